"""Typed run configuration: dataclasses, YAML in and out, presets and ``--set`` overrides.

One :class:`RunConfig` describes a whole run (teacher fine-tuning uses the
``data``, ``teacher`` and ``seed`` sections). Unknown keys and values of the
wrong type are errors, never silently ignored, and so are values out of range
(:func:`validate`, run by :func:`load_config`): a batch size of 0, a NaN learning
rate or an empty config file stop the command before anything is written.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from layergeo.errors import LayergeoError
from layergeo.strategies import SHUFFLE_MODES, MappingOptions, parse_stack_pairs, strategy_names


@dataclass
class DataConfig:
    task: str = "rotten_tomatoes"  # rotten_tomatoes, bbc_news, a local .csv/.jsonl, glue/<task> (online); seq2seq: kjv_bbe, bbc_headlines; causal: rt_sentiment, bbc_topic
    max_length: int = 64  # tokens; 64 covers 99.9% of Rotten Tomatoes snippets (seq2seq: of the source)
    max_target_length: int = 64  # seq2seq only: target tokens (the reference is truncated to this)
    max_train: int | None = None  # cap on training examples (deterministic subset)
    max_eval: int | None = None  # cap on dev and test examples
    # seeds the max_train / max_eval samples; null = the run's seed. Give it a value to keep one training subset for
    # every seed of a grid (the seed then only draws the model: init, data order, dropout, shuffles, RAIL draws)
    seed: int | None = None


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
    eval_steps: list[int] | None = None  # also evaluate on dev at these steps (budgets: one run, several budgets)
    eval_test: bool = False  # at every dev evaluation also evaluate test (logged, never used to select a checkpoint)
    log_every: int = 10
    # accelerate trackers that also receive the logged scalars, e.g. [tensorboard] (writes <run>/trackers/;
    # wandb, trackio, mlflow, ... when installed): see layergeo/tracking.py. Null = none; metrics.jsonl either way.
    log_with: list[str] | None = None
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
class LoraSettings:
    """A LoRA adapter through peft (causal family): the base model frozen, only the adapter trained."""

    r: int | None = None  # rank; null = no adapter, every parameter trains
    alpha: float = 32.0
    dropout: float = 0.1
    target_modules: str = "all-linear"  # peft's "all-linear" (every linear layer but the LM head) or "q_proj,v_proj,..."


@dataclass
class TeacherConfig:
    dir: str | None = None  # a teacher run directory; null = fine-tune one into <out>/teacher (reused when complete)
    model: str = "minilm"  # minilm (embedded all-MiniLM-L6-v2), tiny-bert (random), a hub name or a local path
    family: str = "encoder"  # encoder (classifier) | seq2seq (encoder-decoder) | causal (decoder-only LM)
    train: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=1, lr=5e-5))
    lora: LoraSettings = field(default_factory=LoraSettings)  # causal only: fine-tune the teacher with LoRA, then merge


@dataclass
class StudentConfig:
    layers: int = 3  # per stack (an encoder-decoder student has this many encoder and decoder layers)
    decoder_layers: int | None = None  # seq2seq only: decoder depth when it differs from layers
    init: str = "copy"  # copy: teacher embeddings + copy_layers; random: from the config
    copy_layers: list[int] | None = None  # teacher layers (1-based) to copy, in every stack; null = copy_rule
    copy_rule: str = "forward"  # forward: the forward targets (BERT, BART) | first_last: keep first and last (T5, Qwen3)
    freeze_embeddings: bool = False  # keep the student's token and position embeddings fixed (the authors' seq2seq scripts)
    hidden_size: int | None = None  # narrower student; null = the teacher's width
    intermediate_size: int | None = None  # null = teacher's FFN ratio x hidden_size
    num_heads: int | None = None  # null = the teacher's head count, reduced until it divides hidden_size
    lora: LoraSettings = field(default_factory=LoraSettings)  # causal only: train a LoRA adapter on the frozen student


@dataclass
class LossConfig:
    alpha_ce: float = 1.0
    alpha_kl: float = 1.0
    alpha_hidden: float = 3.0
    temperature: float = 1.0  # KL on softened distributions, scaled by T^2
    normalize: str = "none"  # none | layernorm (whole tensor, as the authors' T5 code) | l2 (per token)
    hidden_reduction: str = "mean"  # over a token's hidden units: mean (MSE) | sum (squared distance, the authors' code)
    # causal only: the positions the KL and hidden terms count. completion: those that predict a completion
    # token (the CE's); all: every non-padding position, the prompt's too (the authors' LLM code)
    positions: str = "completion"


@dataclass
class GenerationConfig:
    """How generating families (seq2seq) decode on dev and test."""

    num_beams: int = 1  # 1 = greedy
    max_new_tokens: int | None = None  # null = data.max_target_length


@dataclass
class TraceConfig:
    """Geometry along training (student runs, ``layergeo.trace``): a fixed probe set of dev examples."""

    examples: int = 16  # dev examples in the probe set (~430 Rotten Tomatoes tokens); 0 = no trace
    probes: int = 10  # probes spread evenly over the run, besides step 0 (when every is null)
    every: int | None = None  # probe every N steps instead
    # also the parameter-gradient alignments of the pulls toward teacher layers (layergeo.alignment) on 2 x examples
    # more dev examples; memory (teacher layers + 1) x trainable parameters floats per probe. Opt-in: see BENCHMARKS.md
    gradients: bool = False
    # the student layers whose pull alignments are measured (null: every layer >= 1); each costs a backward pass
    # with (teacher layers + 1) cotangents per probe, most of a probe's time under a deep teacher
    gradient_layers: list[int] | None = None


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
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    trace: TraceConfig = field(default_factory=TraceConfig)


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


OPTIONAL_SECTIONS = ("generation", "trace")  # added after runs were saved without it: missing = the defaults
SECTIONS = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name not in OPTIONAL_SECTIONS)  # a saved config.yaml has them
CACHE_DTYPES = ("float16", "float32")  # how the teacher cache stores states (layergeo.cache)
NORMALIZATIONS = ("none", "layernorm", "l2")  # of the hidden states before matching (layergeo.losses)
STUDENT_INITS = ("copy", "random")
COPY_RULES = ("forward", "first_last")
POSITIONS = ("completion", "all")
HIDDEN_REDUCTIONS = ("mean", "sum")
MAX_SEED = 2**32 - 1  # numpy's legacy seeding (transformers.set_seed) takes no more


def data_seed(config: RunConfig) -> int:
    """The seed of the training subset and the dev/test caps: ``data.seed``, or the run's seed when it is null."""
    return config.seed if config.data.seed is None else config.data.seed


