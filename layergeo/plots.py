"""Figures: angle heatmaps, cosine histograms, strategy comparisons and training curves.

Every plotting function takes a tidy DataFrame (or a matrix), returns a matplotlib
Figure and never writes to disk; :func:`save_figure` writes ``.png`` and ``.pdf``.
Colour scales of the angle statistics are fixed, so figures of different runs can be
compared side by side, and strategies keep one colour and one order everywhere.
Blue always means acute (high fraction of acute angles, small angle, positive cosine).
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import tempfile
import textwrap
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.collections import QuadMesh
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from layergeo.cells import cells_label, headline_cells, layer_names, table_cells
from layergeo.errors import LayergeoError
from layergeo.geometry import frac_positive

matplotlib.use("Agg")  # headless, before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

STRATEGY_ORDER = ["none", "forward", "reverse", "all_to_one", "shuffle", "rail", "explicit"]
STRATEGY_LABELS = {
    "none": "None",
    "forward": "Forward",
    "reverse": "Reverse",
    "all_to_one": "All-to-one",
    "shuffle": "Random (shuffle)",
    "rail": "RAIL (in-order random)",
    "explicit": "Explicit",
}
INIT_LABELS = {"copy": "Weights copied", "random": "Randomly initialised"}
CHECKPOINT_LABELS = {"init": "Untrained", "best": "Trained"}
TASK_LABELS = {"rotten_tomatoes": "Rotten Tomatoes", "bbc_news": "BBC News", "kjv_bbe": "KJV → BBE",
               "bbc_headlines": "BBC headlines", "rt_sentiment": "RT review → sentiment", "bbc_topic": "BBC article → topic"}
TERM_LABELS = {
    "loss": "Total loss",
    "ce": "Cross-entropy with labels",
    "kl": "KL divergence to teacher",
    "hidden": "Hidden-state loss",
    "grad_norm": "Gradient norm",
    "grad_norm_ce": "Gradient norm of α·CE",
    "grad_norm_kl": "Gradient norm of α·KL",
    "grad_norm_hidden": "Gradient norm of α·hidden loss",
    "lr": "Learning rate",
}

_COLORBLIND = sns.color_palette("colorblind").as_hex()
# one hue per matching strategy, "none" dark grey: Okabe & Ito's blue, orange, bluish green and reddish purple, Tol's
# vibrant red and muted indigo. Every pair differs by CIELAB distance >= 42, and >= 17 under simulated deuteranopia,
# protanopia and tritanopia (Machado et al. 2009; tests/test_plots.py); the lighter grey #949494 was 7 from the
# reddish purple under deuteranopia, and the colorblind palette's two oranges 13
STRATEGY_PALETTE = {"none": "#5c5c5c", "forward": "#0072B2", "reverse": "#E69F00", "all_to_one": "#009E73",
                    "shuffle": "#CC79A7", "rail": "#CC3311", "explicit": "#332288"}
CHECKPOINT_PALETTE = {"init": _COLORBLIND[0], "best": _COLORBLIND[3]}
INIT_PALETTE = {"copy": _COLORBLIND[0], "random": _COLORBLIND[1]}
LEVEL_MARKERS = ("o", "D", "s", "^", "v", "P")  # hue levels of a dot plot differ by marker as well as colour
_EXTRA_COLORS = [_COLORBLIND[i] for i in (9, 6, 8)]  # for strategies or levels outside the palettes

PNG_DPI = 150
MAX_ANNOTATED = 8  # annotate angle heatmaps with values up to 8 x 8 teacher states
MAX_ANNOTATED_MATRIX = 13  # generic matrices: up to 13 rows and columns (a 12-layer teacher)
MAX_PANEL_COLUMNS = 4
ANNOT_FONTSIZE = 7
GRID_PANEL_INCHES = 2.5  # a comparison grid's panel, at most MAX_PANEL_COLUMNS a row: about 12 inches wide
GRID_ANNOTATED = 6  # a comparison grid's panels carry their values up to 6 x 6 teacher states
MAX_TICK_LABELS = 10  # teacher ticks beyond this are labelled every 2nd, 5th, 10th ... state

_THEME = sns.axes_style("white") | sns.plotting_context("paper", font_scale=1.25)


@dataclass(frozen=True)
class ValueScale:
    """Fixed colour scale of one angle statistic."""

    label: str
    vmin: float
    vmax: float
    center: float
    cmap: str
    fmt: str
    ticks: tuple[float, ...]


VALUE_SCALES = {
    "frac_acute": ValueScale("Fraction of acute angles", 0, 1, 0.5, "RdBu", ".2f", (0, 0.25, 0.5, 0.75, 1)),
    "mean_angle_deg": ValueScale("Mean angle (degrees)", 0, 180, 90, "RdBu_r", ".0f", (0, 45, 90, 135, 180)),
    "mean_cos": ValueScale("Mean cosine of the angle", -1, 1, 0, "RdBu", ".2f", (-1, -0.5, 0, 0.5, 1)),
}


def _themed(fn: Callable[..., Figure]) -> Callable[..., Figure]:
    """Draw under the module theme without changing the caller's matplotlib settings."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Figure:
        with plt.rc_context(_THEME):
            return fn(*args, **kwargs)

    return wrapper


# ---------------------------------------------------------------- labels, order, colours


def task_label(name: str) -> str:
    """Readable name of a task; other tasks keep their own name."""
    return TASK_LABELS.get(name, str(name))


def strategy_tick(name: str) -> str:
    """A strategy's label wrapped for an x tick: at most 12 characters a line, so neighbours never touch."""
    return textwrap.fill(strategy_label(name), 12, break_on_hyphens=False)


def strategy_label(name: str) -> str:
    """Readable name of a strategy; unknown strategies keep their own name."""
    return STRATEGY_LABELS.get(name, str(name))


def _ordered(values: Iterable[Any], order: Iterable[Any]) -> list[Any]:
    """Distinct values, known ones in the given order, then unknown ones sorted."""
    present = set(values)
    known = [v for v in order if v in present]
    return known + sorted(present - set(known), key=str)


def sort_strategies(names: Iterable[str]) -> list[str]:
    """Distinct strategy names in STRATEGY_ORDER, unknown ones last (alphabetically)."""
    return _ordered(names, STRATEGY_ORDER)


def _colors(levels: Sequence[Any], palette: Mapping[Any, str]) -> dict[Any, str]:
    """Palette colour of each level; levels outside the palette take the spare colours, or as many
    evenly spaced hues when there are more of them than spare colours (never a repeated colour)."""
    unknown = [level for level in levels if level not in palette]
    extra = _EXTRA_COLORS if len(unknown) <= len(_EXTRA_COLORS) else sns.color_palette("husl", len(unknown)).as_hex()
    spare = dict(zip(unknown, extra))
    return {level: palette.get(level, spare.get(level)) for level in levels}


def _wrapped(title: str, inches: float) -> str:
    """``title`` wrapped to a figure ``inches`` wide at the "medium" title size: never clipped at its edges."""
    return textwrap.fill(title, max(24, int(inches * 9)))  # about 11.7 characters an inch fit


def _value_scale(value: str) -> ValueScale:
    if value not in VALUE_SCALES:
        raise LayergeoError(f"unknown value {value!r} to plot; choose one of {', '.join(VALUE_SCALES)}")
    return VALUE_SCALES[value]


def _zoomed(scale: ValueScale, values: np.ndarray) -> ValueScale:
    """``scale`` narrowed to the side of its centre that holds every value (a fraction of acute angles all in
    0.8-1 would be one dark blue on 0-1): from the least value (rounded out to a 20th of the full range; the
    centre's colour) to the end of the scale, the colour bar saying so. Values on both sides: ``scale`` unchanged."""
    values = values[np.isfinite(values)]
    step = (scale.vmax - scale.vmin) / 20
    if values.size == 0 or values.min() < scale.center < values.max():
        return scale
    if values.min() >= scale.center:
        low = round(min(math.floor(round(values.min() / step, 6)) * step, scale.vmax - step), 10)
        high, center, edge = scale.vmax, low, f"from {low:{scale.fmt}}"
    else:
        high = round(max(math.ceil(round(values.max() / step, 6)) * step, scale.vmin + step), 10)
        low, center, edge = scale.vmin, high, f"up to {high:{scale.fmt}}"
    ticks = tuple(float(t) for t in MaxNLocator(5, steps=[1, 2.5, 5, 10]).tick_values(low, high) if low - 1e-9 <= t <= high + 1e-9)
    return ValueScale(f"{scale.label}\n(colour scale {edge}: no value beyond it)", low, high, center, scale.cmap,
                      scale.fmt, ticks)


