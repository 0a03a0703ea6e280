"""lm-evaluation-harness on a decoder-only run's merged student, as the authors scored theirs (HellaSwag, CoQA).

An optional extra for users with a network (``pip install 'layergeo[lm-eval]'``): the harness fetches each task's
dataset from the Hugging Face hub. A causal checkpoint holds the merged model and its tokenizer at its top, so the
harness's ``hf`` model loads it as any pretrained folder.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from layergeo.errors import LayergeoError
from layergeo.runs import RunDir, write_json


def checkpoint_folder(run: Path, checkpoint: str) -> Path:
    """The merged model folder ``run/checkpoints/<checkpoint>`` of a decoder-only run, or a clear error."""
    run_dir = RunDir(run)
    family = run_dir.config().teacher.family
    if family != "causal":
        raise LayergeoError(f"{run} is a {family!r} run; lm-eval scores decoder-only (teacher.family: causal) students")
    folder = run_dir.checkpoint(checkpoint)
    if not (folder / "config.json").is_file():
        raise LayergeoError(f"{folder} holds no saved model; finish the run first (layergeo train --resume) "
                            "or choose another --checkpoint")
    return folder


def evaluate_run(run: Path, checkpoint: str, tasks: list[str], limit: int | None, batch_size: int,
                 device: str, num_fewshot: int | None) -> Path:
    """Run the harness on the merged student; write ``run/lm_eval/<checkpoint>.json`` (its ``results`` per task,
    the settings and the harness version) and return that path."""
    folder = checkpoint_folder(run, checkpoint)
    try:
        import lm_eval
    except ImportError as exc:
        raise LayergeoError("lm-eval is not installed: pip install 'layergeo[lm-eval]' "
                            "(it downloads each task's dataset, so it needs a network)") from exc
    try:
        out = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(folder), "dtype": "float32"}, tasks=tasks,
                                      num_fewshot=num_fewshot, batch_size=batch_size, device=device, limit=limit)
    except Exception as exc:  # the harness's own failures (an unknown task, no network for a dataset): one line
        first = (str(exc).strip().splitlines() or [""])[0]
        raise LayergeoError(f"lm-eval failed on {folder}: {type(exc).__name__}: {first} "
                            "(`lm-eval --tasks list` lists the task names; the datasets need a network)") from exc
    record: dict[str, Any] = {
        "checkpoint": checkpoint, "model": str(folder), "tasks": tasks, "num_fewshot": num_fewshot, "limit": limit,
        "lm_eval_version": getattr(lm_eval, "__version__", None), "results": _finite(out["results"]),
    }
    path = run / "lm_eval" / f"{checkpoint}.json"
    path.parent.mkdir(exist_ok=True)
    write_json(path, record)
    return path


def _finite(value: Any) -> Any:
    """The harness's results with every non-finite float (an undefined stderr) as None, for strict JSON."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value
