"""End-to-end training on the tiny preset: run directory contract, reproducibility, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModel, AutoTokenizer

import layergeo.distil as train_module
from layergeo.cli import main
from layergeo.runs import RunDir, read_jsonl


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", "--preset", "tiny", "--out", str(out)]) == 0
    return out


def _train(out: Path, teacher: Path, *overrides: str) -> int:
    args = ["train", "--preset", "tiny", "--out", str(out), "--set", f"teacher.dir={teacher}"]
    for item in overrides:
        args += ["--set", item]
    return main(args)


def test_tiny_preset_writes_the_whole_run_directory(tiny_run):
    for name in ("config.yaml", "env.json", "mapping.jsonl", "metrics.jsonl", "results.json"):
        assert (tiny_run / name).is_file(), name
    for checkpoint in ("init", "best"):
        folder = tiny_run / "checkpoints" / checkpoint
        model = AutoModel.from_pretrained(folder)
        assert model.config.num_hidden_layers == 2
        assert len(AutoTokenizer.from_pretrained(folder)) == model.config.vocab_size
    assert not (tiny_run / "checkpoints" / "last").exists()
    teacher = RunDir(tiny_run / "teacher")
    assert teacher.finished and (teacher.checkpoint("best") / "tokenizer.json").is_file()
    results = json.loads((tiny_run / "results.json").read_text())
    assert results["strategy"] == "forward" and results["init"] == "copy"
    assert 0.0 <= results["dev"]["accuracy"] <= 1.0 and results["test"]["n"] == 64
    env = json.loads((tiny_run / "env.json").read_text())
    assert env["seed"] == 0 and env["versions"]["torch"] == torch.__version__ and "end" in env
    mappings = read_jsonl(tiny_run / "mapping.jsonl")
    assert mappings == [{"epoch": 0, "step": 0, "strategy": "forward", "pairs": [[0, 0], [1, 2], [2, 4]]}]
    terms = read_jsonl(tiny_run / "metrics.jsonl")[0]
    assert {"loss", "ce", "kl", "hidden", "grad_norm", "lr"} <= set(terms)
    assert terms["loss"] == pytest.approx(terms["ce"] + terms["kl"] + 3 * terms["hidden"], rel=1e-5)


def test_init_checkpoint_is_the_untrained_student(tiny_run):
    init = AutoModel.from_pretrained(tiny_run / "checkpoints" / "init")
    best = AutoModel.from_pretrained(tiny_run / "checkpoints" / "best")
    teacher = AutoModel.from_pretrained(tiny_run / "teacher" / "checkpoints" / "best")
    assert torch.equal(init.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight)
    assert not torch.equal(init.embeddings.word_embeddings.weight, best.embeddings.word_embeddings.weight)


def test_same_seed_same_numbers_and_config_reproduces(tiny_run, tmp_path):
    teacher = tiny_run / "teacher"
    assert _train(tmp_path / "a", teacher) == 0
    assert main(["train", "--config", str(tmp_path / "a" / "config.yaml"), "--out", str(tmp_path / "b")]) == 0
    a, b = (read_jsonl(tmp_path / x / "metrics.jsonl") for x in "ab")
    assert a == b
    assert json.loads((tmp_path / "a" / "results.json").read_text())["dev"] == json.loads(
        (tmp_path / "b" / "results.json").read_text()
    )["dev"]
    assert _train(tmp_path / "c", teacher, "seed=1") == 0
    assert read_jsonl(tmp_path / "c" / "metrics.jsonl") != a


def test_resume_after_interruption_matches_an_uninterrupted_run(tiny_run, tmp_path, monkeypatch):
    teacher = tiny_run / "teacher"
    settings = ("train.max_steps=8", "train.eval_every=2", "train.batch_size=16", "train.log_every=1")
    assert _train(tmp_path / "whole", teacher, *settings) == 0

    original = train_module.distillation_losses

    def crashing(*args, **kwargs):
        step_losses = original(*args, **kwargs)

        def wrapped(batch, epoch, step):
            if step == 5:
                raise KeyboardInterrupt
            return step_losses(batch, epoch, step)

        return wrapped

    monkeypatch.setattr(train_module, "distillation_losses", crashing)
    assert _train(tmp_path / "cut", teacher, *settings) == 130
    assert not (tmp_path / "cut" / "results.json").exists()
    monkeypatch.setattr(train_module, "distillation_losses", original)
    assert main(["train", "--out", str(tmp_path / "cut"), "--resume"]) == 0
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    cut = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert cut["dev"] == whole["dev"] and cut["test"] == whole["test"] and cut["steps"] == 8
    last = [r for r in read_jsonl(tmp_path / "cut" / "metrics.jsonl") if r["step"] == 8 and "loss" in r]
    expected = [r for r in read_jsonl(tmp_path / "whole" / "metrics.jsonl") if r["step"] == 8 and "loss" in r]
    assert last[-1]["loss"] == pytest.approx(expected[-1]["loss"], rel=1e-6)


def test_rail_logs_every_realised_mapping(tiny_run, tmp_path):
    assert _train(tmp_path / "rail", tiny_run / "teacher", "matching.strategy=rail", "matching.rail_every_steps=2") == 0
    mappings = read_jsonl(tmp_path / "rail" / "mapping.jsonl")
    assert [m["step"] for m in mappings] == [0, 2, 4, 6]
    for m in mappings:
        teachers = [t for s, t in m["pairs"][1:]]
        assert teachers == sorted(set(teachers)) and len(teachers) == 2 and all(1 <= t <= 4 for t in teachers)


def test_narrow_student_trains_and_saves_projections(tiny_run, tmp_path):
    out = tmp_path / "narrow"
    assert _train(out, tiny_run / "teacher", "student.init=random", "student.hidden_size=32") == 0
    from safetensors.torch import load_file

    init = load_file(out / "checkpoints" / "init" / "projections.safetensors")
    best = load_file(out / "checkpoints" / "best" / "projections.safetensors")
    assert sorted(best) == ["0", "1", "2"] and best["1"].shape == (64, 32)
    assert not torch.equal(init["1"], best["1"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["matching.strategy=sideways"], "sideways"),
        (["student.colour=blue"], "unknown config key 'student.colour'"),
        (["matching.strategy=1:9"], "teacher layer 9 is out of range"),
        (["student.layers=5"], "deeper than its teacher"),
        (["student.copy_layers=1,7"], "out of range"),
        (["data.task=/nonexistent/data.csv"], "data.csv"),
        (["loss.normalize=cosine"], "loss.normalize"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tiny_run, tmp_path, capsys, overrides, message):
    out = tmp_path / "bad"
    assert _train(out, tiny_run / "teacher", *overrides) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_missing_teacher_directory_and_nonempty_out(tmp_path, tiny_run, capsys):
    assert _train(tmp_path / "x", tmp_path / "no-teacher") == 2
    assert "holds no finished teacher run" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--out", str(tiny_run)]) == 2
    assert "is not empty" in capsys.readouterr().err


@pytest.mark.parametrize("content", ["text,label\n", "text\nonly text\nmore text\n"])
def test_empty_or_labelless_dataset(tmp_path, tiny_run, capsys, content):
    data = tmp_path / "data.csv"
    data.write_text(content)
    assert _train(tmp_path / "x", tiny_run / "teacher", f"data.task={data}") == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_term_gradient_norms_and_random_init_budget(tiny_run, tmp_path):
    out = tmp_path / "terms"
    assert _train(out, tiny_run / "teacher", "train.term_grad_norms=true", "student.init=random",
                  "train.random_init_lr=5e-4", "train.random_init_epochs=2") == 0
    records = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert all({"grad_norm_ce", "grad_norm_kl", "grad_norm_hidden"} <= set(r) for r in records)
    assert all(r["grad_norm_hidden"] > 0 for r in records)
    assert records[-1]["step"] == 16  # 2 epochs of 8 steps
    assert max(r["lr"] for r in records) <= 5e-4 and max(r["lr"] for r in records) > 1e-4
    copy = tmp_path / "copy"
    assert _train(copy, tiny_run / "teacher", "train.random_init_epochs=2") == 0
    assert [r for r in read_jsonl(copy / "metrics.jsonl") if "loss" in r][-1]["step"] == 8


def test_default_rail_redraws_within_a_one_epoch_run_and_logs_every_draw(tmp_path):
    out = tmp_path / "rail"
    assert main(["train", "--preset", "tiny", "--set", "device=cpu", "--set", "matching.strategy=rail",
                 "--out", str(out)]) == 0  # 1 epoch of 8 steps; 10 draws by default: a draw every step
    logged = [json.loads(line) for line in (out / "mapping.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(8))
    assert len({json.dumps(r["pairs"]) for r in logged}) >= 2  # several distinct mappings, not one
    saved = yaml.safe_load((out / "config.yaml").read_text())["matching"]
    assert (saved["rail_draws"], saved["rail_every_steps"], saved["shuffle"]) == (10, None, "distinct")


def test_rail_draws_redraws_that_many_times_and_logs_every_draw(tmp_path):
    out = tmp_path / "rail"
    assert main(["train", "--preset", "tiny", "--set", "device=cpu", "--set", "matching.strategy=rail",
                 "--set", "matching.rail_draws=3", "--out", str(out)]) == 0  # 256 examples / 32 = 8 steps
    logged = [json.loads(line) for line in (out / "mapping.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [0, 3, 6]  # a draw every ceil(8 / 3) = 3 steps
    assert all(r["strategy"] == "rail" for r in logged)
