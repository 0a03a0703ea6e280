"""``layergeo angles`` and ``layergeo geometry``: measure one run, or compare many.

One pass over the evaluation texts feeds every accumulator of :mod:`layergeo.geometry`, one set
per stack of the run's model family. Results of a run go to
``<run>/geometry/<checkpoint>-<space>-<source>/`` (so runs with other options never overwrite
them) or to ``--out``; every file is written atomically. A one-stack run (an encoder) writes its
tables and figures there; a run with several stacks (an encoder-decoder) writes each stack's into
a subfolder named after it (``encoder/``, ``decoder/``), with the stack in every table and figure
title, plus ``angles.csv`` of all stacks and a ``summary.json`` holding each stack's summary.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from layergeo import plots
from layergeo.cells import cells_label, headline_cells
from layergeo.collect import LoadedRun, StackView, describe, hidden_states, load_run, texts_loader
from layergeo.errors import LayergeoError
from layergeo.progress import progress_bar
from layergeo.geometry import (AngleAccumulator, LinearCKA, MeanDistance, TokenMeanCosine, TransitionCosine, frac_positive,
                               update_angles)
from layergeo.data import read_texts_file
from layergeo.runs import RunDir, atomic_dir, check_output_path, has_content, write_json, write_text
from layergeo.processes import resolve_device

SPACES = ("student", "teacher")


@dataclass(frozen=True)
class AngleOptions:
    checkpoint: str = "best"  # init (untrained student) | best
    space: str = "student"  # student: W^T(T_i - W S_l); teacher: T_i - W S_l
    split: str = "dev"
    texts: str | None = None  # a file of sentences, one per line, instead of a split
    max_examples: int | None = None
    max_length: int | None = None
    bins: int = 200
    batch_size: int = 32
    device: str = "auto"
    extras: bool = False  # distances, distance ratio, CKA, transition cosine
    with_embeddings: bool = False  # headline numbers and figures over every cell, not the authors' (layergeo.cells)

    def tag(self) -> str:
        """Folder name that identifies the options that change the numbers."""
        if self.texts:
            source = f"texts-{Path(self.texts).stem}-{hashlib.sha256(Path(self.texts).read_bytes()).hexdigest()[:8]}"
        else:
            source = self.split
        if self.max_examples:
            source += f"{self.max_examples}"
        if self.max_length:
            source += f"-len{self.max_length}"
        return f"{self.checkpoint}-{self.space}-{source}"

    def check(self) -> None:
        if self.space not in SPACES:
            raise LayergeoError(f"unknown --space {self.space!r}; choose student (the pull the student feels) or teacher")
        if self.texts is not None:
            read_texts_file(self.texts)  # exists, is UTF-8, has sentences
        elif self.split not in ("train", "dev", "test"):
            raise LayergeoError(f"unknown --split {self.split!r}; choose train, dev or test")
        for flag, value, least in (("--max-examples", self.max_examples, 1), ("--max-length", self.max_length, 2),
                                   ("--bins", self.bins, 1), ("--batch-size", self.batch_size, 1)):
            if value is not None and value < least:
                raise LayergeoError(f"{flag} {value}: give a whole number of at least {least}")
        resolve_device(self.device)


def _matrix_frame(matrix: np.ndarray, rows: list[str], cols: list[str], row_name: str, col_name: str, value: str) -> pd.DataFrame:
    """A (rows, cols) matrix as a tidy table with one row per cell."""
    frame = pd.DataFrame(matrix, index=pd.Index(rows, name=row_name), columns=cols)
    return frame.reset_index().melt(id_vars=row_name, var_name=col_name, value_name=value)


def acute_fraction(angles: pd.DataFrame, pairs: list[tuple[int, int]] | None = None, partner: dict[int, int] | None = None) -> float | None:
    """Token-weighted fraction of acute angles over the rows selected.

    ``pairs`` (student s, teacher t): angles at S_s that have T_t as one side;
    ``partner`` {s: t'}: only the angle between T_t and T_t' at S_s. None = all rows.
    """
    mask = pd.Series(pairs is None, index=angles.index)
    for s, t in pairs or []:
        at = (angles.student_layer == s) & ((angles.teacher_i == t) | (angles.teacher_k == t))
        if partner is not None:
            other = partner.get(s)
            if other is None or other == t:
                continue
            at &= (angles.teacher_i == min(t, other)) & (angles.teacher_k == max(t, other))
        mask |= at
    chosen = angles[mask & (angles.n_tokens > 0)]
    if chosen.empty:
        return None
    return float((chosen.frac_acute * chosen.n_tokens).sum() / chosen.n_tokens.sum())


def mean_thales_ratio(angles: pd.DataFrame) -> float | None:
    """Token-weighted mean over the rows of the mean Thales ratio |u_i + u_k| / |u_i - u_k|.

    Per token it is |S - m| / (|T_i - T_k| / 2), m the midpoint of T_i and T_k: the student's
    distance from the pair in units of half the pair's distance (> 1 exactly when the angle is
    acute). Unlike the acute fraction it keeps ranking students once every angle is acute.
    """
    chosen = angles[(angles.n_tokens > 0) & angles.mean_thales_ratio.notna()]
    if chosen.empty:
        return None
    return float((chosen.mean_thales_ratio * chosen.n_tokens).sum() / chosen.n_tokens.sum())


def summary_fractions(angles: pd.DataFrame, with_embeddings: bool = False, matched: list | None = None,
                      forward: list | None = None) -> dict:
    """One run's (one stack's) summary numbers from its angles cells.

    Over the headline cells (:func:`layergeo.cells.headline_cells`: the authors' by default, every cell
    ``with_embeddings``): frac_acute, thales_ratio and, given the matched and forward (student, teacher) pairs,
    frac_acute_matched, frac_acute_forward and frac_acute_matched_vs_forward (None without pairs); over every cell:
    frac_acute_all and thales_ratio_all; ``cells`` names the headline cells.
    """
    cells = headline_cells(angles, with_embeddings)
    matched, forward = [tuple(p) for p in matched or []], [tuple(p) for p in forward or []]
    return {
        "frac_acute": acute_fraction(cells),
        "frac_acute_matched": acute_fraction(cells, matched) if matched else None,
        "frac_acute_forward": acute_fraction(cells, forward) if forward else None,
        "frac_acute_matched_vs_forward": acute_fraction(cells, matched, dict(forward)) if matched else None,
        "frac_acute_all": acute_fraction(angles),
        "thales_ratio": mean_thales_ratio(cells),
        "thales_ratio_all": mean_thales_ratio(angles),
        "cells": cells_label(cells),
    }


def anchor_layers(loaded: LoadedRun, view: StackView) -> list[int]:
    """The student layers of ``view`` whose states are compared with the teacher's: all of them at the teacher's
    width, those with a learned projection for a narrower student (none when it was matched to nothing)."""
    narrow = loaded.student_width != loaded.teacher_width
    return [l for l in range(view.student_layers + 1)
            if not narrow or loaded.student.projection_matrix(l, view.stack) is not None]


class RunGeometry:
    """All accumulators for one (run, options) pass over one stack."""

    def __init__(self, loaded: LoadedRun, options: AngleOptions, view: StackView):
        self.loaded, self.options, self.view = loaded, options, view
        self.n_teacher, self.n_student = view.teacher_layers + 1, view.student_layers + 1
        self.projections = [loaded.student.projection_matrix(l, view.stack) for l in range(self.n_student)]
        self.anchors = anchor_layers(loaded, view)
        if not self.anchors:
            raise LayergeoError(
                f"run {loaded.run.path} has a narrower student but no projections (strategy {loaded.strategy}); "
                "angles need the learned student->teacher projection"
            )
        self.angles = AngleAccumulator(self.n_student, self.n_teacher, options.bins)
        self.deep_anchors = [l for l in self.anchors if l >= 1]
        self.authors = TokenMeanCosine() if self.n_teacher >= 3 and self.deep_anchors else None
        self.n_tokens = 0
        if options.extras:
            self.tt = MeanDistance(self.n_teacher, self.n_teacher)
            self.ts = MeanDistance(self.n_teacher, len(self.anchors))
            self.ss = MeanDistance(self.n_student, self.n_student)
            self.cka = LinearCKA([loaded.teacher_width] * self.n_teacher, [loaded.student_width] * self.n_student)
            self.transitions = TransitionCosine(len(self.anchors))

    def project(self, student: torch.Tensor) -> torch.Tensor:
        """The anchors' states W S_l: student (N, L_S+1, d_s) -> (N, anchors, d_t)."""
        return torch.stack([self.loaded.student.project(l, student[:, l], self.view.stack) for l in self.anchors], 1)

    @torch.inference_mode()
    def update(self, teacher: torch.Tensor, student: torch.Tensor, projected: torch.Tensor | None = None) -> None:
        """teacher (N, L_T+1, d_t), student (N, L_S+1, d_s); ``projected``: :meth:`project` of ``student`` when the
        caller has it."""
        self.n_tokens += teacher.shape[0]
        update_angles(self.angles, teacher, student, self.anchors, self.projections, self.options.space)
        if projected is None and (self.authors is not None or self.options.extras):
            projected = self.project(student)
        if self.authors is not None:  # S_0 is a placeholder: the statistic starts at student layer 1
            deep = projected[:, len(self.anchors) - len(self.deep_anchors):]
            self.authors.update(teacher, torch.cat([deep[:, :1], deep], 1))
        if self.options.extras:
            self.tt.update(teacher, teacher)
            self.ts.update(teacher, projected)
            self.ss.update(student, student)
            self.cka.update(list(teacher.unbind(1)), list(student.unbind(1)))
            forward = [0] + [t for _, t in self.view.forward_pairs]
            self.transitions.update(teacher[:, [forward[l] for l in self.anchors]], projected)


