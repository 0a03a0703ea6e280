"""Geometry along training: a fixed probe set of dev examples measured every few steps, no checkpoints.

At step 0 (the untrained student) and at each probe step the student's states on the probe set are
compared with the teacher's, exactly as ``layergeo angles`` measures a checkpoint (same accumulators,
same anchors and projections, student space): per stack, student layer j and teacher pair i < k the
fraction of acute angles and the mean Thales ratio, and per (j, teacher layer i) the mean distance
|W S_j - T_i|. The teacher is fixed, so its probe states are computed once. Rows go to two tidy tables
in the run directory, one JSON line per row, appended after each probe (a line cut short by a kill is
dropped on reading, as for metrics.jsonl; :func:`trace_tables` reads them as DataFrames):

    trace_angles.jsonl     step, stack, student_layer, teacher_i, teacher_k, n_tokens, frac_acute, mean_thales_ratio
    trace_distances.jsonl  step, stack, student_layer, teacher_layer, distance
    trace_token.jsonl      step, stack, who (teacher | student), layer, state: one token's states (W S_j for the student)

A probe runs the student in eval mode under ``torch.inference_mode`` and draws no random numbers, so a
run trains the same with or without it. Memory does not grow with the number of probes beyond the rows.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import pandas as pd
import torch

from layergeo.alignment import cosines_with, first_order_check, flat_gradient, layer_alignment, strategy_pulls
from layergeo.analyse import AngleOptions, RunGeometry, summary_fractions
from layergeo.collect import LoadedRun, stack_views, texts_loader, token_states
from layergeo.config import RunConfig, TraceConfig
from layergeo.families import Family
from layergeo.geometry import MeanDistance
from layergeo.losses import normalize_states
from layergeo.models import Student
from layergeo.runs import RunDir, append_jsonl_rows, read_jsonl, truncate_jsonl
from layergeo.errors import LayergeoError
from layergeo.strategies import build_mapping

ANGLES, DISTANCES = "trace_angles.jsonl", "trace_distances.jsonl"
LAYER_ALIGNMENT, TERM_ALIGNMENT = "trace_layer_alignment.jsonl", "trace_term_alignment.jsonl"  # with trace.gradients
FIRST_ORDER = "trace_first_order.jsonl"  # with trace.gradients: predicted and realised changes after a small step
TOKEN = "trace_token.jsonl"  # one probe token's teacher states (step 0) and projected student states (every probe)
TABLES = (ANGLES, DISTANCES, LAYER_ALIGNMENT, TERM_ALIGNMENT, FIRST_ORDER, TOKEN)
STRATEGIES = ("forward", "reverse", "all_to_one", "shuffle", "rail")  # the pulls compared with the task's gradient


def probe_steps(settings: TraceConfig, total: int) -> set[int]:
    """The steps after which the probe runs (step 0, before training, is always one): every ``settings.every``
    steps, or ``settings.probes`` times spread evenly over ``total``; the last step always."""
    every = settings.every or max(1, math.ceil(total / settings.probes))
    return {0, *range(every, total + 1, every), total}


class GeometryTrace:
    """The probe set and its measurement; ``record(step)`` appends that step's rows to the run's tables."""

    def __init__(self, run: RunDir, loaded: LoadedRun, settings: TraceConfig, device: torch.device, cost: dict):
        """``cost``: a dict (this sitting's record in the run's env.json) whose "trace_s" the trace increases by its own
        time."""
        started = time.perf_counter()
        self.run, self.loaded = run, loaded
        self.cost = cost
        loader, _, _ = texts_loader(loaded, "dev", max_examples=settings.examples)
        family = loaded.family
        self.batches, self.teacher_states = [], []
        with torch.inference_mode():
            for batch in loader:
                batch = {k: v.to(device) for k, v in batch.items()}
                masks = family.masks(batch)
                teacher = family.hidden_states(loaded.teacher(**family.inputs(batch), output_hidden_states=True))
                self.teacher_states.append({stack: token_states(teacher[stack], masks[stack]) for stack in family.stacks})
                self.batches.append(batch)
        self.options = AngleOptions(max_examples=settings.examples)
        self.settings = settings
        self.gradients = GradientProbe(loaded, settings.examples, device, settings.gradient_layers) if settings.gradients else None
        self._spent(started)

    def steps(self, total: int) -> set[int]:
        return probe_steps(self.settings, total)

    def record(self, step: int, epoch: int = 0) -> dict[str, float]:
        """Append this step's rows; returns their summary for the trackers: per stack the token-weighted acute
        fraction and Thales ratio over the headline cells (student layers >= 1, teacher pairs among layers >= 1;
        ``layergeo.cells``), the mean distance over its (student layer, teacher layer) rows, and with
        ``trace.gradients`` each term's cosine with the cross-entropy gradient."""
        started = time.perf_counter()
        summary = self._record_geometry(step)
        if self.gradients is not None:
            layers, terms, first_order = self.gradients.measure(step, epoch)
            append_jsonl_rows(self.run.path / LAYER_ALIGNMENT, layers)
            append_jsonl_rows(self.run.path / TERM_ALIGNMENT, terms)
            append_jsonl_rows(self.run.path / FIRST_ORDER, first_order)
            summary |= {f"trace/cosine_with_ce/{row['term']}": row["cosine_with_ce"] for row in terms if row["cosine_with_ce"] is not None}
        self._spent(started)
        return summary

    def _spent(self, started: float) -> None:
        self.cost["trace_s"] = round(self.cost.get("trace_s", 0.0) + time.perf_counter() - started, 3)

    @torch.inference_mode()
    def _record_geometry(self, step: int) -> dict[str, float]:
        loaded, family = self.loaded, self.loaded.family
        was_training = loaded.student.training
        loaded.student.eval()
        geometries = {stack: RunGeometry(loaded, self.options, view) for stack, view in loaded.stacks.items()}
        distances = {stack: MeanDistance(g.n_teacher, len(g.anchors)) for stack, g in geometries.items()}
        token_rows = []
        for b, (batch, teacher_states) in enumerate(zip(self.batches, self.teacher_states)):
            masks = family.masks(batch)
            student = family.hidden_states(loaded.student(**family.inputs(batch)))
            for stack, geometry in geometries.items():
                teacher = teacher_states[stack]
                states = token_states(student[stack], masks[stack])
                projected = geometry.project(states)
                geometry.update(teacher, states, projected)
                distances[stack].update(teacher, projected)
                if b == 0:  # one token's states: the middle counted position of the first example
                    token = int(masks[stack][0].sum()) // 2
                    token_rows += [{"step": step, "stack": stack, "who": "student", "layer": l, "state": projected[token, a].tolist()}
                                   for a, l in enumerate(geometry.anchors)]
                    if step == 0:
                        token_rows += [{"step": 0, "stack": stack, "who": "teacher", "layer": i, "state": teacher[token, i].tolist()}
                                       for i in range(geometry.n_teacher)]
        loaded.student.train(was_training)
        append_jsonl_rows(self.run.path / TOKEN, token_rows)
        angle_rows, distance_rows, summary = [], [], {}
        for stack, geometry in geometries.items():
            angles = geometry.angles.to_frame().rename(columns={"anchor": "student_layer"})
            angles = angles[angles.student_layer.isin(geometry.anchors)]
            angle_rows.append(angles[["student_layer", "teacher_i", "teacher_k", "n_tokens", "frac_acute", "mean_thales_ratio"]]
                              .assign(step=step, stack=stack))
            mean = distances[stack].mean()  # (teacher layers, anchors)
            fractions = summary_fractions(angle_rows[-1])  # the headline cells, as in summary.json
            named = {"frac_acute": fractions["frac_acute"], "mean_thales_ratio": fractions["thales_ratio"], "distance": float(mean.mean())}
            summary |= {f"trace/{stack}/{name}": value for name, value in named.items() if value is not None}
            distance_rows += [{"step": step, "stack": stack, "student_layer": j, "teacher_layer": i, "distance": float(mean[i, a])}
                              for a, j in enumerate(geometry.anchors) for i in range(geometry.n_teacher)]
        angles = pd.concat(angle_rows, ignore_index=True)
        angles = angles[["step", "stack", *angles.columns[:-2]]].astype(object).where(angles.notna(), None)
        append_jsonl_rows(self.run.path / ANGLES, angles.to_dict("records"))
        append_jsonl_rows(self.run.path / DISTANCES, distance_rows)
        return summary

    def forget_after(self, step: int) -> None:
        """Drop the rows of probes after ``step`` (a resumed run measures them again); all rows when step is 0."""
        for name in TABLES:
            truncate_jsonl(self.run.path / name, lambda row: step > 0 and row["step"] <= step)