def _headline(frame: pd.DataFrame, with_embeddings: bool, what: str) -> pd.DataFrame:
    """The headline cells of ``frame`` (``layergeo.cells.headline_cells``), or one line saying there are none."""
    cells = headline_cells(frame, with_embeddings)
    if cells.empty:
        raise LayergeoError(f"{what}: no cell at student layers >= 1 (and teacher layers >= 1); with_embeddings "
                            "(--with-embeddings) draws the embedding output")
    return cells


def _require(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    if len(frame) == 0:
        raise LayergeoError(f"{what}: the table is empty, there is nothing to plot")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise LayergeoError(
            f"{what}: missing column(s) {', '.join(missing)}; expected columns {', '.join(columns)}"
        )


# ---------------------------------------------------------------- angle heatmaps


def _teacher_states(frame: pd.DataFrame) -> list[int]:
    return sorted(set(frame["teacher_i"]) | set(frame["teacher_k"]))


def _pair_matrix(means: pd.Series, teachers: list[int]) -> np.ndarray:
    """Symmetric teacher x teacher matrix from values indexed by (teacher_i, teacher_k); NaN diagonal."""
    index = {t: n for n, t in enumerate(teachers)}
    matrix = np.full((len(teachers), len(teachers)), np.nan)
    for (i, k), v in means.items():
        matrix[index[i], index[k]] = matrix[index[k], index[i]] = v
    np.fill_diagonal(matrix, np.nan)
    return matrix


def _panel_inches(n_teachers: int) -> float:
    """Side of one square heatmap panel: room for values when annotated; tick labels are thinned otherwise."""
    return min(max(0.42 * n_teachers + 0.8, 2.4), 4.0) if n_teachers <= MAX_ANNOTATED else 3.0


def _teacher_ticks(teachers: list[int]) -> list[str]:
    """'T{t}' for each teacher state; beyond MAX_TICK_LABELS states only every 2nd, 5th, 10th ... (blank between)."""
    step = next(step for step in (1, 2, 5, 10, 20, 50, 100) if len(teachers) <= MAX_TICK_LABELS * step)
    return [f"T{t}" if t % step == 0 else "" for t in teachers]


def _heatmap(*args, **kwargs) -> None:
    """``sns.heatmap`` without seaborn 0.13's PendingDeprecationWarning about matplotlib's ``set_bad`` (seaborn's own call)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The set_bad function", category=PendingDeprecationWarning)
        sns.heatmap(*args, **kwargs)


def _draw_pair_heatmap(ax: plt.Axes, matrix: np.ndarray, teachers: list[int], scale: ValueScale,
                       annotate: bool) -> QuadMesh:
    labels = _teacher_ticks(teachers)
    ax.set_facecolor("0.8")  # undefined cells (i = k) grey, apart from any colour of the scale
    _heatmap(
        matrix,
        ax=ax,
        mask=np.isnan(matrix),
        vmin=scale.vmin,
        vmax=scale.vmax,
        center=scale.center,
        cmap=scale.cmap,
        annot=annotate,
        fmt=scale.fmt,
        annot_kws={"fontsize": ANNOT_FONTSIZE},
        square=True,
        cbar=False,
        xticklabels=labels,
        yticklabels=labels,
    )
    ax.tick_params(axis="both", labelrotation=0, length=0, labelsize=8)
    return ax.collections[0]


def _shared_colorbar(fig: Figure, mesh: QuadMesh, axes: list[plt.Axes], scale: ValueScale) -> None:
    """One colour bar for ``axes``, at most about 6 inches long."""
    colorbar = fig.colorbar(mesh, ax=axes, ticks=scale.ticks, shrink=min(0.9, 6.0 / fig.get_figheight()), aspect=25)
    colorbar.set_label(scale.label)
    colorbar.outline.set_visible(False)


@_themed
def angle_heatmaps(angles: pd.DataFrame, value: str = "frac_acute", title: str | None = None,
                   with_embeddings: bool = False) -> Figure:
    """One teacher i x teacher k heatmap of `value` per student layer, on a fixed colour scale (narrowed to one side
    of its centre when every value lies there, :func:`_zoomed`).

    Columns: student_layer, teacher_i, teacher_k (i < k) and `value`, one of frac_acute,
    mean_angle_deg, mean_cos. Repeated (student_layer, i, k) rows are averaged. Student layers >= 1 and
    teacher layers >= 1 only (``layergeo.cells``), every layer ``with_embeddings``.
    """
    scale = _value_scale(value)
    _require(angles, ["student_layer", "teacher_i", "teacher_k", value], "angle heatmaps")
    angles = _headline(angles, with_embeddings, "angle heatmaps")
    layers = sorted(angles["student_layer"].unique())
    teachers = _teacher_states(angles)
    ncols = min(MAX_PANEL_COLUMNS, len(layers))
    nrows = math.ceil(len(layers) / ncols)
    side = _panel_inches(len(teachers))
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(side * ncols + 1.2, side * nrows + (0.5 if title else 0.2)),
        squeeze=False, layout="constrained",
    )
    panels = list(axes.flat[: len(layers)])
    for ax in axes.flat[len(layers):]:
        ax.remove()
    matrices = [_pair_matrix(angles[angles["student_layer"] == layer].groupby(["teacher_i", "teacher_k"])[value].mean(),
                             teachers) for layer in layers]
    scale = _zoomed(scale, np.concatenate([m.ravel() for m in matrices]))
    for n, (ax, layer, matrix) in enumerate(zip(panels, layers, matrices)):
        mesh = _draw_pair_heatmap(ax, matrix, teachers, scale, len(teachers) <= MAX_ANNOTATED)
        ax.set_title(f"Student layer S{layer}")
        ax.set_xlabel("Teacher layer" if n + ncols >= len(layers) else "")
        ax.set_ylabel("Teacher layer" if n % ncols == 0 else "")
    _shared_colorbar(fig, mesh, panels, scale)
    if title:
        fig.suptitle(title)
    return fig


@_themed
def cosine_histograms(hist: pd.DataFrame, title: str | None = None, by: str = "student_layer",
                      with_embeddings: bool = False) -> Figure:
    """Density of cos(angle between the vectors to T_i and T_k), one line per ``by`` level.

    Columns: student_layer, ``by`` (student_layer or strategy), bin_left, bin_right, count; rows with
    the same ``by`` level and bin are summed (over teacher pairs, student layers, runs). Student layers
    >= 1 only, every layer ``with_embeddings``; the title says which. The legend gives each line's
    mass at cos > 0 (bins whose centre is positive). Levels with identical densities (every strategy at the
    untrained checkpoint: one student) are one line, labelled so.
    """
    _require(hist, list(dict.fromkeys(["student_layer", by, "bin_left", "bin_right", "count"])), "cosine histograms")
    hist = _headline(hist, with_embeddings, "cosine histograms")
    fig = _density_lines(hist, by, "acute", "cosine histograms")
    fig.axes[0].set_xlabel(r"Cosine of the angle between $T_i - S_l$ and $T_k - S_l$")
    fig.suptitle(_wrapped(f"{title} ({cells_label(hist)})" if title else cells_label(hist), 7.2), fontsize="medium")
    return fig


@_themed
def token_mean_cosine_histograms(hist: pd.DataFrame, title: str | None = None, by: str | None = None,
                                 bins: int = 100) -> Figure:
    """The authors' figure: density over tokens of the per-token mean of cos(T_i - S_j, T_k - S_j)
    (student layers j >= 1, teacher pairs 1 <= i < k), one line per ``by`` level (e.g. strategy) or one.

    Columns: bin_left, bin_right, count (and ``by``), rows of one level and bin summed over runs; the
    counts are summed into ``bins`` equal bins (even: an edge stays at 0) for drawing when the table's bins
    nest in them (their 1000 bins are noisy at a few thousand tokens). The legend gives each line's share of
    tokens with a positive mean, pooled over the tokens of its runs.
    """
    _require(hist, ["bin_left", "bin_right", "count"] + ([by] if by else []), "token mean cosine histograms")
    if bins < 2 or bins % 2:
        raise LayergeoError(f"token mean cosine histograms: bins must be even (an edge at 0), got {bins}")
    hist = hist.assign(**({} if by else {"level": "All tokens"}))
    by = by or "level"
    fine = hist["bin_left"].nunique()
    if fine > bins and fine % bins == 0:  # equal bins on [-1, 1]: each fine bin's centre lies inside one coarse bin
        edges = np.linspace(-1, 1, bins + 1)
        coarse = ((hist["bin_left"] + hist["bin_right"]).to_numpy() / 4 + 0.5) * bins  # centre on [0, bins)
        coarse = coarse.astype(int)
        hist = hist.assign(bin_left=edges[coarse], bin_right=edges[coarse + 1])
    fig = _density_lines(hist, by, "positive", "token mean cosine histograms")
    fig.axes[0].set_xlabel(r"Per-token mean of $\cos(T_i - S_j,\ T_k - S_j)$, $j \geq 1$, $1 \leq i < k$")
    fig.suptitle(_wrapped(title or "The authors' statistic (CosineFromStudent)", 7.2), fontsize="medium")
    return fig


def _density_lines(hist: pd.DataFrame, by: str, mass_word: str, what: str) -> Figure:
    """One density line per ``by`` level of a binned table (bin_left, bin_right, count), the right angle
    marked; the legend gives each line's mass right of 0 (``geometry.frac_positive``) as "<level>: x%
    <mass_word>". Levels with identical densities are one line, labelled so; other ``by`` columns than
    strategy and student_layer are labelled by their values."""
    counts = hist.groupby([by, "bin_left", "bin_right"], as_index=False)["count"].sum()
    if by == "strategy":
        levels = sort_strategies(counts[by].unique())
        colors = [_colors(levels, STRATEGY_PALETTE)[level] for level in levels]
        names, legend_title, every = {level: strategy_label(level) for level in levels}, "Strategy", "strategies"
    elif by == "student_layer":
        levels = sorted(counts[by].unique())
        colors = sns.color_palette("crest", len(levels))
        names, legend_title, every = {level: f"S{level}" for level in levels}, "Student layer", "student layers"
    else:
        levels = sorted(counts[by].unique())
        colors = sns.color_palette("crest", len(levels)) if len(levels) > 1 else ["0.2"]
        names, legend_title, every = {level: str(level) for level in levels}, None, "levels"
    lines = {}  # level -> (bin centres, density, mass right of 0)
    for level in levels:
        bins = counts[counts[by] == level].sort_values("bin_left")
        total = bins["count"].sum()
        if total == 0:
            raise LayergeoError(f"{what}: {names[level]} has no counts")
        density = (bins["count"] / (total * (bins["bin_right"] - bins["bin_left"]))).to_numpy()
        lines[level] = ((bins["bin_left"] + bins["bin_right"]).to_numpy() / 2, density, frac_positive(bins))
    first = next(iter(lines.values()))
    if len(lines) > 1 and all(np.array_equal(x, first[0]) and np.allclose(y, first[1], rtol=1e-9, atol=0)
                              for x, y, _ in lines.values()):
        lines, colors, names = {"all": first}, ["0.2"], {"all": f"All {len(levels)} {every} (identical)"}
    fig, ax = plt.subplots(figsize=(7.2, 3.6), layout="constrained")
    for (level, (centres, density, mass)), color in zip(lines.items(), colors):
        ax.plot(centres, density, color=color, lw=1.6, label=f"{names[level]}: {mass:.1%} {mass_word}")
    ax.axvline(0, ls="--", lw=1, color="0.35", zorder=0)
    ax.annotate(
        "right angle", xy=(0, 1), xycoords=ax.get_xaxis_transform(), xytext=(-3, -4),
        textcoords="offset points", rotation=90, ha="right", va="top", color="0.35", fontsize=8,
    )
    ax.set_xlim(-1, 1)
    ax.set_xticks(np.linspace(-1, 1, 5))
    ax.set_ylim(bottom=0)
    ax.set_ylabel("Density")
    ax.legend(title=legend_title, loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    sns.despine(ax=ax)
    return fig


# ---------------------------------------------------------------- generic matrix


def _number_format(values: np.ndarray) -> str:
    largest = np.abs(values).max()
    return ".0f" if largest >= 100 else ".1f" if largest >= 10 else ".2f"


@_themed
def matrix_heatmap(
    matrix: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str,
    colorbar_label: str,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "viridis",
    center: float | None = None,
    xlabel: str = "",
    ylabel: str = "",
) -> Figure:
    """Annotated heatmap of a (rows, cols) matrix (distances, CKA, transition cosines); NaN cells blank.

    Pass vmin/vmax to fix the scale (CKA: 0, 1; cosines: -1, 1 with center=0).
    """
    matrix = np.asarray(matrix, dtype=float)
    if matrix.ndim != 2 or matrix.size == 0:
        raise LayergeoError(f"matrix heatmap: expected a non-empty 2-D matrix, got shape {matrix.shape}")
    rows, cols = matrix.shape
    if len(row_labels) != rows or len(col_labels) != cols:
        raise LayergeoError(
            f"matrix heatmap: {len(row_labels)} row and {len(col_labels)} column labels "
            f"for a {rows} x {cols} matrix"
        )
    blank = ~np.isfinite(matrix)
    if blank.all():
        raise LayergeoError("matrix heatmap: the matrix has no finite value, there is nothing to plot")
    annotate = max(rows, cols) <= MAX_ANNOTATED_MATRIX
    cell = 0.5 if annotate else 0.3
    width = min(max(cell * cols + 2.2, 4.0), 14.0)
    fig, ax = plt.subplots(figsize=(width, min(max(cell * rows + 1.4, 2.8), 11.0)), layout="constrained")
    _heatmap(
        matrix,
        ax=ax,
        mask=blank,
        vmin=vmin,
        vmax=vmax,
        cmap=cmap,
        center=center,
        annot=annotate,
        fmt=_number_format(matrix[~blank]),
        annot_kws={"fontsize": ANNOT_FONTSIZE},
        xticklabels=list(col_labels),
        yticklabels=list(row_labels),
        cbar_kws={"label": colorbar_label},
    )
    long_labels = max(len(str(label)) for label in col_labels) > 4
    ax.tick_params(axis="x", labelrotation=45 if long_labels else 0, length=0)
    ax.tick_params(axis="y", labelrotation=0, length=0)
    fig.suptitle(_wrapped(title, width), fontsize="medium")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return fig


# ---------------------------------------------------------------- comparisons across runs


def _alike(matrices: list[np.ndarray]) -> bool:
    """Whether a row of a comparison grid shows one picture in every panel (the untrained students of a seed are
    one student whatever the strategy): at least two panels, all equal."""
    return len(matrices) > 1 and all(np.allclose(m, matrices[0], equal_nan=True) for m in matrices[1:])


@_themed
def comparison_grid(tidy: pd.DataFrame, value: str = "frac_acute", title: str = "", with_embeddings: bool = False) -> Figure:
    """Teacher i x teacher k heatmaps of `value`: one column per strategy, one row per (init, checkpoint);
    more than MAX_PANEL_COLUMNS strategies wrap into blocks of rows (the figure stays about 12 inches wide),
    values are written in the cells up to GRID_ANNOTATED teacher states.

    Columns: run, strategy, init, checkpoint, student_layer, teacher_i, teacher_k and `value`.
    Each panel averages over student layers >= 1 and shows teacher layers >= 1 (every layer
    ``with_embeddings``), first within each run, then over runs; the title names the layers averaged.
    Same colour scale as :func:`angle_heatmaps`. ``title`` is added to the figure title (e.g. the stack).
    """
    scale = _value_scale(value)
    columns = ["run", "strategy", "init", "checkpoint", "student_layer", "teacher_i", "teacher_k", value]
    _require(tidy, columns, "comparison grid")
    used = _headline(tidy, with_embeddings, "comparison grid")
    strategies = sort_strategies(used["strategy"].unique())
    present = set(zip(used["init"], used["checkpoint"]))
    rows = [
        (init, checkpoint)
        for init in _ordered(used["init"].unique(), INIT_LABELS)
        for checkpoint in _ordered(used["checkpoint"].unique(), CHECKPOINT_LABELS)
        if (init, checkpoint) in present
    ]
    teachers = _teacher_states(used)
    keys = ["strategy", "init", "checkpoint"]
    per_run = used.groupby([*keys, "run", "teacher_i", "teacher_k"])[value].mean()
    means = per_run.groupby(level=[*keys, "teacher_i", "teacher_k"]).mean()
    panels = {key: _pair_matrix(group.droplevel(keys), teachers) for key, group in means.groupby(level=keys)}
    label, scale = scale.label, _zoomed(scale, means.to_numpy(float))
    same = {row for row in rows if _alike([panels[(s, *row)] for s in strategies if (s, *row) in panels])}

    blocks = math.ceil(len(strategies) / MAX_PANEL_COLUMNS)
    ncols = math.ceil(len(strategies) / blocks)
    fig, axes = plt.subplots(
        blocks * len(rows), ncols, figsize=(GRID_PANEL_INCHES * ncols + 1.8, GRID_PANEL_INCHES * blocks * len(rows) + 0.6),
        squeeze=False, layout="constrained",
    )
    for ax in axes[-len(rows):, len(strategies) - (blocks - 1) * ncols:].flat:  # the last block's empty columns
        ax.remove()
    for (s, strategy), (r, (init, checkpoint)) in itertools.product(enumerate(strategies), enumerate(rows)):
        block, c = divmod(s, ncols)
        ax = axes[block * len(rows) + r, c]
        if (strategy, init, checkpoint) in panels:
            mesh = _draw_pair_heatmap(ax, panels[strategy, init, checkpoint], teachers, scale, len(teachers) <= GRID_ANNOTATED)
        else:
            ax.set(xticks=[], yticks=[])
            sns.despine(ax=ax, left=True, bottom=True)
            ax.text(0.5, 0.5, "no runs", transform=ax.transAxes, ha="center", va="center", color="0.5")
        if r == 0:
            ax.set_title(strategy_label(strategy))
        row_label = f"{INIT_LABELS.get(init, init)}\n{CHECKPOINT_LABELS.get(checkpoint, checkpoint)}"
        row_label += "\n(the same for every strategy)" if (init, checkpoint) in same else ""
        ax.set_ylabel(row_label if c == 0 else "", fontweight="bold", fontsize="small")  # within a panel's height
        ax.set_xlabel("Teacher layer" if r == len(rows) - 1 else "")
    fig.get_layout_engine().set(wspace=0.06)  # a panel's last values clear of the next one's ticks
    _shared_colorbar(fig, mesh, list(fig.axes), scale)
    fig.suptitle(f"{label}, mean over student layers {layer_names('S', used['student_layer'])} and runs{title}")
    return fig


def _dot_panel(
    ax: plt.Axes,
    frame: pd.DataFrame,
    value: str,
    strategies: list[str],
    hue: str,
    levels: list[Any],
    colors: Mapping[Any, str],
    spread: str,
    markers: Mapping[Any, str] | None = None,
) -> None:
    """Per strategy (x) and hue level (dodged): each row as a dot, the mean as a larger marker with a bar.

    spread "range": the bar spans min to max; "std": mean +- standard deviation. ``markers``: each level's
    mean marker (default: LEVEL_MARKERS in the order of ``levels``).
    """
    offsets = (np.arange(len(levels)) - (len(levels) - 1) / 2) * (0.6 / len(levels))
    markers = markers or dict(zip(levels, LEVEL_MARKERS * len(levels)))
    for offset, level in zip(offsets, levels):
        marker = markers[level]
        for x, strategy in enumerate(strategies):
            values = frame.loc[(frame["strategy"] == strategy) & (frame[hue] == level), value].dropna().to_numpy()
            if len(values) == 0:
                continue
            mean = values.mean()
            if spread == "range":
                bar = [[mean - values.min()], [values.max() - mean]]
            else:
                std = values.std(ddof=1) if len(values) > 1 else 0.0
                bar = [[std], [std]]
            jitter = np.linspace(-0.05, 0.05, len(values)) if len(values) > 1 else np.zeros(1)
            ax.scatter(x + offset + jitter, values, s=14, color=colors[level], alpha=0.45, linewidths=0, zorder=2,
                       clip_on=False)
            ax.errorbar(
                x + offset, mean, yerr=bar, fmt=marker, ms=6, color=colors[level], mec="white", mew=0.7,
                capsize=3, lw=1.3, zorder=3, clip_on=False,
            )
    ax.set_xticks(range(len(strategies)))
    ax.set_xticklabels([strategy_tick(s) for s in strategies])
    ax.set_xlim(-0.5, len(strategies) - 0.5)
    ax.set_xlabel("Layer-matching strategy")
    sns.despine(ax=ax)


def _dot_key(fig: Figure, levels: list[Any], colors: Mapping[Any, str], labels: Mapping[Any, str],
             title: str, spread_label: str, extra: Iterable[Line2D] = ()) -> None:
    """The key of a dot plot, below its panels (a key at the right made the figures 17 inches wide)."""
    handles = [Line2D([], [], ls="", marker=marker, ms=6, color=colors[level], label=f"{labels.get(level, level)}: mean")
               for level, marker in zip(levels, LEVEL_MARKERS * len(levels))]
    handles += [
        Line2D([], [], ls="", marker="o", ms=3.5, color="0.45", alpha=0.45, label="Small dot: one run"),
        Line2D([], [], ls="-", lw=1.3, color="0.45", label=spread_label),
        *extra,
    ]
    fig.legend(handles=handles, title=title, loc="outside lower center", ncol=min(3, len(handles)), frameon=False)


def _strip_width(n_strategies: int) -> float:
    return 0.95 * n_strategies + 1.4  # room for a y label of two lines


def _fraction_axis(ax: plt.Axes, values: Iterable[float], axis: str = "y") -> tuple[float, float]:
    """Limits of a fraction axis: the data's range with a margin (room for markers at 0 or 1), no tick outside
    [0, 1] (a flat 1.0 would otherwise get ticks at 1.02, 1.04). Returns the limits."""
    values = np.asarray(list(values), dtype=float)
    values = values[np.isfinite(values)]
    low, high = float(values.min()), float(values.max())
    pad = max(0.02, 0.08 * (high - low))
    limits = (low - pad, high + pad)
    set_limits, get_ticks, set_ticks = (ax.set_ylim, ax.get_yticks, ax.set_yticks) if axis == "y" else (
        ax.set_xlim, ax.get_xticks, ax.set_xticks)
    set_limits(*limits)
    set_ticks([t for t in get_ticks() if max(0.0, limits[0]) <= t <= min(1.0, limits[1]) + 1e-9])
    return limits


@_themed
def acute_fraction_points(summary: pd.DataFrame, title: str = "") -> Figure:
    """Fraction of acute angles per strategy, untrained vs trained: one panel per task and student init, one
    above the other (the figure stays about 7 inches wide), on one y-axis.

    Columns: run, strategy, init, checkpoint, frac_acute [, task, cells] (one row per run and checkpoint).
    Dots are runs; diamonds are means with a bar from the lowest to the highest run. The y label names the
    cells of the fraction (``cells.table_cells``). ``title`` is added to each panel's title (e.g. the stack).
    """
    _require(summary, ["run", "strategy", "init", "checkpoint", "frac_acute"], "acute fraction points")
    strategies = sort_strategies(summary["strategy"].unique())
    by_task = {task: summary[summary["task"] == task] for task in sorted(summary["task"].unique())} if "task" in summary else {None: summary}
    inits = _ordered(summary["init"].unique(), INIT_LABELS)
    checkpoints = _ordered(summary["checkpoint"].unique(), CHECKPOINT_LABELS)
    colors = _colors(checkpoints, CHECKPOINT_PALETTE)
    panels = [(task, init) for task in by_task for init in inits]
    fig, axes = plt.subplots(len(panels), 1, figsize=(_strip_width(len(strategies)), 3.4 * len(panels) + 0.9),
                             sharey=True, squeeze=False, layout="constrained")
    for ax, (task, init) in zip(axes[:, 0], panels):
        rows = by_task[task]
        _dot_panel(ax, rows[rows["init"] == init], "frac_acute", strategies, "checkpoint", checkpoints, colors, spread="range")
        where = INIT_LABELS.get(init, init)
        ax.set_title((f"{task_label(task)}, {where.lower()}" if task is not None else where) + title)
        ax.set_ylabel(textwrap.fill(f"Fraction of acute angles ({table_cells(rows)})", 28))
    bottom, _ = _fraction_axis(axes[0, 0], summary["frac_acute"])
    if bottom < 0.5:
        for ax in axes.flat:
            ax.axhline(0.5, ls="--", lw=1, color="0.6", zorder=0)
    _dot_key(fig, checkpoints, colors, CHECKPOINT_LABELS, "Student", "Bar: lowest to highest run")
    return fig


def _majority_line(ax: plt.Axes, rate: float) -> None:
    """The majority-class rate as a dashed line, or, when it lies more than half the panel's span below the
    data (it would squash the differences the panel is for), as a note under the x label."""
    low, high = ax.get_ylim()
    if rate >= low - 0.5 * (high - low):
        ax.axhline(rate, ls="--", lw=1, color="0.45", zorder=0)
    else:
        ax.set_xlabel(f"{ax.get_xlabel()}\n(majority-class rate {rate:.1f}, below the axis)")


@_themed
def metric_points(results: pd.DataFrame, metric_label: str) -> Figure:
    """A metric (e.g. test accuracy) per strategy: one panel per student init and task, one above the other (the
    figure stays about 7 inches wide), each on its own y-axis, so one init's range never flattens the other's
    differences.

    Columns: strategy, init, task, value (one row per run/seed) [, majority: the split's majority-class rate,
    drawn as a dashed line per panel: the accuracy of always answering the most common label]. Dots are seeds;
    larger markers are means with a bar of +- one standard deviation, or from the lowest to the highest seed when
    no strategy has 3 seeds (a std of two values is their distance over √2, and can reach below 0).
    """
    _require(results, ["strategy", "init", "task", "value"], "metric points")
    majority = "majority" in results and results["majority"].notna().any()
    seeds = int(results.groupby(["strategy", "init", "task"]).size().max())
    spread, spread_label = ("std", "Bar: ± one std over seeds") if seeds >= 3 else ("range", "Bar: lowest to highest seed")
    strategies = sort_strategies(results["strategy"].unique())
    inits = _ordered(results["init"].unique(), INIT_LABELS)
    tasks = sorted(results["task"].unique())
    colors = _colors(inits, INIT_PALETTE)
    markers = dict(zip(inits, LEVEL_MARKERS * len(inits)))
    panels = [(init, task) for init, task in itertools.product(inits, tasks)
              if ((results["task"] == task) & (results["init"] == init)).any()]
    fig, axes = plt.subplots(len(panels), 1, figsize=(_strip_width(len(strategies)), 3.3 * len(panels) + 0.9),
                             squeeze=False, layout="constrained")
    for ax, (init, task) in zip(axes[:, 0], panels):
        rows = results[(results["task"] == task) & (results["init"] == init)]
        _dot_panel(ax, rows, "value", strategies, "init", [init], colors, spread=spread, markers=markers)
        if majority and rows["majority"].notna().any():
            _majority_line(ax, rows["majority"].mean())
        ax.set_title(f"{task_label(task)}, {INIT_LABELS.get(init, init).lower()}")
        ax.set_ylabel(metric_label)
    extra = [Line2D([], [], ls="--", lw=1, color="0.45", label="Majority-class rate")] if majority else []
    _dot_key(fig, inits, colors, INIT_LABELS, "Student init", spread_label, extra)
    return fig


OVERLAP = 0.02  # curves closer than this share of their panel's range are drawn over one another


def _overlap_note(panel: pd.DataFrame, log: bool, lines: str | list[str] = "strategy", value: str = "value") -> str:
    """"(all N curves overlap)" when every curve of a panel lies within OVERLAP of the panel's range of the others
    at every step (on the log scale when the panel has one), else "": a reader who sees one line should know why.

    panel: ``lines`` (the columns that name a curve), step, ``value``; repeated rows (seeds) are averaged."""
    wide = panel.pivot_table(index="step", columns=lines, values=value).dropna()
    if wide.shape[1] < 2 or wide.empty:
        return ""
    wide = np.log10(wide) if log else wide
    span = float(wide.max().max() - wide.min().min())
    gap = float((wide.max(axis=1) - wide.min(axis=1)).max())
    return f"(all {wide.shape[1]} curves overlap)" if gap <= OVERLAP * span or span == 0 else ""


@_themed
def loss_curves(metrics: pd.DataFrame, title: str | None = None, legend_title: str | None = None) -> Figure:
    """Training curves: one panel per term (ce, kl, hidden, grad_norm, ...), one line per strategy.

    Columns: strategy, step, term, value; repeated (strategy, step, term) rows (seeds) are
    averaged. Panels whose values are all positive and span more than a decade use a log y axis.
    ``legend_title``: the key's title (default: "Strategy" when every level is a matching strategy, none
    otherwise, e.g. for the settings a caller puts in the strategy column).
    """
    _require(metrics, ["strategy", "step", "term", "value"], "loss curves")
    curves = (
        metrics.dropna(subset=["value"])
        .groupby(["term", "strategy", "step"], as_index=False)["value"].mean()
    )
    terms = _ordered(curves["term"].unique(), TERM_LABELS)
    strategies = sort_strategies(curves["strategy"].unique())
    colors = _colors(strategies, STRATEGY_PALETTE)
    ncols = min(3, len(terms))
    nrows = math.ceil(len(terms) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.3 * ncols + 2.0, 2.6 * nrows + (0.4 if title else 0.1)),
        squeeze=False, layout="constrained",
    )
    spare = list(axes.flat[len(terms):])
    for ax in spare:
        ax.axis("off")
    plain = FuncFormatter(lambda v, _: f"{v:.3g}")
    for ax, term in zip(axes.flat, terms):
        panel = curves[curves["term"] == term]
        for strategy in sort_strategies(panel["strategy"].unique()):
            line = panel[panel["strategy"] == strategy]
            ax.plot(line["step"], line["value"], color=colors[strategy], lw=1.3)
        if (panel["value"] > 0).all() and panel["value"].max() > 10 * panel["value"].min():
            ax.set_yscale("log")  # only where the term spans more than a decade
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(NullFormatter())
        note = _overlap_note(panel, log=ax.get_yscale() == "log")
        ax.set_title(TERM_LABELS.get(term, term) + (f"\n{note}" if note else ""))
        ax.set_xlabel("Training step")
        sns.despine(ax=ax)
    handles = [Line2D([], [], color=colors[s], lw=1.6, label=strategy_label(s)) for s in strategies]
    if legend_title is None and set(strategies) <= set(STRATEGY_LABELS):
        legend_title = "Strategy"
    if spare:  # in the grid's empty cell, clear of the title
        spare[0].legend(handles=handles, title=legend_title, loc="center", frameon=False)
    else:
        fig.legend(handles=handles, title=legend_title, loc="outside right center", frameon=False)
    if title:
        fig.suptitle(title)
    return fig


# claim (c): per-run geometry column -> (column prefix in the verdict's claim (c) table, axis label, name in sentences)
VERDICT_GEOMETRY = {"frac_acute": ("acute", "Fraction of acute angles, trained", "trained acute fraction"),
                    "thales_ratio": ("ratio", "Thales ratio, trained", "trained Thales ratio")}


def _finite_bar(d: pd.Series) -> list[list[float]] | None:
    """Error-bar lengths below and above ``d.mean_diff`` for its interval (ci_low, ci_high); None without an
    interval, for a zero-width one and for an unbounded one (``_unbounded_bars`` draws those)."""
    if not (np.isfinite(d.ci_low) and np.isfinite(d.ci_high) and d.ci_high > d.ci_low):
        return None
    return [[d.mean_diff - d.ci_low], [d.ci_high - d.mean_diff]]


def _unbounded_bars(ax: plt.Axes, bars: list[tuple[float, str]]) -> None:
    """Unbounded intervals (the same difference on every seed, too few seeds for the sign-flip test to bound
    it), given as (x, colour), as dotted lines over the panel's y-range; the range stays as the rest set it."""
    low, high = ax.get_ylim()
    for x, color in bars:
        ax.vlines(x, low, high, colors=color, linestyles=":", lw=1.3, zorder=1)
    ax.set_ylim(low, high)


