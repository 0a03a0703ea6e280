"""The verdict-full run length is chosen by the recipe's rule from a none pilot's dev accuracy alone."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from layergeo.cli import main
from layergeo.errors import LayergeoError

spec = importlib.util.spec_from_file_location("pilot_length", Path(__file__).parents[1] / "analyses" / "pilot_length.py")
pilot_length = importlib.util.module_from_spec(spec)
sys.modules["pilot_length"] = pilot_length  # its dataclass looks its module up
spec.loader.exec_module(pilot_length)


def test_the_recipes_two_bbc_news_decisions():
    copied = [(32, 0.917), (53, 0.961), (100, 0.966), (159, 0.981), (320, 0.976), (795, 0.971)]  # 15 epochs planned
    length = pilot_length.choose_length(copied, steps_per_epoch=53, planned_epochs=15)
    assert (length.first_step, length.epochs, length.steps, length.is_planned) == (159, 7, 371, False)  # 320 steps floor
    random = [(100, 0.5), (530, 0.95), (795, 0.976), (1060, 0.978)]
    length = pilot_length.choose_length(random, steps_per_epoch=53, planned_epochs=20)
    assert (length.first_step, length.epochs, length.is_planned) == (795, 20, True)  # 23 epochs, capped at 20


def test_the_rule_against_a_brute_force_on_random_curves():
    rng = np.random.default_rng(0)
    for _ in range(200):
        spe, planned = int(rng.integers(5, 400)), int(rng.integers(1, 30))
        steps = sorted(set(rng.integers(1, spe * planned + 1, size=int(rng.integers(1, 12))).tolist()))
        dev = [(s, float(rng.choice([0.5, 0.8, 0.9, 0.903, 0.9049, 0.905, 0.91]))) for s in steps]
        best = max(a for _, a in dev)
        first = next(s for s, a in dev if a >= best - 0.005)
        candidates = [e for e in range(1, 10_000) if e * spe >= 1.5 * first and e * spe >= 320]
        assert pilot_length.choose_length(dev, spe, planned).epochs == min(candidates[0], planned)
        assert candidates[0] == max(math.ceil(1.5 * first / spe), math.ceil(320 / spe))


def test_a_pilot_run_directory_is_read_and_a_matching_student_refused(tmp_path, capsys):
    settings = ("matching.strategy=none", "train.epochs=2", "train.eval_steps=[2]")
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "none"), *(a for s in settings for a in ("--set", s))]) == 0
    assert pilot_length.main([str(tmp_path / "none")]) == 0
    out = capsys.readouterr().out
    assert "of 2 planned" in out and "steps)" in out
    length = pilot_length.pilot_length(tmp_path / "none")
    assert length.planned_epochs == 2 and length.steps == length.epochs * 8  # 256 examples / batch 32
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "forward")]) == 0
    capsys.readouterr()
    assert pilot_length.main([str(tmp_path / "forward")]) == 2
    err = capsys.readouterr().err
    assert "trained with strategy 'forward'" in err and len(err.strip().splitlines()) == 1


def test_a_pilot_without_dev_evaluations_is_refused():
    with pytest.raises(LayergeoError, match="no dev evaluations"):
        pilot_length.choose_length([], 10, 3)
