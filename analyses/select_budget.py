"""Pick the random-init training setting from the no-matching and forward students only.

Reads every finished run under a sweep folder (analyses/random_init_budget.yaml), groups the runs
by their knob setting (loss normalisation, alpha_hidden, random-init lr and epochs, warm-up), scores
each setting by the mean dev accuracy of its `forward` students and of the `none` students trained
with the same lr, epochs and warm-up (both must be present),
and prints the ranking and the winner as grid lines for the verdict recipe. Other strategies, if
present, are ignored. The `none` students do not depend on the hidden-loss knobs, so among settings of
one lr, epochs and warm-up the choice is decided by forward's dev accuracy alone and can favour forward
against none; analyses/pilot_length.py picks run lengths from the none students alone instead (the
full-split verdict's rule).
With --out it also writes ranking.csv, selection.json (the winner, its scores and the dev
majority-class rate they must beat) and loss_terms.png/.pdf (the loss terms and gradient norms
of the none and forward students at the winner's lr, epochs and warm-up, one line per
normalisation and alpha_hidden).

    python analyses/select_budget.py runs/random-init-budget [--out figures/random_init_budget]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from layergeo import plots
from layergeo.errors import LayergeoError
from layergeo.figures import loss_terms
from layergeo.report import collect_results
from layergeo.runs import write_json, write_text

KNOBS = {"loss.normalize": ("loss", "normalize"), "loss.alpha_hidden": ("loss", "alpha_hidden"),
         "train.random_init_lr": ("train", "random_init_lr"), "train.random_init_epochs": ("train", "random_init_epochs"),
         "train.warmup_ratio": ("train", "warmup_ratio")}
SHARED = ["train.random_init_lr", "train.random_init_epochs", "train.warmup_ratio"]  # change every student
MATCHING = ["loss.normalize", "loss.alpha_hidden"]  # change only students with a hidden loss
SELECTION_STRATEGIES = ("none", "forward")


def runs_table(root: Path) -> pd.DataFrame:
    """Finished students with their knobs; an unset random-init lr or epochs is the train value it falls back to."""
    table = collect_results(root, {**KNOBS, "train.lr": ("train", "lr"), "train.epochs": ("train", "epochs")})
    for knob, fallback in (("train.random_init_lr", "train.lr"), ("train.random_init_epochs", "train.epochs")):
        table[knob] = table[knob].fillna(table[fallback]).astype(float)
    return table


def majority_rate(table: pd.DataFrame) -> float:
    """Dev accuracy (%) of always predicting the most common dev label, as the runs recorded it, mean over (task, seed)."""
    if "dev_majority_rate" not in table or table["dev_majority_rate"].isna().any():
        raise LayergeoError("some runs do not record the dev majority-class rate (made before layergeo recorded it); rerun them")
    return float(table.drop_duplicates(["task", "seed"])["dev_majority_rate"].mean())


def setting_curves(root: Path, table: pd.DataFrame, best: pd.Series) -> pd.DataFrame:
    """Loss terms of the none and forward students at the winner's shared knobs; 'strategy' names the setting."""
    same = (table[SHARED] == best[SHARED]).all(axis=1) & table.strategy.isin(SELECTION_STRATEGIES)
    labels = {row.run: "none" if row.strategy == "none"
              else f"forward, {row['loss.normalize']}, α={row['loss.alpha_hidden']:g}" for _, row in table[same].iterrows()}
    terms = loss_terms(root)
    terms = terms[terms.run.isin(labels)]
    return terms.assign(strategy=terms.run.map(labels))[["strategy", "step", "term", "value"]]


def _plain(value):
    """A knob value as JSON writes it: numpy scalars unwrapped, whole floats (epochs) as int."""
    value = value.item() if hasattr(value, "item") else value
    return int(value) if isinstance(value, float) and value.is_integer() else value


def write_selection(root: Path, table: pd.DataFrame, ranking: pd.DataFrame, out: Path) -> None:
    best = ranking.iloc[0]
    write_text(out / "ranking.csv", ranking.to_csv(index=False))
    write_json(out / "selection.json", {
        "sweep": str(root), "rule": "highest mean dev accuracy of the none and forward students (mean over seeds)",
        "chosen": {knob: _plain(best[knob]) for knob in KNOBS},
        "dev_accuracy": {"none": round(float(best["none"]), 2), "forward": round(float(best["forward"]), 2)},
        "dev_majority_class_rate": round(majority_rate(table), 2),
        "seeds": sorted(int(s) for s in table.seed.unique()), "students": int(len(table)),
    })
    title = (f"Random-init students, lr {best['train.random_init_lr']:g}, {best['train.random_init_epochs']:g} epochs "
             "(mean over seeds)")
    plots.save_figure(plots.loss_curves(setting_curves(root, table, best), title, legend_title="Setting"), out / "loss_terms")


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


def run(sweep: Path, out: Path | None) -> int:
    table = runs_table(sweep)
    ranking = select(table)
    if ranking.empty:
        raise LayergeoError(f"no setting under {sweep} has both a none and a forward student")
    print(ranking.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    best = ranking.iloc[0]
    print("\nchosen setting (put these in the verdict grid's base):")
    for knob in KNOBS:
        print(f"  {knob}: {_plain(best[knob])}")
    print(f"dev majority-class rate: {majority_rate(table):.2f}")
    if out:
        write_selection(sweep, table, ranking, out)
        print(f"wrote {out}/ranking.csv, selection.json, loss_terms.png/.pdf")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--out", type=Path, help="also write ranking.csv, selection.json and loss_terms.png/.pdf here")
    args = parser.parse_args(argv)
    try:
        return run(args.sweep, args.out)
    except LayergeoError as exc:
        print(f"select_budget: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
