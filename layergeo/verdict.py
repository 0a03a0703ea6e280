"""The paper's three claims, answered from a finished sweep with intervals and tests.

(a) Does every matching strategy beat no matching? Per task and student init: the paired difference
    to ``none`` (same seed), with a 95% percentile-bootstrap interval over seeds; "better" or
    "worse" only when the interval excludes 0.
(b) Is the spread between matching strategies more than seed noise? Spread = max - min of the
    strategy means; its p-value is the share of random relabellings (strategy labels permuted
    among the matching students of one task and init) whose spread is at least as large.
(c) How acute are the angles at the student, untrained vs trained, and does the trained fraction
    predict accuracy? Mean fraction of acute angles per checkpoint, and the Spearman rank
    correlation (scipy) between the trained fraction and the metric across matching students; the
    same for the Thales ratio (the student's distance from two teacher states in units of half
    their distance), which still ranks students when every angle is acute.

Inputs are two tidy tables: the runs (``report/results_all.csv``: run, task, init, strategy,
seed, metrics in %) and the acute-angle summary (``figures/acute_summary.csv``: run,
checkpoint, frac_acute [, thales_ratio], one row per run and checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from layergeo import plots
from layergeo.errors import LayergeoError
from layergeo.report import collect_results, paired_differences, spread, summary_stats
from layergeo.runs import write_text

PERMUTATIONS = 10_000
GROUP = ["task", "init"]


def beats_none(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Claim (a): per task, init and matching strategy, mean paired difference to none with its CI."""
    diffs = paired_differences(results, "none", [metric])
    if diffs.empty:
        raise LayergeoError("no run of strategy 'none' to compare with; the verdict needs a grid with none")
    diffs = diffs[GROUP + ["strategy", "mean_diff", "ci_low", "ci_high", "n_seeds"]].copy()
    diffs["strategy"] = diffs["strategy"].astype(str)
    diffs["answer"] = np.select([diffs.ci_low > 0, diffs.ci_high < 0], ["better", "worse"], "not distinguishable")
    return diffs.reset_index(drop=True)


def spread_permutation_p(values: np.ndarray, labels: np.ndarray, permutations: int = PERMUTATIONS, seed: int = 0) -> tuple[float, float]:
    """Spread (max - min of group means) of values (n,) grouped by labels (n,), and its permutation p-value.

    p = (1 + #{relabellings with spread >= observed}) / (1 + permutations), labels permuted uniformly.
    """
    codes, _ = pd.factorize(labels)
    counts = np.bincount(codes)
    observed = np.bincount(codes, weights=values) / counts
    observed = observed.max() - observed.min()
    rng = np.random.default_rng(seed)
    shuffled = rng.permuted(np.broadcast_to(codes, (permutations, len(codes))), axis=1)   # (P, n)
    sums = np.zeros((permutations, len(counts)))
    np.add.at(sums, (np.arange(permutations)[:, None], shuffled), values[None, :])
    means = sums / counts
    null = means.max(1) - means.min(1)
    return float(observed), float((1 + np.sum(null >= observed - 1e-9)) / (1 + permutations))