def analyse_run(path: str | Path, options: AngleOptions, out: Path | None = None, reuse: bool = False) -> Path:
    """Measure one run and write its tables and figures; returns the output folder."""
    options.check()
    if out is not None:
        check_output_path(out)
        if has_content(out) and not (out / "summary.json").is_file():
            raise LayergeoError(f"--out {out} already holds other files; give a new folder (or one an earlier "
                                "angles/geometry command wrote, which is replaced)")
    loaded = load_run(path, options.checkpoint)
    out = out or loaded.run.path / "geometry" / options.tag()
    if reuse and _matches(out, options, loaded.run):
        return out
    if not loaded.run.finished:
        print(f"warning: run {loaded.run.path} has not finished; measuring its {options.checkpoint} checkpoint as it is now",
              file=sys.stderr)
    limit = loaded.family.max_positions(loaded.teacher.config)
    if options.max_length is not None and limit is not None and options.max_length > limit:
        raise LayergeoError(f"--max-length {options.max_length} is above the model's limit of {limit} positions; "
                            f"choose at most {limit}")
    device = resolve_device(options.device)
    loader, n_examples, source = texts_loader(loaded, options.split, Path(options.texts) if options.texts else None,
                                              options.max_examples, options.max_length, options.batch_size)
    if n_examples == 0:
        raise LayergeoError(f"no examples to analyse in {source}")
    geometries = {stack: RunGeometry(loaded, options, view) for stack, view in loaded.stacks.items()}
    bar = progress_bar(len(loader), f"angles {loaded.run.path.name} ({options.checkpoint})", unit="batch")
    for states in hidden_states(loaded, loader, device):
        for stack, (teacher, student) in states.items():
            geometries[stack].update(teacher, student)
        bar.update(1)
    bar.close()
    with atomic_dir(out) as tmp:  # the folder appears complete, or not at all
        if len(geometries) == 1:
            _write(tmp, next(iter(geometries.values())), options, n_examples, source)
        else:
            _write_stacks(tmp, geometries, options, n_examples, source)
    return out


