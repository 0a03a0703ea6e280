"""One training loop for teacher fine-tuning and student distillation, on one process or several.

The loop knows no model family: it gets the loss of a batch, an evaluation and the name of the
dev metric as callables (:class:`Loop`). AdamW with linear warm-up and decay, gradient clipping,
periodic dev evaluation, the best checkpoint by the dev metric, optional early stop, bf16 autocast on CUDA,
optional ``torch.compile``, resumable from ``checkpoints/last``. Loss values stay on the
device and are read only at log intervals, so the step itself never waits for the host.

Several processes. Every run goes through one Hugging Face ``accelerate.Accelerator``: a plain
``layergeo train`` is the case N = 1, and ``accelerate launch --num_processes N -m layergeo.cli
train ...`` (or ``torchrun --nproc_per_node N -m layergeo.cli train ...``) runs the very same code
on N processes, with DDP (or FSDP from an accelerate config). What N changes, and what it does not:

* Batches are split (``split_batches``): the global batch stays ``batch_size`` (N must divide it)
  and process r gets rows [r B/N, (r+1) B/N) of exactly the batch one process would get, in the
  same order (the per-epoch shuffle seed is (seed, epoch) either way). Only when the train split
  is not a multiple of ``batch_size`` does N > 1 differ: accelerate fills the last, short batch
  of an epoch up to ``batch_size`` with the epoch's first examples, so every process gets as many.
* The loss is the same function of the global batch. CE and KL are means over examples, equal
  on every process, so the mean over processes is the global mean. The hidden term is a mean over
  non-padding tokens, which differ between processes: each process scales its term by its share
  of the batch's tokens (n_r / mean_r n_r, one all-reduce of a scalar per step), so the average
  DDP takes is the global token mean, as on one process (with ``loss.normalize=layernorm`` the
  standardisation statistics stay per process). Without dropout, 1 and N processes therefore
  train the same model up to float rounding; with dropout each process draws its own masks.
* Logged loss terms are the mean over processes (one all-reduce at log steps only), i.e. the
  values one process would log. ``train.term_grad_norms`` measures each process's local
  gradient (``torch.autograd.grad`` bypasses DDP's all-reduce): the logged value is the mean over
  processes of those local norms, which on N > 1 is larger than the norm of the global gradient.
* Dev evaluation: every process evaluates its share of each dev batch through the prepared model
  and the family gathers the predictions (duplicates of a short last batch dropped),
  so every process gets the same metrics and takes the same best-checkpoint and early-stop
  decisions. Only the main process writes (config, env, metrics, mapping, checkpoints of the
  unwrapped model, results) and shows the progress bar; a failure there reaches every process
  (see :func:`on_main`) instead of leaving the others waiting. The final dev/test evaluation of
  the best checkpoint runs on the main process and its results are broadcast.
* The frozen teacher is not wrapped: each process holds it on its own device.
* Resume: ``checkpoints/last/state.pt`` holds the trainable weights (unwrapped), optimiser and
  scheduler state and every process's RNG states; a 1-process resume is exact, as before. Frozen
  weights (a LoRA student's base, frozen embeddings) are not saved: the run rebuilds them.

bf16 on CUDA is ``torch.autocast`` around the whole step (student, live teacher, loss), as the
teacher cache assumes; the Accelerator itself is told ``mixed_precision="no"`` so that it does not
also wrap the model's forward (that would run dev evaluation in bf16 and copy every hidden state
to float32).
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import gather_object
from torch import nn
from transformers import get_linear_schedule_with_warmup

from layergeo import data
from layergeo.config import OptimConfig, RunConfig
from layergeo.device import step_settings
from layergeo.errors import LayergeoError
from layergeo.processes import check_batch_size, on_main
from layergeo.progress import progress_bar
from layergeo.runs import (
    RunDir, append_jsonl, atomic_dir, environment, now, read_json, read_jsonl, truncate_jsonl, write_config, write_json,
)
from layergeo.strategies import StackMapping

StepLosses = Callable[[dict, int, int], dict[str, torch.Tensor]]  # batch, epoch, step -> {"loss", terms...}


@dataclass
class LoopState:
    """What a resumed run needs besides weights and optimiser state."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best_metric: float = -math.inf
    best_step: int = -1
    evals_since_best: int = 0
    logged_periods: list[int] = field(default_factory=list)


