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


def histograms_by_strategy(root: Path, tag: str, tables: tuple[str, ...]) -> dict[str, pd.DataFrame]:
    """Every run's histogram tables (e.g. angle_hist.csv, authors_cosine_hist.csv) with its strategy, init and
    checkpoint, one frame per table name, empty where no run has it (``tag``: folder name pattern)."""
    frames: dict[str, list[pd.DataFrame]] = {table: [] for table in tables}
    for run in expand_runs([str(root)]):
        for checkpoint in ("init", "best"):
            folder = run / "geometry" / tag.replace("CHECKPOINT", checkpoint)
            if not (folder / "summary.json").is_file():
                continue
            summary = json.loads((folder / "summary.json").read_text())
            ident = {"strategy": summary["strategy"], "init": summary["init"], "checkpoint": checkpoint}
            for table in tables:
                # one table for a one-stack run; one per stack folder (with a stack column) otherwise
                paths = [folder / table] if (folder / table).is_file() else sorted(folder.glob(f"*/{table}"))
                frames[table] += [pd.read_csv(path).assign(**ident) for path in paths]
    return {table: pd.concat(found, ignore_index=True) if found else pd.DataFrame() for table, found in frames.items()}


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
    hists = histograms_by_strategy(root, tag, ("angle_hist.csv", "authors_cosine_hist.csv"))
    histogram_figures(hists["angle_hist.csv"], "cosine_hist", "Cosines seen from the student", plots.cosine_histograms, out)
    # the authors' statistic: absent from analyses made before 2026-12-01
    histogram_figures(hists["authors_cosine_hist.csv"], "authors_cosine_hist", "The authors' statistic",
                      plots.token_mean_cosine_histograms, out)
    loss_figures(root, out)
    return out


def histogram_figures(hist: pd.DataFrame, stem: str, title: str, draw, out: Path) -> None:
    """One figure per init and checkpoint (and stack) of a histogram table, a line per strategy: ``draw(group,
    title, by="strategy")`` saved as ``out/<stem>_<init>_<checkpoint>[_<stack>]``; nothing for an empty table."""
    if hist.empty:
        return
    stacked = "stack" in hist
    for key, group in hist.groupby(["stack", "init", "checkpoint"] if stacked else ["init", "checkpoint"]):
        stack, init, checkpoint = key if stacked else (None, *key)
        where = f" ({stack} stack)" if stacked else ""
        name = f"{title}{where}: {plots.INIT_LABELS.get(init, init)}, {plots.CHECKPOINT_LABELS[checkpoint]}"
        suffix = f"_{stack}" if stacked else ""
        plots.save_figure(draw(group, name, by="strategy"), out / f"{stem}_{init}_{checkpoint}{suffix}")


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
