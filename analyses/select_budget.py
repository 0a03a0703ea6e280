"""Pick the random-init training setting from the no-matching and forward students only.

Reads every finished run under a sweep folder (analyses/random_init_budget.yaml), groups the runs
by their knob setting (loss normalisation, alpha_hidden, random-init lr and epochs, warm-up), scores
each setting by the mean dev accuracy of its `forward` students and of the `none` students trained
with the same lr, epochs and warm-up (both must be present),
and prints the ranking and the winner as grid lines for the verdict recipe. Other strategies, if
present, are ignored: the setting must not be chosen by the strategy gap it is meant to measure.

    python analyses/select_budget.py runs/random-init-budget
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from layergeo.report import collect_results

KNOBS = {"loss.normalize": ("loss", "normalize"), "loss.alpha_hidden": ("loss", "alpha_hidden"),
         "train.random_init_lr": ("train", "random_init_lr"), "train.random_init_epochs": ("train", "random_init_epochs"),
         "train.warmup_ratio": ("train", "warmup_ratio")}
SHARED = ["train.random_init_lr", "train.random_init_epochs", "train.warmup_ratio"]  # change every student
MATCHING = ["loss.normalize", "loss.alpha_hidden"]  # change only students with a hidden loss
SELECTION_STRATEGIES = ("none", "forward")


def runs_table(root: Path) -> pd.DataFrame:
    return collect_results(root, KNOBS)


def select(table: pd.DataFrame) -> pd.DataFrame:
    """Settings ranked by the mean of their none and forward students' dev accuracy (best first).

    A setting is a forward student's knobs; its none score is that of the none students with the
    same shared knobs (lr, epochs, warm-up), whose hidden-loss knobs do not matter. Each score is a
    mean over seeds. Students of any other strategy are never read.
    """
    none = table[table.strategy == "none"].groupby(SHARED, dropna=False)["dev_accuracy"].mean().rename("none")
    forward = table[table.strategy == "forward"].groupby(SHARED + MATCHING, dropna=False)["dev_accuracy"].mean().rename("forward")
    ranking = forward.reset_index().merge(none.reset_index(), on=SHARED, how="inner")
    ranking["score"] = ranking[list(SELECTION_STRATEGIES)].mean(axis=1)
    return ranking[MATCHING + SHARED + list(SELECTION_STRATEGIES) + ["score"]].sort_values("score", ascending=False, kind="stable").reset_index(drop=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path)
    args = parser.parse_args(argv)
    ranking = select(runs_table(args.sweep))
    if ranking.empty:
        print(f"no setting under {args.sweep} has both a none and a forward student", file=sys.stderr)
        return 2
    print(ranking.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    best = ranking.iloc[0]
    print("\nchosen setting (put these in the verdict grid's base):")
    for knob in KNOBS:
        print(f"  {knob}: {best[knob]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
