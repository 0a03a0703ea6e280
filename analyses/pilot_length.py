"""The run length of one dataset and init in analyses/verdict-full.yaml, from its `none` pilot student alone.

The rule (written in the recipe before any pilot ran): find the first dev evaluation whose accuracy is within
0.5 points of the pilot's best dev accuracy; multiply its step by 1.5 and round up to whole epochs; then raise the
result to at least 320 steps (so the 320-step budget exists) and cap it at the pilot's own planned length.
Only the pilot's dev accuracy is read: no strategy's result can move the choice.

    python analyses/pilot_length.py SWEEP/verdict-full/runs/rotten_tomatoes_copy_none_seed0

prints the chosen epochs and steps and whether the pilot is the grid's own none run (the chosen length equals the
planned one) or must be kept aside (the grid's none run is then trained at the chosen length).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from layergeo.distil import student_optim
from layergeo.errors import LayergeoError
from layergeo.runs import RunDir, read_jsonl

TOLERANCE = 0.005  # 0.5 accuracy points
STRETCH = 1.5
MIN_STEPS = 320


@dataclass(frozen=True)
class Length:
    first_step: int  # the first dev evaluation within TOLERANCE of the best
    best: float  # the pilot's best dev accuracy
    epochs: int  # the chosen length
    steps: int
    planned_epochs: int

    @property
    def is_planned(self) -> bool:
        return self.epochs == self.planned_epochs


def choose_length(dev: list[tuple[int, float]], steps_per_epoch: int, planned_epochs: int) -> Length:
    """The rule above on a pilot's dev evaluations ``[(step, accuracy)]``."""
    if not dev:
        raise LayergeoError("the pilot has no dev evaluations in metrics.jsonl; train it with dev evaluations on")
    best = max(accuracy for _, accuracy in dev)
    first = min(step for step, accuracy in dev if accuracy >= best - TOLERANCE)
    epochs = math.ceil(STRETCH * first / steps_per_epoch)
    epochs = max(epochs, math.ceil(MIN_STEPS / steps_per_epoch))
    epochs = min(epochs, planned_epochs)
    return Length(first, best, epochs, epochs * steps_per_epoch, planned_epochs)


def pilot_length(path: Path) -> Length:
    """The rule applied to a finished none student run directory."""
    run = RunDir(path)
    config, results = run.config(), run.results()
    if config.matching.strategy != "none":
        raise LayergeoError(f"{path} trained with strategy {config.matching.strategy!r}; the length is chosen from a none "
                            "student only")
    planned = student_optim(config).epochs
    if config.train.max_steps or not planned:
        raise LayergeoError(f"{path} was not trained for whole epochs (train.max_steps set); the rule counts epochs")
    dev = [(row["step"], row["accuracy"]) for row in read_jsonl(run.metrics_file) if row.get("split") == "dev"]
    return choose_length(dev, results["steps"] // planned, planned)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pilot", type=Path, help="a finished none student run directory")
    args = parser.parse_args(argv)
    try:
        length = pilot_length(args.pilot)
    except LayergeoError as exc:
        print(f"pilot_length: error: {exc}", file=sys.stderr)
        return 2
    where = ("the pilot is the grid's own none run" if length.is_planned
             else f"keep the pilot aside; the grid trains {length.epochs} epochs")
    print(f"best dev {100 * length.best:.1f}%, first within {100 * TOLERANCE:.1f} points at step {length.first_step}: "
          f"{length.epochs} epochs ({length.steps} steps) of {length.planned_epochs} planned; {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