def has_analysis(run: Path, options: AngleOptions) -> bool:
    """Whether a finished run already holds the analysis ``options`` describe (in its own geometry folder)."""
    run_dir = RunDir(run)
    return run_dir.finished and _matches(run_dir.path / "geometry" / options.tag(), options, run_dir)


def _matches(out: Path, options: AngleOptions, run: RunDir) -> bool:
    summary = out / "summary.json"
    if not summary.is_file() or not run.finished or summary.stat().st_mtime < run.results_file.stat().st_mtime:
        return False
    recorded = json.loads(summary.read_text()).get("options", {})
    # an analysis with the extras (geometry) also answers a request without them (angles): same folder, a superset;
    # with_embeddings changes only the headline, which a comparison computes from angles.csv
    free = ("device", "extras", "with_embeddings")
    same = {k: v for k, v in recorded.items() if k not in free} == {k: v for k, v in asdict(options).items() if k not in free}
    has_extras = (out / "cka.csv").is_file() or any(out.glob("*/cka.csv"))
    return same and (recorded.get("extras") or not options.extras) and (not options.extras or has_extras)


def _write_stacks(out: Path, geometries: dict[str, RunGeometry], options: AngleOptions, n_examples: int, source: str) -> None:
    """Each stack into ``out/<stack>/``; all stacks' angles in ``out/angles.csv``; summaries in ``out/summary.json``."""
    stacks, frames = {}, []
    for stack, geometry in geometries.items():
        stacks[stack], angles = _write(out / stack, geometry, options, n_examples, source)
        frames.append(angles)
    write_text(out / "angles.csv", pd.concat(frames, ignore_index=True).to_csv(index=False))
    loaded = next(iter(geometries.values())).loaded
    keys = ("frac_acute", "frac_acute_matched", "frac_acute_forward", "frac_acute_matched_vs_forward", "frac_acute_all",
            "authors_mean_cos", "authors_frac_positive", "thales_ratio", "thales_ratio_all", "cells")
    summary = {**describe(loaded), "source": source, "n_examples": n_examples,
               "n_tokens": {stack: s["n_tokens"] for stack, s in stacks.items()},
               **{f"{key}_{stack}": s[key] for key in keys for stack, s in stacks.items()},
               "stacks": stacks, "options": asdict(options)}
    write_json(out / "summary.json", summary)


