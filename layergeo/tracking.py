"""Accelerate's experiment trackers (TensorBoard, W&B, trackio, ...): a run's scalars where users watch runs.

Off by default (``train.log_with: null``). With ``train.log_with: [tensorboard]`` (or ``teacher.train.log_with``
for a teacher) the loop also hands every logged scalar to ``Accelerator.log``: the training loss and its terms
and the learning rate as ``train/<name>``, every evaluation as ``dev/<metric>`` (``test/<metric>`` with
``train.eval_test``), and each geometry-trace probe as ``trace/<stack>/<summary>``. metrics.jsonl and the
trace tables are written exactly as without trackers and stay the record; a tracker is a view of them.
Local trackers write under ``<run>/trackers/`` (TensorBoard: ``tensorboard --logdir <run>/trackers``). A
resumed run logs again from the step it restarts at, so a tracker can show the lost steps twice.
"""

from __future__ import annotations

from contextlib import contextmanager

import pandas as pd
from accelerate import Accelerator
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
from accelerate.utils import ProjectConfiguration

from layergeo.config import RunConfig, to_dict
from layergeo.errors import LayergeoError
from layergeo.runs import RunDir

TRACKERS = tuple(sorted(LOGGER_TYPE_TO_CLASS))
LOGGING_DIR = "trackers"


def check_trackers(names: list[str] | None, key: str) -> None:
    """Refuse a tracker accelerate does not know, or one whose package is not installed here."""
    available = {str(t) for t in get_available_trackers()}
    for name in names or ():
        if name not in LOGGER_TYPE_TO_CLASS:
            raise LayergeoError(f"config key {key!r} got {name!r}, which is not a tracker; choose from {', '.join(TRACKERS)}")
        if name not in available:
            raise LayergeoError(f"config key {key!r} names {name!r}, whose package is not installed here; "
                                f"install it (pip install {name}) or leave it out")


def tracker_settings(names: list[str] | None, run: RunDir) -> dict:
    """Keyword arguments of the run's Accelerator for trackers ``names`` (none: no trackers)."""
    if not names:
        return {}
    return {"log_with": list(names),
            "project_config": ProjectConfiguration(project_dir=str(run.path), logging_dir=str(run.path / LOGGING_DIR))}


@contextmanager
def tracked(accelerator: Accelerator, config: RunConfig, run: RunDir):
    """Open the trackers of ``accelerator`` (if any) for this run, with its settings as hyper-parameters, and
    close them (flushing what they hold) however the block ends. Not ``Accelerator.end_training``: that also
    ends the process group, which the run still needs after training."""
    if accelerator.log_with:
        accelerator.init_trackers(run.path.name, config=flat_settings(to_dict(config)))
    try:
        yield
    finally:
        for tracker in accelerator.trackers:
            tracker.finish()


def flat_settings(settings: dict) -> dict[str, int | float | str | bool]:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": 1e-4}``; lists and nulls as text (what TensorBoard accepts)."""
    flat = pd.json_normalize(settings, sep=".").to_dict("records")[0]
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in flat.items()}
