"""Tests for layergeo.config: defaults, presets, --set overrides, type checks and YAML round trips."""

import dataclasses

import pytest
import yaml

from layergeo.config import (
    DataConfig,
    LossConfig,
    OptimConfig,
    RunConfig,
    StudentConfig,
    TeacherConfig,
    dump_yaml,
    from_dict,
    load_config,
    preset_names,
    to_dict,
)
from layergeo.errors import LayergeoError
from layergeo.strategies import MappingOptions


def test_defaults_load():
    config = load_config()
    assert config == RunConfig()
    assert isinstance(config.data, DataConfig) and isinstance(config.matching, MappingOptions)
    assert config.seed == 0 and config.device == "auto"
    assert config.student.layers == 3 and config.student.init == "copy" and config.student.copy_layers is None
    assert config.matching.strategy == "forward" and config.matching.embeddings is True
    assert config.loss.alpha_hidden == 3.0 and config.loss.normalize == "none"
    assert config.train.lr == 1e-4
    # the teacher has its own optimiser defaults
    assert config.teacher.train.lr == 5e-5 and config.teacher.train.epochs == 1
    assert config.teacher.train is not config.train


def test_preset_names():
    assert {"default", "tiny"} <= set(preset_names())


def test_preset_default():
    config = load_config(preset="default")
    assert config.teacher.model == "minilm"
    assert config.teacher.train.eval_every == 100 and config.teacher.train.lr == 5e-5
    assert config.train.eval_every == 100 and config.train.lr == 1e-4
    assert config.data.max_length == 64
    assert config.student.layers == 3


def test_preset_tiny():
    config = load_config(preset="tiny")
    assert config.teacher.model == "tiny-bert"
    assert config.data.max_train == 256 and config.data.max_eval == 64 and config.data.max_length == 32
    assert config.student.layers == 2
    assert config.teacher.train.lr == 1e-3 and config.teacher.train.log_every == 2
    assert config.train.lr == 1e-3
    # keys the preset leaves out keep their defaults
    assert config.train.weight_decay == OptimConfig().weight_decay
    assert config.loss == LossConfig()


def test_unknown_preset():
    with pytest.raises(LayergeoError, match="unknown preset"):
        load_config(preset="huge")


def test_overrides_nested_and_coerced():
    config = load_config(
        preset="tiny",
        overrides=[
            "seed=3",
            "student.layers=4",
            "loss.temperature=2",
            "loss.alpha_hidden=0.5",
            "train.lr=1e-4",
            "matching.embeddings=false",
            "matching.strategy=reverse",
            "data.max_train=null",
            "student.copy_layers=2,4,6,8",
            "teacher.train.epochs=3",
            "device=cpu",
        ],
    )
    assert config.seed == 3 and type(config.seed) is int
    assert config.student.layers == 4 and type(config.student.layers) is int
    assert config.loss.temperature == 2.0 and type(config.loss.temperature) is float
    assert config.loss.alpha_hidden == 0.5
    assert config.train.lr == pytest.approx(1e-4) and type(config.train.lr) is float
    assert config.matching.embeddings is False
    assert config.matching.strategy == "reverse"
    assert config.data.max_train is None
    assert config.student.copy_layers == [2, 4, 6, 8]
    assert all(type(k) is int for k in config.student.copy_layers)
    assert config.teacher.train.epochs == 3
    assert config.teacher.train.lr == 1e-3  # from the preset, untouched by the nested override
    assert config.device == "cpu"
    # untouched preset values survive
    assert config.data.max_eval == 64 and config.teacher.model == "tiny-bert"


@pytest.mark.parametrize("value", ["2,4,6", "[2, 4, 6]", "2, 4, 6"])
def test_list_override_forms(value):
    assert load_config(overrides=[f"student.copy_layers={value}"]).student.copy_layers == [2, 4, 6]


def test_override_later_wins_and_bool_forms():
    config = load_config(overrides=["student.layers=2", "student.layers=5"])
    assert config.student.layers == 5
    assert load_config(overrides=["matching.embeddings=true"]).matching.embeddings is True
    assert load_config(overrides=["matching.embeddings=False"]).matching.embeddings is False
    # a numeric string is still a string for str keys
    assert load_config(overrides=["matching.strategy=1:4,2:8,3:12"]).matching.strategy == "1:4,2:8,3:12"
    assert load_config(overrides=["student.hidden_size=192"]).student.hidden_size == 192


