"""The model-family interface: everything the family-agnostic rest of layergeo asks of a model.

The loop, the losses, the teacher cache, geometry, reports and the CLI never import a model class
or name a metric; they ask the run's family (``teacher.family`` in the config). A family answers:

* tasks and batches: which tasks it trains on, how a split is tokenised, how batches are padded;
* models: load a teacher (embedded default, local folder or hub name), read a checkpoint, the
  **stacks** of layers whose states can be matched (``encoder``; ``encoder`` and ``decoder``; ...)
  with their depths, the width, and a student of a given depth per stack (``copy`` or ``random``);
* one forward pass: the model inputs of a batch, the hidden states per stack (index 0 = the
  stack's embedding output, index k = the output of its layer k, as ``output_hidden_states``) and
  per stack the (B, L) mask of the positions that count;
* the prediction loss (task CE and the temperature-scaled KL to the teacher) and the task metrics,
  with the one dev metric (higher is better) that selects the best checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PretrainedConfig, PreTrainedModel

from layergeo.config import RunConfig, StudentConfig
from layergeo.errors import LayergeoError


class Family:
    """One kind of model. Subclasses set the class attributes and implement the methods."""

    name: str = ""
    stacks: tuple[str, ...] = ()
    metric: str = ""  # the dev metric that selects the best checkpoint (higher is better)
    caches_teacher: bool = False  # whether train.teacher_cache can store this family's teacher outputs
    length_keys: tuple[str, ...] = ("max_length",)  # the data.* lengths that must fit the model's positions
    adapters: bool = False  # whether teacher.lora / student.lora (LoRA through peft) apply
    reads_plain_texts: bool = False  # whether ``layergeo angles --texts`` (sentences without targets) applies

    # ---- tasks and batches
    def load_task(self, config: RunConfig):
        """The configured task with its deterministic caps (``data.max_train``, ``data.max_eval``)."""
        raise NotImplementedError

    def task_check(self, task, model_config: PretrainedConfig, where: Path) -> None:
        """Refuse a finished teacher that cannot serve ``task`` (e.g. another number of labels)."""

    def encode(self, config: RunConfig, task, split: str, tokenizer, model_config: PretrainedConfig):
        """The tokenised split (a torch Dataset whose items carry "index", their position in the split)."""
        raise NotImplementedError

    def collator(self, tokenizer, model: PreTrainedModel) -> Callable:
        """Pads a list of encoded items into a batch of tensors."""
        raise NotImplementedError

    # ---- models
    def model_config(self, spec: str) -> PretrainedConfig:
        """The config of teacher model ``spec``, read without weights."""
        raise NotImplementedError

    def load_pretrained(self, spec: str, task) -> tuple[PreTrainedModel, object]:
        """A pretrained model set up for ``task`` (a fresh head where needed) and its tokenizer."""
        raise NotImplementedError

    def prepare_teacher(self, model: PreTrainedModel, config: RunConfig) -> PreTrainedModel:
        """The pretrained teacher as it is fine-tuned (e.g. with a LoRA adapter); by default itself."""
        return model

    def load_checkpoint(self, path: Path) -> tuple[PreTrainedModel, object]:
        """A model saved by ``save_pretrained`` and its tokenizer."""
        raise NotImplementedError

    def depths(self, model_config: PretrainedConfig) -> dict[str, int]:
        """Layers per stack, in the order of :attr:`stacks`."""
        raise NotImplementedError

    def width(self, model_config: PretrainedConfig) -> int:
        raise NotImplementedError

    def max_positions(self, model_config: PretrainedConfig) -> int | None:
        """The longest input the model takes (None: no fixed limit)."""
        return None

    def check_student(self, teacher_config: PretrainedConfig, spec: StudentConfig) -> None:
        """Refuse a student this family cannot build from ``teacher_config``, before anything is written."""

    def student_depths(self, spec: StudentConfig) -> dict[str, int]:
        """The student's layers per stack."""
        return {stack: spec.layers for stack in self.stacks}

    def build_student(self, teacher: PreTrainedModel, spec: StudentConfig, copy: dict[str, list[int]]) -> PreTrainedModel:
        """A student model of ``spec``'s depths: random, or teacher weights with layers ``copy[stack]`` (1-based)."""
        raise NotImplementedError

    def embedding_parameters(self, model: PreTrainedModel) -> list[torch.nn.Parameter]:
        """The token, position and segment embeddings that ``student.freeze_embeddings`` keeps fixed.

        Every ``nn.Embedding`` whose name says embedding (``embeddings.word_embeddings``, ``embed_tokens``,
        ``embed_positions``, T5's ``shared``); not T5's relative attention bias. An output layer tied
        to the token embeddings stays fixed with them.
        """
        found = {}
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Embedding) and ("embed" in name or name.endswith("shared")):
                found.update({id(p): p for p in module.parameters()})
        return list(found.values())

    # ---- one forward pass
    def inputs(self, batch: dict) -> dict:
        """The model's keyword inputs from a batch."""
        raise NotImplementedError

    def hidden_states(self, output) -> dict[str, tuple[torch.Tensor, ...]]:
        """Stack -> its L+1 states, each (B, L_positions, d)."""
        raise NotImplementedError

    def masks(self, batch: dict) -> dict[str, torch.Tensor]:
        """Stack -> (B, L_positions) bool mask of the positions whose states count."""
        raise NotImplementedError

    def prediction_mask(self, batch: dict) -> torch.Tensor | None:
        """(B, T) mask of the positions the CE and KL average over; None when they average over examples."""
        return None

    def task_loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """Cross-entropy of the logits against the batch's labels (a mean)."""
        raise NotImplementedError

    def kl_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, batch: dict, temperature: float) -> torch.Tensor:
        """T^2 KL(p_T || p_S) at temperature T (a mean over what :meth:`task_loss` averages over)."""
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module, loader, device: torch.device, config: RunConfig, tokenizer,
                 accelerator=None) -> dict:
        """Task metrics of ``model`` on ``loader`` (all processes' shares gathered); includes :attr:`metric`."""
        raise NotImplementedError

    def describe_metrics(self, metrics: dict) -> str:
        """A short line of the main metrics, for the command line."""
        return f"{self.metric} {100 * metrics[self.metric]:.1f}%"


_FAMILIES: dict[str, Family] = {}


def register_family(name: str):
    """Class decorator: ``@register_family("seq2seq")`` registers one instance of the family."""

    def wrap(cls: type[Family]) -> type[Family]:
        if name in _FAMILIES:
            raise LayergeoError(f"model family {name!r} is registered twice")
        cls.name = name
        _FAMILIES[name] = cls()
        return cls

    return wrap


def family_names() -> list[str]:
    return list(_FAMILIES)


def get_family(name: str) -> Family:
    if name not in _FAMILIES:
        raise LayergeoError(f"unknown model family {name!r} (teacher.family); choose one of {', '.join(_FAMILIES)}")
    return _FAMILIES[name]


def unwrap(model: torch.nn.Module) -> PreTrainedModel:
    """The Hugging Face model inside ``model`` (DDP-wrapped, compiled, a :class:`layergeo.models.Student`)."""
    from accelerate.utils import extract_model_from_parallel

    from layergeo.models import Student

    model = extract_model_from_parallel(model, keep_torch_compile=False)
    return model.model if isinstance(model, Student) else model
