"""What a training step does differently on CUDA, in one place.

On CUDA: bf16 ``torch.autocast`` around the whole step (student, live teacher, loss), pinned host
memory for the data loader, and the fused AdamW kernel. Elsewhere: float32, pageable memory, the
default AdamW. The teacher cache records the same precision (``precision``), so cached outputs
are the ones a live teacher would give on that device.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepSettings:
    autocast_dtype: torch.dtype | None  # None: no autocast (float32)
    pin_memory: bool
    fused_adamw: bool

    def autocast(self, device: torch.device) -> AbstractContextManager:
        """The context a step (or a live/cached teacher forward) runs in on ``device``."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    @property
    def optimizer_kwargs(self) -> dict:
        return {"fused": True} if self.fused_adamw else {}


def step_settings(device: torch.device) -> StepSettings:
    """bf16 autocast, pinned memory and fused AdamW on CUDA; plain float32 elsewhere."""
    if device.type == "cuda":
        return StepSettings(autocast_dtype=torch.bfloat16, pin_memory=True, fused_adamw=True)
    return StepSettings(autocast_dtype=None, pin_memory=False, fused_adamw=False)


def precision(device: torch.device) -> str:
    """How the teacher computes in a step on ``device``: "bf16-autocast" or "fp32" (a cache key)."""
    return "fp32" if step_settings(device).autocast_dtype is None else "bf16-autocast"