class GradientProbe:
    """The alignments of ``layergeo.alignment`` on 2n dev examples: n for the pulls and the KL term, n held out
    for the cross-entropy gradient they are compared with; the pull alignments at student ``layers`` (None: every
    layer >= 1). The pulls are those of the run's hidden loss: W S_j and T_i normalised as ``loss.normalize``
    says, per layer, before ½|W S_j − T_i|² (the geometry trace keeps the raw states, as ``layergeo angles``).
    The student runs in eval mode (no dropout)."""

    def __init__(self, loaded: LoadedRun, examples: int, device: torch.device, layers: list[int] | None = None):
        self.loaded, self.layers, self.normalize = loaded, layers, loaded.config.loss.normalize
        loader, _, _ = texts_loader(loaded, "dev", max_examples=2 * examples, batch_size=examples)
        batches = [{k: v.to(device) for k, v in batch.items()} for batch in loader]
        if len(batches) < 2:
            raise LayergeoError(f"trace.gradients needs {2 * examples} dev examples (n for the pulls, n held out); "
                                "lower trace.examples")
        self.pull_batch, self.held_out = batches[0], batches[1]
        family = loaded.family
        with torch.inference_mode():
            out = loaded.teacher(**family.inputs(self.pull_batch), output_hidden_states=True)
            masks = family.masks(self.pull_batch)
            self.teacher_logits = out.logits.float().clone()
            self.teacher_states = {stack: self._normalised(token_states(states, masks[stack]).clone())
                                   for stack, states in family.hidden_states(out).items()}
        config = loaded.config
        depths = {stack: (view.teacher_layers, view.student_layers) for stack, view in loaded.stacks.items()}
        self.mappings = {name: build_mapping(dataclasses.replace(config.matching, strategy=name), depths, config.seed)
                         for name in STRATEGIES}

    def _normalised(self, teacher: torch.Tensor) -> torch.Tensor:
        """(N, L_T + 1, d) teacher states, each layer normalised as the hidden loss normalises it."""
        return torch.stack([normalize_states(teacher[:, i], self.normalize) for i in range(teacher.shape[1])], 1)

    def _projected(self, hidden: tuple[torch.Tensor, ...], mask: torch.Tensor, stack: str) -> list[torch.Tensor]:
        """W S_j at the counted positions, normalised as the hidden loss does, (N, d) per student layer j, in the
        autograd graph."""
        return [normalize_states(self.loaded.student.project(l, h[mask.bool()].float(), stack), self.normalize)
                for l, h in enumerate(hidden)]

    def measure(self, step: int, epoch: int) -> tuple[list[dict], list[dict], list[dict]]:
        """(layer rows: step, stack, student_layer, teacher_i, teacher_k, cosine; term rows: step, term, cosine_with_ce;
        first-order rows: step, stack and ``alignment.first_order_check``'s columns, for the last student layer)."""
        loaded, family, student = self.loaded, self.loaded.family, self.loaded.student
        was_training = student.training
        student.eval()
        params = [p for p in student.parameters() if p.requires_grad]
        with torch.enable_grad():
            ce = flat_gradient(family.task_loss(student(**family.inputs(self.held_out)).logits, self.held_out), params)
            out = student(**family.inputs(self.pull_batch))
            kl = flat_gradient(family.kl_loss(out.logits, self.teacher_logits, self.pull_batch, loaded.config.loss.temperature), params)
            masks = family.masks(self.pull_batch)
            layer_rows, pulls, first_order = [], [], []
            targets = {name: {} for name in STRATEGIES}
            for stack, hidden in family.hidden_states(out).items():
                states = self._projected(hidden, masks[stack], stack)
                teacher = self.teacher_states[stack]
                for j, matrix in layer_alignment(states, teacher, params, self.layers or range(1, len(states))).items():
                    layer_rows += [{"step": step, "stack": stack, "student_layer": j, "teacher_i": i, "teacher_k": k,
                                    "cosine": _number(matrix[i, k])} for i in range(len(matrix)) for k in range(len(matrix)) if i < k]
                for name, mapping in self.mappings.items():
                    targets[name] = dict(mapping.pairs_at(epoch, step)[stack])
                pulls.append(strategy_pulls(states, teacher, params, targets))
            for stack in self.teacher_states:  # last: it steps the parameters in place, which the graphs above read

                def states_fn(stack=stack):
                    return self._projected(family.hidden_states(student(**family.inputs(self.pull_batch)))[stack], masks[stack], stack)

                last = loaded.stacks[stack].student_layers
                first_order += [{"step": step, "stack": stack, **row}
                                for row in first_order_check(states_fn, params, self.teacher_states[stack], [last])]
        student.train(was_training)
        hidden = sum(pulls)  # (strategies, P): every stack's pulls of each strategy
        cosines = cosines_with(torch.cat([hidden, kl[None]]), ce).tolist()
        terms = [{"step": step, "term": name, "cosine_with_ce": _number(value)} for name, value in zip([*STRATEGIES, "kl"], cosines)]
        return layer_rows, terms, first_order


def _number(value) -> float | None:
    """A cosine for a JSON line: None where it is undefined (a zero gradient, e.g. a copied student layer that
    starts exactly at its teacher layer, whose pull is zero)."""
    value = float(value)
    return value if math.isfinite(value) else None


def live_run(run: RunDir, config: RunConfig, family: Family, teacher, student: Student, tokenizer, strategy: str) -> LoadedRun:
    """A run being trained, seen as ``load_run`` sees a saved one (no mapping logged yet: no matched pairs)."""
    return LoadedRun(run, config, "live", family, teacher, student, tokenizer, strategy,
                     stack_views(family, teacher.config, student.model.config, []))


def trace_tables(run: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A run's trace: (angles, distances); empty frames when it has none."""
    return tuple(pd.DataFrame(read_jsonl(Path(run) / name)) for name in (ANGLES, DISTANCES))


def alignment_tables(run: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """A run's gradient traces (trace.gradients): (layer alignment, term alignment, first-order check); empty
    frames without them."""
    return tuple(pd.DataFrame(read_jsonl(Path(run) / name)) for name in (LAYER_ALIGNMENT, TERM_ALIGNMENT, FIRST_ORDER))
