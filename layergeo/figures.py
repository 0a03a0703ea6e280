"""``layergeo figures RUNS_DIR``: the comparison figures of a sweep.

Metric per strategy and init with the seed spread; the angle heatmaps faceted by
strategy; the fraction of acute angles per strategy, untrained vs trained; the
histograms of cosines per strategy, ours and the authors' per-token means; the loss
terms during training. Angle analyses already written by the sweep are reused;
missing ones are computed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from layergeo import plots
from layergeo.analyse import AngleOptions, compare_runs, expand_runs
from layergeo.columns import split_column
from layergeo.report import collect_results
from layergeo.runs import read_jsonl

METRIC_LABELS = {"test_accuracy": "Test accuracy (%)", "test_macro_f1": "Test macro-F1 (%)", "dev_accuracy": "Dev accuracy (%)",
                 "test_bleu": "Test BLEU", "test_chrf": "Test chrF", "dev_bleu": "Dev BLEU"}
LOSS_TERMS = ("ce", "kl", "hidden", "grad_norm", "grad_norm_ce", "grad_norm_kl", "grad_norm_hidden")


def _grid_geometry(root: Path) -> dict:
    import yaml

    grid = root / "grid.yaml"
    return (yaml.safe_load(grid.read_text()) or {}).get("geometry") or {} if grid.is_file() else {}


def cosine_histograms_by_strategy(root: Path, tag: str, table: str = "angle_hist.csv") -> pd.DataFrame:
    """Every run's cosine histogram (``table``: angle_hist.csv, or authors_cosine_hist.csv for the authors'
    per-token means) with its strategy, init and checkpoint (``tag``: folder name pattern)."""
    frames = []
    for run in expand_runs([str(root)]):
        for checkpoint in ("init", "best"):
            folder = run / "geometry" / tag.replace("CHECKPOINT", checkpoint)
            if not (folder / "summary.json").is_file():
                continue
            summary = json.loads((folder / "summary.json").read_text())
            # one table for a one-stack run; one per stack folder (with a stack column) otherwise
            paths = [folder / table] if (folder / table).is_file() else sorted(folder.glob(f"*/{table}"))
            for path in paths:
                hist = pd.read_csv(path)
                frames.append(hist.assign(strategy=summary["strategy"], init=summary["init"], checkpoint=checkpoint))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def loss_terms(root: Path) -> pd.DataFrame:
    """Logged loss terms of every run: run, strategy, init, task, seed, step, term, value."""
    rows = []
    results = collect_results(root)
    for run in expand_runs([str(root)]):
        ident = results[results.run == run.name].iloc[0]
        for record in read_jsonl(run / "metrics.jsonl"):
            if "loss" not in record:
                continue
            for term in LOSS_TERMS:
                if term in record:
                    rows.append({"run": run.name, "strategy": ident.strategy, "init": ident.init, "task": ident.task, "seed": ident.seed,
                                 "step": record["step"], "term": term, "value": record[term]})
    return pd.DataFrame(rows)


def metric_figures(results: pd.DataFrame, out: Path) -> None:
    """The metric per strategy figures of a results table (the report's results_all)."""
    for metric, label in METRIC_LABELS.items():
        if metric in results and results[metric].notna().any():
            frame = results.rename(columns={metric: "value"})[["strategy", "init", "task", "seed", "value"]]
            majority = split_column(metric, "majority_rate")
            if metric.endswith("_accuracy") and majority in results:  # the accuracy of always answering the most common label
                frame["majority"] = results[majority]
            plots.save_figure(plots.metric_points(frame.dropna(subset=["value"]), label), out / f"{metric}_by_strategy")


def write_figures(root: str | Path, out: Path | None = None) -> Path:
    root = Path(root)
    out = out or root / "figures"
    metric_figures(collect_results(root), out)
    geometry = _grid_geometry(root)
    options = AngleOptions(max_examples=geometry.get("max_examples"), space=geometry.get("space", "student"))
    compare_runs([str(root)], options, ["init", "best"], out, strict=False)  # a grid may cross budgets: pooled.csv says
    tag = AngleOptions(**{**options.__dict__, "checkpoint": "CHECKPOINT"}).tag()
    hist = cosine_histograms_by_strategy(root, tag)
    stacked = "stack" in hist
    groups = [] if hist.empty else hist.groupby(["stack", "init", "checkpoint"] if stacked else ["init", "checkpoint"])
    for key, group in groups:
        stack, init, checkpoint = key if stacked else (None, *key)
        where = f" ({stack} stack)" if stacked else ""
        title = f"Cosines seen from the student{where}: {plots.INIT_LABELS.get(init, init)}, {plots.CHECKPOINT_LABELS[checkpoint]}"
        stem = f"cosine_hist_{init}_{checkpoint}" + (f"_{stack}" if stacked else "")
        plots.save_figure(plots.cosine_histograms(group, title, by="strategy"), out / stem)
    authors = cosine_histograms_by_strategy(root, tag, "authors_cosine_hist.csv")  # none in analyses before 2026-12-01
    for key, group in ([] if authors.empty else
                       authors.groupby(["stack", "init", "checkpoint"] if "stack" in authors else ["init", "checkpoint"])):
        stack, init, checkpoint = key if "stack" in authors else (None, *key)
        where = f" ({stack} stack)" if stack else ""
        title = f"The authors' statistic{where}: {plots.INIT_LABELS.get(init, init)}, {plots.CHECKPOINT_LABELS[checkpoint]}"
        stem = f"authors_cosine_hist_{init}_{checkpoint}" + (f"_{stack}" if stack else "")
        plots.save_figure(plots.token_mean_cosine_histograms(group, title, by="strategy"), out / stem)
    loss_figures(root, out)
    return out


def loss_figures(root: Path, out: Path) -> None:
    """The loss terms over training of a sweep's runs, one figure per (task, init), seeds averaged."""
    for (init, task), group in loss_terms(root).groupby(["init", "task"]):
        curve = group.groupby(["strategy", "step", "term"], as_index=False)["value"].mean()
        seeds = group["seed"].nunique()
        title = (f"Loss terms during distillation ({f'mean over {seeds} seeds' if seeds > 1 else 'one seed'}): "
                 f"{plots.task_label(task)}, {plots.INIT_LABELS.get(init, init).lower()}")
        plots.save_figure(plots.loss_curves(curve, title), out / f"loss_terms_{task}_{init}")


def main(argv: list[str] | None = None) -> int:
    """``python -m layergeo.figures --results tables/results_all.csv --acute plots/acute_summary.csv --out plots``:
    redraw, from a saved sweep's tables alone, the figures that come from them (metric per strategy, acute
    fractions untrained vs trained); the others need the run folders (``layergeo figures RUNS_DIR``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m layergeo.figures", description=main.__doc__)
    parser.add_argument("--results", required=True, metavar="CSV", help="a saved report's results_all.csv")
    parser.add_argument("--acute", metavar="CSV", help="a saved figures folder's acute_summary.csv")
    parser.add_argument("--out", required=True, metavar="DIR")
    args = parser.parse_args(argv)
    for name in ("results", "acute"):
        path = getattr(args, name)
        if path is not None and not Path(path).is_file():
            parser.error(f"--{name} {path} does not exist")
    out = Path(args.out)
    metric_figures(pd.read_csv(args.results), out)
    if args.acute:
        acute = pd.read_csv(args.acute)
        stacks = acute["stack"].dropna().unique() if "stack" in acute else [None]
        for stack in stacks:
            table, suffix = (acute, "") if stack is None else (acute[acute["stack"] == stack], f"_{stack}")
            title = "" if stack is None else f" ({stack} stack)"
            plots.save_figure(plots.acute_fraction_points(table, title=title), out / f"acute_fraction_by_strategy{suffix}")
    print(f"figures in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
