"""The one real end-to-end run: embedded MiniLM teacher, real Rotten Tomatoes data, small budget."""

from __future__ import annotations

import json

import pytest

from layergeo.cli import main

BUDGET = ["data.max_train=1600", "data.max_eval=400", "teacher.train.max_steps=100", "teacher.train.lr=5e-5",
          "train.max_steps=50", "train.eval_every=25", "teacher.train.eval_every=25"]


@pytest.mark.slow
def test_embedded_teacher_and_student_learn_and_angles_run(tmp_path):
    out = tmp_path / "forward"
    args = ["train", "--out", str(out)]
    for item in BUDGET:
        args += ["--set", item]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    dev = results["teacher_results"]["dev"]
    labels = json.loads((out / "teacher" / "checkpoints" / "best" / "config.json").read_text())["id2label"]
    assert labels == {"0": "rotten", "1": "fresh"}
    # 400 dev reviews; the majority class is ~58%: a learning teacher is clearly above it.
    assert dev["accuracy"] > 0.65, dev
    assert results["dev"]["accuracy"] > 0.6, results["dev"]
    assert results["teacher_layers"] == 6 and results["student_layers"] == 3
    assert main(["angles", "--run", str(out), "--checkpoint", "init", "--max-examples", "32"]) == 0
    summary = json.loads((out / "geometry" / "init-student-dev32" / "summary.json").read_text())
    assert summary["n_tokens"] > 32 * 5 and 0.0 <= summary["frac_acute"] <= 1.0
