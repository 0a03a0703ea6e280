"""Processes and devices: one process or several (``accelerate launch``, ``torchrun``), the same code.

Every run goes through one Hugging Face ``accelerate.Accelerator``: a plain ``layergeo train`` is
the case N = 1, and ``accelerate launch --num_processes N -m layergeo.cli train ...`` (or
``torchrun --nproc_per_node N -m layergeo.cli train ...``) runs the very same code on N processes,
with DDP (or FSDP from an accelerate config). What N changes and what it does not is described in
:mod:`layergeo.loop`; this module only finds the process's place and device, builds the
Accelerator, and runs work on the main process with its failures reaching every process.
"""

from __future__ import annotations

import os
from typing import Callable, TypeVar

import torch
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list

from layergeo.config import OptimConfig
from layergeo.errors import LayergeoError

EVAL_BATCH_SIZE = 64
T = TypeVar("T")


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise LayergeoError(f"device {spec!r} asked for but no CUDA GPU is visible; use --set device=cpu")
    try:
        return torch.device(spec)
    except RuntimeError:
        raise LayergeoError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from None


def launched() -> bool:
    """Whether this process is one of several started by ``accelerate launch``, ``torchrun`` or MPI."""
    names = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    return any(int(os.environ.get(name, "1") or 1) > 1 for name in names)


def distributed_state(spec: str) -> tuple[PartialState, torch.device]:
    """This process's place in the run (1 process unless launched) and the device it computes on.

    One process: the configured ``device`` (``cuda:N`` included). Launched: the process's own
    device (``cuda:<local rank>``, or the CPU for ``device=cpu`` or ``accelerate launch --cpu``).
    """
    device = resolve_device(spec)
    cpu = device.type == "cpu" or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if not launched():
        shared = PartialState._shared_state
        if shared.get("device") is not None and (shared["device"].type == "cpu") != cpu:
            # an earlier run in this interpreter used the other kind of device: start afresh
            AcceleratorState._reset_state(reset_partial_state=True)
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
    state = PartialState(cpu=cpu)
    if state.num_processes > 1 or state.device.type != device.type:
        device = torch.device("cpu") if state.device.type == "cpu" else state.device  # accelerate says cpu:<rank>
    return state, device


def make_accelerator(device: torch.device, find_unused_parameters: bool = False, **trackers) -> Accelerator:
    """The run's Accelerator: split batches (global batch = ``batch_size``), no accelerate autocast.

    ``trackers``: ``log_with`` and ``project_config`` (``layergeo.tracking.tracker_settings``), or nothing."""
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else []
    return Accelerator(
        cpu=device.type == "cpu", mixed_precision="no", kwargs_handlers=handlers,
        dataloader_config=DataLoaderConfiguration(split_batches=True), **trackers,
    )


def on_main(state, fn: Callable[[], T]) -> T:
    """Run ``fn`` on the main process only; every process returns its result (broadcast).

    An exception on the main process is raised there and, as a LayergeoError with the same
    message, on every other process, so none waits forever for a main process that failed.
    ``state``: a PartialState or an Accelerator.
    """
    outcome: list = [None, None]
    error = None
    if state.is_main_process:
        try:
            outcome[0] = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the others are told
            error = exc
            outcome[1] = str(exc) if isinstance(exc, LayergeoError) else f"the main process failed: {exc!r}"
    if state.num_processes > 1:
        broadcast_object_list(outcome)
    if error is not None:
        raise error
    if outcome[1] is not None:
        raise LayergeoError(outcome[1])
    return outcome[0]


def check_batch_size(optim: OptimConfig, processes: int, key: str) -> None:
    if optim.batch_size % processes:
        raise LayergeoError(
            f"{key}.batch_size={optim.batch_size} cannot be split over {processes} processes; "
            f"choose a multiple of {processes} (it stays the global batch size)"
        )


def eval_batch_size(processes: int) -> int:
    """64, or the largest multiple of the process count below it (split batches divide evenly)."""
    return EVAL_BATCH_SIZE if EVAL_BATCH_SIZE % processes == 0 else max(1, EVAL_BATCH_SIZE // processes) * processes
