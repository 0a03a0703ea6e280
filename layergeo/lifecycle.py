"""The life of one run directory: check everything, claim it, start or resume, fail or finish.

``layergeo teacher``, ``layergeo train`` and every run of a sweep go through :func:`execute_run`,
so they obey the same rules:

1. The whole configuration (values, teacher, data, output path, and on ``--resume`` that the
   configuration is the saved one) is checked before anything is written or removed.
2. One writer per run directory: a :class:`~layergeo.runs.RunLock` held for the whole run.
3. ``config.yaml`` is written before the first phase, so ``--resume`` continues a run killed in
   either phase (the teacher a run trains for itself, or the student) from its last checkpoint;
   ``--resume`` on a finished run changes nothing and says so.
4. A run that fails after it started stays on disk, unfinished (no ``results.json``), with its
   error in ``error.txt``; the message says how to resume it or start it afresh.
"""

from __future__ import annotations

import traceback
from pathlib import Path

from layergeo.config import RunConfig
from layergeo.errors import LayergeoError
from layergeo.runs import ERROR, RunDir, RunLock, check_out_dir, clear_dir, config_differences, write_config, write_text

KINDS = ("teacher", "train")


class AlreadyFinished(Exception):
    """``--resume`` of a run that has its results: nothing to do."""


def resolved(config: RunConfig, out: Path, kind: str) -> RunConfig:
    """The configuration as the run saves it: a student's own teacher is ``<out>/teacher``, absolute."""
    from layergeo.teacher import owns_teacher

    if kind == "train" and owns_teacher(config, out):
        config.teacher.dir = str((out / "teacher").resolve())
    return config


def check_run(kind: str, config: RunConfig, out: Path, resume: bool, overwrite: bool) -> None:
    """Every check that needs no write: out directory, resume rules, then the configuration itself.

    Raises LayergeoError, or AlreadyFinished for ``--resume`` of a finished run.
    """
    from layergeo.distil import validate_student_config
    from layergeo.teacher import validate_teacher_config
    from layergeo.tracking import check_trackers

    check_out_dir(out, resume, overwrite)
    run = RunDir(out)
    if resume:
        if run.finished:
            raise AlreadyFinished(str(out))
        differences = config_differences(run.config(), config)
        if differences:
            shown = "; ".join(differences[:4]) + ("; ..." if len(differences) > 4 else "")
            raise LayergeoError(f"--resume with a configuration that differs from {run.config_file} ({shown}); resume "
                                f"without --config/--preset/--set, or start a new run in another --out")
    check_trackers(config.teacher.train.log_with, "teacher.train.log_with")
    if kind == "train":
        check_trackers(config.train.log_with, "train.log_with")
    if kind == "teacher":
        validate_teacher_config(config)
    else:
        validate_student_config(config, out)


def execute_run(kind: str, config: RunConfig, out: Path, resume: bool = False, overwrite: bool = False,
                wait: bool = False) -> dict:
    """Check, claim, run and finish one teacher (``kind`` teacher) or student (``train``) run.

    On several processes call it on every process: only the main one checks the directory, holds
    the lock and writes. ``wait``: wait for another writer of ``out`` instead of refusing.
    Returns the run's results.
    """
    from layergeo.distil import distil_student
    from layergeo.processes import distributed_state, on_main
    from layergeo.teacher import fine_tune_teacher

    out = Path(out)
    config = resolved(config, out, kind)
    state, _ = distributed_state(config.device)
    check_run(kind, config, out, resume, overwrite)
    lock = RunLock(out)
    run = RunDir(out)

    def claim() -> None:
        lock.acquire(wait=wait)
        if resume and run.finished:  # finished by the writer we waited for
            lock.release()
            raise AlreadyFinished(str(out))

    def start() -> None:
        if overwrite:
            clear_dir(out)
        (out / ERROR).unlink(missing_ok=True)
        write_config(run, config)  # before any phase: a kill in the teacher phase can be resumed

    on_main(state, claim)
    try:
        on_main(state, start)
        phase = fine_tune_teacher if kind == "teacher" else distil_student
        return phase(config, out, resume=resume)
    except (AlreadyFinished, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - every failure after the start leaves a resumable run and one line
        reason = str(exc) if isinstance(exc, LayergeoError) else f"{type(exc).__name__}: {exc}"
        if state.is_main_process and out.is_dir():
            write_text(out / ERROR, f"{reason}\n\n{traceback.format_exc()}")
        raise LayergeoError(
            f"{reason} -- the unfinished run stays in {out} (error in {ERROR}); after fixing the cause continue it "
            f"with: layergeo {kind} --out {out} --resume (or replace it with --overwrite)"
        ) from None
    finally:
        lock.release()
