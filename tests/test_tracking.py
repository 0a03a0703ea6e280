"""Accelerate's trackers: TensorBoard's local writer receives what metrics.jsonl and the trace record, and a
run with a tracker trains exactly as one without."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from layergeo.cli import main
from layergeo.runs import read_jsonl
from layergeo.trace import trace_tables
from layergeo.tracking import flat_settings

SETTINGS = ("train.max_steps=6", "train.eval_every=3", "train.log_every=2", "train.batch_size=16",
            "trace.every=2", "trace.examples=12")


def _train(out: Path, *overrides: str) -> int:
    args = ["train", "--preset", "tiny", "--out", str(out)]
    for item in overrides:
        args += ["--set", item]
    return main(args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """(a run logged to TensorBoard, the same run without trackers), sharing one teacher."""
    root = tmp_path_factory.mktemp("tracking")
    assert _train(root / "tracked", *SETTINGS, "train.log_with=tensorboard") == 0
    assert _train(root / "plain", *SETTINGS, f"teacher.dir={root / 'tracked' / 'teacher'}") == 0
    return root / "tracked", root / "plain"


def _scalars(run: Path) -> dict[str, dict[int, float]]:
    (folder,) = (run / "trackers").iterdir()  # one project: the run's name
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_tensorboard_receives_the_losses_the_evaluations_and_the_trace(runs):
    tracked, _ = runs
    scalars = _scalars(tracked)
    records = read_jsonl(tracked / "metrics.jsonl")
    train = [r for r in records if "split" not in r]
    assert [r["step"] for r in train] == [2, 4, 6]
    for name in ("loss", "ce", "kl", "hidden", "lr", "grad_norm"):
        assert scalars[f"train/{name}"] == pytest.approx({r["step"]: r[name] for r in train}, rel=1e-6), name
    dev = [r for r in records if r.get("split") == "dev"]
    assert [r["step"] for r in dev] == [3, 6]
    assert scalars["dev/accuracy"] == pytest.approx({r["step"]: r["accuracy"] for r in dev}, rel=1e-6)
    angles, distances = trace_tables(tracked)
    assert sorted(scalars["trace/encoder/frac_acute"]) == [0, 2, 4, 6]
    # token-weighted over the authors' cells (student layers >= 1, teacher pairs among layers >= 1), as summary.json
    deep = angles[(angles.student_layer >= 1) & (angles.teacher_i >= 1) & (angles.n_tokens > 0)]
    for column in ("frac_acute", "mean_thales_ratio"):
        expected = {step: np.average(rows[column], weights=rows.n_tokens) for step, rows in deep.groupby("step")}
        assert scalars[f"trace/encoder/{column}"] == pytest.approx(expected, rel=1e-6)
    assert scalars["trace/encoder/distance"] == pytest.approx(distances.groupby("step").distance.mean().to_dict(), rel=1e-5)


def test_a_tracker_changes_nothing_the_run_records(runs):
    tracked, plain = runs
    assert read_jsonl(tracked / "metrics.jsonl") == read_jsonl(plain / "metrics.jsonl")
    assert trace_tables(tracked)[0].equals(trace_tables(plain)[0])
    results = [json.loads((run / "results.json").read_text()) for run in runs]
    assert results[0]["dev"] == results[1]["dev"] and results[0]["test"] == results[1]["test"]
    assert not (plain / "trackers").exists()


def test_the_run_settings_reach_tensorboard_as_flat_scalars():
    flat = flat_settings({"train": {"lr": 1e-4, "eval_steps": [32, 100], "log_with": None}, "seed": 3})
    assert flat == {"train.lr": 1e-4, "train.eval_steps": "[32, 100]", "train.log_with": "None", "seed": 3}
