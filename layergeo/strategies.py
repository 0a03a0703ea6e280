"""Layer-mapping strategies: which teacher state each student state imitates.

Indexing follows Hugging Face ``output_hidden_states``: index 0 is the embedding
output, index k the output of layer k. A teacher of depth L_T has states
T0..T_{L_T}, a student of depth L_S has S0..S_{L_S}. A mapping is a list of
``(student_index, teacher_index)`` pairs.

Strategies are registered with ``@register("name")``; each builds a
:class:`Mapper` that realises the pairs used at a given epoch and step. Only
``rail`` changes during training; every other mapping is fixed for the run.

A model family may have several stacks of layers (an encoder-decoder has ``encoder`` and
``decoder``). :func:`build_mapping` applies the strategy to each stack on its own, as the
authors did: the same rule per stack, with stack k's random draws (shuffle, rail) from their own
stream ``[seed, ..., k]``; stack 0 draws exactly what a one-stack run draws. Explicit pairs name
their stack (``encoder:1:4,decoder:1:4``); plain ``1:4`` is valid for a one-stack family.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from layergeo.errors import LayergeoError

Pair = tuple[int, int]
DEFAULT_RAIL_DRAWS = 10  # rail redraws every ceil(steps / 10) steps unless told otherwise: at most 10 draws a run


@dataclass
class MappingOptions:
    """Options shared by the strategies (the ``matching`` section of a config)."""

    strategy: str = "forward"
    embeddings: bool = True  # add the S0 -> T0 pair (all_to_one maps S0 to its target instead)
    target: int | None = None  # all_to_one target; the middle teacher layer when None
    pairs: str | None = None  # explicit "1:4,2:8,3:12"
    # rail: resample this many times over the run (every ceil(total steps / N) steps), so a run of any length sees
    # several mappings; rail_every_steps, when set, gives the period in steps instead; both null: every epoch
    rail_every_steps: int | None = None
    rail_draws: int | None = DEFAULT_RAIL_DRAWS
    # "distinct": neither forward nor reverse, and the seeds of a grid train distinct permutations as far as there are
    # any (seed s takes the s-th of a fixed order, modulo their number); "fair": neither forward nor reverse, drawn
    # per seed (seeds may repeat an order); "any": any permutation
    shuffle: str = "distinct"


def forward_targets(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher layers: student layer j -> ceil(j * L_T / L_S), j = 1..L_S."""
    _check_depths(teacher_layers, student_layers)
    return [math.ceil(j * teacher_layers / student_layers) for j in range(1, student_layers + 1)]


# "Keep first and last": the authors' copy maps (paper notes sections 3.2 and 3.3), 0-based teacher
# layers by teacher depth and student depth (T5-base 12 layers, Qwen3-8B 36). Other depths use
# evenly spaced layers rounded half up, both ends kept (12 -> 3, 6 and 36 -> 9 agree with that
# rule except in a few rounded places, which is why the published maps are listed).
_FIRST_LAST = {
    12: {3: [0, 6, 11], 6: [0, 2, 4, 7, 9, 11], 9: [0, 1, 2, 5, 6, 7, 9, 10, 11]},
    36: {9: [0, 4, 9, 13, 18, 22, 27, 31, 35]},
}