class Probe(Protocol):
    """Something measured along training from the live model (the geometry trace). ``record`` writes its
    rows and returns a few summary scalars for the trackers (``layergeo.tracking``)."""

    def steps(self, total: int) -> set[int]: ...
    def record(self, step: int, epoch: int = 0) -> dict[str, float]: ...
    def forget_after(self, step: int) -> None: ...


@dataclass
class Loop:
    """Everything :func:`fit` needs; the two kinds of run differ only in these callables.

    ``step_losses_for(model)`` returns the per-batch loss closure ``(batch, epoch, step) -> {"loss",
    terms...}`` that runs its forward pass through ``model``: what :func:`fit` made of ``module``
    (DDP-wrapped on several processes, compiled with ``train.compile``), so that gradients are
    synchronised. ``save_best(path)`` writes the (unwrapped) trainable module; main process only.
    """

    run: RunDir
    accelerator: Accelerator
    module: nn.Module  # all trainable parameters, unwrapped (student + projections, or the teacher)
    step_losses_for: Callable[[nn.Module], StepLosses]
    save_best: Callable[[Path], None]
    train_data: object  # an encoded split
    eval_loaders: dict  # "dev" (and "test", read with train.eval_test): batches of eval_batch_size(N); fit shards them
    tokenizer: object
    collate: Callable  # pads a list of items into a batch (the family's collator)
    evaluate: Callable[[nn.Module, object], dict]  # (model, prepared dev loader) -> metrics of every process
    metric: str  # the key of the dev metric that selects the best checkpoint (higher is better)
    optim: OptimConfig
    device: torch.device
    seed: int
    mapper: StackMapping | None = None
    term_weights: dict[str, float] = field(default_factory=dict)  # loss term -> alpha, for term_grad_norms
    env: dict | None = None  # env.json of this sitting: its time is recorded with every resumable checkpoint
    probe: Probe | None = None  # measured on the main process at step 0 and at probe.steps(total) (layergeo.trace)



def _loader(loop: Loop, epoch: int):
    return data.make_loader(
        loop.train_data, loop.tokenizer, loop.optim.batch_size, shuffle=True, seed=loop.seed * 100_003 + epoch,
        pin_memory=step_settings(loop.device).pin_memory, collate_fn=loop.collate,
    )


def total_steps(optim: OptimConfig, n_train: int) -> int:
    """The optimiser steps of a run: ``max_steps``, or ``epochs`` passes over ``n_train`` examples."""
    return optim.max_steps or math.ceil(n_train / optim.batch_size) * optim.epochs


