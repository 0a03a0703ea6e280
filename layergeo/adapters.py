"""LoRA adapters through peft: add one to a frozen model, and save a model with its adapter merged.

A model with an adapter is saved twice over in one folder: the adapter alone under ``adapter/``
(``PeftModel.save_pretrained``) and the merged model at the top (``merge_and_unload`` on a copy,
then ``save_pretrained``), so that a checkpoint loads with plain
``AutoModelForCausalLM.from_pretrained(folder)`` and every layergeo command reads it as any other.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

from torch import nn

from layergeo.config import LoraSettings
from layergeo.errors import LayergeoError

ADAPTER_FOLDER = "adapter"


def target_modules(settings: LoraSettings) -> str | list[str]:
    text = settings.target_modules.strip()
    return text if text == "all-linear" else [name.strip() for name in text.split(",") if name.strip()]


def add_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """``model`` with every parameter frozen and a fresh LoRA adapter (r, alpha, dropout, targets) that trains."""
    try:
        from peft import LoraConfig, TaskType, get_peft_model
    except ImportError:
        raise LayergeoError("LoRA needs peft; run: pip install peft") from None
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=target_modules(settings), task_type=TaskType.CAUSAL_LM)
    try:
        with warnings.catch_warnings():  # peft asks transformers a deprecated is_gradient_checkpointing
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(model, config)
    except ValueError as exc:
        raise LayergeoError(f"cannot add a LoRA adapter on {settings.target_modules!r} ({str(exc).splitlines()[0][:160]}); "
                            "name modules the model has, or use all-linear") from None


def has_adapter(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def save_model(model: nn.Module, path: Path) -> None:
    """``save_pretrained`` of ``model``; with an adapter: the adapter under ``adapter/`` and the merged model."""
    if not has_adapter(model):
        model.save_pretrained(path)
        return
    model.save_pretrained(Path(path) / ADAPTER_FOLDER)
    merged = copy.deepcopy(model).merge_and_unload()
    merged.save_pretrained(path)