def first_last_targets(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher layers (1-based) to copy that keep the first and the last: 12 -> 3 gives 1, 7, 12."""
    _check_depths(teacher_layers, student_layers)
    table = _FIRST_LAST.get(teacher_layers, {})
    if student_layers in table:
        return [k + 1 for k in table[student_layers]]
    if student_layers == 1:
        return [1]
    spaced = np.floor(np.linspace(0, teacher_layers - 1, student_layers) + 0.5).astype(int)
    return [int(k) + 1 for k in spaced]


def copy_targets(rule: str, teacher_layers: int, student_layers: int) -> list[int]:
    """The teacher layers a copied student starts from: ``forward`` targets or ``first_last``."""
    if rule == "first_last":
        return first_last_targets(teacher_layers, student_layers)
    if rule == "forward":
        return forward_targets(teacher_layers, student_layers)
    raise LayergeoError(f"unknown student.copy_rule {rule!r}; choose forward or first_last")


def parse_stack_pairs(text: str) -> dict[str | None, list[Pair]]:
    """Parse ``"encoder:1:4,decoder:1:4"`` (or plain ``"1:4,2:8"``, stack None) into pairs per stack."""
    pairs: dict[str | None, list[Pair]] = {}
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        fields = item.split(":")
        stack = fields[0] if len(fields) == 3 else None
        try:
            if len(fields) not in (2, 3) or (stack is not None and not stack.isidentifier()):
                raise ValueError
            s, t = int(fields[-2]), int(fields[-1])
        except ValueError:
            raise LayergeoError(
                f"cannot read layer pair {item!r} in {text!r}; write student:teacher pairs such as '1:4,2:8,3:12', "
                "with the stack first for an encoder-decoder ('encoder:1:4,decoder:1:4')"
            ) from None
        pairs.setdefault(stack, []).append((s, t))
    if not pairs:
        raise LayergeoError(f"no layer pairs in {text!r}; write student:teacher pairs such as '1:4,2:8,3:12'")
    return pairs


def parse_pairs(text: str) -> list[Pair]:
    """Parse ``"0:0,1:4,2:8"`` into ``[(0, 0), (1, 4), (2, 8)]``."""
    pairs = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        try:
            s, t = item.split(":")
            pairs.append((int(s), int(t)))
        except ValueError:
            raise LayergeoError(
                f"cannot read layer pair {item!r} in {text!r}; write student:teacher pairs such as '1:4,2:8,3:12'"
            ) from None
    if not pairs:
        raise LayergeoError(f"no layer pairs in {text!r}; write student:teacher pairs such as '1:4,2:8,3:12'")
    return pairs


class Mapper:
    """Realises the layer pairs of one run; fixed unless the strategy resamples.

    ``pairs_at(epoch, step)`` gives the pairs in force; ``period(epoch, step)``
    identifies when they may change (a new period means a new mapping to log).
    """

    def __init__(self, name: str, teacher_layers: int, student_layers: int, pairs: list[Pair], note: str = ""):
        self.name = name
        self.teacher_layers = teacher_layers
        self.student_layers = student_layers
        self.note = note
        self._pairs = pairs
        validate_pairs(pairs, teacher_layers, student_layers)

    @property
    def dynamic(self) -> bool:
        return False

    def period(self, epoch: int, step: int) -> int:
        return 0

    def pairs_at(self, epoch: int = 0, step: int = 0) -> list[Pair]:
        return list(self._pairs)

    def student_states(self) -> list[int]:
        """Student indices that can ever be matched (each needs a projection when widths differ)."""
        return sorted({s for s, _ in self._pairs})

    def teacher_states(self) -> list[int]:
        """Teacher indices that can ever be matched (what a teacher cache must keep)."""
        return sorted({t for _, t in self._pairs})


class RailMapper(Mapper):
    """RAIL-KD in-order random: L_S distinct teacher layers, sorted, redrawn each period.

    A period is ``every_steps`` optimiser steps (:func:`rail_schedule` makes it ⌈total / ``rail_draws``⌉ steps,
    so at most 10 draws per run by default), or an epoch when it is None. The draw
    for period p uses its own generator seeded by (seed, p), so it does not depend
    on data order or on how many draws came before.
    """

    def __init__(self, teacher_layers: int, student_layers: int, seed: int, embeddings: bool, every_steps: int | None,
                 stream: int = 0):
        self.seed = seed
        self.stream = stream
        self.embeddings = embeddings
        self.every_steps = every_steps
        self.teacher_layers, self.student_layers = teacher_layers, student_layers
        super().__init__("rail", teacher_layers, student_layers, self._draw(0))

    @property
    def dynamic(self) -> bool:
        return True

    def period(self, epoch: int, step: int) -> int:
        return step // self.every_steps if self.every_steps else epoch

    def _draw(self, period: int) -> list[Pair]:
        rng = np.random.default_rng([self.seed, period] + ([self.stream] if self.stream else []))
        chosen = np.sort(rng.choice(np.arange(1, self.teacher_layers + 1), self.student_layers, replace=False))
        pairs = [(j + 1, int(t)) for j, t in enumerate(chosen)]
        return [(0, 0)] + pairs if self.embeddings else pairs

    def pairs_at(self, epoch: int = 0, step: int = 0) -> list[Pair]:
        return self._draw(self.period(epoch, step))

    def student_states(self) -> list[int]:
        return ([0] if self.embeddings else []) + list(range(1, self.student_layers + 1))

    def teacher_states(self) -> list[int]:
        return ([0] if self.embeddings else []) + list(range(1, self.teacher_layers + 1))


StrategyFn = Callable[[int, int, MappingOptions, int, int], Mapper]  # L_T, L_S, options, seed, stream
_REGISTRY: dict[str, StrategyFn] = {}


def register(name: str) -> Callable[[StrategyFn], StrategyFn]:
    """Decorator: ``@register("reverse")`` adds a strategy builder to the registry."""

    def wrap(fn: StrategyFn) -> StrategyFn:
        _REGISTRY[name] = fn
        return fn

    return wrap


def strategy_names() -> list[str]:
    return list(_REGISTRY)


def build_mapper(options: MappingOptions, teacher_layers: int, student_layers: int, seed: int = 0,
                 stream: int = 0) -> Mapper:
    """The mapper for ``options.strategy``; ``"1:4,2:8"`` is accepted as an explicit mapping.

    ``stream``: which random stream the strategy draws from (the stack's position; 0 for one stack).
    """
    _check_depths(teacher_layers, student_layers)
    name = options.strategy
    if name not in _REGISTRY:
        if ":" in name:
            explicit = MappingOptions(strategy="explicit", pairs=name, embeddings=options.embeddings)
            return _explicit(teacher_layers, student_layers, explicit, seed, stream)
        raise LayergeoError(
            f"unknown matching strategy {name!r}; choose one of {', '.join(_REGISTRY)} "
            "or give explicit pairs such as '1:4,2:8,3:12'"
        )
    return _REGISTRY[name](teacher_layers, student_layers, options, seed, stream)


class StackMapping:
    """The layer mapping of one run: a :class:`Mapper` per stack, e.g. ``{"encoder": ..., "decoder": ...}``.

    ``pairs_at`` gives ``{stack: [(s, t), ...]}``; a one-stack mapping is logged as a plain list of
    pairs (as before stacks existed), a several-stack one as ``{stack: pairs}``.
    """

    def __init__(self, mappers: dict[str, Mapper]):
        self.mappers = mappers
        first = next(iter(mappers.values()))
        self.name, self.note = first.name, first.note

    @property
    def stacks(self) -> list[str]:
        return list(self.mappers)

    @property
    def dynamic(self) -> bool:
        return any(m.dynamic for m in self.mappers.values())

    def period(self, epoch: int, step: int) -> int:
        """When the pairs may change: every stack redraws on the same schedule (one matching section)."""
        return max(m.period(epoch, step) for m in self.mappers.values())

    def pairs_at(self, epoch: int = 0, step: int = 0) -> dict[str, list[Pair]]:
        return {stack: m.pairs_at(epoch, step) for stack, m in self.mappers.items()}

    def student_states(self) -> dict[str, list[int]]:
        return {stack: m.student_states() for stack, m in self.mappers.items()}

    def teacher_states(self) -> dict[str, list[int]]:
        return {stack: m.teacher_states() for stack, m in self.mappers.items()}

    def logged(self, epoch: int = 0, step: int = 0) -> list | dict:
        """The pairs in force as mapping.jsonl records them."""
        pairs = self.pairs_at(epoch, step)
        return next(iter(pairs.values())) if len(pairs) == 1 else pairs


def build_mapping(options: MappingOptions, depths: dict[str, tuple[int, int]], seed: int = 0) -> StackMapping:
    """The mapping of every stack: ``depths[stack] = (teacher layers, student layers)``."""
    explicit = options.pairs if options.strategy == "explicit" else options.strategy if ":" in options.strategy else None
    if explicit is None:
        return StackMapping({stack: build_mapper(options, lt, ls, seed, stream=k)
                             for k, (stack, (lt, ls)) in enumerate(depths.items())})
    named = parse_stack_pairs(explicit)
    if None in named:
        if len(depths) > 1:
            raise LayergeoError(f"explicit pairs {explicit!r} name no stack, but this model has the stacks "
                                f"{', '.join(depths)}; write e.g. 'encoder:1:4,decoder:1:4'")
        named = {next(iter(depths)): named.pop(None), **named}
    unknown = sorted(set(named) - set(depths))
    if unknown:
        raise LayergeoError(f"explicit pairs {explicit!r} name the stack {unknown[0]!r}; this model has "
                            f"{', '.join(depths)}")
    mappers = {}
    for stack, (lt, ls) in depths.items():
        text = ",".join(f"{s}:{t}" for s, t in named.get(stack, []))
        if text:
            mappers[stack] = _explicit(lt, ls, MappingOptions("explicit", options.embeddings, pairs=text), seed, 0)
        else:
            mappers[stack] = Mapper("explicit", lt, ls, [], note=f"no pairs given for the {stack} stack")
    return StackMapping(mappers)


def validate_pairs(pairs: list[Pair], teacher_layers: int, student_layers: int) -> None:
    for s, t in pairs:
        if not 0 <= s <= student_layers:
            raise LayergeoError(
                f"student layer {s} is out of range: a {student_layers}-layer student has states 0..{student_layers}"
            )
        if not 0 <= t <= teacher_layers:
            raise LayergeoError(
                f"teacher layer {t} is out of range: a {teacher_layers}-layer teacher has states 0..{teacher_layers}"
            )
    students = [s for s, _ in pairs]
    if len(set(students)) != len(students):
        raise LayergeoError(f"student state matched twice in {pairs}; give each student state one teacher state")


def _check_depths(teacher_layers: int, student_layers: int) -> None:
    if teacher_layers < 1 or student_layers < 1:
        raise LayergeoError("teacher and student need at least one layer each")
    if student_layers > teacher_layers:
        raise LayergeoError(
            f"the student ({student_layers} layers) is deeper than its teacher ({teacher_layers} layers); "
            f"choose at most {teacher_layers} student layers"
        )


def _with_embeddings(targets: list[int], options: MappingOptions) -> list[Pair]:
    pairs = [(j + 1, t) for j, t in enumerate(targets)]
    return [(0, 0)] + pairs if options.embeddings else pairs


@register("forward")
def _forward(lt: int, ls: int, options: MappingOptions, seed: int, stream: int = 0) -> Mapper:
    return Mapper("forward", lt, ls, _with_embeddings(forward_targets(lt, ls), options))


@register("reverse")
def _reverse(lt: int, ls: int, options: MappingOptions, seed: int, stream: int = 0) -> Mapper:
    return Mapper("reverse", lt, ls, _with_embeddings(forward_targets(lt, ls)[::-1], options))


@register("all_to_one")
def _all_to_one(lt: int, ls: int, options: MappingOptions, seed: int, stream: int = 0) -> Mapper:
    target = lt // 2 if options.target is None else options.target
    first = 0 if options.embeddings else 1
    return Mapper("all_to_one", lt, ls, [(s, target) for s in range(first, ls + 1)], note=f"every state -> T{target}")


@register("shuffle")
def _shuffle(lt: int, ls: int, options: MappingOptions, seed: int, stream: int = 0) -> Mapper:
    """A fixed random permutation of the forward targets, drawn once per seed.

    ``shuffle="fair"`` redraws until the order is neither forward nor reverse, so
    shuffle is a different treatment from both; that is impossible with fewer
    than three student layers, where the plain permutation is used and said so.
    """
    if options.shuffle not in SHUFFLE_MODES:
        raise LayergeoError(f"unknown shuffle mode {options.shuffle!r}; choose one of {', '.join(SHUFFLE_MODES)}")
    forward = forward_targets(lt, ls)
    if options.shuffle == "distinct" and ls <= DISTINCT_MAX_LAYERS:
        return _distinct_shuffle(lt, ls, options, seed, stream, forward)
    excluded = [forward, forward[::-1]] if options.shuffle != "any" and ls >= 3 else []
    rng = np.random.default_rng([seed, 0x5F] + ([stream] if stream else []))
    order = [int(t) for t in rng.permutation(forward)]
    while order in excluded:
        order = [int(t) for t in rng.permutation(forward)]
    note = "neither forward nor reverse" if excluded else "any permutation"
    if options.shuffle != "any" and ls < 3:
        note = f"any permutation (a {ls}-layer student has no order that is neither forward nor reverse)"
    return Mapper("shuffle", lt, ls, _with_embeddings(order, options), note=note)


SHUFFLE_MODES = ("fair", "any", "distinct")
DISTINCT_MAX_LAYERS = 8  # up to 8! = 40,320 orders are listed; deeper students draw (a repeat is then ~impossible)


def _distinct_shuffle(lt: int, ls: int, options: MappingOptions, seed: int, stream: int, forward: list[int]) -> Mapper:
    """Seed s trains the s-th (mod their number) of the fair orders of the forward targets, in one fixed random
    order (drawn from the stack's stream, not from the seed), so seeds 0..N-1 of a grid train N distinct orders."""
    positions = list(itertools.permutations(range(ls)))
    if ls >= 3:
        positions = [p for p in positions if list(p) not in (list(range(ls)), list(range(ls))[::-1])]
    order = np.random.default_rng([0x5F, 0xD1] + ([stream] if stream else [])).permutation(len(positions))
    index = int(order[seed % len(positions)])
    chosen = [forward[i] for i in positions[index]]
    note = (f"order {seed % len(positions) + 1} of the {len(positions)} "
            f"{'fair orders (neither forward nor reverse)' if ls >= 3 else 'orders'}: seeds {seed % len(positions)} + "
            f"k x {len(positions)} train it")
    return Mapper("shuffle", lt, ls, _with_embeddings(chosen, options), note=note)


def rail_schedule(options: MappingOptions, total_steps: int) -> MappingOptions:
    """``options`` with ``rail_draws`` turned into a period of steps (``rail_every_steps``) for a run of ``total_steps``;
    unchanged when a period is already given (it wins) or both are null (every epoch)."""
    if options.rail_draws is None or options.rail_every_steps is not None:
        return options
    return dataclasses.replace(options, rail_every_steps=max(1, math.ceil(total_steps / options.rail_draws)))


@register("rail")
def _rail(lt: int, ls: int, options: MappingOptions, seed: int, stream: int = 0) -> Mapper:
    if options.rail_every_steps is not None and options.rail_every_steps < 1:
        raise LayergeoError("matching.rail_every_steps must be a positive number of steps "
                            "(or null for matching.rail_draws draws over the run)")
    return RailMapper(lt, ls, seed, options.embeddings, options.rail_every_steps, stream)


@register("none")
def _none(lt: int, ls: int, options: MappingOptions, seed: int, stream: int = 0) -> Mapper:
    return Mapper("none", lt, ls, [], note="no intermediate-layer matching")


@register("explicit")
def _explicit(lt: int, ls: int, options: MappingOptions, seed: int, stream: int = 0) -> Mapper:
    if not options.pairs:
        raise LayergeoError("strategy 'explicit' needs matching.pairs, e.g. '1:4,2:8,3:12'")
    pairs = parse_pairs(options.pairs)
    if options.embeddings and all(s != 0 for s, _ in pairs):
        pairs = [(0, 0)] + pairs
    return Mapper("explicit", lt, ls, sorted(pairs))