def _unbounded(diffs: pd.DataFrame) -> pd.Series:
    """Which rows' intervals are unbounded (ci_low = -inf)."""
    return np.isneginf(diffs.ci_low.astype(float))


def _stacks(frame: pd.DataFrame) -> list[str | None]:
    """The stacks a table's rows cover, in order of appearance: None for runs of one stack (no stack column, or
    NaN there)."""
    if "stack" not in frame:
        return [None]
    return list(dict.fromkeys(stack if isinstance(stack, str) else None for stack in frame["stack"]))


def _in_stack(frame: pd.DataFrame, stack: str | None) -> pd.DataFrame:
    """The rows of one stack (``_stacks``): None selects the runs of one stack."""
    if "stack" not in frame:
        return frame
    return frame[frame["stack"].isna()] if stack is None else frame[frame["stack"] == stack]


def _interval_text(diff: pd.DataFrame) -> str:
    """What claim (a)'s bars are: 'Holm 99.75% t intervals', or why there are none."""
    drawn = diff[diff.ci_high > diff.ci_low]  # unbounded ones too; NaN: False
    if len(drawn):
        levels = sorted(set(drawn.ci_level.dropna().round(6))) if "ci_level" in drawn else []
        text = (f"Holm {100 * levels[0]:.4g}% t intervals" if len(levels) == 1 else
                f"Holm {100 * levels[0]:.4g}–{100 * levels[-1]:.4g}% t intervals" if levels else "t intervals")
        return text + (", dotted: unbounded (the same difference on every seed)" if _unbounded(drawn).any() else "")
    if len(diff) and (diff.mean_diff == 0).all():
        return "no interval: every difference 0"
    if diff.ci_low.notna().any():
        return "every seed gives the same difference (exact sign-flip test)"
    return "no interval (too few seeds)"


