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


def test_a_rail_period_replaces_the_default_draws_and_the_resolved_config_says_so():
    assert load_config(preset="tiny").matching.rail_draws == 10
    period = load_config(preset="tiny", overrides=["matching.rail_every_steps=7"]).matching
    assert (period.rail_every_steps, period.rail_draws) == (7, None)
    both = load_config(preset="tiny", overrides=["matching.rail_draws=4", "matching.rail_every_steps=2"]).matching
    assert (both.rail_every_steps, both.rail_draws) == (2, None)  # the period wins, as max_steps wins over epochs
    per_epoch = load_config(preset="tiny", overrides=["matching.rail_draws=null"]).matching
    assert (per_epoch.rail_every_steps, per_epoch.rail_draws) == (None, None)


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
    config = load_config(path, overrides=["student.layers=1"], complete=False)
    assert config.student.layers == 1
    assert config.train.lr == pytest.approx(1e-3)
    # layered on a preset, a partial file is fine (the preset fills the rest)
    config = load_config(path, preset="tiny")
    assert config.student.layers == 2 and config.teacher.model == "tiny-bert"


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
    config = load_config(path, complete=False)
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


# --------------------------------------------------------------------------------------------
# Ranges: nonsense numbers are refused when the config is loaded, naming the full dotted key


OPTIM_BAD = [
    ("batch_size", "0"), ("batch_size", "-4"),
    ("lr", "0"), ("lr", "-1e-4"), ("lr", "nan"), ("lr", ".inf"), ("lr", "-.inf"),
    ("epochs", "0"), ("epochs", "-1"),
    ("max_steps", "0"), ("max_steps", "-3"),
    ("warmup_ratio", "-0.1"), ("warmup_ratio", "1"), ("warmup_ratio", "1.5"), ("warmup_ratio", "nan"),
    ("grad_clip", "0"), ("grad_clip", "-1"), ("grad_clip", "nan"), ("grad_clip", ".inf"),
    ("eval_every", "0"), ("eval_every", "-1"),
    ("log_every", "0"), ("log_every", "-2"),
    ("early_stop", "0"), ("early_stop", "-1"),
    ("weight_decay", "-0.01"), ("weight_decay", "nan"), ("weight_decay", ".inf"),
    ("random_init_lr", "0"), ("random_init_lr", "-1"), ("random_init_lr", "nan"), ("random_init_lr", ".inf"),
    ("random_init_epochs", "0"), ("random_init_epochs", "-1"),
    ("cache_dtype", "bfloat16"), ("cache_dtype", "float64"),
]
OTHER_BAD = [
    ("seed", "-1"), ("seed", "4294967296"),
    ("data.max_length", "1"), ("data.max_length", "0"), ("data.max_length", "-64"),
    ("data.max_train", "0"), ("data.max_train", "-1"), ("data.max_eval", "0"), ("data.max_eval", "-5"),
    ("student.layers", "0"), ("student.layers", "-1"),
    ("student.hidden_size", "0"), ("student.hidden_size", "-192"),
    ("student.intermediate_size", "0"), ("student.num_heads", "0"), ("student.num_heads", "-2"),
    ("student.copy_layers", "0,1"), ("student.copy_layers", "-1,2"),
    ("student.init", "pretrained"),
    ("loss.temperature", "0"), ("loss.temperature", "-1"), ("loss.temperature", "nan"), ("loss.temperature", ".inf"),
    ("loss.alpha_ce", "-1"), ("loss.alpha_kl", "nan"), ("loss.alpha_hidden", ".inf"), ("loss.alpha_hidden", "-0.5"),
    ("loss.normalize", "batchnorm"),
    ("matching.strategy", "backwards"), ("matching.strategy", "1:x"), ("matching.strategy", "-1:2"),
    ("matching.target", "-1"), ("matching.rail_every_steps", "0"), ("matching.shuffle", "some"),
    ("matching.pairs", "1-4"),
]


@pytest.mark.parametrize("section", ["train", "teacher.train"])
@pytest.mark.parametrize("name, value", OPTIM_BAD, ids=[f"{n}={v}" for n, v in OPTIM_BAD])
def test_optimiser_values_out_of_range_named_by_full_key(section, name, value):
    key = f"{section}.{name}"
    with pytest.raises(LayergeoError) as info:
        load_config(preset="tiny", overrides=[f"{key}={value}"])
    message = str(info.value)
    assert repr(key) in message and "\n" not in message
    if section == "train":  # 'train.epochs' is a substring of 'teacher.train.epochs': the other way round only
        assert "teacher.train." not in message
    for other in ("batch_size", "epochs", "lr", "max_steps"):  # a bad batch size is not blamed on the epochs
        if other != name:
            assert f"{section}.{other}'" not in message


@pytest.mark.parametrize("key, value", OTHER_BAD, ids=[f"{k}={v}" for k, v in OTHER_BAD])
def test_values_out_of_range_named(key, value):
    with pytest.raises(LayergeoError) as info:
        load_config(preset="tiny", overrides=[f"{key}={value}"])
    message = str(info.value)
    assert repr(key) in message and "\n" not in message


