"""Which cells of an angles table a headline number covers, and their names.

An angles table (``angles.csv``, a trace's ``trace_angles.jsonl``) has one row per cell: student layer j and
teacher pair i < k. The paper's authors measure at student layers j >= 1 over teacher pairs among layers >= 1, no
embedding output on either side: those are the headline cells of every summary, figure and verdict by default.
``with_embeddings`` takes every cell instead (S0, and the pairs with T0). A cosine histogram summed over teacher
pairs (``angle_hist.csv``: student_layer, bin, count) can only be selected by student layer.
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

# what an acute summary table's frac_acute covered when it did not name its cells (older layergeo)
ALL_CELLS = "every measured layer, embedding output included"


def headline_cells(angles: pd.DataFrame, with_embeddings: bool = False) -> pd.DataFrame:
    """The rows the headline numbers cover: student_layer >= 1 and, where the table has it, teacher_i >= 1
    (teacher_k > teacher_i); every row ``with_embeddings``."""
    if with_embeddings:
        return angles
    keep = angles["student_layer"] >= 1
    if "teacher_i" in angles:
        keep &= angles["teacher_i"] >= 1
    return angles[keep]


def layer_names(prefix: str, layers: Iterable[int]) -> str:
    """'S1–S3' for consecutive layers, 'S1, S3' otherwise."""
    layers = sorted({int(layer) for layer in layers})
    if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{prefix}{layers[0]}–{prefix}{layers[-1]}"
    return ", ".join(f"{prefix}{layer}" for layer in layers)


def cells_label(cells: pd.DataFrame) -> str:
    """What ``cells`` cover, from their rows: 'S1–S3, teacher pairs among T1–T4' (a histogram summed over pairs:
    'S1–S3, every teacher pair, T0's included'); 'no cells' for none."""
    if cells.empty:
        return "no cells"
    students = layer_names("S", cells["student_layer"])
    if "teacher_i" not in cells:
        return f"{students}, every teacher pair, T0's included"
    return f"{students}, teacher pairs among {layer_names('T', pd.concat([cells['teacher_i'], cells['teacher_k']]))}"


def table_cells(table: pd.DataFrame) -> str:
    """What the frac_acute of a table of run summaries (``acute_summary.csv``) covers: its ``cells`` column
    (distinct values joined by '; '), or :data:`ALL_CELLS` for a table written before that column."""
    if "cells" not in table:
        return ALL_CELLS
    return "; ".join(dict.fromkeys(table["cells"].dropna().astype(str)))