def _write(out: Path, geometry: RunGeometry, options: AngleOptions, n_examples: int, source: str) -> tuple[dict, pd.DataFrame]:
    """One stack's tables, figures and summary.json into ``out``; returns the summary and the angles table.

    With several stacks every table gets a leading ``stack`` column."""
    loaded, view = geometry.loaded, geometry.view
    several = len(loaded.stacks) > 1
    n_tokens = geometry.n_tokens
    teacher_labels = [f"T{i}" for i in range(geometry.n_teacher)]
    student_labels = [f"S{l}" for l in range(geometry.n_student)]
    angles = geometry.angles.to_frame().rename(columns={"anchor": "student_layer"})
    angles.insert(3, "space", options.space)
    angles.insert(4, "checkpoint", options.checkpoint)
    hist = geometry.angles.hist_frame().rename(columns={"anchor": "student_layer"})
    if several:
        angles.insert(0, "stack", view.stack)
        hist.insert(0, "stack", view.stack)
    angles = angles[angles.student_layer.isin(geometry.anchors)].reset_index(drop=True)
    hist = hist[hist.student_layer.isin(geometry.anchors)].reset_index(drop=True)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "angles.csv", angles.to_csv(index=False))
    write_text(out / "angle_hist.csv", hist.to_csv(index=False))
    authors = geometry.authors.hist_frame() if geometry.authors is not None else None  # (bins) per-token mean histogram
    if authors is not None:
        write_text(out / "authors_cosine_hist.csv", (authors.assign(stack=view.stack)[["stack", *authors.columns]]
                                                     if several else authors).to_csv(index=False))
    summary = {
        **describe(loaded),
        **({"stack": view.stack} if several else {}),
        "source": source,
        "n_examples": n_examples,
        "n_tokens": n_tokens,
        **summary_fractions(angles, options.with_embeddings, view.matched_pairs, view.forward_pairs),
        "authors_mean_cos": geometry.authors.mean() if geometry.authors is not None else None,
        "authors_frac_positive": frac_positive(authors) if authors is not None else None,
        "matched_pairs": view.matched_pairs,
        "forward_pairs": view.forward_pairs,
        "n_degenerate": int(angles.n_degenerate.sum()),
        "options": asdict(options),
        "definitions": {
            "cells": "the headline cells: student layers >= 1 and teacher pairs among layers >= 1 (the authors'; no "
                     "embedding output), or every cell with options.with_embeddings",
            "frac_acute": "share of (token, student layer, teacher pair) angles with cos > 0, over the headline cells",
            "frac_acute_all": "the same over every cell (S0 and the teacher pairs with T0 included)",
            "frac_acute_matched": "headline angles at S_s having the teacher state S_s was matched to as one side",
            "frac_acute_forward": "the same for the teacher state forward matching would have used",
            "frac_acute_matched_vs_forward": "the angle at S_s between its matched and its forward target (where they differ)",
            "thales_ratio": "token-weighted mean of |S - (T_i + T_k)/2| / (|T_i - T_k| / 2) over the headline cells; > 1 "
                            "exactly when the angle is acute",
            "thales_ratio_all": "the same over every cell",
            "authors_mean_cos": "the authors' statistic (CosineFromStudent): per token, the mean cosine over student layers "
                                ">= 1 and teacher pairs 1 <= i < k, then the mean over tokens; its histogram (1000 bins) "
                                "is authors_cosine_hist.csv",
            "authors_frac_positive": "the share of those per-token means that are positive (the histogram's bins right of 0)",
        },
    }
    where = f"{view.stack} stack, " if several else ""
    name = f"{loaded.run.path.name} ({where}{plots.strategy_label(loaded.strategy)}, {options.checkpoint}, {options.space} space)"
    embeddings = options.with_embeddings
    if not headline_cells(angles, embeddings).empty:  # a narrow student projected at S0 alone has no headline cell
        plots.save_figure(plots.angle_heatmaps(angles, "frac_acute", f"Fraction of acute angles: {name}", embeddings),
                          out / "angles_frac_acute")
        plots.save_figure(plots.angle_heatmaps(angles, "mean_angle_deg", f"Mean angle: {name}", embeddings), out / "angles_mean_deg")
        plots.save_figure(plots.cosine_histograms(hist, f"Cosines seen from the student: {name}", with_embeddings=embeddings),
                          out / "angle_hist")
    if authors is not None and authors["count"].sum():
        plots.save_figure(plots.token_mean_cosine_histograms(authors, f"The authors' statistic: {name}"), out / "authors_cosine_hist")
    if options.extras:
        anchors = [student_labels[l] for l in geometry.anchors]
        tt, ts, ss = geometry.tt.mean(), geometry.ts.mean(), geometry.ss.mean()
        consecutive = float(np.mean(np.diag(tt, 1)))
        ratio = pd.DataFrame({"student_layer": geometry.anchors, "mean_dist_to_teacher": ts.mean(0),
                              "mean_consecutive_teacher_dist": consecutive})
        ratio["distance_ratio"] = ratio.mean_dist_to_teacher / consecutive
        tables = {
            "distances_teacher_teacher": _matrix_frame(tt, teacher_labels, teacher_labels, "teacher_a", "teacher_b", "mean_l2"),
            "distances_teacher_student": _matrix_frame(ts, teacher_labels, anchors, "teacher_layer", "student_layer", "mean_l2"),
            "distances_student_student": _matrix_frame(ss, student_labels, student_labels, "student_a", "student_b", "mean_l2"),
            "cka": _matrix_frame(geometry.cka.compute(), teacher_labels, student_labels, "teacher_layer", "student_layer", "cka_debiased"),
            "transition_cosine": _matrix_frame(geometry.transitions.mean(), anchors, anchors, "student_a", "student_b", "mean_cos"),
            "distance_ratio": ratio,
        }
        for stem, table in tables.items():
            if several:
                table.insert(0, "stack", view.stack)
            write_text(out / f"{stem}.csv", table.to_csv(index=False))
        summary["distance_ratio"] = dict(zip(anchors, ratio.distance_ratio.round(6).tolist()))
        figures = {
            "distances_teacher_teacher": (tt, teacher_labels, teacher_labels, "Teacher-teacher distance", "Mean L2 distance", None, None),
            "distances_teacher_student": (ts, teacher_labels, anchors, "Teacher-student distance (teacher space)", "Mean L2 distance", None, None),
            "distances_student_student": (ss, student_labels, student_labels, "Student-student distance", "Mean L2 distance", None, None),
            "cka": (geometry.cka.compute(), teacher_labels, student_labels, "Linear CKA (debiased)", "CKA", 0.0, 1.0),
            "transition_cosine": (geometry.transitions.mean(), anchors, anchors, "Structured cosine of layer transitions", "Mean cosine", -1.0, 1.0),
        }
        for stem, (matrix, rows, cols, title, label, vmin, vmax) in figures.items():
            suffix = f" ({view.stack} stack)" if several else ""
            fig = plots.matrix_heatmap(matrix, rows, cols, f"{title}: {loaded.run.path.name}{suffix}", label, vmin=vmin, vmax=vmax)
            plots.save_figure(fig, out / stem)
    write_json(out / "summary.json", summary)
    return summary, angles