def _correlation_text(rho: float, corr: pd.DataFrame, prefix: str, xs: pd.Series) -> str:
    """Claim (c)'s panel title: Spearman's ρ and p over the matching students, or why ρ is undefined."""
    if np.isfinite(rho):
        return f"ρ = {rho:.2f}, p = {corr[f'{prefix}_spearman_p'].iloc[0]:.2g} over matching students"
    if len(xs) and xs.nunique() == 1:
        return f"ρ undefined: every matching student at {xs.iloc[0]:.3f}"
    return "ρ undefined over matching students"


@_themed
def verdict_panels(diffs: pd.DataFrame, spreads: pd.DataFrame, acute: pd.DataFrame, trained: pd.DataFrame,
                   metric: str) -> Figure:
    """The three claims, panels in rows of two per (task, init), named above them: (a) difference to None with its
    (Holm) interval per strategy, (b) the metric per strategy (seeds as dots, mean ± one std) with the spread, its
    within-seed permutation p and Friedman's p; below them (c) the trained fraction of acute angles (and the
    trained Thales ratio, when given) against the metric, one dot per student, a row per stack where ``trained``
    has a stack column (an encoder-decoder student is measured in both). One key below the panels.

    diffs: task, init, strategy, mean_diff, ci_low, ci_high [, ci_level]; spreads: task, init, spread,
    p_permutation [, friedman_p]; acute: task, init [, stack], acute_spearman_rho, acute_spearman_p [, ratio_...,
    cells]; trained: run, task, init [, stack], strategy, frac_acute [, thales_ratio], <metric> (one row per
    trained student and stack).
    """
    _require(diffs, ["task", "init", "strategy", "mean_diff", "ci_low", "ci_high"], "verdict")
    _require(trained, ["run", "task", "init", "strategy", "frac_acute", metric], "verdict")
    geometry = [(column, prefix, xlabel) for column, (prefix, xlabel, _) in VERDICT_GEOMETRY.items() if column in trained]
    groups = [key for key, _ in diffs.groupby(["task", "init"])]
    stacks = {(task, init): _stacks(trained[(trained.task == task) & (trained.init == init)]) for task, init in groups}
    rows = 1 + max(len(s) for s in stacks.values())
    strategies = sort_strategies(trained["strategy"].unique())
    colors = _colors(strategies, STRATEGY_PALETTE)
    label = metric.replace("_", " ").capitalize() + " (%)"
    fig = plt.figure(figsize=(2 * _strip_width(len(strategies)), 3.3 * rows * len(groups) + 0.8), layout="constrained")
    for sub, (task, init) in zip(np.atleast_1d(fig.subfigures(len(groups), 1)), groups):
        (a, b), *lowers = sub.subplots(rows, 2)
        sub.suptitle(f"{task_label(task)}, {INIT_LABELS.get(init, init).lower()}", fontweight="bold")
        diff = diffs[(diffs.task == task) & (diffs.init == init)]
        matching = [s for s in strategies if s in set(diff.strategy)]
        unbounded = []
        for x, strategy in enumerate(matching):
            d = diff[diff.strategy == strategy].iloc[0]
            a.errorbar(x, d.mean_diff, yerr=_finite_bar(d), fmt="D", ms=6, color=colors[strategy], capsize=3, lw=1.3)
            unbounded += [(x, colors[strategy])] if np.isneginf(d.ci_low) else []
        a.axhline(0, ls="--", lw=1, color="0.5", zorder=0)
        a.set_xticks(range(len(matching)))
        a.set_xticklabels([strategy_tick(s) for s in matching])
        a.set_xlim(-0.5, len(matching) - 0.5)
        a.set_ylabel("Difference to None (points)")
        low, high = a.get_ylim()
        cut = low < -100 or high > 100  # a 3-seed Holm interval can pass what a difference of % can be
        a.set_ylim(max(low, -105), min(high, 105))
        _unbounded_bars(a, unbounded)
        a.set_title(f"(a) {_interval_text(diff)}" + (", bars cut at ±100" if cut else ""), loc="left")
        sns.despine(ax=a)
        runs = trained[(trained.task == task) & (trained.init == init)]
        students = runs.drop_duplicates("run").assign(group="all")
        _dot_panel(b, students, metric, strategies, "group", ["all"], {"all": "black"}, spread="std", markers={"all": "s"})
        spread = spreads[(spreads.task == task) & (spreads.init == init)]
        note = ""
        if len(spread):
            first = spread.iloc[0]
            note = f"spread {first.spread:.1f} among matching strategies (None aside)\nwithin-seed p = {first.p_permutation:.2g}"
            if np.isfinite(first.get("friedman_p", np.nan)):
                note += f", Friedman p = {first.friedman_p:.2g}"
        b.set_ylabel(label)
        b.set_title(f"(b) {note}", loc="left")
        for ax in np.ravel(lowers[len(stacks[task, init]):]):
            ax.set_axis_off()
        for stack, lower in zip(stacks[task, init], lowers):
            measured = _in_stack(runs, stack)
            corr = _in_stack(acute[(acute.task == task) & (acute.init == init)], stack)
            where = "" if stack is None else f", {stack} stack"
            for ax, (column, prefix, xlabel) in zip(lower, geometry):
                for strategy in strategies:
                    points = measured[measured.strategy == strategy]
                    ax.scatter(points[column], points[metric], s=22, color=colors[strategy], label=strategy_label(strategy))
                if column == "frac_acute":
                    _fraction_axis(ax, measured[column], axis="x")
                rho = corr[f"{prefix}_spearman_rho"].iloc[0] if len(corr) else np.nan
                ax.set_title(f"(c{where}) {_correlation_text(rho, corr, prefix, measured[measured.strategy != 'none'][column])}\n"
                             "(None drawn, not counted)", loc="left")
                ax.set_xlabel(f"{xlabel}\n({corr.cells.iloc[0]})" if "cells" in corr and len(corr) else xlabel)
                ax.set_ylabel(label)
                sns.despine(ax=ax)
            for ax in lower[len(geometry):]:
                ax.set_axis_off()
    handles = [Line2D([], [], ls="", marker="o", ms=5, color=colors[s], label=strategy_label(s)) for s in strategies]
    handles += [Line2D([], [], ls="", marker="s", ms=6, color="black", label="(b) mean over seeds"),  # not None's grey dot
                Line2D([], [], ls="", marker="o", ms=3.5, color="black", alpha=0.45, label="(b) one seed"),
                Line2D([], [], ls="-", lw=1.3, color="black", label="(b) bar: ± one std over seeds")]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(5, len(handles)), frameon=False)
    return fig


