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

from layergeo.config import RunConfig, dump_yaml, load_config
from layergeo.errors import LayergeoError

CONFIG, ENV, MAPPING, METRICS, RESULTS = "config.yaml", "env.json", "mapping.jsonl", "metrics.jsonl", "results.json"


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record, default=str) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_jsonl(path: Path, keep) -> None:
    """Keep only the records for which ``keep(record)`` is true (atomically)."""
    if path.is_file():
        write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in read_jsonl(path) if keep(r)))


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path`` in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


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
        return json.loads(self.results_file.read_text())

    def mappings(self) -> list[dict[str, Any]]:
        return read_jsonl(self.mapping_file)

    def kind(self) -> str:
        """``teacher`` or ``student``, as recorded in env.json."""
        if not self.env_file.is_file():
            raise LayergeoError(f"{self.path} is not a layergeo run directory (no {ENV})")
        return json.loads(self.env_file.read_text())["kind"]


def prepare_out_dir(path: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix a new run into an existing one unless asked to resume or overwrite."""
    if resume and overwrite:
        raise LayergeoError("choose either --resume or --overwrite, not both")
    if path.exists() and not path.is_dir():
        raise LayergeoError(f"--out {path} is a file; give a directory")
    if resume:
        if not (path / CONFIG).is_file():
            raise LayergeoError(f"nothing to resume in {path} (no {CONFIG}); drop --resume to start a new run")
        return
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise LayergeoError(f"{path} is not empty; pass --resume to continue that run or --overwrite to replace it")
        shutil.rmtree(path)


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