@pytest.mark.parametrize(
    "override, key",
    [
        ("bogus=1", "bogus"),
        ("student.depth=3", "student.depth"),
        ("teacher.train.speed=2", "teacher.train.speed"),
        ("loss.alpah_kl=1", "loss.alpah_kl"),
    ],
)
def test_unknown_key_named(override, key):
    with pytest.raises(LayergeoError) as info:
        load_config(overrides=[override])
    assert repr(key) in str(info.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("student.layers=three", "student.layers"),
        ("student.layers=2.5", "student.layers"),
        ("student.layers=true", "student.layers"),
        ("train.lr=fast", "train.lr"),
        ("train.lr=true", "train.lr"),
        ("matching.embeddings=maybe", "matching.embeddings"),
        ("matching.embeddings=1", "matching.embeddings"),
        ("data.task=null", "data.task"),
        ("student.copy_layers=a,b", "student.copy_layers"),
        ("student.copy_layers=4", "student.copy_layers"),
        ("seed=[1, 2]", "seed"),
    ],
)
def test_wrong_type(override, key):
    with pytest.raises(LayergeoError) as info:
        load_config(overrides=[override])
    assert repr(key) in str(info.value)


def test_section_must_be_mapping_and_override_syntax():
    with pytest.raises(LayergeoError):
        load_config(overrides=["student=3"])
    with pytest.raises(LayergeoError, match="key=value"):
        load_config(overrides=["student.layers"])
    with pytest.raises(LayergeoError):
        load_config(overrides=["=3"])


@pytest.mark.parametrize("override", ["student.copy_layers=[2,4", "data.task={x", "student.copy_layers=a,{b"])
def test_override_not_yaml(override):
    with pytest.raises(LayergeoError):
        load_config(overrides=[override])


def test_layer_pairs_stay_strings():
    # YAML 1.1 would read 1:9 as the base-60 integer 69
    assert load_config(overrides=["matching.strategy=1:9"]).matching.strategy == "1:9"
    assert load_config(overrides=["matching.pairs=1:4,2:8"]).matching.pairs == "1:4,2:8"


def test_yaml_round_trip(tmp_path):
    config = load_config(
        preset="tiny",
        overrides=["student.copy_layers=1,3", "matching.strategy=rail", "matching.rail_every_steps=7",
                   "train.lr=3e-5", "loss.normalize=l2", "teacher.dir=/tmp/teacher"],
    )
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(config))
    again = load_config(path)
    assert again == config
    assert dataclasses.asdict(again) == to_dict(config)
    assert yaml.safe_load(path.read_text())["student"]["copy_layers"] == [1, 3]
    # and the defaults round-trip too
    path.write_text(dump_yaml(RunConfig()))
    assert load_config(path) == RunConfig()


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("student: {layers: 2}\ntrain: {lr: 1e-3}\n")
    config = load_config(path, overrides=["student.layers=1"])
    assert config.student.layers == 1
    assert config.train.lr == pytest.approx(1e-3)


def test_bad_files(tmp_path):
    with pytest.raises(LayergeoError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("student: {layers: [\n")
    with pytest.raises(LayergeoError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(LayergeoError):
        load_config(listy)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("student: {layerz: 2}\n")
    with pytest.raises(LayergeoError, match="student.layerz"):
        load_config(unknown)


def test_teacher_train_defaults_survive_partial_override(tmp_path):
    config = load_config(overrides=["teacher.train.epochs=4"])
    assert config.teacher.train.epochs == 4
    assert config.teacher.train.lr == 5e-5  # teacher default, not the student's 1e-4
    assert config.train.lr == 1e-4 and config.train.epochs == 1
    path = tmp_path / "t.yaml"
    path.write_text("teacher:\n  model: tiny-bert\n  train: {batch_size: 8}\n")
    config = load_config(path)
    assert config.teacher.train.batch_size == 8 and config.teacher.train.lr == 5e-5
    assert config.teacher.model == "tiny-bert"
    # an override of teacher.model alone keeps the whole teacher.train section
    config = load_config(overrides=["teacher.model=tiny-bert"])
    assert config.teacher.train == TeacherConfig().train
    assert config.teacher.train != OptimConfig()


def test_from_dict_direct():
    student = from_dict(StudentConfig, {"layers": 2, "hidden_size": 16})
    assert student == StudentConfig(layers=2, hidden_size=16)
    with pytest.raises(LayergeoError):
        from_dict(StudentConfig, [1, 2])