def fit(loop: Loop, resume: bool) -> LoopState:
    """Train with periodic dev evaluation; the best checkpoint goes to ``checkpoints/best``.

    The same code for 1 and N processes (see the module docstring); call it on every process.
    """
    acc, optim = loop.accelerator, loop.optim
    main = acc.is_main_process
    check_batch_size(optim, acc.num_processes, "train")
    steps_per_epoch = math.ceil(len(loop.train_data) / optim.batch_size)
    total = total_steps(optim, len(loop.train_data))
    if total < 1:
        raise LayergeoError("the training budget is zero steps; raise train.epochs or train.max_steps")
    eval_every = optim.eval_every or steps_per_epoch
    eval_steps = set(optim.eval_steps or ())
    settings = step_settings(loop.device)
    decay = [p for n, p in loop.module.named_parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for n, p in loop.module.named_parameters() if p.requires_grad and p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=optim.lr, **settings.optimizer_kwargs,
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, int(optim.warmup_ratio * total), total)
    state = LoopState()
    last = loop.run.checkpoint("last")
    if resume and main:
        loop.run.tidy()
    acc.wait_for_everyone()
    if resume and (last / "state.pt").is_file():
        saved = torch.load(last / "state.pt", map_location=loop.device, weights_only=False)
        _load_trainable(loop.module, saved["module"], last / "state.pt")
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = LoopState(**_loop_fields(saved["loop"]))
        _restore_rng(saved, acc)
    if resume:  # forget what was logged after the state we restart from
        if main:
            truncate_jsonl(loop.run.metrics_file, lambda r: r["step"] <= state.step)
            truncate_jsonl(loop.run.mapping_file, lambda r: r["step"] < state.step)
        acc.wait_for_everyone()
        state.logged_periods = [loop.mapper.period(r["epoch"], r["step"]) for r in read_jsonl(loop.run.mapping_file)] if loop.mapper else []
    probe_at = loop.probe.steps(total) if loop.probe is not None and main else set()
    if probe_at:
        loop.probe.forget_after(state.step)
        if state.step == 0:
            acc.log(loop.probe.record(0), step=0)
    model, optimizer, scheduler = acc.prepare(loop.module, optimizer, scheduler)
    step_losses = loop.step_losses_for(torch.compile(model) if optim.compile else model)
    splits = ["dev", "test"] if optim.eval_test else ["dev"]
    eval_loaders = {split: acc.prepare_data_loader(loop.eval_loaders[split], device_placement=False) for split in splits}
    autocast = settings.autocast(loop.device)
    sums: dict[str, torch.Tensor] = {}
    window = 0
    finite = torch.ones((), dtype=torch.bool, device=loop.device)  # stays on the device: read with the logs
    bar = progress_bar(total, loop.run.path.name, initial=state.step, enabled=main)
    best = {f"best_dev_{loop.metric}": f"{state.best_metric:.3f}" if state.best_step >= 0 else "-"}
    model.train()
    while state.step < total:
        # the same batches, in the same order, as one process; each process gets its slice of each
        loader = acc.prepare_data_loader(_loader(loop, state.epoch), device_placement=False)
        try:
            for i, batch in enumerate(loader):
                if i < state.step_in_epoch:
                    continue
                if loop.mapper is not None:
                    _log_mapping(loop, state, write=main)
                # "index" stays on the host: only the teacher cache reads it, and so without waiting for the device;
                # so does a copy of the mask, which the cache checks against its stored lengths on any device
                host_mask = batch["attention_mask"] if "index" in batch else None
                batch = {k: v if k == "index" else v.to(loop.device, non_blocking=True) for k, v in batch.items()}
                if host_mask is not None:
                    batch["host_attention_mask"] = host_mask
                with autocast:
                    losses = step_losses(batch, state.epoch, state.step)
                log_now = (state.step + 1) % optim.log_every == 0 or state.step + 1 == total
                term_norms = _term_grad_norms(model, loop.term_weights, losses) if optim.term_grad_norms and log_now else {}
                optimizer.zero_grad(set_to_none=True)
                acc.backward(losses["loss"])
                losses["grad_norm"] = acc.clip_grad_norm_(model.parameters(), optim.grad_clip)
                optimizer.step()
                scheduler.step()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0) + v.detach().float()
                finite &= torch.isfinite(losses["loss"].detach()) & torch.isfinite(losses["grad_norm"].detach())
                window += 1
                state.step += 1
                state.step_in_epoch = i + 1
                bar.update(1)
                if state.step in probe_at:  # before this step's state can be saved: a resume measures it again
                    acc.log(loop.probe.record(state.step, state.epoch), step=state.step)
                evaluate_now = state.step % eval_every == 0 or state.step in eval_steps or state.step == total
                if log_now or evaluate_now:  # before anything is logged or saved from this state
                    _stop_unless_finite(finite, sums, state.step, window, acc)
                if log_now:  # the one host synchronisation of the step, at log intervals only
                    names = [*sums, *term_norms]
                    values = torch.stack([*sums.values(), *(v.detach().float() for v in term_norms.values())])
                    values = acc.reduce(values, "mean").tolist()  # mean over processes
                    record = {k: v / window if k in sums else v for k, v in zip(names, values)}
                    lr = scheduler.get_last_lr()[0]
                    if main:
                        append_jsonl(loop.run.metrics_file, {"step": state.step, "epoch": state.epoch, "lr": lr, **record})
                    acc.log({f"train/{k}": v for k, v in {"lr": lr, **record}.items()}, step=state.step)  # trackers, if any
                    bar.set_postfix(loss=f"{record['loss']:.3f}", **best)
                    sums, window = {}, 0
                if evaluate_now:
                    evaluated = {split: loop.evaluate(model, loader) for split, loader in eval_loaders.items()}
                    if main:
                        for split, values in evaluated.items():
                            append_jsonl(loop.run.metrics_file, {"step": state.step, "epoch": state.epoch, "split": split, **values})
                    acc.log({f"{split}/{k}": v for split, values in evaluated.items() for k, v in values.items()
                             if isinstance(v, (int, float))}, step=state.step)
                    metrics = evaluated["dev"]
                    if metrics[loop.metric] > state.best_metric:
                        state.best_metric, state.best_step, state.evals_since_best = metrics[loop.metric], state.step, 0
                        if main:
                            with atomic_dir(loop.run.checkpoint("best")) as tmp:
                                loop.save_best(tmp)
                    else:
                        state.evals_since_best += 1
                    _save_last(last, acc, loop.module, optimizer, scheduler, state)
                    if main and loop.env is not None:
                        record_sitting(loop.env)
                        write_env(loop.run, loop.env)
                    best = {f"best_dev_{loop.metric}": f"{state.best_metric:.3f}"}
                    bar.set_postfix(**best)
                    if optim.early_stop and state.evals_since_best >= optim.early_stop:
                        total = state.step
                if state.step >= total:
                    break
            else:
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
        finally:
            loader.end()  # unregister it from accelerate's state even when we leave it early
    bar.close()
    if probe_at and state.step not in probe_at:  # an early stop: the last state is measured too
        acc.log(loop.probe.record(state.step, state.epoch), step=state.step)
    return state


