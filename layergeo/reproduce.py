"""``layergeo reproduce``: the embedded recipe end to end (teacher, grid, geometry, report, figures, verdict)."""

from __future__ import annotations

import time
from pathlib import Path

from layergeo.errors import LayergeoError
from layergeo.figures import write_figures
from layergeo.report import write_report
from layergeo.runs import environment, now, write_json
from layergeo.sweep import execute, load_grid
from layergeo.verdict import verdict_from_sweep

ANALYSES = Path(__file__).resolve().parents[1] / "analyses"


def reproduce(out: Path, full: bool = False, jobs: int = 1, devices: list[str] | None = None) -> Path:
    """Run ``analyses/classification[-full].yaml``; returns the sweep folder holding report/, figures/ and verdict/."""
    grid_file = ANALYSES / ("classification-full.yaml" if full else "classification.yaml")
    if not grid_file.is_file():
        raise LayergeoError(f"{grid_file} is missing; run reproduce from a clone of the layergeo repository (pip install -e .)")
    record = environment("reproduce", "cuda" if devices else "auto", 0)  # its "start" is now
    start = time.time()
    execute(grid_file, out, jobs=jobs, devices=devices)
    root = out / load_grid(grid_file).name
    write_report(root, paper=True)
    write_figures(root)
    verdict_from_sweep(root)
    record.update({"grid": str(grid_file.relative_to(ANALYSES.parent)), "end": now(), "wall_time_s": round(time.time() - start, 1)})
    write_json(root / "reproduce.json", record)
    return root
