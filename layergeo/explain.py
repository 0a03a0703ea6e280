"""``layergeo explain``: one page that shows, from a run's geometry trace, why its matching did what it did.

Everything comes from the trace written during training (``layergeo.trace``): no checkpoint is loaded.
Panels: (a) the acute fraction and Thales ratio over training (student layers >= 1, teacher pairs among
layers >= 1); (b) the distance from each student state to its matched teacher layer and to the others;
(c) one probe token in the plane through two teacher states, with the student's trajectory and the
Thales ball of that pair (inside the ball the angle is obtuse); with ``trace.gradients``, (d) the
parameter-space alignment of pulls toward two teacher layers at start, middle and end and (e) each
strategy's hidden-loss gradient and the KL gradient against the task's (CE) gradient. A Markdown summary
states the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from layergeo import plots
from layergeo.analyse import expand_runs, pooled_settings, summary_fractions
from layergeo.cells import layer_names
from layergeo.errors import LayergeoError
from layergeo.families import get_family
from layergeo.runs import RunDir, read_jsonl, write_text
from layergeo.strategies import MappingOptions, build_mapping, forward_targets
from layergeo.trace import STRATEGIES, TOKEN, alignment_tables, trace_tables


def deep_geometry(angles: pd.DataFrame) -> pd.DataFrame:
    """Per stack and step: the token-weighted acute fraction and mean Thales ratio over the headline cells, student
    layers >= 1 and teacher pairs among layers >= 1 (the authors' selection; ``analyse.summary_fractions``), and
    ``cells``, their name."""
    rows = []
    for (stack, step), group in angles.groupby(["stack", "step"]):
        fractions = summary_fractions(group)
        rows.append({"stack": stack, "step": step, **{k: fractions[k] for k in ("frac_acute", "thales_ratio", "cells")}})
    return pd.DataFrame(rows)


def matched_at(logged: list[dict], stacks: list[str]) -> dict[str, list[tuple[int, dict[int, int]]]]:
    """Per stack, the mappings a run trained (its mapping.jsonl records): [(first step, {student layer >= 1: teacher
    layer})] (a one-stack run logs a plain list of pairs: it is ``stacks[0]``'s)."""
    out: dict[str, list] = {}
    for record in logged:
        pairs = record["pairs"] if isinstance(record["pairs"], dict) else {stacks[0]: record["pairs"]}
        for stack, stack_pairs in pairs.items():
            out.setdefault(stack, []).append((record["step"], {s: t for s, t in stack_pairs if s >= 1}))
    return out


def matched_distances(distances: pd.DataFrame, mappings: dict[str, list], depths: dict[str, tuple[int, int]]) -> pd.DataFrame:
    """Per stack and step: mean over student layers >= 1 of the distance to the matched teacher layer, and of the
    mean distance to the other teacher layers >= 1. The state after ``step`` updates was trained by the mappings
    logged before it; a run that matched nothing is measured against the forward targets (where forward would pull)."""
    rows = []
    for (stack, step), group in distances.groupby(["stack", "step"]):
        current = [pairs for first, pairs in mappings.get(stack, []) if first <= max(step - 1, 0)]
        pairs = current[-1] if current and current[-1] else _forward(*depths[stack])
        table = group.set_index(["student_layer", "teacher_layer"]).distance
        matched = [table[(j, t)] for j, t in pairs.items() if (j, t) in table]
        others = [table[(j, i)] for j, t in pairs.items() for i in range(1, depths[stack][0] + 1) if i != t and (j, i) in table]
        rows.append({"stack": stack, "step": step, "matched": float(np.mean(matched)), "unmatched": float(np.mean(others))})
    return pd.DataFrame(rows)


def _forward(teacher_layers: int, student_layers: int) -> dict[int, int]:
    return {j + 1: t for j, t in enumerate(forward_targets(teacher_layers, student_layers))}


def token_plane(token: pd.DataFrame, stack: str, layer: int, pair: tuple[int, int]) -> dict:
    """One token in the plane through teacher states T_i, T_k and the student's last state W S_j.

    Returns the 2-D coordinates (origin T_i, x along T_k - T_i) of every teacher state, of the student's
    trajectory and the Thales circle of the pair (centre, radius): the ball's cross-section in this plane.
    Points off the plane are drawn by their orthogonal projection onto it.
    """
    teacher = token[(token["stack"] == stack) & (token.who == "teacher")].sort_values("layer")
    student = token[(token["stack"] == stack) & (token.who == "student") & (token.layer == layer)].sort_values("step")
    t = np.array(teacher.state.tolist(), dtype=float)
    s = np.array(student.state.tolist(), dtype=float)
    i, k = pair
    e1 = t[k] - t[i]
    e1 /= np.linalg.norm(e1)
    rest = s[-1] - t[i] - (s[-1] - t[i]) @ e1 * e1
    if np.linalg.norm(rest) == 0:  # the last state on the pair's line: any direction orthogonal to it
        axis = np.eye(len(e1))[np.argmin(np.abs(e1))]
        rest = axis - axis @ e1 * e1
    e2 = rest / np.linalg.norm(rest)
    plane = lambda x: np.stack([(x - t[i]) @ e1, (x - t[i]) @ e2], -1)
    return {"teacher": plane(t), "student": plane(s), "steps": student.step.tolist(),
            "centre": plane((t[i] + t[k]) / 2), "radius": float(np.linalg.norm(t[k] - t[i]) / 2), "pair": pair}


@dataclass
class RunTrace:
    """What the pages read from one run: its identity and its trace tables, the stacks' depths (teacher, student)
    from the traced rows, the deep geometry and the matched / unmatched distances per stack and step."""

    run: RunDir
    strategy: str
    init: str
    seed: int
    depths: dict[str, tuple[int, int]]
    geometry: pd.DataFrame
    distances: pd.DataFrame
    layers: pd.DataFrame
    terms: pd.DataFrame
    first_order: pd.DataFrame


def read_trace(path: str | Path) -> RunTrace:
    """A student run's trace, or one line saying why there is none."""
    run = RunDir(path)
    if not run.path.is_dir() or run.kind() != "student":
        raise LayergeoError(f"{run.path} is not a student run directory; give one written by layergeo train")
    angles, distances = trace_tables(run.path)
    if angles.empty:
        raise LayergeoError(f"{run.path} has no geometry trace (trace_angles.jsonl): it was trained with trace.examples=0 "
                            "or before layergeo traced runs; train it again with the default trace settings")
    config, logged = run.config(), run.mappings()
    depths = {stack: (int(g.teacher_k.max()), int(g.student_layer.max())) for stack, g in angles.groupby("stack", sort=False)}
    return RunTrace(run, logged[0]["strategy"] if logged else config.matching.strategy, config.student.init, config.seed,
                    depths, deep_geometry(angles), matched_distances(distances, matched_at(logged, list(depths)), depths),
                    *alignment_tables(run.path))


def traced_stack(trace: RunTrace, stack: str | None) -> str:
    """``stack`` if the run traced it (None: its first stack, the encoder of a seq2seq run), or one line saying
    which stacks it traced."""
    if stack is None:
        return next(iter(trace.depths))
    if stack not in trace.depths:
        raise LayergeoError(f"{trace.run.path} traced the stacks {', '.join(trace.depths)}, not {stack!r}; "
                            f"give --stack one of them")
    return stack


def explain_run(path: str | Path, out: Path | None = None, stack: str | None = None) -> Path:
    """Write explain.png/.pdf and explain.md for one run (into ``<run>/explain/`` by default). Panels (a) and (b)
    draw every traced stack; the text, the token plane (c) and the gradient matrices (d) read ``stack`` (None: the
    first traced)."""
    trace = read_trace(path)
    stack = traced_stack(trace, stack)
    out = out or trace.run.path / "explain"
    token = pd.DataFrame(read_jsonl(trace.run.path / TOKEN))
    lt, ls = trace.depths[stack]
    # the plane of the last student layer's forward target (T_L) and its reverse target
    reverse = dict(build_mapping(MappingOptions("reverse"), {stack: (lt, ls)}).pairs_at()[stack])[ls]
    planes = token_plane(token, stack, ls, (lt, reverse)) if not token.empty and reverse != lt else None
    title = f"{trace.run.path.name}: {plots.strategy_label(trace.strategy)}, {plots.INIT_LABELS.get(trace.init, trace.init).lower()}"
    matched = "to the forward targets (matching none)" if trace.strategy == "none" else "to the matched layer"
    plots.save_figure(plots.explain_page(trace.geometry, trace.distances, planes, trace.layers, trace.terms, title, matched,
                                         stack), out / "explain")
    write_text(out / "explain.md", summary_text(trace, planes, stack) + "\n")
    tables = {"geometry_over_training": trace.geometry, "distances_over_training": trace.distances,
              "pull_alignment": trace.layers, "pulls_vs_task": trace.terms}  # (a), (b), (d), (e); the last two with gradients
    for name, table in tables.items():
        if not table.empty:
            write_text(out / f"{name}.csv", table.to_csv(index=False))
    return out


def summary_text(trace: RunTrace, planes: dict | None, stack: str) -> str:
    """What the run shows on one of its stacks, in sentences with its numbers."""
    run, strategy, geometry, dist, terms, first_order = (trace.run, trace.strategy, trace.geometry, trace.distances,
                                                         trace.terms, trace.first_order)
    results = run.results() if run.finished else {}
    g = geometry[geometry["stack"] == stack].sort_values("step")
    d = dist[dist["stack"] == stack].sort_values("step")
    first, last = g.iloc[0], g.iloc[-1]
    lines = [f"# {run.path.name}: what its trace shows\n",
             f"Strategy {plots.strategy_label(strategy)}; {stack} stack; probes at steps {', '.join(map(str, g.step))}.\n",
             f"- Angles at the student ({first.cells}): {100 * first.frac_acute:.1f}% acute at "
             f"step {first.step}, {100 * last.frac_acute:.1f}% at step {last.step}; the Thales ratio (distance from a pair's "
             f"midpoint in units of half the pair's distance; above 1 = acute) went from {first.thales_ratio:.2f} to "
             f"{last.thales_ratio:.2f}. An acute angle means a step toward one teacher layer also shortens the distance to "
             "the other."]
    if len(d):
        a, b = d.iloc[0], d.iloc[-1]
        lines.append(f"- Distance to the matched teacher layer: {a.matched:.2f} → {b.matched:.2f} ({_change(a.matched, b.matched)}); "
                     f"to the other teacher layers: {a.unmatched:.2f} → {b.unmatched:.2f} ({_change(a.unmatched, b.unmatched)})."
                     + (" Matching none, \"matched\" is where forward matching would pull." if strategy == "none" else ""))
    if planes is not None:
        inside = np.linalg.norm(planes["student"][-1] - planes["centre"]) < planes["radius"]
        i, k = planes["pair"]
        lines.append(f"- The probe token's last student state ends {'inside' if inside else 'outside'} the Thales ball of "
                     f"T{i} and T{k} (in their plane): the angle it sees between them is {'obtuse' if inside else 'acute'}.")
    if not terms.empty:
        t0, t1 = terms[terms.step == terms.step.min()], terms[terms.step == terms.step.max()]
        fmt = lambda frame: ", ".join(f"{plots.strategy_label(r.term) if r.term != 'kl' else 'KL'} {r.cosine_with_ce:+.2f}"
                                      for r in frame.itertuples())
        lines.append(f"- Cosine of each pull's parameter gradient with the task's (CE, held-out batch) gradient at step "
                     f"{int(t0.step.iloc[0])}: {fmt(t0)}; at step {int(t1.step.iloc[0])}: {fmt(t1)}.")
    if not first_order.empty:
        signs = first_order_signs(first_order, stack)
        lines.append(f"- First-order check (S{trace.depths[stack][1]}, a parameter step of 1e-5 |θ| toward each teacher "
                     f"layer k, the change of the squared distance to every other layer i, {int(signs.cases.sum())} cases "
                     f"over the probes): the parameter-space prediction has the sign of the realised change in "
                     f"{_percent(signs.param_sign @ signs.cases / signs.cases.sum())} of cases, the state-space one (the "
                     f"paper's idealised step) in {_percent(signs.state_sign @ signs.cases / signs.cases.sum())}.")
    if results:
        lines.append(f"- Dev metrics of the best checkpoint: {get_family(run.config().teacher.family).describe_metrics(results['dev'])}.")
    return "\n".join(lines)


def first_order_signs(first_order: pd.DataFrame, stack: str) -> pd.DataFrame:
    """Per probe step of one stack's first-order check (the cases i != k): cases, and the fraction whose parameter-
    and state-space predictions have the sign of the realised change (param_sign, state_sign)."""
    cases = first_order[(first_order["stack"] == stack) & (first_order.toward != first_order.teacher_layer)]
    right = {column: np.sign(cases[view]) == np.sign(cases.realised)
             for view, column in (("param_view", "param_sign"), ("state_view", "state_sign"))}
    return pd.DataFrame(right).groupby(cases.step).agg("mean").assign(cases=cases.groupby("step").size())


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.0f}%" if np.isfinite(fraction) else "–"


def _change(before: float, after: float) -> str:
    return f"{100 * (after - before) / before:+.0f}%" if before else "from 0"


def run_trace_summary(trace: RunTrace, stack: str | None = None) -> pd.DataFrame:
    """One run's trace per step on ``stack`` (None: its first): frac_acute, thales_ratio, matched, unmatched and, with gradient
    traces, own_pull_vs_ce (the cosine of the run's own strategy's pull with the CE gradient; NaN for none),
    pulls_aligned (the fraction of measured student layers j >= 1 and teacher pairs i < k whose parameter pulls have a
    positive cosine) and param_sign / state_sign (the fraction of first-order cases i != k whose parameter- and
    state-space predictions have the realised sign)."""
    stack = traced_stack(trace, stack)
    table = trace.geometry[trace.geometry["stack"] == stack].merge(trace.distances, on=["stack", "step"])
    terms, layers, first_order = trace.terms, trace.layers, trace.first_order
    own = terms[terms.term == trace.strategy].set_index("step").cosine_with_ce if not terms.empty else pd.Series(dtype=float)
    table = table.assign(own_pull_vs_ce=table.step.map(own))
    if not layers.empty:
        cosines = layers[layers["stack"] == stack].dropna(subset=["cosine"])
        table["pulls_aligned"] = table.step.map(cosines.groupby("step").cosine.apply(lambda c: float((c > 0).mean())))
    if not first_order.empty:
        signs = first_order_signs(first_order, stack)
        for column in ("param_sign", "state_sign"):
            table[column] = table.step.map(signs[column])
    return table.assign(run=trace.run.path.name, strategy=trace.strategy, init=trace.init, seed=trace.seed)


def explain_runs(paths: list[str], out: Path, stack: str | None = None) -> Path:
    """Compare the traces of several runs (one setting, any strategies and inits) on one stack (None: the first
    traced): compare.png/.pdf, compare.md and compare.csv under ``out``. Runs of one strategy and init are averaged
    over their seeds."""
    runs = expand_runs(paths)
    _, pooled = pooled_settings(runs, strict=True)
    traces = [read_trace(path) for path in runs]
    table = pd.concat([run_trace_summary(trace, stack) for trace in traces], ignore_index=True)
    write_text(out / "compare.csv", table.to_csv(index=False))
    pulls = pulls_against_task(traces)
    several = len(traces[0].depths) > 1
    plots.save_figure(plots.trace_comparison(table, table["stack"].iloc[0] if several else ""), out / "compare")
    gradients = "pulls_aligned" in table
    header = ("| init | strategy | seeds | acute fraction, first → last probe | Thales ratio | distance to the matched layer "
              "(None: to the forward targets) | own pull vs CE (mean over probes) |")
    if gradients:
        measured = layer_names("S", pd.concat([t.layers.student_layer for t in traces if not t.layers.empty]))
        header += (f" parameter pulls toward two teacher layers aligned (cos > 0; at {measured}), first → last | "
                   "first-order sign right: parameter / state view |")
    lines = [f"# Traces compared\n", f"{pooled}" + (f"; {table['stack'].iloc[0]} stack" if several else "") + ".\n", header, "|---" * (header.count("|") - 1) + "|"]
    for (init, strategy), group in table.groupby(["init", "strategy"]):
        columns = [c for c in ("frac_acute", "thales_ratio", "matched", "own_pull_vs_ce", "pulls_aligned", "param_sign", "state_sign") if c in group]
        ends = group.groupby("step")[columns].mean().sort_index()
        a, b = ends.iloc[0], ends.iloc[-1]
        own = f"{ends.own_pull_vs_ce.mean():+.2f}" if ends.own_pull_vs_ce.notna().any() else "–"
        line = (f"| {init} | {plots.strategy_label(strategy)} | {group.seed.nunique()} | {100 * a.frac_acute:.1f}% → "
                f"{100 * b.frac_acute:.1f}% | {a.thales_ratio:.2f} → {b.thales_ratio:.2f} | {a.matched:.2f} → {b.matched:.2f} | {own} |")
        if gradients:  # "–" for runs of the comparison traced without gradients
            line += (f" {_percent(a.pulls_aligned)} → {_percent(b.pulls_aligned)} | {_percent(ends.param_sign.mean())} / "
                     f"{_percent(ends.state_sign.mean())} |")
        lines.append(line)
    if not pulls.empty:
        write_text(out / "pulls_vs_ce.csv", pulls.to_csv())
        labels = [plots.strategy_label(t) if t != "kl" else "KL" for t in pulls.columns]
        lines += ["", "Each pull's cosine with the task's gradient (CE on a held-out probe batch), measured at the parameters "
                  "of the run in the row whatever strategy trains it; mean over probes (and seeds)"
                  + (" (a pull is its hidden loss over every stack: the same table on each stack's comparison)" if several else "")
                  + ":", "",
                  "| init | run trained with | " + " | ".join(labels) + " |", "|---" * (len(labels) + 2) + "|"]
        lines += [f"| {init} | {plots.strategy_label(strategy)} | " + " | ".join(f"{v:+.2f}" for v in row) + " |"
                  for (init, strategy), row in pulls.iterrows()]
    write_text(out / "compare.md", "\n".join(lines) + "\n")
    return out


def pulls_against_task(traces: list[RunTrace]) -> pd.DataFrame:
    """Rows (init, the strategy a run trained with), columns the pulls (forward, ..., rail, kl): the mean over
    probes and seeds of each pull's cosine with the CE gradient; empty without gradient traces."""
    terms = [t.terms.assign(init=t.init, strategy=t.strategy, seed=t.seed) for t in traces if not t.terms.empty]
    if not terms:
        return pd.DataFrame()
    terms = pd.concat(terms, ignore_index=True)
    per_run = terms.groupby(["init", "strategy", "seed", "term"]).cosine_with_ce.mean()
    table = per_run.groupby(["init", "strategy", "term"]).mean().unstack("term")
    return table[[t for t in (*STRATEGIES, "kl") if t in table]]
