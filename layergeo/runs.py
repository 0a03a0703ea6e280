"""The run-directory contract: the only interface between training and analysis.

```
<run>/
  config.yaml      resolved configuration (``layergeo train --config`` on it reproduces the run)
  env.json         versions, git commit, device, seed, command line, start and end time
  mapping.jsonl    every realised layer mapping: {"epoch", "step", "pairs"}
  metrics.jsonl    one JSON object per logged step or evaluation
  results.json     final metrics of the best checkpoint (written last: its presence marks a finished run)
  checkpoints/init/, checkpoints/best/   model + tokenizer (save_pretrained) [+ projections.safetensors]
  checkpoints/last/                      optimiser state for --resume (removed when the run finishes)
  geometry/, figures/                    written by the analysis commands
```
Files are written atomically (temporary name, then rename) so an interrupted run
never leaves a file that looks complete.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from layergeo.config import RunConfig, dump_yaml, load_config, to_dict
from layergeo.errors import LayergeoError

CONFIG, ENV, MAPPING, METRICS, RESULTS = "config.yaml", "env.json", "mapping.jsonl", "metrics.jsonl", "results.json"
ERROR, LOCK = "error.txt", ".lock"


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    """Strict JSON (a NaN or infinity is an error, never written as ``NaN``), atomically."""
    write_text(path, json.dumps(data, indent=2, default=str, allow_nan=False) + "\n")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record, default=str, allow_nan=False) + "\n")


def append_jsonl_rows(path: Path, records: list[dict[str, Any]]) -> None:
    """Append many records at once (one write of whole lines)."""
    with path.open("a") as handle:
        handle.write("".join(json.dumps(r, default=str, allow_nan=False) + "\n" for r in records))


def read_json(path: Path) -> Any:
    """A JSON file of a run, or one line saying that it is damaged."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LayergeoError(f"{path} is damaged ({exc.__class__.__name__}: {exc}); restore it or re-run what wrote it") from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a last line cut short by a kill is dropped, any other bad line is an error."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise LayergeoError(f"{path} is damaged at line {number}; restore it or re-run what wrote it") from None
    return records


def truncate_jsonl(path: Path, keep) -> None:
    """Keep only the records for which ``keep(record)`` is true (atomically)."""
    if path.is_file():
        write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in read_jsonl(path) if keep(r)))


def _previous(path: Path) -> Path:
    """Where :func:`atomic_dir` keeps the old version of ``path`` while the new one moves in."""
    return path.with_name(f".{path.name}.previous")


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path``.

    The old ``path`` is first renamed aside, then the new one renamed in, then the old one removed:
    a kill at any point leaves either the old or the new folder, or the old one aside, which
    :func:`recover_dir` puts back.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    previous = _previous(path)
    shutil.rmtree(previous, ignore_errors=True)
    if path.exists():
        os.replace(path, previous)
    os.replace(tmp, path)
    shutil.rmtree(previous, ignore_errors=True)


def recover_dir(path: Path) -> None:
    """Undo what a kill inside :func:`atomic_dir` left: restore the old folder, remove temporaries."""
    previous = _previous(path)
    if previous.exists():
        if path.exists():
            shutil.rmtree(previous)
        else:
            os.replace(previous, path)
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