@_themed
def budget_differences(diffs: pd.DataFrame, metric: str) -> Figure:
    """Paired difference to None against training steps: one panel per (task, init), one line per strategy,
    bars = the Holm-corrected paired t interval of each budget's table; filled markers where the interval
    excludes 0, open ones where it does not, none where there is no interval (too few seeds).

    diffs: budget, task, init, strategy, mean_diff, ci_low, ci_high, answer (``verdict.claims_by_budget``).
    """
    _require(diffs, ["budget", "task", "init", "strategy", "mean_diff", "ci_low", "ci_high", "answer"], "budget differences")
    groups = [key for key, _ in diffs.groupby(["task", "init"])]
    tasks = sorted({task for task, _ in groups})
    inits = _ordered({init for _, init in groups}, INIT_LABELS)
    strategies = sort_strategies(diffs["strategy"].unique())
    colors = _colors(strategies, STRATEGY_PALETTE)
    fig, axes = plt.subplots(len(tasks), len(inits), figsize=(4.6 * len(inits) + 2.2, 3.4 * len(tasks) + 0.5),
                             squeeze=False, layout="constrained")
    # budgets evenly spaced in their order (a run's own length can sit close to a planned budget: 320 and 371),
    # strategies dodged around each
    offsets = dict(zip(strategies, 0.09 * (np.arange(len(strategies)) - (len(strategies) - 1) / 2)))
    for (r, task), (c, init) in itertools.product(enumerate(tasks), enumerate(inits)):
        ax = axes[r, c]
        cell = diffs[(diffs.task == task) & (diffs.init == init)]
        if cell.empty:
            ax.set_axis_off()
            continue
        budgets, unbounded = sorted(cell.budget.unique()), []
        position = {budget: n for n, budget in enumerate(budgets)}
        for strategy in strategies:
            line = cell[cell.strategy == strategy].sort_values("budget")
            if line.empty:
                continue
            x = line.budget.map(position).to_numpy(float) + offsets[strategy]
            ax.plot(x, line.mean_diff, color=colors[strategy], lw=1.2)
            for xi, (_, d) in zip(x, line.iterrows()):
                called = d.answer in ("better", "worse")
                unbounded += [(xi, colors[strategy])] if np.isneginf(d.ci_low) else []
                ax.errorbar(xi, d.mean_diff, yerr=_finite_bar(d), fmt="o", ms=5, color=colors[strategy], capsize=2, lw=1,
                            mfc=colors[strategy] if called else "white")
        ax.axhline(0, ls="--", lw=1, color="0.5", zorder=0)
        _unbounded_bars(ax, unbounded)
        ax.set_xticks(range(len(budgets)), [str(int(b)) for b in budgets])
        ax.set_xlim(-0.5, len(budgets) - 0.5)
        ax.set_xlabel("Training step (budget; evenly spaced)")
        ax.set_ylabel("Difference to None (points)")
        ax.set_title(f"{task_label(task)}, {INIT_LABELS.get(init, init).lower()}", loc="left")
        sns.despine(ax=ax)
    dotted = "; dotted: unbounded (the same difference on every seed)" if _unbounded(diffs).any() else ""
    handles = [Line2D([], [], ls="-", marker="o", ms=5, color=colors[s], label=strategy_label(s)) for s in strategies]
    handles += [Line2D([], [], ls="", marker="o", ms=5, color="0.3", label="interval excludes 0"),
                Line2D([], [], ls="", marker="o", ms=5, color="0.3", mfc="white", label="not distinguishable")]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(4, len(handles)), frameon=False)
    fig.suptitle(_wrapped(f"{metric.replace('_', ' ').capitalize()}, difference to None (same seed) along training; "
                          "bars: Holm-corrected paired t intervals per budget" + dotted, 4.6 * len(inits) + 2.2),
                 fontsize="medium")
    return fig