def spread_vs_noise(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Claim (b): the report's spread table (per task and init) with the permutation p of each spread."""
    table = spread(summary_stats(results, [metric])).drop(columns="metric")
    table[["best", "worst"]] = table[["best", "worst"]].astype(str)
    matching = results[results.strategy != "none"].dropna(subset=[metric])
    p = {key: spread_permutation_p(group[metric].to_numpy(float), group["strategy"].to_numpy())[1]
         for key, group in matching.groupby(GROUP)}
    table["p_permutation"] = [p[key] for key in zip(table.task, table.init)]
    return table


def acute_vs_metric(results: pd.DataFrame, acute: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Claim (c): per task and init, the mean acute fraction (and Thales ratio, when the table has it)
    untrained and trained, and the Spearman correlation of each trained value with the metric."""
    missing = {"run", "checkpoint", "frac_acute"} - set(acute.columns)
    if missing:
        raise LayergeoError(f"the acute-angle table lacks {', '.join(sorted(missing))}; give figures/acute_summary.csv")
    table = results
    measures = {column: prefix for column, (prefix, _, _) in plots.VERDICT_GEOMETRY.items() if column in acute}
    for column, prefix in measures.items():
        values = acute.pivot_table(index="run", columns="checkpoint", values=column, aggfunc="first")
        values = values.rename(columns={"init": f"{prefix}_untrained", "best": f"{prefix}_trained"})
        values = values.reindex(columns=[f"{prefix}_untrained", f"{prefix}_trained"])
        table = table.merge(values, left_on="run", right_index=True, how="inner")
    rows = []
    for (task, init), group in table[table.strategy != "none"].groupby(GROUP):
        row = {"task": task, "init": init}
        for prefix in measures.values():
            trained = group.dropna(subset=[f"{prefix}_trained", metric])
            varies = len(trained) > 2 and trained[f"{prefix}_trained"].nunique() > 1 and trained[metric].nunique() > 1
            rho, p = stats.spearmanr(trained[f"{prefix}_trained"], trained[metric]) if varies else (np.nan, np.nan)
            row |= {f"{prefix}_untrained": group[f"{prefix}_untrained"].mean(), f"{prefix}_trained": group[f"{prefix}_trained"].mean(),
                    f"{prefix}_spearman_rho": float(rho), f"{prefix}_spearman_p": float(p)}
        rows.append(row | {"n_students": len(group.dropna(subset=["acute_trained", metric]))})
    if not rows:
        raise LayergeoError("no run of the acute-angle table matches a finished matching student; "
                            "were they made from the same sweep?")
    return pd.DataFrame(rows)


def _name(task: str, init: str) -> str:
    return f"{plots.task_label(task)}, {plots.INIT_LABELS.get(init, init).lower()}"


def _rank_correlation(row: pd.Series, prefix: str, name: str) -> str:
    rho, p = row[f"{prefix}_spearman_rho"], row[f"{prefix}_spearman_p"]
    return f"{name} ρ = {rho:.2f} (p = {p:.2g})" if np.isfinite(rho) else f"{name} undefined (constant)"


def sentences(results: pd.DataFrame, a: pd.DataFrame, b: pd.DataFrame, c: pd.DataFrame, metric: str) -> list[str]:
    """One plain paragraph per task and init, every number from the three tables."""
    lines = []
    for (task, init), diffs in a.groupby(GROUP):
        counts = diffs["answer"].value_counts()
        best = diffs.loc[diffs.mean_diff.idxmax()]
        text = (f"**{_name(task, init)}** ({metric.replace('_', ' ')}), {len(diffs)} matching strategies against none: "
                f"better {counts.get('better', 0)}, worse {counts.get('worse', 0)}, not distinguishable "
                f"{counts.get('not distinguishable', 0)} (best: {plots.strategy_label(best.strategy)} {best.mean_diff:+.1f} points, 95% CI "
                f"{best.ci_low:+.1f} to {best.ci_high:+.1f}, {int(best.n_seeds)} seeds).")
        split = metric.split("_")[0]
        if f"{split}_predicted_classes" in results:
            students = results[(results.task == task) & (results.init == init)]
            collapsed = int((students[f"{split}_predicted_classes"] == 1).sum())
            text += (f" {collapsed} of {len(students)} students predict a single class on {split} (majority-class "
                     f"rate {students[f'{split}_majority_rate'].mean():.1f}%).")
        spreads = b[(b.task == task) & (b.init == init)]
        if not spreads.empty:
            s = spreads.iloc[0]
            text += (f" Spread between strategies {s.spread:.1f} points ({plots.strategy_label(s.best)} best, "
                     f"{plots.strategy_label(s.worst)} worst) against a seed std of {s.mean_seed_std:.1f}; "
                     f"permutation p = {s.p_permutation:.2f}.")
        angle = c[(c.task == task) & (c.init == init)]
        if not angle.empty:
            g = angle.iloc[0]
            text += f" Acute angles: {100 * g.acute_untrained:.1f}% untrained, {100 * g.acute_trained:.1f}% trained"
            if "ratio_trained" in g:
                text += f"; Thales ratio {g.ratio_untrained:.2f} untrained, {g.ratio_trained:.2f} trained"
            text += f". Spearman with {metric.replace('_', ' ')} across {g.n_students} students: "
            text += "; ".join(_rank_correlation(g, prefix, name) for prefix, _, name in plots.VERDICT_GEOMETRY.values()
                              if f"{prefix}_spearman_rho" in g) + "."
        lines.append(text)
    return lines


def write_verdict(results: pd.DataFrame, acute: pd.DataFrame, out: Path, metric: str = "test_accuracy") -> Path:
    """Write claim_a/b/c (CSV, Markdown), verdict.md and verdict.png/.pdf under ``out``."""
    if metric not in results:
        raise LayergeoError(f"no column {metric!r} in the results; choose one of "
                            f"{', '.join(c for c in results.columns if c.startswith(('dev_', 'test_')))}")
    claims = {"claim_a_beats_none": beats_none(results, metric), "claim_b_spread": spread_vs_noise(results, metric),
              "claim_c_acute": acute_vs_metric(results, acute, metric)}
    for name, table in claims.items():
        write_text(out / f"{name}.csv", table.to_csv(index=False))
    a, b, c = claims.values()
    titles = ["(a) Paired difference to None, points, 95% bootstrap CI over seeds",
              "(b) Spread between matching strategies (max - min of means), permutation p-value",
              "(c) Fraction of acute angles and Thales ratio at the student; Spearman of each trained value with the metric"]
    text = [f"# Verdict on the paper's three claims ({metric.replace('_', ' ')})\n", "\n\n".join(sentences(results, a, b, c, metric)), ""]
    for title, table in zip(titles, claims.values()):
        text += [f"## {title}\n", table.to_markdown(index=False, floatfmt=".3g", missingval="–"), ""]
    write_text(out / "verdict.md", "\n".join(text) + "\n")
    trained = results.merge(acute[acute.checkpoint == "best"][["run"] + [c for c in plots.VERDICT_GEOMETRY if c in acute]], on="run")
    plots.save_figure(plots.verdict_panels(a, b, c, trained, metric), out / "verdict")
    return out


def verdict_from_sweep(root: Path, out: Path | None = None, metric: str = "test_accuracy") -> Path:
    """The verdict of a sweep folder after ``layergeo figures`` (which writes figures/acute_summary.csv)."""
    if not Path(root).is_dir():
        raise LayergeoError(f"{root} does not exist; give the folder of a sweep (e.g. runs/classification)")
    acute_file = Path(root) / "figures" / "acute_summary.csv"
    if not acute_file.is_file():
        raise LayergeoError(f"{acute_file} is missing; run `layergeo figures {root}` first")
    return write_verdict(collect_results(root), pd.read_csv(acute_file), out or Path(root) / "verdict", metric)
