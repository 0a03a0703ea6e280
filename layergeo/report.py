"""``layergeo report RUNS_DIR``: the paper's tables from many runs.

Rows are init x strategy, columns are task x metric, each cell mean ± std over
seeds with the number of seeds. Paired differences against Forward and against
None are taken seed by seed (a seed is a block), with paired t-tests, Holm-corrected
over the comparisons of one table and metric, and intervals consistent with Holm
(``layergeo.stats``). The spread is max - min of the strategy means, matching strategies only.
Shuffle runs are also grouped by the permutation each trained (a few fair ones exist).
The paper's published numbers (shipped in ``resources/paper_results.csv``) are
written beside ours, in their own table, never mixed into our means. ``provenance.json``
says how the numbers were made: machines, threads, versions, commits, commands and times.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pandas as pd

from layergeo.budgets import collect_budget_results
from layergeo.columns import metric_columns
from layergeo.errors import LayergeoError
from layergeo.plots import INIT_LABELS, STRATEGY_ORDER, strategy_label, task_label
from layergeo.runs import read_json, read_jsonl, write_text
from layergeo.stats import ALPHA, compare_family

METRICS = {"test_accuracy": "test acc", "test_macro_f1": "test macro-F1", "dev_accuracy": "dev acc",
           "test_bleu": "test BLEU", "test_chrf": "test chrF", "dev_bleu": "dev BLEU", "test_exact_match": "test EM"}
SETTING_KEYS = ["student_layers", "hidden_size", "normalize", "alpha_hidden"]
STAT_COLUMNS = ["n_seeds", "mean_diff", "sd_diff", "d_z", "t", "p", "p_holm", "ci_level", "ci_low", "ci_high",
                "bca_low", "bca_high", "answer"]


def student_runs(root: str | Path) -> dict[Path, dict]:
    """The finished student runs under ``root``, in path order: each one's folder and its results.json."""
    root = Path(root)
    if not root.is_dir():
        raise LayergeoError(f"{root} does not exist; give the folder of a sweep (or of runs)")
    runs = {}
    for results_file in sorted(root.rglob("results.json")):
        results = read_json(results_file)
        if results.get("kind") == "student":
            runs[results_file.parent] = results
    return runs


def collect_results(root: str | Path, config_keys: dict[str, tuple[str, str]] | None = None,
                    runs: dict[Path, dict] | None = None) -> pd.DataFrame:
    """One row per finished student run under ``root``: identity, setting and metrics (in %, with the
    majority-class rate and the number of distinct predicted labels when the run recorded them).

    ``config_keys`` adds columns read from each run's config.yaml: {column: (section, key)}. ``runs``: the
    :func:`student_runs` of ``root`` when the caller has them (a report reads each results.json once).
    """
    import yaml

    runs = student_runs(root) if runs is None else runs
    rows = []
    for folder, results in runs.items():
        config = yaml.safe_load((folder / "config.yaml").read_text())
        row = {
            "run": folder.name,
            "task": results["task"],
            "init": results["init"],
            "strategy": results["strategy"],
            "seed": results["seed"],
            "student_layers": results["student_layers"],
            "hidden_size": config["student"]["hidden_size"] or "teacher",
            "normalize": config["loss"]["normalize"],
            "alpha_hidden": config["loss"]["alpha_hidden"],
            "pairs": trained_pairs(folder),
            **_teacher_score(results["teacher_results"]["test"]),
            **{column: config[section].get(key) for column, (section, key) in (config_keys or {}).items()},
        }
        for split in ("dev", "test"):
            row |= metric_columns(split, results[split])
        rows.append(row)
    if not rows:
        raise LayergeoError(f"no finished student runs under {root}; run a sweep first (layergeo sweep GRID.yaml)")
    return pd.DataFrame(rows)


