"""Student set-up and the distillation loss: a student of the teacher, trained by :func:`layergeo.loop.fit`.

The loss of a batch is CE + T^2 KL + alpha * hidden matching, where the hidden term is summed over
the family's stacks (an encoder-decoder matches encoder and decoder pairs) and each stack's term
is the mean over its pairs of the masked MSE (:func:`layergeo.losses.hidden_matching_loss`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, extract_model_from_parallel
from torch import nn
from transformers import PreTrainedModel, set_seed

from layergeo.analyse import anchor_layers
from layergeo.cache import TeacherCache, teacher_digest
from layergeo.config import OptimConfig, RunConfig
from layergeo.errors import LayergeoError
from layergeo.families import Family
from layergeo.loop import Loop, StepLosses, finish_run, fit, start_env, total_steps
from layergeo.losses import hidden_matching_loss
from layergeo.models import Student
from layergeo.processes import check_batch_size, distributed_state, make_accelerator, on_main
from layergeo.runs import RunDir, atomic_dir
from layergeo.strategies import StackMapping, build_mapping, copy_targets, rail_schedule
from layergeo.trace import GeometryTrace, live_run
from layergeo.tracking import tracked, tracker_settings
from layergeo.teacher import (
    check_adapters, check_max_length, encode_splits, family_of, fine_tune_teacher, loaders, owns_teacher, teacher_model_config,
    teacher_run_dir,
)


def stack_depths(family: Family, teacher_config, config: RunConfig) -> dict[str, tuple[int, int]]:
    """Stack -> (teacher layers, student layers), refusing a student deeper than its teacher."""
    teacher, student = family.depths(teacher_config), family.student_depths(config.student)
    for stack in family.stacks:
        if student[stack] > teacher[stack]:
            key = "student.decoder_layers" if stack == "decoder" and config.student.decoder_layers else "student.layers"
            where = f" {stack}" if len(family.stacks) > 1 else ""
            raise LayergeoError(
                f"the student{where} ({student[stack]} layers) is deeper than its teacher{where} ({teacher[stack]} "
                f"layers); choose {key} <= {teacher[stack]}"
            )
    return {stack: (teacher[stack], student[stack]) for stack in family.stacks}


def copy_plan(config: RunConfig, depths: dict[str, tuple[int, int]]) -> dict[str, list[int]]:
    """Stack -> the teacher layers (1-based) a copied student starts from: ``copy_layers`` or ``copy_rule``."""
    listed = config.student.copy_layers
    plan = {}
    for stack, (lt, ls) in depths.items():
        chosen = listed if listed is not None else copy_targets(config.student.copy_rule, lt, ls)
        if len(chosen) != ls:
            what = "student" if len(depths) == 1 else stack
            raise LayergeoError(f"student.copy_layers names {len(chosen)} teacher layers for a {ls}-layer {what}; "
                                "give one per student layer")
        for k in chosen:
            if not 1 <= k <= lt:
                raise LayergeoError(f"student.copy_layers: teacher layer {k} is out of range 1..{lt}")
        plan[stack] = list(chosen)
    return plan


def validate_student_config(config: RunConfig, out: Path) -> tuple[StackMapping, object]:
    """Check everything that can be checked before any file is written; return the mapping and the task."""
    family = family_of(config)
    teacher_config = teacher_model_config(config, out)
    depths = stack_depths(family, teacher_config, config)
    task = family.load_task(config)
    mapping = build_mapping(rail_schedule(config.matching, total_steps(student_optim(config), len(task.splits["train"]))),
                            depths, config.seed)
    copy_plan(config, depths)
    if config.student.init == "copy" and config.student.hidden_size not in (None, family.width(teacher_config)):
        raise LayergeoError("student.init=copy needs the teacher's width; use student.init=random for a narrower student")
    family.check_student(teacher_config, config.student)
    check_adapters(config, family)
    if config.train.teacher_cache and not family.caches_teacher:
        raise LayergeoError(f"train.teacher_cache is not available for the {family.name} family (its teacher runs live); "
                            "set train.teacher_cache=false")
    state, _ = distributed_state(config.device)
    check_batch_size(student_optim(config), state.num_processes, "train")
    if owns_teacher(config, out) and not RunDir(teacher_run_dir(config, out)).finished:
        check_batch_size(config.teacher.train, state.num_processes, "teacher.train")
    check_max_length(config, family, teacher_config)
    if RunDir(teacher_run_dir(config, out)).finished:
        family.task_check(task, teacher_config, teacher_run_dir(config, out))
    return mapping, task


def student_optim(config: RunConfig) -> OptimConfig:
    """``config.train`` with the random-init learning rate and epochs applied when the student is random."""
    optim = config.train
    if config.student.init != "random":
        return optim
    return dataclasses.replace(optim, lr=optim.random_init_lr or optim.lr, epochs=optim.random_init_epochs or optim.epochs)


def distil_student(config: RunConfig, out: Path, resume: bool = False) -> dict:
    """Distil a student of the teacher into the run directory ``out`` (training the teacher first if needed)."""
    mapping, task = validate_student_config(config, out)
    family = family_of(config)
    teacher_dir = teacher_run_dir(config, out)
    state, device = distributed_state(config.device)
    teacher_finished = RunDir(teacher_dir).finished
    teacher_resume = (teacher_dir / "config.yaml").is_file()  # a teacher phase this run started and did not finish
    state.wait_for_everyone()  # every process has looked at the teacher directory before the main one writes there
    if not teacher_finished:
        fine_tune_teacher(config, teacher_dir, resume=teacher_resume)
    config.teacher.dir = str(teacher_dir.resolve())
    set_seed(config.seed)
    run = RunDir(out)
    teacher, tokenizer = family.load_checkpoint(RunDir(teacher_dir).checkpoint("best"))
    encoded = encode_splits(config, family, task, tokenizer, teacher.config)
    family.task_check(task, teacher.config, teacher_dir)
    env = start_env(run, config, "student", device, resume, state, teacher_sha256=teacher_digest(RunDir(teacher_dir).checkpoint("best")))
    depths = stack_depths(family, teacher.config, config)
    model = family.build_student(teacher, config.student, copy_plan(config, depths))
    student = Student(model, family.width(teacher.config), mapping.student_states(), student_width=family.width(model.config))
    if config.student.freeze_embeddings:
        for parameter in family.embedding_parameters(student.model):
            parameter.requires_grad_(False)

    def save_init() -> None:
        if not resume or not run.checkpoint("init").is_dir():
            with atomic_dir(run.checkpoint("init")) as tmp:
                student.save(tmp, tokenizer)

    on_main(state, save_init)
    teacher.to(device).eval()
    student.to(device)
    eval_loader, during = loaders(family, encoded, tokenizer, teacher, state.num_processes)
    cache = None

    def open_cache() -> None:
        nonlocal cache
        cache = open_teacher_cache(config, teacher_dir, teacher, tokenizer, task.name, encoded["train"], mapping)

    on_main(state, open_cache)  # the main process builds it when needed; the others then only open it
    if not state.is_main_process:
        open_cache()
    env["teacher_cache"] = cache.describe() if cache is not None else {"used": False}
    _, match = _teacher_needs(mapping, config)
    unused_projections = len(student.projections) > 0 and not match  # kept for the geometry, never trained
    accelerator = make_accelerator(device, find_unused_parameters=unused_projections,
                                   **tracker_settings(config.train.log_with, run))
    probe = geometry_trace(config, run, family, teacher, student, tokenizer, mapping, device, accelerator, env,
                           total_steps(student_optim(config), len(encoded["train"])))
    if cache is not None and device.type == "cuda":
        teacher.cpu()  # only its config is needed from here on (the trace holds the teacher's probe states)
    if accelerator.distributed_type == DistributedType.FSDP and len(student.projections):
        raise LayergeoError("a narrower student's projections run outside the student's forward pass, which FSDP "
                            "does not allow; distil it with DDP (no FSDP config) or give it the teacher's width")

    def step_losses_for(module: nn.Module) -> StepLosses:
        return distillation_losses(module, teacher, mapping, config, cache=cache, family=family)

    loss = config.loss
    loop = Loop(run=run, accelerator=accelerator, module=student, step_losses_for=step_losses_for,
                save_best=lambda path: student.save(path, tokenizer), train_data=encoded["train"], eval_loaders=during,
                tokenizer=tokenizer, collate=family.collator(tokenizer, teacher),
                evaluate=lambda m, loader: family.evaluate(m, loader, device, config, tokenizer, accelerator),
                metric=family.metric, optim=student_optim(config), device=device,
                seed=config.seed, mapper=mapping, env=env, probe=probe,
                term_weights={"ce": loss.alpha_ce, "kl": loss.alpha_kl, "hidden": loss.alpha_hidden})
    with tracked(accelerator, config, run):
        loop_state = fit(loop, resume)

    def evaluate_best():
        best, _ = Student.load(run.checkpoint("best"), family.width(teacher.config), family)
        best.to(device)
        return {s: family.evaluate(best.model, eval_loader[s], device, config, tokenizer) for s in ("dev", "test")}

    (teacher_layers, student_layers) = next(iter(depths.values()))
    extra = {"kind": "student", "task": task.name, "strategy": mapping.name, "init": config.student.init,
             "student_layers": student_layers, "teacher_layers": teacher_layers, "seed": config.seed,
             "teacher_results": RunDir(teacher_dir).results(), "teacher_cache": env["teacher_cache"],
             "teacher_sha256": env["teacher_sha256"]}
    if len(depths) > 1:
        extra["stack_layers"] = {stack: {"teacher": lt, "student": ls} for stack, (lt, ls) in depths.items()}
    return finish_run(run, env, loop, loop_state, evaluate_best, extra)


def geometry_trace(config: RunConfig, run: RunDir, family, teacher, student: Student, tokenizer, mapping: StackMapping,
                   device: torch.device, accelerator: Accelerator, env: dict, total: int) -> GeometryTrace | None:
    """The run's geometry trace (``config.trace``), on the main process; None when it is off, on the other
    processes, or under FSDP (whose sharded student cannot run a forward pass on one process). env.json says which.
    The trace sees the matching as trained (``rail_draws`` turned into the period of this run's ``total`` steps), so
    its RAIL pull is the run's own draw."""
    if not config.trace.examples:
        env["trace"] = {"used": False, "why": "trace.examples is 0"}
        return None
    if accelerator.distributed_type == DistributedType.FSDP:
        env["trace"] = {"used": False, "why": "FSDP shards the student; measure checkpoints with layergeo angles"}
        return None
    trained = dataclasses.replace(config, matching=rail_schedule(config.matching, total))
    loaded = live_run(run, trained, family, teacher, student, tokenizer, mapping.name)
    if not all(anchor_layers(loaded, view) for view in loaded.stacks.values()):  # what RunGeometry refuses
        env["trace"] = {"used": False, "why": "a narrower student matched to nothing has no student->teacher projection"}
        return None
    env["trace"] = {"used": True, "examples": config.trace.examples, "probes": config.trace.probes, "every": config.trace.every}
    if not accelerator.is_main_process:
        return None
    return GeometryTrace(run, loaded, config.trace, device,
                         cost=env["sittings"][-1])  # its time in this sitting; env.json's trace.seconds sums the sittings


def _teacher_needs(mapping: StackMapping, config: RunConfig) -> tuple[bool, bool]:
    """(whether the loss reads the teacher at all, whether it matches hidden states)."""
    match = config.loss.alpha_hidden > 0 and mapping.name != "none"
    return config.loss.alpha_kl > 0 or match, match


def open_teacher_cache(
    config: RunConfig, teacher_dir: Path, teacher: PreTrainedModel, tokenizer, task_name: str,
    train_data, mapping: StackMapping,
) -> TeacherCache | None:
    """The teacher's train-split outputs from ``<teacher run>/cache/`` when ``train.teacher_cache`` is on.

    Stores (or reuses) the logits and the states the run can ever match: all of them for rail,
    the targets of a fixed strategy, none when no hidden state is matched. None when the option
    is off or the loss never reads the teacher. Only families with one stack and example-level
    logits cache their teacher (:attr:`Family.caches_teacher`).
    """
    need_teacher, match = _teacher_needs(mapping, config)
    if not config.train.teacher_cache or not need_teacher:
        return None
    (layers,) = mapping.teacher_states().values()
    with torch.random.fork_rng(devices=[]):  # building draws nothing, but the student's RNG stream must not move
        return TeacherCache.open_or_build(
            teacher, tokenizer, train_data, checkpoint=RunDir(teacher_dir).checkpoint("best"), task=task_name,
            split="train", max_length=config.data.max_length, layers=layers if match else [],
            dtype=config.train.cache_dtype, root=Path(teacher_dir) / "cache",
        )


TeacherStates = dict[str, "tuple[torch.Tensor, ...] | dict[int, torch.Tensor] | None"]  # stack -> states by index
TeacherOutputs = Callable[[dict, dict[str, list[int]]], tuple[torch.Tensor, TeacherStates]]


def live_teacher(teacher: PreTrainedModel, family: Family, hidden_states: bool) -> TeacherOutputs:
    """(batch, layers per stack) -> the teacher's logits and hidden states per stack, computed now (``layers`` unused)."""

    def outputs(batch, layers):
        with torch.no_grad():
            out = teacher(**family.inputs(batch), output_hidden_states=hidden_states)
        return out.logits, family.hidden_states(out)

    return outputs


def cached_teacher(cache: TeacherCache, stack: str) -> TeacherOutputs:
    """(batch, layers per stack) -> the teacher's logits and states for ``batch["index"]``, read from the cache."""

    def outputs(batch, layers):
        logits, states = cache.lookup(batch["index"], batch["attention_mask"], layers[stack],
                                      host_mask=batch.get("host_attention_mask"))
        return logits, {stack: states}

    return outputs


def distillation_losses(student: nn.Module, teacher: PreTrainedModel, mapping: StackMapping, config: RunConfig,
                        cache: TeacherCache | None = None, family: Family | None = None) -> StepLosses:
    """The per-batch loss of distillation: CE + T^2 KL + alpha * hidden matching (each term returned).

    ``student`` is the module the forward pass goes through: a :class:`Student`, or what
    :func:`fit` made of it (DDP-wrapped, compiled); the projections are read from the Student
    inside. The teacher's outputs come from ``cache`` when given (batches must carry "index"),
    else from running ``teacher`` on the batch; the loss arithmetic is the same either way. The
    hidden term is summed over stacks; with several stacks each stack's term is also returned as
    ``hidden_<stack>``. On several processes each token-mean term is scaled by this process's share
    of the batch's tokens (see :func:`token_share`).
    """
    family = family or family_of(config)
    loss_cfg = config.loss
    need_teacher, match = _teacher_needs(mapping, config)
    stacks = mapping.stacks
    teacher_outputs = cached_teacher(cache, stacks[0]) if cache is not None else live_teacher(teacher, family, match)
    project = extract_model_from_parallel(student, keep_torch_compile=False).project

    def step_losses(batch, epoch, step):
        out = student(**family.inputs(batch))
        share = _prediction_share(family, batch)
        terms = {"ce": _scaled(family.task_loss(out.logits, batch), share)}
        total = loss_cfg.alpha_ce * terms["ce"]
        if need_teacher:
            pairs = mapping.pairs_at(epoch, step) if match else {stack: [] for stack in stacks}
            teacher_logits, teacher_states = teacher_outputs(batch, {k: sorted({t for _, t in p}) for k, p in pairs.items()})
            terms["kl"] = _scaled(family.kl_loss(out.logits, teacher_logits, batch, loss_cfg.temperature), share)
            total = total + loss_cfg.alpha_kl * terms["kl"]
        if match:
            student_states, masks = family.hidden_states(out), family.masks(batch)
            for stack in stacks:
                term = hidden_matching_loss(
                    student_states[stack], teacher_states[stack], pairs[stack], masks[stack],
                    lambda s, x, stack=stack: project(s, x, stack), loss_cfg.normalize, loss_cfg.hidden_reduction,
                )
                term = _scaled(term, token_share(masks[stack]))
                terms["hidden"] = term if "hidden" not in terms else terms["hidden"] + term
                if len(stacks) > 1:
                    terms[f"hidden_{stack}"] = term.detach()
            total = total + loss_cfg.alpha_hidden * terms["hidden"]
        return {"loss": total, **terms}

    return step_losses


def _scaled(term: torch.Tensor, share: torch.Tensor | None) -> torch.Tensor:
    return term if share is None else term * share


def _prediction_share(family: Family, batch: dict) -> torch.Tensor | None:
    """This process's share of the positions the CE and KL average over (None: they average over examples)."""
    mask = family.prediction_mask(batch)
    return None if mask is None else token_share(mask)


def token_share(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """n / mean over processes of n, with n this process's non-padding tokens; None on one process.

    A token-mean loss term computed per process and averaged over processes (as DDP averages
    gradients) weighs each process's tokens by 1 / its own count. Scaled by this share, the average
    is sum over all tokens / all tokens: the global token mean one process computes on the whole
    batch. One all-reduce of a scalar, on the device (no host synchronisation).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    processes = torch.distributed.get_world_size()
    if processes == 1:
        return None
    tokens = attention_mask.detach().bool().sum().float()
    total = tokens.clone()
    torch.distributed.all_reduce(total)
    return tokens * processes / total