def test_out_of_range_message_says_key_value_and_range():
    with pytest.raises(LayergeoError) as info:
        load_config(overrides=["train.batch_size=-4"])
    assert str(info.value) == "config key 'train.batch_size' got -4, which is out of range: it must be an integer >= 1"
    with pytest.raises(LayergeoError, match=r"'teacher.train.lr' got nan, .*finite number > 0"):
        load_config(overrides=["teacher.train.lr=nan"])
    with pytest.raises(LayergeoError, match=r"'train.warmup_ratio' got 1.0, .*>= 0 and < 1"):
        load_config(overrides=["train.warmup_ratio=1"])


def test_epochs_may_be_zero_when_max_steps_sets_the_budget():
    config = load_config(preset="tiny", overrides=["train.epochs=0", "train.max_steps=5"])
    assert config.train.epochs == 0 and config.train.max_steps == 5
    with pytest.raises(LayergeoError, match="'train.epochs'"):
        load_config(preset="tiny", overrides=["train.epochs=-1", "train.max_steps=5"])


@pytest.mark.parametrize("overrides", [
    ["train.warmup_ratio=0", "train.weight_decay=0", "loss.alpha_hidden=0", "loss.alpha_kl=0"],
    ["seed=4294967295", "data.max_length=2", "student.copy_layers=1,2", "matching.target=0"],
    ["train.grad_clip=1e9", "loss.temperature=0.1", "train.random_init_lr=5e-4", "train.random_init_epochs=1"],
    ["matching.strategy=explicit", "matching.pairs=1:2,2:4"], ["matching.strategy=1:4,2:8"],
    ["student.init=random", "student.copy_layers=[1, 3]"],
    ["train.cache_dtype=float32", "loss.normalize=l2", "matching.shuffle=any", "matching.rail_every_steps=1"],
])
def test_edges_of_the_ranges_are_allowed(overrides):
    load_config(preset="tiny", overrides=overrides)


def test_copy_layers_must_name_one_teacher_layer_per_student_layer():
    with pytest.raises(LayergeoError, match="'student.copy_layers'.*2-layer student"):
        load_config(preset="tiny", overrides=["student.copy_layers=1,2,3"])


@pytest.mark.parametrize("overrides", [
    ["loss.alpha_ce=0", "loss.alpha_kl=0", "loss.alpha_hidden=0"],
    ["loss.alpha_ce=0", "loss.alpha_kl=0", "matching.strategy=none"],
])
def test_a_loss_of_zero_is_refused(overrides):
    with pytest.raises(LayergeoError, match="loss.alpha_ce"):
        load_config(preset="tiny", overrides=overrides)


def test_explicit_strategy_needs_pairs():
    with pytest.raises(LayergeoError, match="matching.pairs"):
        load_config(overrides=["matching.strategy=explicit"])


# --------------------------------------------------------------------------------------------
# Empty and truncated files never silently start the default job


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "~\n", "null\n", "{}\n", "---\n"])
@pytest.mark.parametrize("preset", [None, "tiny"])
def test_empty_config_file_is_an_error(tmp_path, text, preset):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(LayergeoError, match=f"config file {path} is empty"):
        load_config(path, preset=preset)


def test_truncated_saved_config_is_refused_naming_the_missing_sections(tmp_path):
    full = dump_yaml(load_config(preset="tiny"))
    path = tmp_path / "config.yaml"
    path.write_text(full)
    assert load_config(path) == load_config(preset="tiny")
    cut = full[: full.index("\nstudent:") + 1]  # the file ends after the teacher section
    path.write_text(cut)
    with pytest.raises(LayergeoError) as info:
        load_config(path)
    message = str(info.value)
    assert "student, matching, loss, train" in message and "saved config.yaml has them all" in message
    assert "\n" not in message
    # the same partial file on top of a preset is a deliberate partial config
    assert load_config(path, preset="tiny") == load_config(preset="tiny")
    assert load_config(path, complete=False).teacher.model == "tiny-bert"


def test_config_file_that_is_a_folder_or_not_utf8(tmp_path):
    with pytest.raises(LayergeoError, match="is a folder"):
        load_config(tmp_path)
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"data: {task: caf\xe9}\n")
    with pytest.raises(LayergeoError, match="not UTF-8"):
        load_config(path, preset="tiny")


# --------------------------------------------------------------------------------------------
# Everything shipped still loads


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_loads_and_round_trips_complete(preset, tmp_path):
    config = load_config(preset=preset)
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(config))
    assert load_config(path) == config  # a saved config is complete


def _shipped_grids():
    from pathlib import Path

    root = Path(__file__).parents[1]
    return sorted([*(root / "analyses").glob("*.yaml"), *(root / "figures").glob("*/grid.yaml")])


@pytest.mark.parametrize("grid_file", _shipped_grids(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_config_of_every_shipped_grid_loads(grid_file, tmp_path):
    from layergeo.sweep import load_grid, plan

    teachers, runs = plan(load_grid(grid_file), tmp_path)
    assert runs
    for config in [*teachers.values(), *(r.config for r in runs)]:
        path = tmp_path / "config.yaml"
        path.write_text(dump_yaml(config))
        assert load_config(path) == config