def load_config(path: str | Path | None = None, preset: str | None = None, overrides: list[str] = (),
                complete: bool | None = None) -> RunConfig:
    """Defaults, then a preset, then a YAML file, then ``key=value`` overrides (later wins); then :func:`validate`.

    ``complete``: the file must have every top-level section of a saved run config (:data:`SECTIONS`), so
    a truncated ``config.yaml`` is refused instead of silently filled with defaults. By default it must
    when no preset is given (the file is the whole run, as ``train --config runs/X/config.yaml``); a
    file layered on a preset may be partial. An empty file is always an error.
    """
    raw: dict[str, Any] = {}
    if preset is not None:
        if preset not in preset_names():
            raise LayergeoError(f"unknown preset {preset!r}; choose one of {', '.join(preset_names())}")
        raw = _deep_merge(raw, parse_yaml(resources.files("layergeo.presets").joinpath(f"{preset}.yaml").read_text()))
    if path is not None:
        loaded = _read_config_file(Path(path), preset is None if complete is None else complete)
        raw = _deep_merge(raw, loaded)
    for item in overrides:
        key, value = split_key_value(item, "override", "key=value, e.g. student.layers=3")
        raw = _deep_merge(raw, _nested(key.split("."), command_line_value(value, item, "override")))
    return validate(_period_replaces_draws(from_dict(RunConfig, raw)))


def _period_replaces_draws(config: RunConfig) -> RunConfig:
    """``matching.rail_every_steps``, when set, replaces ``matching.rail_draws`` (10 by default): the resolved config
    (and so ``config.yaml``) names the one RAIL schedule the run trains, as ``max_steps`` replaces ``epochs``."""
    if config.matching.rail_every_steps is not None:
        config.matching.rail_draws = None
    return config