def _stop_unless_finite(finite: torch.Tensor, sums: dict[str, torch.Tensor], step: int, window: int, acc: Accelerator) -> None:
    """Raise one line naming the step window and the loss terms that stopped being finite (any process)."""
    bad = acc.reduce((~finite).float(), "sum")
    if float(bad) == 0:
        return
    terms = [k for k, v in sums.items() if not torch.isfinite(acc.reduce(v.detach(), "sum"))] or ["grad_norm"]
    first = step - window + 1
    raise LayergeoError(
        f"the loss stopped being finite ({', '.join(terms)} not finite within steps {first}..{step}); nothing from "
        "those steps was saved: lower the learning rate, or check loss.temperature and the data"
    )


def _term_grad_norms(model: nn.Module, weights: dict[str, float], losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gradient norm of each weighted loss term on this batch: grad_norm_<term> = alpha * |d term / d theta|.

    On several processes this is the norm of this process's local gradient (torch.autograd.grad
    does not go through DDP's all-reduce); fit logs the mean over processes.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    norms = {}
    for name, weight in weights.items():
        if name in losses and losses[name].requires_grad:
            grads = torch.autograd.grad(losses[name], params, retain_graph=True, allow_unused=True)
            norms[f"grad_norm_{name}"] = weight * torch.linalg.vector_norm(torch.stack([g.norm() for g in grads if g is not None]))
    return norms


def _rng_state() -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None}


