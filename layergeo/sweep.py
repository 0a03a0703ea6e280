"""``layergeo sweep GRID.yaml``: the Cartesian product of a grid as independent, resumable runs.

A grid file::

    name: classification            # folder name under --out (default: the file's stem)
    preset: default                 # base preset for every run (optional)
    base:                           # config values shared by every run (same keys as a run config)
      data: {max_train: 2000}
    grid:                           # dotted config keys -> values; every combination is one run
      data.task: [rotten_tomatoes, bbc_news]
      student.init: [copy, random]
      matching.strategy: [none, forward, reverse, all_to_one, shuffle, rail]
      seed: [0, 1, 2]
    geometry:                       # optional: angles after each run (reused by report/figures)
      checkpoints: [init, best]
      max_examples: 200

``grid`` may also be a list of such mappings: the runs are the union of their products, so
axes that matter only for some runs are not crossed with the rest (e.g. loss options for the
matching strategies, but not for ``none``)::

    grid:
      - {matching.strategy: [none], seed: [0, 1]}
      - {matching.strategy: [forward], loss.normalize: [none, l2], seed: [0, 1]}

A block may also ``set`` student settings of its own runs, which are not an axis and not in the
run names (e.g. a budget per dataset)::

    grid:
      - {data.task: [rotten_tomatoes], seed: [0, 1], set: {train: {epochs: 3}}}
      - {data.task: [bbc_news], seed: [0, 1], set: {train: {epochs: 15}}}

Teachers take ``base`` only (one teacher per task serves every block), so ``set`` cannot name
``teacher`` settings.

One teacher is fine-tuned per task (and teacher model) under ``<sweep>/teachers/`` and
shared by all its students. A finished run (``results.json``) is skipped; an
interrupted one is resumed, so a killed sweep loses at most the run in progress. ``only``
restricts a sweep to a slice of its grid (e.g. one task, or seeds 0 and 1 of every strategy
first); the slice's runs keep their names, so the full sweep later skips them.
"""

from __future__ import annotations

import copy
import itertools
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from layergeo.config import RunConfig, dump_yaml, load_config, parse_yaml, preset_names
from layergeo.errors import LayergeoError
from layergeo.progress import eta
from layergeo.runs import RunDir, RunLock, write_text

GRID_KEYS = {"name", "preset", "base", "grid", "geometry"}


@dataclass
class Grid:
    name: str
    preset: str | None
    base: dict[str, Any]
    blocks: list[dict[str, list[Any]]]  # each block: config key -> values; the grid is the union of their products
    geometry: dict[str, Any] = field(default_factory=dict)
    settings: list[dict[str, Any]] = field(default_factory=list)  # per block: its `set` (config sections), or {}

    def __post_init__(self) -> None:
        self.settings = self.settings or [{} for _ in self.blocks]


@dataclass
class PlannedRun:
    name: str
    out: Path
    config: RunConfig

    @property
    def status(self) -> str:
        run = RunDir(self.out)
        return "done" if run.finished else "resume" if run.config_file.is_file() else "new"