def trained_pairs(run: Path) -> str:
    """The mapping a run trained, from its mapping.jsonl: "S1>T8 S2>T12 S3>T4" (per stack when there are several),
    or "N draws" for a mapping redrawn during training (RAIL)."""
    logged = read_jsonl(run / "mapping.jsonl") if (run / "mapping.jsonl").is_file() else []
    if not logged:
        return "-"
    if len(logged) > 1:
        return f"{len(logged)} draws"
    pairs = logged[0]["pairs"]
    stacks = pairs if isinstance(pairs, dict) else {"": pairs}
    text = {stack: " ".join(f"S{s}>T{t}" for s, t in p) or "none" for stack, p in stacks.items()}
    return "; ".join(f"{stack}: {t}" if stack else t for stack, t in text.items())


def _teacher_score(test: dict) -> dict:
    """The teacher's test accuracy (%) of a classifier, or its test BLEU of a generating model."""
    return {"teacher_test_accuracy": 100 * test["accuracy"]} if "accuracy" in test else {"teacher_test_bleu": test["bleu"]}


def _order(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    frame["strategy"] = pd.Categorical(frame.strategy, [s for s in STRATEGY_ORDER if s in set(frame.strategy)]
                                       + sorted(set(frame.strategy) - set(STRATEGY_ORDER)), ordered=True)
    return frame


def _varying_settings(results: pd.DataFrame) -> list[str]:
    return [k for k in SETTING_KEYS if k in results and results[k].nunique() > 1]


def summary_stats(results: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Mean, std (ddof 1) and n over seeds per (setting, init, strategy, task, metric)."""
    keys = _varying_settings(results) + ["init", "strategy", "task"]
    long = results.melt(id_vars=keys + ["seed"], value_vars=metrics, var_name="metric").dropna(subset=["value"])
    stats = long.groupby(keys + ["metric"], observed=True)["value"].agg(mean="mean", std="std", n="count").reset_index()
    return _order(stats).sort_values(keys + ["metric"]).reset_index(drop=True)


def _blank_missing(table: pd.DataFrame) -> pd.DataFrame:
    """Missing cells as None, so the Markdown shows "–" and the LaTeX "--" (their missing-value marks), never "nan"."""
    return table.astype(object).where(table.notna(), None)


def main_table(stats: pd.DataFrame) -> pd.DataFrame:
    """The paper's layout: rows init x strategy, columns task / metric, cells 'mean ± std (n)'."""
    stats = stats.copy()
    stats["cell"] = [f"{m:.1f} ± {s:.1f} ({n})" if n > 1 else f"{m:.1f} (1)" for m, s, n in zip(stats["mean"], stats["std"].fillna(0), stats["n"])]
    stats["column"] = stats.task.map(task_label) + " " + stats.metric.map(METRICS)
    index = [k for k in stats.columns if k in SETTING_KEYS] + ["init", "strategy"]
    table = stats.pivot_table(index=index, columns="column", values="cell", aggfunc="first", observed=True)
    table = _blank_missing(table.reset_index())  # a cell without runs (a partial sweep)
    table["init"] = table["init"].map(lambda v: INIT_LABELS.get(v, v))
    table["strategy"] = table["strategy"].map(strategy_label)
    return table.rename(columns={"init": "Init", "strategy": "Layer selection"})


def paired_differences(results: pd.DataFrame, reference: str, metrics: list[str], alpha: float = ALPHA) -> pd.DataFrame:
    """Per setting, init, task, strategy and metric: strategy - reference on the same seeds (a seed is a block:
    runs sharing it share the training subset, data order and draws), tested with the paired t-test.

    The comparisons of one metric in this table are one family: their p-values are Holm-corrected together
    (``p_holm``) and each interval (``ci_low``, ``ci_high``) is the paired t interval at the level Holm tested
    it at (``ci_level``), so it excludes 0 exactly when ``p_holm`` < alpha; ``bca_low``/``bca_high`` are the BCa
    bootstrap interval at the same level (from 5 seeds on); ``d_z`` = mean / sd of the differences; ``answer``
    is better / worse / not distinguishable from that interval, or "no call" below 3 seeds; where every seed gives
    the same difference the exact sign-flip test replaces the t-test (see layergeo.stats).
    """
    keys = _varying_settings(results) + ["init", "task"]
    rows, pairs = [], []
    for group_key, group in results.groupby(keys):
        group_key = group_key if isinstance(group_key, tuple) else (group_key,)
        ref = group[group.strategy == reference].set_index("seed")
        if ref.empty:
            continue
        for strategy, runs in group[group.strategy != reference].groupby("strategy"):
            runs = runs.set_index("seed")
            for metric in metrics:
                if metric not in runs or runs[metric].isna().all():
                    continue
                seeds = sorted(set(runs.index[runs[metric].notna()]) & set(ref.index[ref[metric].notna()]))
                rows.append({**dict(zip(keys, group_key)), "strategy": strategy, "reference": reference, "metric": metric})
                pairs.append((runs.loc[seeds, metric].to_numpy(dtype=float), ref.loc[seeds, metric].to_numpy(dtype=float)))
    if not rows:
        return pd.DataFrame(rows)
    tests: list[dict] = [{}] * len(rows)
    for metric in dict.fromkeys(row["metric"] for row in rows):
        family = [i for i, row in enumerate(rows) if row["metric"] == metric]
        for i, test in zip(family, compare_family([pairs[i] for i in family], alpha)):
            tests[i] = test
    frame = pd.DataFrame([row | test for row, test in zip(rows, tests)])
    return _order(frame).sort_values(keys + ["strategy", "metric"]).reset_index(drop=True)


def spread(stats: pd.DataFrame) -> pd.DataFrame:
    """Max - min of the strategy means over matching strategies, beside the typical seed std."""
    matching = stats[stats.strategy.astype(str) != "none"]
    keys = [k for k in stats.columns if k in SETTING_KEYS] + ["init", "task", "metric"]
    if matching.empty:  # a grid (or a budget) of none runs only
        return pd.DataFrame(columns=[*keys, "spread", "best", "worst", "mean_seed_std", "n_strategies"])
    grouped = matching.groupby(keys, observed=True)
    out = grouped["mean"].agg(lambda m: m.max() - m.min()).rename("spread").to_frame()
    out["best"] = grouped.apply(lambda g: g.loc[g["mean"].idxmax(), "strategy"], include_groups=False)
    out["worst"] = grouped.apply(lambda g: g.loc[g["mean"].idxmin(), "strategy"], include_groups=False)
    out["mean_seed_std"] = grouped["std"].mean()
    out["n_strategies"] = grouped.size()
    return out.reset_index()


def by_mapping(results: pd.DataFrame, metrics: list[str], strategy: str = "shuffle") -> pd.DataFrame:
    """The ``strategy`` runs grouped by the mapping each trained (``pairs``): its seeds and metric means.

    A 3-layer student of a 6-layer teacher has only a few fair shuffles, so seeds can share one; this
    says which, and whether a permutation rather than the seed goes with the score."""
    runs = results[results.strategy == strategy]
    if "pairs" not in runs:
        return pd.DataFrame()
    runs = runs[runs["pairs"].ne("-")]  # no mapping logged: nothing to group by
    if runs.empty:
        return pd.DataFrame()
    keys = _varying_settings(results) + ["init", "task", "pairs"]
    grouped = runs.groupby(keys, observed=True)
    out = grouped["seed"].agg(seeds=lambda s: ", ".join(str(v) for v in sorted(s)), n="count")
    out = out.join(grouped[[m for m in metrics if m in runs]].mean())
    return out.reset_index().sort_values(keys).reset_index(drop=True)


def paper_table() -> pd.DataFrame:
    """The authors' published numbers in the same layout (their settings, not ours)."""
    path = resources.files("layergeo.resources").joinpath("paper_results.csv")
    paper = pd.read_csv(path.open())
    paper["column"] = paper.dataset + " " + paper.metric
    students = paper[paper.model == "student"]
    table = students.pivot_table(index=["setting", "init", "strategy"], columns="column", values="value", aggfunc="first")
    table = _blank_missing(table.reset_index())  # a number the paper does not give
    table["init"] = table["init"].map(lambda v: INIT_LABELS.get(v, v))
    table["strategy"] = table["strategy"].map(strategy_label)
    return table.rename(columns={"setting": "Paper setting", "init": "Init", "strategy": "Layer selection"})


def display(frame: pd.DataFrame, blank: bool = False) -> pd.DataFrame:
    """A table of paired differences as printed (Markdown, LaTeX): the interval's level in percent (``ci_percent``:
    99.75, which 2 or 3 decimals of 0.9975 would round to 1.00), p-values to two significant digits (not 0.00) and a
    missing number as a missing cell ("–", not "nan"); the CSV keeps the numbers. Another table is left as it is
    (``blank``: its missing numbers blanked too)."""
    formats = {"p": lambda v: f"{v:.2g}", "p_holm": lambda v: f"{v:.2g}", "ci_level": lambda v: f"{100 * v:.4g}"}
    if not blank and not any(column in frame for column in formats):
        return frame
    frame = frame.assign(**{column: [form(v) if pd.notna(v) else None for v in frame[column]]
                            for column, form in formats.items() if column in frame})
    return _blank_missing(frame.rename(columns={"ci_level": "ci_percent"}))


def _write_table(frame: pd.DataFrame, stem: Path, float_format: str = "%.2f") -> None:
    write_text(stem.with_suffix(".csv"), frame.to_csv(index=False))
    frame = display(frame)
    write_text(stem.with_suffix(".md"), frame.to_markdown(index=False, floatfmt=".2f", missingval="–") + "\n")
    write_text(stem.with_suffix(".tex"), frame.to_latex(index=False, float_format=lambda v: float_format % v, na_rep="--"))


def _distinct(values) -> list:
    return sorted(set(values))


def _commits(env: dict) -> list:
    """The git commits a run was made at: the last sitting's and each sitting's (recorded since runs kept them)."""
    return [env.get("git_commit")] + [s["git_commit"] for s in env.get("sittings", []) if "git_commit" in s]


def provenance(root: str | Path) -> dict:
    """How the finished runs under ``root`` were made, from their env.json files.

    Counts and summed wall time per kind (teacher, student), the first start and last end
    (the span a sweep took), and every distinct machine (device, threads, processes),
    version set, git commit (of any sitting) and command that occur among them.
    """
    envs = [read_json(f) for f in sorted(Path(root).rglob("env.json"))]
    envs = [e for e in envs if "end" in e]
    if not envs:
        return {}
    kinds = sorted({e["kind"] for e in envs})
    first_start, last_end = min(e["start"] for e in envs), max(e["end"] for e in envs)
    return {
        "runs": {k: sum(e["kind"] == k for e in envs) for k in kinds},
        "wall_time_s": {k: round(sum(e["wall_time_s"] for e in envs if e["kind"] == k), 1) for k in kinds},
        "first_start": first_start,
        "last_end": last_end,
        "span_s": round((pd.Timestamp(last_end) - pd.Timestamp(first_start)).total_seconds()),
        "machines": _distinct(f"{e['device']} ({e['device_name']}), {e['threads']} threads, {e['processes']} process(es), "
                             f"{e['platform']}" for e in envs),
        "versions": _distinct(" ".join(f"{k} {v}" for k, v in sorted({"python": e["python"], **e["versions"]}.items()))
                             for e in envs),
        "git_commits": _distinct(str(c) for e in envs for c in _commits(e)),
        "commands": _distinct(e["command"] for e in envs if e["kind"] == "teacher" or "--config" not in e["command"]),
    }


def write_tables(results: pd.DataFrame, out: Path, title: str, paper: bool = False, with_results: bool = True) -> Path:
    """Every table of ``results`` as CSV, Markdown and LaTeX, plus ``report.md`` gathering them, under ``out``
    (``results_all`` itself only when ``with_results``)."""
    metrics = [m for m in METRICS if m in results and results[m].notna().any()]
    stats = summary_stats(results, metrics)
    tables = {
        "results_all": results.sort_values(["task", "init", "strategy", "seed"]),
        "summary": stats,
        "main_table": main_table(stats),
        "diff_vs_forward": paired_differences(results, "forward", metrics),
        "diff_vs_none": paired_differences(results, "none", metrics),
        "spread": spread(stats),
        "shuffle_by_mapping": by_mapping(results, metrics),
    }
    if paper:
        tables["paper_table"] = paper_table()
    out.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        if not table.empty and (with_results or name != "results_all"):
            _write_table(table, out / name)
    paired = ("mean over seeds, paired t-test, Holm-corrected over this table's comparisons of one metric; interval "
              "= paired t interval at the level Holm tested it at (ci_percent), BCa bootstrap at the same level beside; "
              "d_z = mean / sd of the differences; no test below 3 seeds; where every seed gives the same difference, the "
              "exact sign-flip test and its inverted interval instead (unbounded up to 5 seeds: -inf to inf); points")
    sections = [
        ("Our runs: mean ± std over seeds (n seeds), in %", "main_table"),
        (f"Paired difference to Forward (same seed): {paired}", "diff_vs_forward"),
        (f"Paired difference to None (same seed): {paired}", "diff_vs_none"),
        ("Spread between matching strategies (max - min of means) beside the mean seed std, points", "spread"),
        ("Shuffle runs by the permutation they trained (pairs), with their seeds and mean metrics", "shuffle_by_mapping"),
    ]
    if paper:
        sections.append(("The paper's published numbers (their setting: BERT-base on GLUE test server etc.; not our runs)", "paper_table"))
    text = [f"# layergeo report: {title}\n", f"{len(results)} finished student runs.\n"]
    for name_title, name in sections:
        if not tables[name].empty:
            text += [f"## {name_title}\n", display(tables[name]).to_markdown(index=False, floatfmt=".2f", missingval="–"), ""]
    write_text(out / "report.md", "\n".join(text) + "\n")
    return out


def write_report(root: str | Path, out: Path | None = None, paper: bool = False) -> Path:
    """Write every table as CSV, Markdown and LaTeX, plus ``report.md`` gathering them and ``provenance.json``."""
    runs = student_runs(root)
    results = collect_results(root, runs=runs)
    out = out or Path(root) / "report"
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "provenance.json", json.dumps(provenance(root), indent=2) + "\n")
    budgets = collect_budget_results(runs, results)
    if not budgets.empty:  # runs that evaluated test along training (train.eval_test): results at each budget
        _write_table(budgets, out / "results_by_budget")
    return write_tables(results, out, Path(root).name, paper)


def read_table(path: Path, flag: str = "") -> pd.DataFrame:
    """A CSV written by ``layergeo report``/``figures``, or one line saying why it cannot be read."""
    name = f"{flag} {path}" if flag else str(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise LayergeoError(f"{name} {what}; give the CSV written by layergeo report/figures")
    try:
        return pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, OSError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise LayergeoError(f"{name} cannot be read as a CSV ({reason}); give the file written by "
                            "layergeo report/figures") from None


def tables_from_results(results_file: Path, out: Path | None = None, paper: bool = False) -> Path:
    """Rewrite every table of a saved report from its results_all.csv (no run folders needed; results_all and
    provenance.json are left as they are) in ``out`` (default: the folder of ``results_file``), named after the
    folder above it."""
    results = read_table(Path(results_file), "--results")
    out = Path(out) if out else Path(results_file).parent
    write_tables(results, out, out.resolve().parent.name, paper, with_results=False)
    return out