def _restore_rng(saved: dict, acc: Accelerator) -> None:
    per_process = saved.get("rng_per_process")
    if per_process and len(per_process) == acc.num_processes:
        mine = per_process[acc.process_index]
        torch.set_rng_state(mine["cpu"].cpu())
        if mine["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(mine["cuda"].cpu())
    else:  # written by an older layergeo or by another number of processes
        torch.set_rng_state(saved["rng"].cpu())


def _loop_fields(saved: dict) -> dict:
    """A saved LoopState's fields (``best_accuracy`` was the name of ``best_metric`` before families)."""
    saved = dict(saved)
    if "best_accuracy" in saved:
        saved["best_metric"] = saved.pop("best_accuracy")
    return saved


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (a LoRA student: its adapter and projections). The frozen rest is
    rebuilt exactly when a run resumes (a copy of the teacher, or a seeded random init)."""
    return {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}


def _load_trainable(module: nn.Module, saved: dict[str, torch.Tensor], where: Path) -> None:
    """Load a :func:`trainable_state` (or a full state dict written by an older layergeo) into ``module``."""
    result = module.load_state_dict(saved, strict=False)
    missing = set(result.missing_keys) & set(trainable_state(module))
    if result.unexpected_keys or missing:
        names = sorted(missing) or result.unexpected_keys
        raise LayergeoError(f"{where} does not fit this run's model ({names[0]} {'missing' if missing else 'unexpected'}); "
                            "it was written by another configuration: start the run again without --resume")


def _save_last(path: Path, acc: Accelerator, module: nn.Module, optimizer, scheduler, state: LoopState) -> None:
    rngs = gather_object([_rng_state()]) if acc.num_processes > 1 else [_rng_state()]
    if not acc.is_main_process:
        return
    with atomic_dir(path) as tmp:
        torch.save(
            {
                "module": trainable_state(module),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "loop": vars(state),
                "rng": torch.get_rng_state(),
                "rng_per_process": rngs,
            },
            tmp / "state.pt",
        )


def _log_mapping(loop: Loop, state: LoopState, write: bool = True) -> None:
    period = loop.mapper.period(state.epoch, state.step)
    if period not in state.logged_periods:
        state.logged_periods.append(period)
        if write:
            pairs = loop.mapper.logged(state.epoch, state.step)
            append_jsonl(loop.run.mapping_file, {"epoch": state.epoch, "step": state.step, "strategy": loop.mapper.name, "pairs": pairs})


def finish_run(run: RunDir, env: dict, loop: Loop, state: LoopState, evaluate_best: Callable[[], dict], extra: dict) -> dict:
    """On the main process: evaluate the best checkpoint, write env.json and results.json. Every process gets the results."""

    def finish() -> dict:
        results = {**extra, "best_step": state.best_step, "steps": state.step, **evaluate_best()}
        record_sitting(env, end=True)
        results["wall_time_s"] = env["wall_time_s"]
        write_env(run, env)
        write_json(run.results_file, results)  # the run is finished from here: "last" is no longer needed
        shutil.rmtree(run.checkpoint("last"), ignore_errors=True)
        return results

    return on_main(loop.accelerator, finish)


def start_env(run: RunDir, config: RunConfig, kind: str, device: torch.device, resume: bool, state: PartialState,
           **recorded) -> dict:
    """env.json for this sitting: the first sitting's record, plus every earlier sitting of a resumed run.

    ``sittings`` lists each sitting's start, last sign of life (``seen``), command, device, threads,
    processes, git commit and versions (the top-level ones are the last sitting's); ``wall_time_s`` is their sum,
    so a run resumed after a kill reports all of its time.
    """
    env = environment(kind, str(device), config.seed)
    env["processes"] = state.num_processes
    env.update(recorded)
    earlier = read_json(run.env_file).get("sittings", []) if resume and run.env_file.is_file() else []
    env["sittings"] = earlier + [{k: env[k] for k in ("start", "command", "device", "threads", "processes", "git_commit", "versions")}]
    if earlier:
        env["resumed"] = True
        env["start"] = earlier[0]["start"]
    env["_t0"] = time.time()
    record_sitting(env)

    def write() -> None:
        run.path.mkdir(parents=True, exist_ok=True)
        write_config(run, config)
        write_env(run, env)

    on_main(state, write)
    return env


def write_env(run: RunDir, env: dict) -> None:
    write_json(run.env_file, {k: v for k, v in env.items() if not k.startswith("_")})


def record_sitting(env: dict, end: bool = False) -> None:
    """Update this sitting's last sign of life, the wall time summed over all sittings and, for a traced run, the
    trace's time summed over them (``trace.seconds``; a sitting's own is its ``trace_s``)."""
    sitting = env["sittings"][-1]
    sitting["seen"] = now()
    sitting["wall_time_s"] = round(time.time() - env["_t0"], 1)
    env["wall_time_s"] = round(sum(s.get("wall_time_s", 0.0) for s in env["sittings"]), 1)
    if env.get("trace", {}).get("used"):
        env["trace"]["seconds"] = round(sum(s.get("trace_s", 0.0) for s in env["sittings"]), 3)
    if end:
        env["end"] = sitting["seen"]
        env.pop("_t0")