def expand_runs(paths: list[str]) -> list[Path]:
    """Run directories named directly, or every student run found under a folder."""
    runs: list[Path] = []
    for item in paths:
        path = Path(item)
        if (path / "config.yaml").is_file():
            runs.append(path)
        elif path.is_dir():
            found = sorted(p.parent for p in path.rglob("results.json")
                           if (p.parent / "env.json").is_file() and json.loads((p.parent / "env.json").read_text()).get("kind") == "student")
            if not found:
                raise LayergeoError(f"no finished student runs under {path}")
            runs.extend(found)
        else:
            raise LayergeoError(f"{path} does not exist; give run directories or a folder of runs")
    return runs


SETTING_KEYS = ("teacher", "train_examples", "steps", "lr", "student_layers", "student_width", "loss")


def run_setting(path: Path) -> dict:
    """What runs pooled into one strategy column must share besides their seed: teacher, data, budget, student, loss."""
    run = RunDir(path)
    config = run.config()
    results = run.results() if run.finished else {}
    loss = config.loss
    lr = config.train.random_init_lr if config.student.init == "random" and config.train.random_init_lr else config.train.lr
    return {
        "task": config.data.task, "strategy": config.matching.strategy, "init": config.student.init,
        "teacher": (results.get("teacher_sha256") or str(config.teacher.dir))[:12],
        "train_examples": config.data.max_train or "all", "steps": results.get("steps"), "lr": lr,
        "student_layers": config.student.layers, "student_width": config.student.hidden_size or "teacher's",
        "loss": f"ce {loss.alpha_ce}, kl {loss.alpha_kl} (T {loss.temperature}), hidden {loss.alpha_hidden} ({loss.normalize})",
    }


