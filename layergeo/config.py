"""Typed run configuration: dataclasses, YAML in and out, presets and ``--set`` overrides.

One :class:`RunConfig` describes a whole run (teacher fine-tuning uses the
``data``, ``teacher`` and ``seed`` sections). Unknown keys and values of the
wrong type are errors, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from layergeo.errors import LayergeoError
from layergeo.strategies import MappingOptions


@dataclass
class DataConfig:
    task: str = "rotten_tomatoes"  # rotten_tomatoes, bbc_news, a local .csv/.jsonl, glue/<task> (online)
    max_length: int = 64  # tokens; 64 covers 99.9% of Rotten Tomatoes snippets
    max_train: int | None = None  # cap on training examples (deterministic subset)
    max_eval: int | None = None  # cap on dev and test examples


@dataclass
class OptimConfig:
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimiser steps (overrides epochs)
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1  # linear warm-up then linear decay
    grad_clip: float = 1.0
    eval_every: int | None = None  # evaluate on dev every N steps; null = once per epoch
    log_every: int = 10
    early_stop: int | None = None  # stop after N evaluations without a better dev metric
    # Student runs only: run the teacher once over the train split and read its logits and matched hidden
    # states from a memory-mapped cache under <teacher run>/cache/, shared by every run of a sweep with that
    # teacher (see layergeo/cache.py). Off = the live teacher on every batch. Float32 gives the live losses.
    teacher_cache: bool = False
    cache_dtype: str = "float16"  # float16 (half the disk, ~1e-3 relative on the hidden term) | float32
    # At each log step, also log the gradient norm of each weighted loss term (ce, kl, hidden): one extra
    # backward pass per term, on log steps only. Shows which term drives the student.
    term_grad_norms: bool = False
    # Student runs with student.init=random only: their own learning rate and epochs (null = lr, epochs).
    random_init_lr: float | None = None
    random_init_epochs: int | None = None
    # torch.compile the trained model (the student, or the teacher being fine-tuned) for the training steps;
    # dev evaluation runs it uncompiled. Off by default: compilation takes a while and changes rounding.
    compile: bool = False


@dataclass
class TeacherConfig:
    dir: str | None = None  # a teacher run directory; null = fine-tune one into <out>/teacher (reused when complete)
    model: str = "minilm"  # minilm (embedded all-MiniLM-L6-v2), tiny-bert (random), a hub name or a local path
    train: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=1, lr=5e-5))


@dataclass
class StudentConfig:
    layers: int = 3
    init: str = "copy"  # copy: teacher embeddings + copy_layers; random: from the config
    copy_layers: list[int] | None = None  # teacher layers (1-based) to copy; null = the forward targets
    hidden_size: int | None = None  # narrower student; null = the teacher's width
    intermediate_size: int | None = None  # null = teacher's FFN ratio x hidden_size
    num_heads: int | None = None  # null = the teacher's head count, reduced until it divides hidden_size


@dataclass
class LossConfig:
    alpha_ce: float = 1.0
    alpha_kl: float = 1.0
    alpha_hidden: float = 3.0
    temperature: float = 1.0  # KL on softened distributions, scaled by T^2
    normalize: str = "none"  # none | layernorm (whole tensor, as the authors' T5 code) | l2 (per token)


@dataclass
class RunConfig:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    matching: MappingOptions = field(default_factory=MappingOptions)
    loss: LossConfig = field(default_factory=LossConfig)
    train: OptimConfig = field(default_factory=OptimConfig)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 without base-60 integers, so a layer pair like ``1:9`` stays a string."""


_Loader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if not (tag.endswith(":int") and ":" in regexp.pattern)]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)


def parse_yaml(text: str) -> Any:
    """YAML as configs and grids read it (``1:9`` stays a string); raises yaml.YAMLError."""
    return yaml.load(text, Loader=_Loader)


def split_key_value(item: str, flag: str, example: str) -> tuple[str, str]:
    """``"student.layers=3"`` -> ``("student.layers", "3")``, or one line saying what ``flag`` expects."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise LayergeoError(f"{flag} {item!r} must look like {example}")
    return key.strip(), value


def command_line_value(text: str, item: str, flag: str) -> Any:
    """A value typed on the command line, read as YAML (3 -> int, [1, 2] -> list, null -> None)."""
    try:
        return parse_yaml(text)
    except yaml.YAMLError as exc:
        raise LayergeoError(f"{flag} {item!r} has a value that is not valid YAML ({str(exc).splitlines()[0]})") from None


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("layergeo.presets").iterdir() if p.name.endswith(".yaml"))


def load_config(path: str | Path | None = None, preset: str | None = None, overrides: list[str] = ()) -> RunConfig:
    """Defaults, then a preset, then a YAML file, then ``key=value`` overrides (later wins)."""
    raw: dict[str, Any] = {}
    if preset is not None:
        if preset not in preset_names():
            raise LayergeoError(f"unknown preset {preset!r}; choose one of {', '.join(preset_names())}")
        raw = _deep_merge(raw, parse_yaml(resources.files("layergeo.presets").joinpath(f"{preset}.yaml").read_text()))
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise LayergeoError(f"config file {path} does not exist; give a YAML file such as runs/X/config.yaml")
        try:
            loaded = parse_yaml(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise LayergeoError(f"config file {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise LayergeoError(f"config file {path} must hold a mapping of sections (data, student, ...)")
        raw = _deep_merge(raw, loaded)
    for item in overrides:
        key, value = split_key_value(item, "override", "key=value, e.g. student.layers=3")
        raw = _deep_merge(raw, _nested(key.split("."), command_line_value(value, item, "override")))
    return from_dict(RunConfig, raw)


def from_dict(cls: type, raw: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, checking keys and value types."""
    if not isinstance(raw, dict):
        raise LayergeoError(f"config section {where or 'top level'!r} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        key = f"{where}{unknown[0]}"
        raise LayergeoError(f"unknown config key {key!r}; valid keys here: {', '.join(sorted(names))}")
    base = cls()
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise LayergeoError(f"config section {where}{name!r} must be a mapping, got {value!r}")
            value = from_dict(hint, _deep_merge(to_dict(getattr(base, name)), value), f"{where}{name}.")
        else:
            value = _coerce(hint, value, f"{where}{name}")
        setattr(base, name, value)
    return base


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key)
            except LayergeoError:
                continue
        raise LayergeoError(f"config key {key!r} got {value!r}, which is not a {_type_name(hint)}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):  # "2,4,6" from --set: read each item as YAML, like a scalar value
            value = [_scalar(v) for v in value.replace(" ", "").split(",") if v]
        if not isinstance(value, list):
            raise LayergeoError(f"config key {key!r} needs a list, e.g. [2, 4, 6], got {value!r}")
        return [_coerce(item, v, key) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise LayergeoError(f"config key {key!r} got {value!r}, which is not a {_type_name(hint)}")


def _scalar(text: str) -> Any:
    """One item of a comma-separated list, read as YAML (``"4"`` -> 4); left a string when it is not YAML."""
    try:
        return parse_yaml(text)
    except yaml.YAMLError:
        return text


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _nested(keys: list[str], value: Any) -> dict[str, Any]:
    return {keys[0]: value} if len(keys) == 1 else {keys[0]: _nested(keys[1:], value)}


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
