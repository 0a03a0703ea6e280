"""Results at several training budgets from one run, and the verdict's claims at each budget.

A run trained with ``train.eval_steps`` and ``train.eval_test`` logs its dev and test metrics at those steps
(and at every ``eval_every`` step and the end) in ``metrics.jsonl``. Its result **at budget B** is the
evaluation with the best dev metric among those at steps <= B (the first of equal ones, the rule that picks
the loop's best checkpoint), read on test at that same step: every strategy and both inits select their
checkpoint the same way, on dev, and the test split never selects anything. The budgets of a run are its
``train.eval_steps`` that it reached, and its last step. A budget B < the run's length is "B steps into one
run whose learning-rate schedule spans the whole run", not a run of B steps; figures and tables say so.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from layergeo.columns import metric_columns
from layergeo.families import get_family
from layergeo.runs import read_json, read_jsonl

IDENTITY = ["run", "task", "init", "strategy", "seed"]


def selected_at_budgets(evaluations: pd.DataFrame, budgets: list[int], metric: str) -> pd.DataFrame:
    """Per budget, the evaluation a run would have kept by then.

    ``evaluations``: one row per evaluation step (columns step, ``dev_<metric>``, test columns), any order.
    Returns one row per budget that some evaluation precedes: budget, selected_step and that step's columns.
    """
    evaluations = evaluations.sort_values("step", kind="stable").reset_index(drop=True)
    rows = []
    for budget in budgets:
        seen = evaluations[evaluations.step <= budget]
        if seen.empty:
            continue
        best = seen.loc[seen[f"dev_{metric}"].idxmax()]  # idxmax: the first of equal maxima, as the loop keeps
        rows.append({"budget": int(budget), "selected_step": int(best.step), **best.drop("step").to_dict()})
    return pd.DataFrame(rows)


def run_evaluations(run: Path) -> pd.DataFrame:
    """The dev and test evaluations a run logged: one row per step, columns step, dev_* and test_* (in %
    for fractions, as ``layergeo report`` writes them); test columns only where the run evaluated test."""
    by_step: dict[int, dict] = {}
    for record in read_jsonl(run / "metrics.jsonl"):
        split = record.get("split")
        if split in ("dev", "test"):
            by_step.setdefault(int(record["step"]), {"step": int(record["step"])}).update(metric_columns(split, record))
    return pd.DataFrame(list(by_step.values()))


def run_budgets(run: Path, results: dict | None = None) -> pd.DataFrame:
    """The budgets of one finished run (its ``train.eval_steps`` it reached, and its last step) with the
    selected evaluation at each; empty when the run logged no test evaluation along training. ``results``:
    the run's results.json when the caller has read it."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    evaluations = run_evaluations(run)
    if evaluations.empty or not any(c.startswith("test_") for c in evaluations):
        return pd.DataFrame()
    metric = get_family(config["teacher"]["family"]).metric
    last = int((read_json(run / "results.json") if results is None else results)["steps"])
    budgets = sorted({*(s for s in config["train"].get("eval_steps") or () if s <= last), last})
    table = selected_at_budgets(evaluations.dropna(subset=[f"dev_{metric}"]), budgets, metric)
    return table.assign(end=table.budget == last)


def collect_budget_results(runs: dict[Path, dict], results: pd.DataFrame) -> pd.DataFrame:
    """One row per finished student run and budget: the identity columns of ``results`` (the report's
    results_all), budget, selected_step, end, and the dev/test metrics selected at that budget. ``runs``: the
    student runs' folders and results.json (``layergeo.report.student_runs``). Empty when none of them evaluated
    test along training (``train.eval_test``)."""
    frames = []
    for folder, run_results in runs.items():
        table = run_budgets(folder, run_results)
        if not table.empty:
            frames.append(table.assign(run=folder.name))
    if not frames:
        return pd.DataFrame()
    budgets = pd.concat(frames, ignore_index=True)
    identity = [c for c in results.columns if not c.startswith(("dev_", "test_"))]
    return results[identity].merge(budgets, on="run", how="inner").sort_values(
        ["task", "init", "strategy", "seed", "budget"]).reset_index(drop=True)
