"""`layergeo lm-eval`: the harness is called on the merged student folder and its results are kept; bad input is
one line. The harness itself needs a network (its datasets), so a stand-in module takes its place here."""

import json
import sys
import types

import pytest

from layergeo.cli import main
from layergeo.config import load_config
from layergeo.runs import RunDir, write_config


def fake_run(root, family="causal", saved=True):
    """A run folder with a complete config of ``family`` and, if ``saved``, a merged checkpoint's config.json."""
    root.mkdir()
    write_config(RunDir(root), load_config(preset="causal-tiny" if family == "causal" else "tiny"))
    if saved:
        (root / "checkpoints" / "best").mkdir(parents=True)
        (root / "checkpoints" / "best" / "config.json").write_text("{}")
    return root


@pytest.fixture
def harness(monkeypatch):
    calls = []

    def simple_evaluate(**kwargs):
        calls.append(kwargs)
        return {"results": {task: {"acc,none": 0.25, "acc_stderr,none": float("nan")} for task in kwargs["tasks"]}}

    module = types.ModuleType("lm_eval")
    module.simple_evaluate, module.__version__ = simple_evaluate, "0.0-test"
    monkeypatch.setitem(sys.modules, "lm_eval", module)
    return calls


def test_the_merged_student_is_scored_and_the_results_kept(tmp_path, harness, capsys):
    run = fake_run(tmp_path / "run")
    assert main(["lm-eval", "--run", str(run), "--tasks", "hellaswag, coqa", "--limit", "5"]) == 0
    (call,) = harness
    assert call["model"] == "hf" and call["model_args"] == {"pretrained": str(run / "checkpoints" / "best"), "dtype": "float32"}
    assert call["tasks"] == ["hellaswag", "coqa"] and call["limit"] == 5 and call["device"] == "cpu"
    record = json.loads((run / "lm_eval" / "best.json").read_text())
    assert record["results"]["coqa"] == {"acc,none": 0.25, "acc_stderr,none": None}  # NaN kept as null, strict JSON
    assert record["lm_eval_version"] == "0.0-test" and record["tasks"] == ["hellaswag", "coqa"]
    assert "lm_eval/best.json" in capsys.readouterr().out


@pytest.mark.parametrize("case, message", [
    ("encoder", "lm-eval scores decoder-only"),
    ("unsaved", "holds no saved model"),
    ("not_a_run", "is not a layergeo run directory"),
    ("no_tasks", "--tasks names no task"),
    ("limit", "--limit must be at least 1"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, harness, capsys, case, message):
    run = {"encoder": lambda: fake_run(tmp_path / "run", family="encoder"),
           "unsaved": lambda: fake_run(tmp_path / "run", saved=False),
           "not_a_run": lambda: tmp_path}.get(case, lambda: fake_run(tmp_path / "run"))()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    extra = {"no_tasks": ["--tasks", " , "], "limit": ["--tasks", "hellaswag", "--limit", "0"]}.get(case, ["--tasks", "hellaswag"])
    assert main(["lm-eval", "--run", str(run), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before and not harness


def test_without_the_harness_installed_the_message_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    run = fake_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import fails as if not installed
    assert main(["lm-eval", "--run", str(run), "--tasks", "hellaswag"]) == 2
    assert "pip install 'layergeo[lm-eval]'" in capsys.readouterr().err and not (run / "lm_eval").exists()


def test_a_failing_harness_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    run = fake_run(tmp_path / "run")
    module = types.ModuleType("lm_eval")

    def simple_evaluate(**kwargs):
        raise ConnectionError("cannot reach huggingface.co\nmore detail")

    module.simple_evaluate = simple_evaluate
    monkeypatch.setitem(sys.modules, "lm_eval", module)
    assert main(["lm-eval", "--run", str(run), "--tasks", "hellaswag"]) == 2
    err = capsys.readouterr().err
    assert "ConnectionError: cannot reach huggingface.co (`lm-eval --tasks list`" in err and err.count("\n") == 1
    assert not (run / "lm_eval").exists()