def load_grid(path: str | Path) -> Grid:
    path = Path(path)
    if not path.is_file():
        raise LayergeoError(f"grid file {path} does not exist; see analyses/*.yaml for examples")
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise LayergeoError(f"grid file {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    except UnicodeDecodeError as exc:
        raise LayergeoError(f"grid file {path} is not UTF-8 (byte {exc.start}); save it as UTF-8 text") from None
    if not raw:
        raise LayergeoError(f"grid file {path} is empty; a grid names at least its axes (see analyses/*.yaml)")
    if not isinstance(raw, dict):
        raise LayergeoError(f"grid file {path} must be a mapping with keys {', '.join(sorted(GRID_KEYS))}")
    unknown = sorted(set(raw) - GRID_KEYS)
    if unknown:
        raise LayergeoError(f"unknown grid key {unknown[0]!r} in {path}; valid keys: {', '.join(sorted(GRID_KEYS))}")
    blocks = raw.get("grid") or {}
    blocks = [blocks] if isinstance(blocks, dict) else blocks  # a mapping (empty: one run), or a list of non-empty ones
    settings = [_block_settings(block, path) for block in blocks] if isinstance(blocks, list) else []
    blocks = [{k: v for k, v in block.items() if k != "set"} if isinstance(block, dict) else block for block in blocks] \
        if isinstance(blocks, list) else blocks
    if not isinstance(blocks, list) or not blocks or any(
        not isinstance(block, dict) or (len(blocks) > 1 and not block)
        or any(not isinstance(v, list) or not v for v in block.values()) for block in blocks
    ):
        raise LayergeoError(f"'grid' in {path} must map config keys to non-empty lists of values "
                            "(or be a list of such mappings, whose products are joined)")
    preset = raw.get("preset")
    if preset is not None and preset not in preset_names():
        raise LayergeoError(f"unknown preset {preset!r} in {path}; choose one of {', '.join(preset_names())}")
    return Grid(str(raw.get("name") or path.stem), preset, raw.get("base") or {}, blocks, raw.get("geometry") or {}, settings)


def _block_settings(block: Any, path: Path) -> dict[str, Any]:
    """A block's ``set``: config sections for its runs only (not an axis, not in run names); {} without one."""
    if not isinstance(block, dict) or "set" not in block:
        return {}
    settings = block["set"]
    if not isinstance(settings, dict) or not settings:
        raise LayergeoError(f"'set' in a block of {path} must be a mapping of config sections, e.g. set: {{train: {{epochs: 3}}}}")
    if "teacher" in settings:
        raise LayergeoError(f"'set' in a block of {path} names teacher settings, but one teacher per task serves every "
                            "block; put teacher settings in 'base'")
    return settings


def restrict(grid: Grid, only: dict[str, list[Any]]) -> Grid:
    """The grid cut to the given values of some of its axes.

    A block of the grid that does not cross a restricted axis is left out (its runs have no value on it).
    """
    axes = list(dict.fromkeys(key for block in grid.blocks for key in block))
    blocks = [(dict(block), settings) for block, settings in zip(grid.blocks, grid.settings)]
    for key, wanted in only.items():
        if key not in axes:
            raise LayergeoError(f"--only {key}: not an axis of grid {grid.name!r}; its axes are {', '.join(axes)}")
        known = [v for block in grid.blocks for v in block.get(key, [])]
        missing = [v for v in wanted if v not in known]
        if missing:
            raise LayergeoError(f"--only {key}={missing[0]}: not a value of that axis; "
                                f"its values are {', '.join(map(str, dict.fromkeys(known)))}")
        blocks = [({k: [v for v in vs if v in wanted] if k == key else vs for k, vs in block.items()}, settings)
                  for block, settings in blocks if key in block]
    blocks = [(block, settings) for block, settings in blocks if all(block.values())]
    if not blocks:
        raise LayergeoError(f"--only leaves no run of grid {grid.name!r}: no block has all those values together")
    return Grid(grid.name, grid.preset, grid.base, [b for b, _ in blocks], grid.geometry, [s for _, s in blocks])


def _flatten(tree: dict[str, Any], prefix: str = "") -> list[str]:
    items = []
    for key, value in tree.items():
        if isinstance(value, dict):
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append(f"{prefix}{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
    return items


def run_name(point: dict[str, Any]) -> str:
    """Readable and unique within a grid: values in axis order, numbers prefixed by their key."""
    parts = []
    for key, value in point.items():
        short = key.split(".")[-1]
        text = str(value)
        parts.append(f"{short}{text}" if isinstance(value, (int, float)) or value is None else text)
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", "_".join(parts)) or "run"


def plan(grid: Grid, root: Path) -> tuple[dict[str, RunConfig], list[PlannedRun]]:
    """Teachers (one per task and teacher model) and runs of the grid, with resolved configs."""
    base = _flatten(grid.base)
    teachers: dict[str, RunConfig] = {}
    runs = []
    points = [(dict(zip(block, values)), settings) for block, settings in zip(grid.blocks, grid.settings)
              for values in itertools.product(*block.values())]
    for point, settings in points:
        overrides = base + _flatten(settings) + [
            f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}" for k, v in point.items()]
        config = load_config(preset=grid.preset, overrides=overrides)
        if config.teacher.dir is None:
            key = re.sub(r"[^A-Za-z0-9_.+-]+", "-", f"{Path(config.data.task).stem}-{config.teacher.model}")
            if key not in teachers:
                teacher_config = load_config(preset=grid.preset, overrides=base + [f"data.task={config.data.task}",
                                                                                   f"teacher.model={config.teacher.model}"])
                teachers[key] = teacher_config
            config.teacher.dir = str((root / "teachers" / key).resolve())
        runs.append(PlannedRun(run_name(point), root / "runs" / run_name(point), config))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise LayergeoError("two grid points give the same run name; make the grid values distinct")
    return teachers, runs


def _train_command(kind: str, config_file: Path, out: Path, resume: bool) -> list[str]:
    command = [sys.executable, "-m", "layergeo.cli", kind, "--config", str(config_file), "--out", str(out)]
    return command + (["--resume"] if resume else [])


def execute(grid_file: str | Path, out: Path, jobs: int = 1, devices: list[str] | None = None, dry_run: bool = False,
            only: dict[str, list[Any]] | None = None) -> list[PlannedRun]:
    """Run (or list) every run of the grid, or of its slice ``only``; returns the plan."""
    grid = restrict(load_grid(grid_file), only or {})
    root = out / grid.name
    teachers, runs = plan(grid, root)
    if dry_run:
        for key in teachers:
            status = "done" if RunDir(root / "teachers" / key).finished else "new"
            print(f"[{status:>6}] teacher {key}")
        for run in runs:
            print(f"[{run.status:>6}] {run.name}")
        print(f"{len(runs)} runs, {sum(r.status == 'done' for r in runs)} finished, under {root}")
        return runs
    root.mkdir(parents=True, exist_ok=True)
    write_text(root / "grid.yaml", Path(grid_file).read_text())
    for key, config in teachers.items():
        _run_one("teacher", config, root / "teachers" / key, None)
    todo = [r for r in runs if not complete(r.out, grid.geometry)]
    print(f"sweep {grid.name}: {len(runs) - len(todo)} of {len(runs)} runs already complete; running {len(todo)}", flush=True)
    slots = devices or ([None] if jobs <= 1 else ["cpu"] * jobs)
    progress = SweepProgress(len(todo))
    if len(slots) == 1:
        for run in todo:
            _run_one("train", run.config, run.out, slots[0], grid.geometry, progress=progress)
    else:
        free = list(slots)
        with ThreadPoolExecutor(len(slots)) as pool:
            list(pool.map(lambda r: _with_slot(free, len(slots), r, grid.geometry, progress), todo))
    return runs


class SweepProgress:
    """One line per run started or ended: ``[3/24 done, 9 min, ~63 min left] start train NAME``."""

    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.monotonic()
        self.lock = threading.Lock()

    def say(self, text: str, finished: bool = False) -> None:
        with self.lock:
            self.done += finished
            elapsed = time.monotonic() - self.t0
            print(f"[{self.done}/{self.total} done, {elapsed / 60:.0f} min{eta(self.done, self.total, elapsed)}] {text}",
                  flush=True)


def submit(grid_file: str | Path, out: Path, launcher: str = "slurm", slurm: dict[str, Any] | None = None,
           wait: bool = True, only: dict[str, list[Any]] | None = None) -> list[PlannedRun]:
    """Run the grid through ``submitit``: teachers first, then one array job over the unfinished runs.

    ``launcher`` is ``slurm`` (a cluster) or ``local`` (submitit's local executor, for testing).
    ``slurm`` holds executor parameters such as ``{"slurm_partition": "gpu", "timeout_min": 120,
    "gpus_per_node": 1}``. Finished runs are skipped and interrupted ones resumed, as with ``execute``.
    """
    try:
        import submitit
    except ImportError:
        raise LayergeoError("sweeps on a cluster need submitit: pip install submitit") from None
    grid = restrict(load_grid(grid_file), only or {})
    root = out / grid.name
    teachers, runs = plan(grid, root)
    root.mkdir(parents=True, exist_ok=True)
    write_text(root / "grid.yaml", Path(grid_file).read_text())
    executor = submitit.AutoExecutor(folder=root / "submitit" / "%j", cluster=None if launcher == "slurm" else launcher)
    executor.update_parameters(**{"timeout_min": 240, **(slurm or {})})
    pending = [(k, root / "teachers" / k) for k in teachers if not RunDir(root / "teachers" / k).finished]
    if pending:
        jobs = executor.map_array(_job, ["teacher"] * len(pending), [teachers[k] for k, _ in pending],
                                  [o for _, o in pending], [None] * len(pending))
        [job.result() for job in jobs]
    todo = [r for r in runs if not complete(r.out, grid.geometry)]
    print(f"sweep {grid.name}: submitting {len(todo)} of {len(runs)} runs through submitit ({launcher})", flush=True)
    if todo:
        jobs = executor.map_array(_job, ["train"] * len(todo), [r.config for r in todo], [r.out for r in todo],
                                  [grid.geometry] * len(todo))
        if wait:
            [job.result() for job in jobs]
    return runs


def _job(kind: str, config: RunConfig, out: Path, geometry: dict[str, Any] | None) -> str:
    """One submitit job: a run in the job's own process."""
    _run_one(kind, config, out, None, geometry)
    return str(out)


def _with_slot(free: list, parallel: int, run: PlannedRun, geometry: dict[str, Any], progress: SweepProgress) -> None:
    device = free.pop()
    try:
        _run_one("train", run.config, run.out, device, geometry, parallel=parallel, progress=progress)
    finally:
        free.append(device)


def geometry_options(geometry: dict[str, Any]) -> list:
    """The AngleOptions of a grid's ``geometry`` section, one per checkpoint."""
    from layergeo.analyse import AngleOptions

    return [AngleOptions(checkpoint=checkpoint, max_examples=geometry.get("max_examples"), space=geometry.get("space", "student"))
            for checkpoint in geometry.get("checkpoints", ["init", "best"])]


def complete(out: Path, geometry: dict[str, Any] | None) -> bool:
    """Whether the run has finished and, if the grid asks for it, has all its geometry."""
    from layergeo.analyse import has_analysis

    return RunDir(out).finished and all(has_analysis(out, options) for options in geometry_options(geometry or {}))


def _run_one(kind: str, config: RunConfig, out: Path, device: str | None, geometry: dict[str, Any] | None = None,
             parallel: int = 1, progress: SweepProgress | None = None) -> None:
    """One run (here, or in its own process on ``device``), then its geometry; under the run's lock.

    A run another process is writing (a second sweep of the same grid) is skipped with a note for
    a student, waited for for a teacher (its students need it).
    """
    from layergeo.lifecycle import execute_run

    if complete(out, geometry if kind == "train" else None):
        return
    say = progress.say if progress is not None else lambda text, finished=False: print(text, flush=True)
    lock = RunLock(out)
    try:
        lock.acquire(wait=kind == "teacher")
    except LayergeoError as exc:
        say(f"skip {out.name}: {exc}")
        return
    try:
        if not RunDir(out).finished:
            resume = RunDir(out).config_file.is_file()
            say(f"{'resume' if resume else 'start'} {kind} {out.name}")
            if device is None:  # in this process: no interpreter start-up per run
                os.environ[RunLock.HELD_BY_PARENT] = str(out.resolve())
                try:
                    execute_run(kind, copy.deepcopy(config), out, resume=resume)
                finally:
                    os.environ.pop(RunLock.HELD_BY_PARENT, None)
            else:
                _run_in_process(kind, config, out, device, parallel, resume)
        if geometry and kind == "train":
            from layergeo.analyse import analyse_run

            for options in geometry_options(geometry):
                try:
                    analyse_run(out, options, reuse=True)
                except LayergeoError as exc:  # e.g. a narrow student without projections (strategy none)
                    print(f"no angles for {out.name}: {exc}", flush=True)
        if progress is not None:
            say(f"finished {kind} {out.name}", finished=True)
    finally:
        lock.release()


def _run_in_process(kind: str, config: RunConfig, out: Path, device: str, parallel: int, resume: bool) -> None:
    """``layergeo teacher|train`` in a child process on ``device`` (the lock stays with this process)."""
    config_file = out.parent / f".{out.name}.config.yaml"
    write_text(config_file, dump_yaml(config))
    env = {**os.environ, RunLock.HELD_BY_PARENT: str(out.resolve())}
    if device == "cpu":  # share the cores between the parallel runs
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
    else:
        env["CUDA_VISIBLE_DEVICES"] = str(device)
    done = subprocess.run(_train_command(kind, config_file, out, resume), env=env)
    config_file.unlink(missing_ok=True)
    if done.returncode != 0:
        raise LayergeoError(f"{kind} run {out} failed (exit {done.returncode}); fix it and re-run the sweep to resume")