def _lines_per_stack(frame: pd.DataFrame, series: list[tuple[plt.Axes, str, str, str, str]]) -> None:
    """One line over ``step`` per stack (its own line style) and series (axes, column, colour, marker, label)."""
    stacks = list(dict.fromkeys(frame["stack"]))
    for stack, style in zip(stacks, ["-", "--", ":"]):
        rows = frame[frame["stack"] == stack].sort_values("step")
        suffix = f" ({stack})" if len(stacks) > 1 else ""
        for ax, column, color, marker, label in series:
            ax.plot(rows.step, rows[column], style, color=color, marker=marker, ms=3, label=label + suffix)


@_themed
def explain_page(geometry: pd.DataFrame, distances: pd.DataFrame, plane: dict | None, layers: pd.DataFrame,
                 terms: pd.DataFrame, title: str, matched: str = "to the matched layer", stack: str | None = None) -> Figure:
    """The ``layergeo explain`` page: (a) acute fraction and Thales ratio over training, (b) distance to the
    matched and to the other teacher layers, (c) one token in the plane of a teacher pair with the Thales
    circle, and with gradient traces (d) the layer-alignment matrices at start, middle and end and (e) each
    pull's cosine with the task gradient over training.

    geometry: stack, step, frac_acute, thales_ratio, cells; distances: stack, step, matched, unmatched; plane: see
    ``explain.token_plane``; layers: step, stack, student_layer, teacher_i, teacher_k, cosine; terms: step, term,
    cosine_with_ce (both may be empty). ``matched``: what (b)'s matched line measures to; ``stack``: the stack of
    (d)'s matrices (None: the first).
    """
    gradients = not layers.empty
    fig = plt.figure(figsize=(15, 9.6 if gradients else 4.6), layout="constrained")
    grid = fig.add_gridspec(2 if gradients else 1, 3)
    stacks = list(dict.fromkeys(geometry["stack"]))
    ax = fig.add_subplot(grid[0, 0])
    twin = ax.twinx()
    _lines_per_stack(geometry, [(ax, "frac_acute", _COLORBLIND[0], "o", "acute fraction"),
                                (twin, "thales_ratio", _COLORBLIND[3], "s", "Thales ratio")])
    ax.set_xlabel("Training step")
    ax.set_ylabel("Fraction of acute angles", color=_COLORBLIND[0])
    twin.set_ylabel("Mean Thales ratio (> 1: acute)", color=_COLORBLIND[3])
    ax.set_title(f"(a) Angles at the student\n({'; '.join(dict.fromkeys(geometry['cells']))})", loc="left")
    lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles=lines, frameon=False, fontsize="small", loc="best")
    ax = fig.add_subplot(grid[0, 1])
    _lines_per_stack(distances, [(ax, "matched", _COLORBLIND[2], "o", matched),
                                 (ax, "unmatched", _COLORBLIND[7], "o", "to the other layers")])
    ax.set_xlabel("Training step")
    ax.set_ylabel("Mean distance |W S_j − T_i|")
    ax.set_title("(b) Distance to teacher layers", loc="left")
    ax.legend(frameon=False, fontsize="small")
    sns.despine(ax=ax)
    ax = fig.add_subplot(grid[0, 2])
    if plane is not None:
        i, k = plane["pair"]
        t, s = plane["teacher"], plane["student"]
        ax.add_patch(plt.Circle(plane["centre"], plane["radius"], fill=True, alpha=0.12, color=_COLORBLIND[3],
                                label=f"Thales ball of T{i}, T{k} (inside: obtuse)"))
        ax.plot(t[:, 0], t[:, 1], color="0.6", lw=0.8, zorder=1)
        ax.scatter(t[:, 0], t[:, 1], color="0.3", s=18, zorder=2, label="teacher states T0…")
        for n, (x, y) in enumerate(t):
            ax.annotate(f"T{n}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.plot(s[:, 0], s[:, 1], color=_COLORBLIND[0], lw=1.2, marker="o", ms=3, zorder=3, label="student state, over training")
        ax.scatter(*s[-1], color=_COLORBLIND[0], s=40, marker="*", zorder=4)
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_xlabel(f"along T{k} − T{i}")
        ax.set_ylabel("orthogonal, toward the last student state")
        ax.legend(frameon=False, fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)  # never on the states
        ax.set_title("(c) One token, in the plane of a teacher pair", loc="left")
    else:
        ax.set_axis_off()
    if gradients:
        stack = stack or stacks[0]
        j = int(layers[layers["stack"] == stack].student_layer.max())
        steps = sorted(layers.step.unique())
        chosen = list(dict.fromkeys([steps[0], steps[len(steps) // 2], steps[-1]]))
        inner = grid[1, :2].subgridspec(1, len(chosen))
        for n, step in enumerate(chosen):
            cell = layers[(layers["stack"] == stack) & (layers.student_layer == j) & (layers.step == step)]
            size = int(cell.teacher_k.max()) + 1
            matrix = np.full((size, size), np.nan)
            for r in cell.itertuples():
                matrix[r.teacher_i, r.teacher_k] = matrix[r.teacher_k, r.teacher_i] = r.cosine
            np.fill_diagonal(matrix, 1.0)
            ax = fig.add_subplot(inner[0, n])
            mesh = ax.imshow(matrix, cmap="RdBu", vmin=-1, vmax=1)
            ticks = range(0, size, 1 if size <= 13 else 5)  # a 31-state teacher: every fifth layer
            ax.set_xticks(ticks, [f"T{x}" for x in ticks], fontsize=7)
            ax.set_yticks(ticks, [f"T{x}" for x in ticks], fontsize=7)
            where = f" ({stack})" if len(stacks) > 1 else ""
            ax.set_title(f"(d) S{j}{where}, step {step}" if n == 0 else f"step {step}", loc="left")
        fig.colorbar(mesh, ax=ax, label="cos(∇ pull to T_i, ∇ pull to T_k)", shrink=0.8)
        ax = fig.add_subplot(grid[1, 2])
        names = list(dict.fromkeys(terms.term))
        colors = _colors([n for n in names if n != "kl"], STRATEGY_PALETTE)
        for name in names:
            line = terms[terms.term == name].sort_values("step")
            ax.plot(line.step, line.cosine_with_ce, marker="o", ms=3, color=colors.get(name, "0.2"),
                    ls="--" if name == "kl" else "-", label="KL term" if name == "kl" else strategy_label(name))
        ax.axhline(0, color="0.5", lw=1, ls=":")
        ax.set_xlabel("Training step")
        ax.set_ylabel("cos(pull gradient, CE gradient)")
        ax.set_title("(e) Each pull against the task", loc="left")
        ax.legend(frameon=False, fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3)  # never on the lines
        sns.despine(ax=ax)
    fig.suptitle(title, fontsize="medium")
    return fig


def _seeds_text(table: pd.DataFrame, group: list[str]) -> str:
    """'seed 0', 'mean over 3 seeds' or 'mean over 1-3 seeds per line', from the seeds of each ``group``."""
    counts = table.groupby(group)["seed"].nunique()
    if table["seed"].nunique() == 1:
        return f"seed {table['seed'].iloc[0]}"
    if counts.nunique() == 1:
        return f"mean over {counts.iloc[0]} seeds" if counts.iloc[0] > 1 else "one seed per line"
    return f"mean over {counts.min()}–{counts.max()} seeds per line"


@_themed
def trace_comparison(table: pd.DataFrame, stack: str = "") -> Figure:
    """Traces of several runs, one line per strategy (mean over its seeds) and init (its own line style when
    there are several): acute fraction, Thales ratio, distance to the matched teacher layer and, when the runs
    traced gradients, the fraction of teacher pairs whose parameter pulls are aligned (the acute fraction's
    parameter-space twin) and the own pull's cosine with the CE gradient; panels in rows of three. The title
    names the init, the seeds and the cells of the angles.

    table: strategy, init, seed, step, frac_acute, thales_ratio, matched, own_pull_vs_ce (pulls_aligned, cells);
    ``stack``: named in the title (for runs with several stacks).
    """
    panels = [("frac_acute", "Fraction of acute angles\n(states)"), ("pulls_aligned", "Fraction of aligned pulls\n(parameters)"),
              ("thales_ratio", "Mean Thales ratio"), ("matched", "Distance to the matched layer"),
              ("own_pull_vs_ce", "cos(own pull, CE gradient)")]
    panels = [(c, label) for c, label in panels if c in table and table[c].notna().any()]
    strategies = sort_strategies(table.strategy.unique())
    colors = _colors(strategies, STRATEGY_PALETTE)
    inits = _ordered(table.init.unique(), INIT_LABELS)
    styles = dict(zip(inits, ["-", "--", ":"]))
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    spare = nrows * ncols > len(panels)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.0 * ncols + (0 if spare else 2.4), 3.2 * nrows + 0.6),
                             squeeze=False, layout="constrained")
    for ax, (column, label) in zip(axes.flat, panels):
        for (strategy, init), group in table.groupby(["strategy", "init"]):
            line = group.groupby("step")[column].mean()
            ax.plot(line.index, line.values, styles[init], color=colors[strategy], marker="o", ms=2.5)
        if column in ("frac_acute", "pulls_aligned"):
            _fraction_axis(ax, table[column])
        ax.set_title(_overlap_note(table, False, ["strategy", "init"], column), fontsize="small")
        if column == "matched" and "none" in strategies:
            label += "\n(None: to the forward targets)"
        ax.set_xlabel("Training step")
        ax.set_ylabel(label)
        sns.despine(ax=ax)
    handles = [Line2D([], [], color=colors[s], label=strategy_label(s)) for s in strategies]
    if len(inits) > 1:
        handles += [Line2D([], [], color="black", ls=styles[i], label=f"{INIT_LABELS.get(i, i)} (line style)") for i in inits]
    if spare:
        for ax in axes.flat[len(panels):]:
            ax.set_axis_off()
        axes.flat[-1].legend(handles=handles, title="Strategy", loc="center", frameon=False)
    else:
        fig.legend(handles=handles, title="Strategy", loc="outside right upper", frameon=False)
    students = " and ".join(INIT_LABELS.get(i, i).lower() for i in inits)
    cells = f"; angles at {'; '.join(dict.fromkeys(table['cells'].dropna()))}" if "cells" in table else ""
    where = f", {stack} stack" if stack else ""
    fig.suptitle(_wrapped(f"Geometry along training on the probe set{where}: {students}, "
                          f"{_seeds_text(table, ['strategy', 'init'])}{cells}", fig.get_figwidth()), fontsize="medium")
    return fig


# ---------------------------------------------------------------- saving


def save_figure(fig: Figure, stem: Path) -> list[Path]:
    """Write stem.png (150 dpi) and stem.pdf atomically, close the figure, return the two paths.

    The saved area is the drawn content plus a small margin (``bbox_inches="tight"``): a label that the layout
    engine placed at the figure's edge is not cut off."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    try:
        for fmt in ("png", "pdf"):
            path = stem.with_name(f"{stem.name}.{fmt}")
            fd, tmp = tempfile.mkstemp(dir=stem.parent, prefix=f".{path.name}.")
            try:
                with os.fdopen(fd, "wb") as handle, plt.rc_context({"pdf.fonttype": 42}):
                    fig.savefig(handle, format=fmt, dpi=PNG_DPI, bbox_inches="tight", pad_inches=0.08)
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
            paths.append(path)
    finally:
        plt.close(fig)
    return paths
