"""The paper's three claims, answered from a finished sweep with intervals and tests.

A seed is a block: runs that share it share the training subset, the data order and the random draws,
so every comparison below is made within seeds (``layergeo.stats``, where scipy does each test).

(a) Does every matching strategy beat no matching? Per task and student init: the paired difference
    to ``none`` (same seed), paired t-test, Holm-corrected over all comparisons of the table (every
    task, init and strategy of the metric), with the number of seeds and Cohen's d_z beside; the
    interval is the paired t interval at the level Holm tested it at, with a BCa bootstrap at the same
    level as a cross-check (where every seed gives the same difference, the exact sign-flip test and its
    inverted interval instead). "better" or "worse" only when that interval excludes 0; below 3 seeds there
    is no interval and no call.
(b) Do the matching strategies differ more than seed noise? Spread = max - min of the strategy means,
    with a BCa bootstrap interval over seeds (whole seeds resampled; from 5 seeds) and the mean spread that relabelling
    within seeds gives; tested by a within-seed permutation test of the spread (strategy labels permuted
    within each seed) and by Friedman's test (seeds as blocks).
(c) How acute are the angles at the student, untrained vs trained, and does the trained fraction
    predict accuracy? Mean fraction of acute angles per checkpoint, and the Spearman rank
    correlation (scipy) between the trained fraction and the metric across matching students; the
    same for the Thales ratio (the student's distance from two teacher states in units of half
    their distance), which still ranks students when every angle is acute. Both over the cells the
    acute table names (``layergeo.cells``; ``layergeo figures`` writes the authors': student layers
    >= 1, teacher pairs among layers >= 1), for each stack of an encoder-decoder student on its own.

Inputs are two tidy tables: the runs (``report/results_all.csv``: run, task, init, strategy,
seed, metrics in %) and the acute-angle summary (``figures/acute_summary.csv``: run,
checkpoint [, stack], frac_acute [, thales_ratio, cells], one row per run, checkpoint and stack; no stack
for a run of one stack).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from layergeo import plots
from layergeo.budgets import collect_budget_results
from layergeo.cells import table_cells
from layergeo.columns import split_column
from layergeo.errors import LayergeoError
from layergeo.report import (STAT_COLUMNS, collect_results, display, paired_differences, read_table, spread, student_runs,
                             summary_stats)
from layergeo.runs import write_text
from layergeo.stats import ALPHA, MIN_SEEDS, blocked_spread_test

GROUP = ["task", "init"]
AUTHORS_COLUMNS = ("authors_mean_cos", "authors_frac_positive")  # CosineFromStudent: layergeo.geometry.TokenMeanCosine
INTRO = ("A seed is a block (runs sharing it share the training subset, data order and draws), so every comparison is "
         "within seeds. A difference is called better or worse only when its Holm-corrected interval excludes 0.\n")
BUDGET_INTRO = ("At budget B each run's result is its evaluation with the best dev metric among those at steps <= B, read "
                "on test at that step (one run gives every budget; its learning-rate schedule spans the whole run). Holm "
                "corrects over the comparisons of each budget's table. Tables: claim_a_by_budget.csv, claim_b_by_budget.csv.\n")
CLAIM_B_TESTS = ["n_seeds", "spread_ci_low", "spread_ci_high", "null_spread_mean", "p_permutation", "permutations",
                 "friedman_chi2", "friedman_p"]


def beats_none(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Claim (a): per task, init and matching strategy, the paired difference to none (same seeds) with its
    paired t-test, Holm correction over the whole table, Holm-consistent interval and answer."""
    diffs = _differences_to_none(results, metric)
    if diffs.empty:
        raise LayergeoError("no run of strategy 'none' to compare with; the verdict needs a grid with none")
    return diffs