def pooled_settings(runs: list[Path], strict: bool) -> tuple[pd.DataFrame, str]:
    """The setting of every run and one line saying what is pooled; with ``strict``, refuse unlike runs in one column.

    Runs of one task, strategy and init are drawn as one column of a comparison: they must differ only by seed.
    """
    table = pd.DataFrame([{"run": p.name, **run_setting(p)} for p in runs])
    column = ["task", "strategy", "init"]
    for key in SETTING_KEYS:
        mixed = table.groupby(column)[key].nunique(dropna=False)
        mixed = mixed[mixed > 1]
        if strict and len(mixed):
            task, strategy, init = mixed.index[0]
            values = ", ".join(map(str, table[(table.task == task) & (table.strategy == strategy) & (table.init == init)][key].unique()))
            raise LayergeoError(f"the runs to compare mix settings: {strategy} ({init}) runs on {task} differ in {key} "
                                f"({values}); compare one setting at a time, e.g. the runs of one sweep")
    parts = [f"{len(table)} runs"] + [
        f"{key.replace('_', ' ')}: " + ", ".join(f"{v} ({n})" for v, n in table[key].astype(str).value_counts().items())
        for key in ("task", *SETTING_KEYS)
    ]
    return table, "; ".join(parts)


def compare_runs(paths: list[str], options: AngleOptions, checkpoints: list[str], out: Path,
                 strict: bool = True) -> pd.DataFrame:
    """Analyse every run (reusing finished analyses) and write one tidy table and faceted figures.

    ``strict``: refuse runs that would be pooled into one strategy column but differ in more than their
    seed (see :func:`pooled_settings`); either way ``out/pooled.csv`` lists every run's setting.
    """
    check_output_path(out)
    runs = expand_runs(paths)
    settings, pooled = pooled_settings(runs, strict)
    print(f"comparing {pooled}", flush=True)
    frames, summaries = [], []
    for number, path in enumerate(runs, 1):
        print(f"[{number}/{len(runs)}] {path.name}", flush=True)
        for checkpoint in checkpoints:
            try:
                folder = analyse_run(path, AngleOptions(**{**asdict(options), "checkpoint": checkpoint}), reuse=True)
            except LayergeoError as exc:
                if len(paths) == 1 and (Path(paths[0]) / "config.yaml").is_file():
                    raise
                print(f"skipping {path.name}: {exc}", file=sys.stderr)  # e.g. a narrow student matched to nothing
                continue
            summary = json.loads((folder / "summary.json").read_text())
            angles = pd.read_csv(folder / "angles.csv").drop(columns=["checkpoint"])
            ident = {k: summary[k] for k in ("run", "strategy", "init", "seed", "checkpoint", "task")}
            frames.append(angles.assign(**ident))
            scores = {k: summary[k] for k in ("dev_accuracy", "dev_bleu") if k in summary}
            for stack, part in summary.get("stacks", {None: summary}).items():
                rows = angles if stack is None else angles[angles["stack"] == stack]
                # from the cells, not summary.json: older analyses' frac_acute covered every cell
                fractions = summary_fractions(rows, options.with_embeddings, part.get("matched_pairs"), part.get("forward_pairs"))
                authors = folder / (stack or "") / "authors_cosine_hist.csv"  # the share from the table: older summaries lack it
                summaries.append({**ident, **({"stack": stack} if stack else {}), **fractions,
                                  "authors_mean_cos": part.get("authors_mean_cos"),
                                  "authors_frac_positive": frac_positive(pd.read_csv(authors)) if authors.is_file() else None,
                                  "n_tokens": part["n_tokens"],
                                  "dev_accuracy": scores.get("dev_accuracy"), **scores})
    if not frames:
        raise LayergeoError("none of the runs could be analysed")
    tidy = pd.concat(frames, ignore_index=True)
    lead = ["run", "strategy", "init", "seed", "checkpoint", "task"]
    tidy = tidy[lead + [c for c in tidy.columns if c not in lead]]
    table = pd.DataFrame(summaries)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "angles_all.csv", tidy.to_csv(index=False))
    write_text(out / "acute_summary.csv", table.to_csv(index=False))
    write_text(out / "pooled.csv", settings.to_csv(index=False))
    if "stack" not in table:
        plots.save_figure(plots.comparison_grid(tidy, "frac_acute", with_embeddings=options.with_embeddings), out / "angles_by_strategy")
        plots.save_figure(plots.acute_fraction_points(table), out / "acute_fraction_by_strategy")
        return table
    for stack in table["stack"].dropna().unique():  # one figure per stack: an encoder's and a decoder's angles differ
        title = f" ({stack} stack)"
        plots.save_figure(plots.comparison_grid(tidy[tidy["stack"] == stack], "frac_acute", title, options.with_embeddings),
                          out / f"angles_by_strategy_{stack}")
        plots.save_figure(plots.acute_fraction_points(table[table["stack"] == stack], title=title),
                          out / f"acute_fraction_by_strategy_{stack}")
    return table