class RunDir:
    """Paths and readers for one run directory (teacher or student)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    config_file = property(lambda self: self.path / CONFIG)
    env_file = property(lambda self: self.path / ENV)
    mapping_file = property(lambda self: self.path / MAPPING)
    metrics_file = property(lambda self: self.path / METRICS)
    results_file = property(lambda self: self.path / RESULTS)

    def checkpoint(self, name: str) -> Path:
        return self.path / "checkpoints" / name

    @property
    def finished(self) -> bool:
        return self.results_file.is_file()

    def config(self) -> RunConfig:
        if not self.config_file.is_file():
            raise LayergeoError(f"{self.path} is not a layergeo run directory (no {CONFIG}); give the --out of a train run")
        return load_config(self.config_file)

    def results(self) -> dict[str, Any]:
        if not self.finished:
            raise LayergeoError(f"run {self.path} has not finished (no {RESULTS}); finish it with layergeo train --resume")
        return read_json(self.results_file)

    def mappings(self) -> list[dict[str, Any]]:
        return read_jsonl(self.mapping_file)

    def kind(self) -> str:
        """``teacher`` or ``student``, as recorded in env.json."""
        if not self.env_file.is_file():
            raise LayergeoError(f"{self.path} is not a layergeo run directory (no {ENV})")
        return read_json(self.env_file)["kind"]

    def tidy(self) -> None:
        """Before resuming: put back checkpoints a kill left renamed aside, remove orphan temporaries."""
        for name in ("init", "best", "last"):
            recover_dir(self.checkpoint(name))
        for name in (CONFIG, ENV, MAPPING, METRICS, RESULTS, ERROR):
            for tmp in self.path.glob(f".{name}.*"):
                tmp.unlink(missing_ok=True)


def check_output_path(path: Path, flag: str = "--out") -> None:
    """Refuse, before any work, an output path that cannot become a writable folder."""
    if path.exists() and not path.is_dir():
        raise LayergeoError(f"{flag} {path} is a file; give a folder")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise LayergeoError(f"{flag} {path} cannot be created: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise LayergeoError(f"{flag} {path} cannot be written: {ancestor} is read-only; choose another folder")


class RunLock:
    """One writer per run directory: an exclusive ``flock`` on ``<run>/.lock``, holding the writer's pid.

    The kernel drops the lock when its holder dies, so a lock left by a killed process is never
    stale. ``acquire(wait=False)`` raises a one-line LayergeoError naming the holder;
    ``wait=True`` blocks until the holder is done. A process started by a sweep that already holds
    the lock for it (``LAYERGEO_LOCK_HELD`` = the run's path) does not lock again.
    """

    HELD_BY_PARENT = "LAYERGEO_LOCK_HELD"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.handle = None

    def holder(self) -> str:
        try:
            return (self.path / LOCK).read_text().strip() or "another process"
        except OSError:
            return "another process"

    def acquire(self, wait: bool = False) -> "RunLock":
        import fcntl

        if os.environ.get(self.HELD_BY_PARENT) == str(self.path.resolve()):
            return self
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.path / LOCK, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.close()
            raise LayergeoError(f"{self.path} is being written by {self.holder()}; wait for it to finish or stop it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {platform.node()} since {now()}\n")
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing drops the flock
            self.handle = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def has_content(path: Path) -> bool:
    """Whether ``path`` holds anything besides a lock file."""
    return path.is_dir() and any(p.name != LOCK for p in path.iterdir())


def check_out_dir(path: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix a new run into an existing one unless asked to resume or overwrite (changes nothing)."""
    if resume and overwrite:
        raise LayergeoError("choose either --resume or --overwrite, not both")
    check_output_path(path)
    if resume:
        if not (path / CONFIG).is_file():
            raise LayergeoError(f"nothing to resume in {path} (no {CONFIG}); drop --resume to start a new run")
    elif has_content(path) and not overwrite:
        raise LayergeoError(f"{path} is not empty; pass --resume to continue that run or --overwrite to replace it")


def clear_dir(path: Path) -> None:
    """Remove everything in ``path`` but its lock (``--overwrite``, after the new run was validated)."""
    for item in path.iterdir():
        if item.name != LOCK:
            shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()


def config_differences(saved: RunConfig, new: RunConfig) -> list[str]:
    """Dotted keys whose values differ, as ``key: saved -> new``."""

    def flat(tree: dict, prefix: str = "") -> dict[str, Any]:
        items: dict[str, Any] = {}
        for key, value in tree.items():
            items.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
        return items

    old, fresh = flat(to_dict(saved)), flat(to_dict(new))
    return [f"{k}: {old.get(k)!r} -> {fresh.get(k)!r}" for k in sorted(set(old) | set(fresh)) if old.get(k) != fresh.get(k)]


def write_config(run: RunDir, config: RunConfig) -> None:
    write_text(run.config_file, dump_yaml(config))


def environment(kind: str, device: str, seed: int) -> dict[str, Any]:
    """Versions and provenance recorded in env.json."""
    import numpy
    import torch
    import transformers

    import layergeo

    return {
        "kind": kind,
        "seed": seed,
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            "layergeo": layergeo.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numpy": numpy.__version__,
        },
        "git_commit": _git_commit(),
        "command": " ".join(sys.argv),
        "start": now(),
    }


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None