def _differences_to_none(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Claim (a)'s table, empty where no task and init has none beside a matching strategy."""
    diffs = paired_differences(results, "none", [metric])
    if diffs.empty:
        return diffs
    diffs = diffs[GROUP + ["strategy"] + STAT_COLUMNS].copy()
    diffs["strategy"] = diffs["strategy"].astype(str)
    return diffs.reset_index(drop=True)


def spread_vs_noise(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Claim (b): the report's spread table (per task and init) with the seed-blocked tests of it, made on the
    seeds that every matching strategy has (``n_seeds``)."""
    table = spread(summary_stats(results, [metric])).drop(columns="metric")
    table[["best", "worst"]] = table[["best", "worst"]].astype(str)
    matching = results[results.strategy != "none"].dropna(subset=[metric])
    tests = {}
    for key, group in matching.groupby(GROUP):
        wide = group.pivot_table(index="seed", columns="strategy", values=metric, aggfunc="first").dropna()
        tests[key] = blocked_spread_test(wide.to_numpy(float)) if len(wide) else {"n_seeds": 0}
    tests = pd.DataFrame([tests.get(key, {"n_seeds": 0}) for key in zip(table.task, table.init)]).reindex(columns=CLAIM_B_TESTS)
    return pd.concat([table.reset_index(drop=True), tests], axis=1)


def acute_vs_metric(results: pd.DataFrame, acute: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Claim (c): per task and init (and per stack, where the acute-angle table has a stack column: an
    encoder-decoder student is measured in both), the mean acute fraction (and Thales ratio, when the table has
    it) untrained and trained, the Spearman correlation of each trained value with the metric, and the cells
    they cover (``cells.table_cells``)."""
    missing = {"run", "checkpoint", "frac_acute"} - set(acute.columns)
    if missing:
        raise LayergeoError(f"the acute-angle table lacks {', '.join(sorted(missing))}; give figures/acute_summary.csv")
    stacked = "stack" in acute  # a run of one stack has no stack (NaN) beside encoder-decoder runs
    if acute.duplicated(["run", "checkpoint"] + (["stack"] if stacked else [])).any():
        raise LayergeoError("the acute-angle table has more than one row for a run and checkpoint"
                            + (" and stack" if stacked else " and no stack column") + "; give figures/acute_summary.csv "
                            "as `layergeo figures` writes it")
    rows = []
    for stack, measured in acute.groupby("stack", sort=False, dropna=False) if stacked else [(None, acute)]:
        rows += [row | ({"stack": stack} if stacked else {}) for row in _acute_rows(results, measured, metric)]
    if not rows:
        raise LayergeoError("no run of the acute-angle table matches a finished matching student; "
                            "were they made from the same sweep?")
    table = pd.DataFrame(rows)
    return table[GROUP + ["stack"] + [c for c in table if c not in GROUP + ["stack"]]] if stacked else table


def _acute_rows(results: pd.DataFrame, acute: pd.DataFrame, metric: str) -> list[dict]:
    """Claim (c)'s rows, one per task and init, from an acute-angle table with one row per run and checkpoint."""
    table = results
    measures = {column: prefix for column, (prefix, _, _) in plots.VERDICT_GEOMETRY.items() if column in acute}
    authors = [column for column in AUTHORS_COLUMNS if column in acute and acute[column].notna().any()]
    # ours must be there for a run to count; the authors' statistic, beside them, is described, not correlated
    for column, prefix, how in [(c, p, "inner") for c, p in measures.items()] + [(c, c, "left") for c in authors]:
        values = acute.pivot(index="run", columns="checkpoint", values=column)
        values = values.rename(columns={"init": f"{prefix}_untrained", "best": f"{prefix}_trained"})
        values = values.reindex(columns=[f"{prefix}_untrained", f"{prefix}_trained"])
        table = table.merge(values, left_on="run", right_index=True, how=how)
    rows = []
    for (task, init), group in table[table.strategy != "none"].groupby(GROUP):
        row = {"task": task, "init": init}
        for prefix in measures.values():
            trained = group.dropna(subset=[f"{prefix}_trained", metric])
            varies = len(trained) > 2 and trained[f"{prefix}_trained"].nunique() > 1 and trained[metric].nunique() > 1
            rho, p = stats.spearmanr(trained[f"{prefix}_trained"], trained[metric]) if varies else (np.nan, np.nan)
            row |= {f"{prefix}_untrained": group[f"{prefix}_untrained"].mean(), f"{prefix}_trained": group[f"{prefix}_trained"].mean(),
                    f"{prefix}_spearman_rho": float(rho), f"{prefix}_spearman_p": float(p)}
        for column in authors:
            row |= {f"{column}_{when}": group[f"{column}_{when}"].mean() for when in ("untrained", "trained")}
        rows.append(row | {"n_students": len(group.dropna(subset=["acute_trained", metric])),
                           "cells": table_cells(acute[acute.run.isin(group.run)])})
    return rows


def claims_by_budget(budgets: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Claims (a) and (b) at each training budget (``layergeo.budgets``): one table per budget, so Holm corrects
    over that budget's comparisons (every task, init and strategy that reached it); a budget column in front."""
    a, b = [], []
    for budget, table in budgets.dropna(subset=[metric]).groupby("budget"):
        # a budget only some runs reach (a run's own length) may hold none and no matching strategy of its task and init
        a.append(_differences_to_none(table, metric).assign(budget=int(budget)))
        b.append(spread_vs_noise(table, metric).assign(budget=int(budget)))
    a, b = [frame for frame in a if not frame.empty], [frame for frame in b if not frame.empty]
    if not a:
        raise LayergeoError(f"no budget has a run of strategy 'none' with {metric} beside a matching strategy of the same "
                            "task and init; the budget verdict compares them")
    first = lambda frame: frame[["budget"] + [c for c in frame.columns if c != "budget"]]
    return first(pd.concat(a, ignore_index=True)), first(pd.concat(b, ignore_index=True))


def budget_sentences(a: pd.DataFrame, b: pd.DataFrame, metric: str, budgets: pd.DataFrame) -> list[str]:
    """Per budget, one line per task and init: claims (a) and (b) at that budget and, where ``budgets`` records
    the predicted classes, the students that predict a single class there; every number from the tables."""
    counted = split_column(metric, "predicted_classes") in budgets
    budgets = budgets.dropna(subset=[metric])
    return [line for budget, diffs_at in a.groupby("budget")
            for line in _paragraphs(diffs_at, b[b.budget == budget], metric, head=f"Step {budget}, ",
                                    results=budgets[budgets.budget == budget] if counted else None)]


def write_budget_verdict(budgets: pd.DataFrame, out: Path, metric: str) -> list[str]:
    """Write claim_a/b_by_budget.csv and budget_differences.png/.pdf under ``out``; return the verdict's lines."""
    a, b = claims_by_budget(budgets, metric)
    write_text(out / "claim_a_by_budget.csv", a.to_csv(index=False))
    write_text(out / "claim_b_by_budget.csv", b.to_csv(index=False))
    plots.save_figure(plots.budget_differences(a, metric), out / "budget_differences")
    return budget_sentences(a, b, metric, budgets)


def _name(task: str, init: str) -> str:
    return f"{plots.task_label(task)}, {plots.INIT_LABELS.get(init, init).lower()}"


def _rank_correlation(row: pd.Series, prefix: str, name: str) -> str:
    rho, p = row[f"{prefix}_spearman_rho"], row[f"{prefix}_spearman_p"]
    return f"{name} ρ = {rho:.2f} (p = {p:.2g})" if np.isfinite(rho) else f"{name} undefined (constant)"


def _p(p: float) -> str:
    return f"{p:.2g}" if np.isfinite(p) else "–"


def _comparison(d: pd.Series, label: str | None = None) -> str:
    """'Forward +1.1 points (d_z 0.55; p = 0.28, Holm 1; 99.75% interval -5.1 to +7.4)', the test named where it is
    the sign-flip one."""
    d_z = f"{d.d_z:+.2f}" if np.isfinite(d.d_z) else "undefined"
    interval = f"interval {d.ci_low:+.1f} to {d.ci_high:+.1f}" if np.isfinite(d.ci_low) else "interval unbounded"
    if d.sd_diff == 0:
        interval += ": the same difference on every seed, exact sign-flip test"
    return (f"{label or plots.strategy_label(d.strategy)} {d.mean_diff:+.1f} points (d_z {d_z}; p = {_p(d.p)}, Holm {_p(d.p_holm)}; "
            f"{100 * d.ci_level:.4g}% {interval})")


def _claim_a(diffs: pd.DataFrame, family: int) -> str:
    counts = diffs["answer"].value_counts()
    seeds = sorted(set(diffs.n_seeds.astype(int)))
    seed_text = f"{seeds[0]} seeds" if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]} seeds"
    if not diffs.n_seeds.ge(MIN_SEEDS).any():
        return (f"(a) Only {seed_text}: a paired interval needs at least {MIN_SEEDS}, so **no call** is made for any of "
                f"the {len(diffs)} matching strategies against none (their mean differences run from "
                f"{diffs.mean_diff.min():+.1f} to {diffs.mean_diff.max():+.1f} points; 2 seeds cannot tell them from noise).")
    text = (f"(a) {len(diffs)} matching strategies against none, {seed_text}, paired t-tests Holm-corrected over the "
            f"{family} comparisons of this table: **better {counts.get('better', 0)}, worse {counts.get('worse', 0)}, "
            f"not distinguishable {counts.get('not distinguishable', 0)}**")
    if counts.get("no call", 0):
        text += f", no call {counts['no call']} (fewer than {MIN_SEEDS} seeds)"
    tested = diffs[diffs.n_seeds >= MIN_SEEDS]
    best, worst = tested.loc[tested.mean_diff.idxmax()], tested.loc[tested.mean_diff.idxmin()]
    if len(tested) > 1 and tested[["mean_diff", "sd_diff"]].round(9).nunique().max() == 1:
        return text + f". Every one of them: {_comparison(best, 'the same difference,')}."
    called = diffs[diffs.answer.isin(["better", "worse"])]
    if len(called):
        text += ": " + "; ".join(_comparison(d) for _, d in called.iterrows())
    # the highest and lowest difference, unless named above among those called
    extremes = [(name, d) for name, d in (("highest", best), ("lowest", worst)) if d.strategy not in set(called.strategy)]
    extremes = extremes[:1] if best.strategy == worst.strategy else extremes
    if not extremes:
        return text + "."
    named = "; ".join(f"{name}: {_comparison(d)}" for name, d in extremes)
    return text + ". " + named[0].upper() + named[1:] + "."


def _collapsed(results: pd.DataFrame, task: str, init: str, metric: str) -> str:
    split = metric.split("_")[0]
    column = split_column(metric, "predicted_classes")
    if column not in results:
        return (f" The results table does not record how many classes each student predicts on {split}, so students "
                f"that predict a single class cannot be flagged from it.")
    students = results[(results.task == task) & (results.init == init)]
    single = students[students[column] == 1]
    majority = split_column(metric, "majority_rate")
    rate = f" (majority-class rate {students[majority].mean():.1f}%)" if majority in students else ""
    if single.empty:
        return f" 0 of {len(students)} students predict a single class on {split}{rate}."
    names = ", ".join(f"{plots.strategy_label(s.strategy)} seed {int(s.seed)}" for _, s in single.sort_values(["strategy", "seed"]).iterrows())
    return (f" **{len(single)} of {len(students)} students predict a single class on {split}**{rate}: {names}; their "
            f"{metric.replace('_', ' ')} is the share of that class, not a learned answer.")


def _claim_b(s: pd.Series) -> str:
    if s.spread == 0:
        return (f" (b) Every matching strategy has the same mean (mean seed std {s.mean_seed_std:.1f}): spread 0, "
                f"within-seed permutation p = {_p(s.p_permutation)}.")
    text = (f" (b) Spread between matching strategies {s.spread:.1f} points ({plots.strategy_label(s.best)} best, "
            f"{plots.strategy_label(s.worst)} worst; mean seed std {s.mean_seed_std:.1f}")
    if np.isfinite(s.spread_ci_low):
        text += f"; 95% BCa interval over seeds {s.spread_ci_low:.1f} to {s.spread_ci_high:.1f}"
    if np.isfinite(s.null_spread_mean):
        text += f"; relabelling strategies within seeds gives {s.null_spread_mean:.1f} on average"
    text += ")"
    if not np.isfinite(s.p_permutation):
        return text + "; too few seeds for a test."
    text += f"; within-seed permutation p = {_p(s.p_permutation)} ({int(s.permutations):,} relabellings"
    text += ", all of them)" if s.permutations == math.factorial(int(s.n_strategies)) ** int(s.n_seeds) else " drawn)"
    if np.isfinite(s.friedman_p):
        text += f", Friedman χ² = {s.friedman_chi2:.1f}, p = {_p(s.friedman_p)}"
    text += f", {int(s.n_seeds)} seeds as blocks"
    significant = [p < ALPHA for p in (s.p_permutation, s.friedman_p) if np.isfinite(p)]
    if all(significant):
        text += ": the strategies differ by more than seed noise."
    elif not any(significant):
        text += ": no evidence that the strategies differ beyond seed noise."
    else:
        text += ": the two tests disagree at the 5% level."
    return text


def _untrained(value: float, form: str, unit: str = "") -> str:
    return f"{value:{form}}{unit} untrained" if np.isfinite(value) else "untrained not measured"


def _claim_c(g: pd.Series, metric: str) -> str:
    stack = f", {g['stack']} stack" if isinstance(g.get("stack"), str) else ""
    text = (f" (c) Acute angles{stack} ({g.cells}): {_untrained(100 * g.acute_untrained, '.1f', '%')}, "
            f"{100 * g.acute_trained:.1f}% trained")
    if "ratio_trained" in g:
        text += f"; Thales ratio {_untrained(g.ratio_untrained, '.2f')}, {g.ratio_trained:.2f} trained"
    both = lambda column: all(f"{column}_{when}" in g and np.isfinite(g[f"{column}_{when}"]) for when in ("untrained", "trained"))
    if both("authors_mean_cos"):
        text += (f"; the authors' per-token mean cosine {g.authors_mean_cos_untrained:.2f} untrained, "
                 f"{g.authors_mean_cos_trained:.2f} trained")
        if both("authors_frac_positive"):
            text += (f", positive at {100 * g.authors_frac_positive_untrained:.1f}% and "
                     f"{100 * g.authors_frac_positive_trained:.1f}% of tokens")
    text += f". Spearman with {metric.replace('_', ' ')} across {g.n_students} students: "
    return text + "; ".join(_rank_correlation(g, prefix, name) for prefix, _, name in plots.VERDICT_GEOMETRY.values()
                            if f"{prefix}_spearman_rho" in g) + "."


def _paragraphs(a: pd.DataFrame, b: pd.DataFrame, metric: str, head: str = "", results: pd.DataFrame | None = None,
                c: pd.DataFrame | None = None) -> list[str]:
    """One paragraph per task and init of claim (a)'s table ``a`` (Holm's family is all of ``a``): ``head`` and the
    task in bold, claim (a), the students of ``results`` that predict a single class, claim (b) from ``b`` and
    claim (c) from ``c``; ``results`` and ``c`` where given, (b) and (c) where their table has the task and init."""
    lines = []
    family = int(a.n_seeds.ge(MIN_SEEDS).sum())
    for (task, init), diffs in a.groupby(GROUP):
        text = f"**{head}{_name(task, init)}** ({metric.replace('_', ' ')}). " + _claim_a(diffs, family)
        if results is not None:
            text += _collapsed(results, task, init, metric)
        spreads = b[(b.task == task) & (b.init == init)]
        if not spreads.empty:
            text += _claim_b(spreads.iloc[0])
        angles = c[(c.task == task) & (c.init == init)] if c is not None else pd.DataFrame()
        text += "".join(_claim_c(angle, metric) for _, angle in angles.iterrows())
        lines.append(text)
    return lines


def sentences(results: pd.DataFrame, a: pd.DataFrame, b: pd.DataFrame, c: pd.DataFrame, metric: str) -> list[str]:
    """One plain paragraph per task and init, every number from the three tables."""
    return _paragraphs(a, b, metric, results=results, c=c)


def write_verdict(results: pd.DataFrame, acute: pd.DataFrame, out: Path, metric: str = "test_accuracy",
                  budgets: pd.DataFrame | None = None) -> Path:
    """Write claim_a/b/c (CSV, Markdown), verdict.md and verdict.png/.pdf under ``out``; with ``budgets`` (the
    report's results_by_budget) also the claims at each training budget and their figure."""
    if metric not in results:
        raise LayergeoError(f"no column {metric!r} in the results; choose one of "
                            f"{', '.join(c for c in results.columns if c.startswith(('dev_', 'test_')))}")
    claims = {"claim_a_beats_none": beats_none(results, metric), "claim_b_spread": spread_vs_noise(results, metric),
              "claim_c_acute": acute_vs_metric(results, acute, metric)}
    for name, table in claims.items():
        write_text(out / f"{name}.csv", table.to_csv(index=False))
    a, b, c = claims.values()
    family = int(a.n_seeds.ge(MIN_SEEDS).sum())
    titles = [f"(a) Paired difference to None (same seed), points: paired t-test Holm-corrected over the {family} comparisons "
              "of this table; interval = paired t interval at the level Holm tested it at (ci_percent), BCa bootstrap at "
              "the same level beside (from 5 seeds); d_z = mean / sd of the differences; no test below 3 seeds; where every "
              "seed gives the same difference, the exact sign-flip test and its inverted interval (unbounded up to 5 seeds: "
              "-inf to inf)",
              "(b) Spread between matching strategies (max - min of means) with a 95% BCa interval over seeds (from 5 seeds), the mean "
              "spread under within-seed relabelling, the within-seed permutation p and Friedman's test (seeds as blocks)",
              "(c) Fraction of acute angles and Thales ratio at the student over the cells named (cells), per stack where "
              "students have two; Spearman of "
              "each trained value with the metric"]
    text = [f"# Verdict on the paper's three claims ({metric.replace('_', ' ')})\n", INTRO, "\n\n".join(sentences(results, a, b, c, metric)), ""]
    if budgets is not None and not budgets.empty:
        text += ["## At each training budget\n", BUDGET_INTRO, "\n\n".join(write_budget_verdict(budgets, out, metric)), "",
                 "![Paired differences to None against training steps](budget_differences.png)", ""]
    for title, table in zip(titles, claims.values()):
        text += [f"## {title}\n", display(table, blank=True).to_markdown(index=False, floatfmt=".3g", missingval="–"), ""]
    write_text(out / "verdict.md", "\n".join(text) + "\n")
    measured = ["run"] + [c for c in ["stack", *plots.VERDICT_GEOMETRY] if c in acute]
    trained = results.merge(acute[acute.checkpoint == "best"][measured], on="run")  # a row per stack where there are two
    plots.save_figure(plots.verdict_panels(a, b, c, trained, metric), out / "verdict")
    return out


def verdict_from_sweep(root: Path, out: Path | None = None, metric: str = "test_accuracy") -> Path:
    """The verdict of a sweep folder after ``layergeo figures`` (which writes figures/acute_summary.csv)."""
    if not Path(root).is_dir():
        raise LayergeoError(f"{root} does not exist; give the folder of a sweep (e.g. runs/classification)")
    acute_file = Path(root) / "figures" / "acute_summary.csv"
    if not acute_file.is_file():
        raise LayergeoError(f"{acute_file} is missing; run `layergeo figures {root}` first")
    runs = student_runs(root)
    results = collect_results(root, runs=runs)
    return write_verdict(results, read_table(acute_file), out or Path(root) / "verdict", metric,
                         collect_budget_results(runs, results))