def _read_config_file(path: Path, complete: bool) -> dict[str, Any]:
    if path.is_dir():
        raise LayergeoError(f"config file {path} is a folder; give a YAML file such as runs/X/config.yaml")
    if not path.is_file():
        raise LayergeoError(f"config file {path} does not exist; give a YAML file such as runs/X/config.yaml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LayergeoError(f"config file {path} is not UTF-8 text; give a YAML file such as runs/X/config.yaml") from None
    except OSError as exc:
        raise LayergeoError(f"cannot read config file {path} ({exc.strerror or exc})") from None
    try:
        loaded = parse_yaml(text)
    except yaml.YAMLError as exc:
        raise LayergeoError(f"config file {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if loaded is None or loaded == {}:
        raise LayergeoError(f"config file {path} is empty; give a run's config.yaml, or settings with --preset")
    if not isinstance(loaded, dict):
        raise LayergeoError(f"config file {path} must hold a mapping of sections (data, student, ...)")
    missing = [name for name in SECTIONS if name not in loaded]
    if complete and missing:
        from_dict(RunConfig, loaded)  # an unknown key or a wrong type says so first
        raise LayergeoError(
            f"config file {path} lacks the section{'s' if len(missing) > 1 else ''} {', '.join(missing)}: "
            f"a saved config.yaml has them all ({', '.join(SECTIONS)}); is it truncated? "
            "For a partial file, add --preset NAME to take the rest from a preset"
        )
    return loaded


def validate(config: RunConfig) -> RunConfig:
    """Refuse values out of range, naming the key by its dotted path, the value and the range; returns ``config``.

    Only what the config alone decides: whether a layer exists in the teacher, or a length fits its
    model, is checked when the teacher is known (``train.validate_student_config``).
    """
    _integer("seed", config.seed, 0, MAX_SEED)
    data = config.data
    _integer("data.max_length", data.max_length, 2)
    _integer("data.max_train", data.max_train, 1, optional=True)
    _integer("data.max_eval", data.max_eval, 1, optional=True)
    _integer("data.seed", data.seed, 0, MAX_SEED, optional=True)
    _integer("data.max_target_length", data.max_target_length, 2)
    _integer("generation.num_beams", config.generation.num_beams, 1)
    _integer("generation.max_new_tokens", config.generation.max_new_tokens, 1, optional=True)
    _optim(config.teacher.train, "teacher.train.")
    student = config.student
    _integer("student.layers", student.layers, 1)
    _integer("student.decoder_layers", student.decoder_layers, 1, optional=True)
    _choice("student.init", student.init, STUDENT_INITS)
    _choice("student.copy_rule", student.copy_rule, COPY_RULES)
    if student.copy_layers is not None:
        for layer in student.copy_layers:
            _integer("student.copy_layers", layer, 1, rule="every item must be a teacher layer >= 1 (1-based)")
        if len(student.copy_layers) != student.layers:
            raise LayergeoError(
                f"config key 'student.copy_layers' got {student.copy_layers!r}, which names {len(student.copy_layers)} "
                f"teacher layers for a {student.layers}-layer student; give {student.layers} (or null for the forward targets)"
            )
    for name in ("hidden_size", "intermediate_size", "num_heads"):
        _integer(f"student.{name}", getattr(student, name), 1, optional=True)
    for where, lora in (("teacher.lora", config.teacher.lora), ("student.lora", student.lora)):
        _integer(f"{where}.r", lora.r, 1, optional=True)
        _number(f"{where}.alpha", lora.alpha, 0.0)
        _number(f"{where}.dropout", lora.dropout, 0.0, inclusive=True, below=1.0)
        if not lora.target_modules.strip():
            raise _out_of_range(f"{where}.target_modules", lora.target_modules, "name modules, e.g. all-linear or q_proj,v_proj")
    _matching(config.matching)
    loss = config.loss
    for name in ("alpha_ce", "alpha_kl", "alpha_hidden"):
        _number(f"loss.{name}", getattr(loss, name), 0.0, inclusive=True)
    hidden = loss.alpha_hidden if config.matching.strategy != "none" else 0.0
    if loss.alpha_ce == loss.alpha_kl == hidden == 0:
        why = "are all 0" if loss.alpha_hidden == 0 else "are 0 and matching.strategy is none"
        raise LayergeoError(f"config keys 'loss.alpha_ce', 'loss.alpha_kl' and 'loss.alpha_hidden' {why}: "
                            "the student's loss would be 0; give loss.alpha_ce or loss.alpha_kl a weight > 0")
    _number("loss.temperature", loss.temperature, 0.0)
    _choice("loss.normalize", loss.normalize, NORMALIZATIONS)
    _choice("loss.positions", loss.positions, POSITIONS)
    _choice("loss.hidden_reduction", loss.hidden_reduction, HIDDEN_REDUCTIONS)
    _optim(config.train, "train.")
    _integer("trace.examples", config.trace.examples, 0)
    _integer("trace.probes", config.trace.probes, 1)
    _integer("trace.every", config.trace.every, 1, optional=True)
    shallowest = min(student.layers, student.decoder_layers or student.layers)
    for layer in config.trace.gradient_layers or []:
        _integer("trace.gradient_layers", layer, 1, shallowest,
                 rule=f"every item must be a student layer from 1 to {shallowest} (null: all of them)")
    return config


def _optim(optim: OptimConfig, where: str) -> None:
    _integer(f"{where}max_steps", optim.max_steps, 1, optional=True)
    if optim.max_steps is None:
        _integer(f"{where}epochs", optim.epochs, 1, rule=f"it must be an integer >= 1 (or set {where}max_steps >= 1)")
    else:
        _integer(f"{where}epochs", optim.epochs, 0)  # unused: max_steps sets the budget
    _integer(f"{where}batch_size", optim.batch_size, 1)
    _number(f"{where}lr", optim.lr, 0.0)
    _number(f"{where}weight_decay", optim.weight_decay, 0.0, inclusive=True)
    _number(f"{where}warmup_ratio", optim.warmup_ratio, 0.0, inclusive=True, below=1.0)
    _number(f"{where}grad_clip", optim.grad_clip, 0.0)
    _integer(f"{where}eval_every", optim.eval_every, 1, optional=True)
    if optim.eval_steps is not None:
        for step in optim.eval_steps:
            _integer(f"{where}eval_steps", step, 1, rule="every item must be an optimiser step >= 1")
        if list(optim.eval_steps) != sorted(set(optim.eval_steps)):
            raise _out_of_range(f"{where}eval_steps", optim.eval_steps, "give distinct steps in increasing order, e.g. [32, 100, 320]")
    _integer(f"{where}log_every", optim.log_every, 1)
    _integer(f"{where}early_stop", optim.early_stop, 1, optional=True)
    _choice(f"{where}cache_dtype", optim.cache_dtype, CACHE_DTYPES)
    _number(f"{where}random_init_lr", optim.random_init_lr, 0.0, optional=True)
    _integer(f"{where}random_init_epochs", optim.random_init_epochs, 1, optional=True)


def _matching(options: MappingOptions) -> None:
    names = [name for name in strategy_names() if name != "explicit"]
    strategy = options.strategy
    if strategy == "explicit" and not options.pairs:
        raise LayergeoError("config key 'matching.strategy' is 'explicit' but 'matching.pairs' is null; "
                            "give matching.pairs, e.g. '1:4,2:8,3:12'")
    if strategy not in strategy_names() and ":" not in strategy:
        raise LayergeoError(f"config key 'matching.strategy' got {strategy!r}, which is not a strategy; choose one of "
                            f"{', '.join(names)}, or give explicit pairs such as '1:4,2:8,3:12'")
    for key, text in (("matching.strategy", strategy if ":" in strategy else None), ("matching.pairs", options.pairs)):
        if text is None:
            continue
        try:
            pairs = [pair for stack in parse_stack_pairs(text).values() for pair in stack]
        except LayergeoError as exc:
            raise LayergeoError(f"config key {key!r}: {exc}") from None
        for s, t in pairs:
            if s < 0 or t < 0:
                raise LayergeoError(f"config key {key!r} got {text!r}, whose pair {s}:{t} is out of range: "
                                    "layer indices are >= 0 (0 = the embedding output)")
    _integer("matching.target", options.target, 0, optional=True, rule="it must be null or a teacher state >= 0")
    _integer("matching.rail_every_steps", options.rail_every_steps, 1, optional=True)
    _integer("matching.rail_draws", options.rail_draws, 1, optional=True)
    _choice("matching.shuffle", options.shuffle, SHUFFLE_MODES)


def _out_of_range(key: str, value: Any, rule: str) -> LayergeoError:
    return LayergeoError(f"config key {key!r} got {value!r}, which is out of range: {rule}")


def _integer(key: str, value: int | None, low: int, high: int | None = None, optional: bool = False,
             rule: str | None = None) -> None:
    if value is None and optional:
        return
    if value is None or value < low or (high is not None and value > high):
        if rule is None:
            rule = f"it must be an integer >= {low}" + (f" and <= {high}" if high is not None else "")
            rule = f"{rule.replace('it must be', 'it must be null or')}" if optional else rule
        raise _out_of_range(key, value, rule)


def _number(key: str, value: float | None, low: float, inclusive: bool = False, below: float | None = None,
            optional: bool = False) -> None:
    if value is None and optional:
        return
    ok = value is not None and math.isfinite(value) and (value >= low if inclusive else value > low)
    if ok and below is not None:
        ok = value < below
    if not ok:
        rule = f"it must be {'null or ' if optional else ''}a finite number {'>=' if inclusive else '>'} {low:g}"
        rule += f" and < {below:g}" if below is not None else ""
        raise _out_of_range(key, value, rule)


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise LayergeoError(f"config key {key!r} got {value!r}; choose one of {', '.join(choices)}")


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
