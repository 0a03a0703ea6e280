"""One training loop for teacher fine-tuning and student distillation, on one process or several.

AdamW with linear warm-up and decay, gradient clipping, periodic dev evaluation,
the best checkpoint by dev accuracy, optional early stop, bf16 autocast on CUDA,
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
  and ``gather_for_metrics`` collects the predictions (duplicates of a short last batch dropped),
  so every process gets the same metrics and takes the same best-checkpoint and early-stop
  decisions. Only the main process writes (config, env, metrics, mapping, checkpoints of the
  unwrapped model, results) and shows the progress bar; a failure there reaches every process
  (see :func:`on_main`) instead of leaving the others waiting. The final dev/test evaluation of
  the best checkpoint runs on the main process and its results are broadcast.
* The frozen teacher is not wrapped: each process holds it on its own device.
* Resume: ``checkpoints/last/state.pt`` holds the unwrapped weights, optimiser and scheduler
  state and every process's RNG states; a 1-process resume is exact, as before.

bf16 on CUDA is ``torch.autocast`` around the whole step (student, live teacher, loss), as the
teacher cache assumes; the Accelerator itself is told ``mixed_precision="no"`` so that it does not
also wrap the model's forward (that would run dev evaluation in bf16 and copy every hidden state
to float32).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DistributedType,
    broadcast_object_list,
    extract_model_from_parallel,
    gather_object,
)
from sklearn.metrics import f1_score
from torch import nn
from transformers import AutoConfig, PreTrainedModel, get_linear_schedule_with_warmup, set_seed

from layergeo import data
from layergeo.cache import TeacherCache, teacher_digest
from layergeo.config import OptimConfig, RunConfig
from layergeo.errors import LayergeoError
from layergeo.losses import hidden_matching_loss, kl_to_teacher
from layergeo.models import (
    EMBEDDED_TEACHER,
    Student,
    build_student,
    depth,
    embedded_teacher_path,
    load_checkpoint,
    load_pretrained,
    require_hub,
    student_config,
    tiny_bert_config,
    width,
)
from layergeo.device import step_settings
from layergeo.progress import progress_bar
from layergeo.runs import (
    RunDir, append_jsonl, atomic_dir, environment, now, read_json, read_jsonl, truncate_jsonl, write_config, write_json,
)
from layergeo.strategies import Mapper, build_mapper, forward_targets

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
EVAL_BATCH_SIZE = 64
T = TypeVar("T")
StepLosses = Callable[[dict, int, int], dict[str, torch.Tensor]]  # batch, epoch, step -> {"loss", terms...}


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise LayergeoError(f"device {spec!r} asked for but no CUDA GPU is visible; use --set device=cpu")
    try:
        return torch.device(spec)
    except RuntimeError:
        raise LayergeoError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from None


# --------------------------------------------------------------------------------------------
# Processes


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


def make_accelerator(device: torch.device, find_unused_parameters: bool = False) -> Accelerator:
    """The run's Accelerator: split batches (global batch = ``batch_size``), no accelerate autocast."""
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else []
    return Accelerator(
        cpu=device.type == "cpu", mixed_precision="no", kwargs_handlers=handlers,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
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


# --------------------------------------------------------------------------------------------
# Data and evaluation


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


def teacher_run_dir(config: RunConfig, out: Path) -> Path:
    return Path(config.teacher.dir) if config.teacher.dir else out / "teacher"


def load_task(config: RunConfig) -> data.TaskData:
    """The configured task with its deterministic caps on train and eval examples."""
    cap = config.data.max_eval
    return data.load_task(config.data.task, max_examples={"train": config.data.max_train, "dev": cap, "test": cap}, seed=config.seed)


def encode_splits(config: RunConfig, task: data.TaskData, tokenizer) -> dict[str, data.EncodedSplit]:
    return {s: data.encode(df, tokenizer, task.text_columns, config.data.max_length) for s, df in task.splits.items()}


@torch.inference_mode()
def evaluate(model: nn.Module, loader, device: torch.device, num_labels: int, accelerator: Accelerator | None = None) -> dict[str, float]:
    """Accuracy (and macro-F1 when there are more than two classes) of ``model`` on ``loader``, with
    the accuracy of always answering the most common label and the number of distinct predicted
    labels (1 means the model collapsed to a single class).

    With an ``accelerator`` of several processes, ``loader`` is a prepared (sharded) loader and
    the predictions of all processes are gathered: every process returns the full-split metrics.
    """
    was_training = model.training
    model.eval()
    gather = accelerator is not None and accelerator.num_processes > 1
    predictions, labels = [], []
    for batch in loader:
        logits = model(**{k: v.to(device) for k, v in model_inputs(batch).items()}).logits
        predicted, label = logits.argmax(-1), batch["labels"]
        if gather:
            predicted, label = accelerator.gather_for_metrics((predicted, label.to(device)))
        predictions.append(predicted.cpu())
        labels.append(label.cpu())
    model.train(was_training)
    y_pred, y_true = torch.cat(predictions).numpy(), torch.cat(labels).numpy()
    metrics = {"accuracy": float((y_pred == y_true).mean()), "n": int(len(y_true)),
               "majority_rate": float(np.bincount(y_true).max() / len(y_true)), "predicted_classes": int(len(np.unique(y_pred)))}
    if num_labels > 2:
        metrics["macro_f1"] = float(f1_score(y_true, y_pred, average="macro", labels=list(range(num_labels))))
    return metrics


# --------------------------------------------------------------------------------------------
# The loop


@dataclass
class LoopState:
    """What a resumed run needs besides weights and optimiser state."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best_accuracy: float = -1.0
    best_step: int = -1
    evals_since_best: int = 0
    logged_periods: list[int] = field(default_factory=list)


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
    dev_loader: object  # batches of eval_batch_size(N); fit shards it over the processes
    tokenizer: object
    num_labels: int
    optim: OptimConfig
    device: torch.device
    seed: int
    mapper: Mapper | None = None
    term_weights: dict[str, float] = field(default_factory=dict)  # loss term -> alpha, for term_grad_norms
    env: dict | None = None  # env.json of this sitting: its time is recorded with every resumable checkpoint


def _loader(loop: Loop, epoch: int):
    return data.make_loader(
        loop.train_data, loop.tokenizer, loop.optim.batch_size, shuffle=True, seed=loop.seed * 100_003 + epoch,
        pin_memory=step_settings(loop.device).pin_memory,
    )


def fit(loop: Loop, resume: bool) -> LoopState:
    """Train with periodic dev evaluation; the best checkpoint goes to ``checkpoints/best``.

    The same code for 1 and N processes (see the module docstring); call it on every process.
    """
    acc, optim = loop.accelerator, loop.optim
    main = acc.is_main_process
    check_batch_size(optim, acc.num_processes, "train")
    steps_per_epoch = math.ceil(len(loop.train_data) / optim.batch_size)
    total = optim.max_steps or steps_per_epoch * optim.epochs
    if total < 1:
        raise LayergeoError("the training budget is zero steps; raise train.epochs or train.max_steps")
    eval_every = optim.eval_every or steps_per_epoch
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
        loop.module.load_state_dict(saved["module"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = LoopState(**saved["loop"])
        _restore_rng(saved, acc)
    if resume:  # forget what was logged after the state we restart from
        if main:
            truncate_jsonl(loop.run.metrics_file, lambda r: r["step"] <= state.step)
            truncate_jsonl(loop.run.mapping_file, lambda r: r["step"] < state.step)
        acc.wait_for_everyone()
        state.logged_periods = [loop.mapper.period(r["epoch"], r["step"]) for r in read_jsonl(loop.run.mapping_file)] if loop.mapper else []
    model, optimizer, scheduler = acc.prepare(loop.module, optimizer, scheduler)
    step_losses = loop.step_losses_for(torch.compile(model) if optim.compile else model)
    dev_loader = acc.prepare_data_loader(loop.dev_loader, device_placement=False)
    autocast = settings.autocast(loop.device)
    sums: dict[str, torch.Tensor] = {}
    window = 0
    finite = torch.ones((), dtype=torch.bool, device=loop.device)  # stays on the device: read with the logs
    bar = progress_bar(total, loop.run.path.name, initial=state.step, enabled=main)
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
                evaluate_now = state.step % eval_every == 0 or state.step == total
                if log_now or evaluate_now:  # before anything is logged or saved from this state
                    _stop_unless_finite(finite, sums, state.step, window, acc)
                if log_now:  # the one host synchronisation of the step, at log intervals only
                    names = [*sums, *term_norms]
                    values = torch.stack([*sums.values(), *(v.detach().float() for v in term_norms.values())])
                    values = acc.reduce(values, "mean").tolist()  # mean over processes
                    record = {k: v / window if k in sums else v for k, v in zip(names, values)}
                    if main:
                        append_jsonl(loop.run.metrics_file, {"step": state.step, "epoch": state.epoch, "lr": scheduler.get_last_lr()[0], **record})
                    bar.set_postfix(loss=f"{record['loss']:.3f}", best_dev_acc=f"{max(state.best_accuracy, 0):.3f}")
                    sums, window = {}, 0
                if evaluate_now:
                    metrics = evaluate(model, dev_loader, loop.device, loop.num_labels, acc)
                    if main:
                        append_jsonl(loop.run.metrics_file, {"step": state.step, "epoch": state.epoch, "split": "dev", **metrics})
                    if metrics["accuracy"] > state.best_accuracy:
                        state.best_accuracy, state.best_step, state.evals_since_best = metrics["accuracy"], state.step, 0
                        if main:
                            with atomic_dir(loop.run.checkpoint("best")) as tmp:
                                loop.save_best(tmp)
                    else:
                        state.evals_since_best += 1
                    _save_last(last, acc, loop.module, optimizer, scheduler, state)
                    if main and loop.env is not None:
                        _record_sitting(loop.env)
                        write_env(loop.run, loop.env)
                    bar.set_postfix(best_dev_acc=f"{state.best_accuracy:.3f}")
                    if optim.early_stop and state.evals_since_best >= optim.early_stop:
                        total = state.step
                if state.step >= total:
                    break
            else:
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
        finally:
            loader.end()  # unregister it from accelerate's state even when we leave it early
    bar.close()
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


def _save_last(path: Path, acc: Accelerator, module: nn.Module, optimizer, scheduler, state: LoopState) -> None:
    rngs = gather_object([_rng_state()]) if acc.num_processes > 1 else [_rng_state()]
    if not acc.is_main_process:
        return
    with atomic_dir(path) as tmp:
        torch.save(
            {
                "module": module.state_dict(),
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
            pairs = loop.mapper.pairs_at(state.epoch, state.step)
            append_jsonl(loop.run.mapping_file, {"epoch": state.epoch, "step": state.step, "strategy": loop.mapper.name, "pairs": pairs})


def _finish(run: RunDir, env: dict, loop: Loop, state: LoopState, evaluate_best: Callable[[], dict], extra: dict) -> dict:
    """On the main process: evaluate the best checkpoint, write env.json and results.json. Every process gets the results."""

    def finish() -> dict:
        results = {**extra, "best_step": state.best_step, "steps": state.step, **evaluate_best()}
        _record_sitting(env, end=True)
        results["wall_time_s"] = env["wall_time_s"]
        write_env(run, env)
        write_json(run.results_file, results)  # the run is finished from here: "last" is no longer needed
        shutil.rmtree(run.checkpoint("last"), ignore_errors=True)
        return results

    return on_main(loop.accelerator, finish)


def _start(run: RunDir, config: RunConfig, kind: str, device: torch.device, resume: bool, state: PartialState,
           **recorded) -> dict:
    """env.json for this sitting: the first sitting's record, plus every earlier sitting of a resumed run.

    ``sittings`` lists each sitting's start, last sign of life (``seen``), command, device, threads
    and processes; ``wall_time_s`` is their sum, so a run resumed after a kill reports all of its time.
    """
    env = environment(kind, str(device), config.seed)
    env["processes"] = state.num_processes
    env.update(recorded)
    earlier = read_json(run.env_file).get("sittings", []) if resume and run.env_file.is_file() else []
    env["sittings"] = earlier + [{k: env[k] for k in ("start", "command", "device", "threads", "processes")}]
    if earlier:
        env["resumed"] = True
        env["start"] = earlier[0]["start"]
    env["_t0"] = time.time()
    _record_sitting(env)

    def write() -> None:
        run.path.mkdir(parents=True, exist_ok=True)
        write_config(run, config)
        write_env(run, env)

    on_main(state, write)
    return env


def write_env(run: RunDir, env: dict) -> None:
    write_json(run.env_file, {k: v for k, v in env.items() if not k.startswith("_")})


def _record_sitting(env: dict, end: bool = False) -> None:
    """Update this sitting's last sign of life and the wall time summed over all sittings."""
    sitting = env["sittings"][-1]
    sitting["seen"] = now()
    sitting["wall_time_s"] = round(time.time() - env["_t0"], 1)
    env["wall_time_s"] = round(sum(s.get("wall_time_s", 0.0) for s in env["sittings"]), 1)
    if end:
        env["end"] = sitting["seen"]
        env.pop("_t0")


def fine_tune_teacher(config: RunConfig, out: Path, resume: bool = False) -> dict:
    """Fine-tune ``config.teacher.model`` on ``config.data.task`` into the run directory ``out``."""
    state, device = distributed_state(config.device)
    check_batch_size(config.teacher.train, state.num_processes, "teacher.train")
    set_seed(config.seed)
    run = RunDir(out)
    task = load_task(config)
    model, tokenizer = load_pretrained(config.teacher.model, task.num_labels)
    env = _start(run, config, "teacher", device, resume, state)
    model.config.id2label = dict(enumerate(task.label_names))
    model.config.label2id = {n: i for i, n in enumerate(task.label_names)}
    model.to(device)
    encoded = encode_splits(config, task, tokenizer)
    eval_loader = {s: data.make_loader(encoded[s], tokenizer, EVAL_BATCH_SIZE, shuffle=False, seed=0) for s in ("dev", "test")}
    dev_loader = data.make_loader(encoded["dev"], tokenizer, eval_batch_size(state.num_processes), shuffle=False, seed=0)

    def step_losses_for(module: nn.Module) -> StepLosses:
        def step_losses(batch, epoch, step):
            loss = F.cross_entropy(module(**model_inputs(batch)).logits.float(), batch["labels"])
            return {"loss": loss}

        return step_losses

    def save_best(path: Path) -> None:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)

    loop = Loop(run=run, accelerator=make_accelerator(device), module=model, step_losses_for=step_losses_for,
                save_best=save_best, train_data=encoded["train"], dev_loader=dev_loader, tokenizer=tokenizer,
                num_labels=task.num_labels, optim=config.teacher.train, device=device, seed=config.seed, env=env)
    loop_state = fit(loop, resume)

    def evaluate_best():
        best, _ = load_checkpoint(run.checkpoint("best"))
        best.to(device)
        return {s: evaluate(best, eval_loader[s], device, task.num_labels) for s in ("dev", "test")}

    return _finish(run, env, loop, loop_state, evaluate_best, {"kind": "teacher", "task": task.name, "labels": list(task.label_names)})


def owns_teacher(config: RunConfig, out: Path) -> bool:
    """Whether the run trains its own teacher into ``<out>/teacher`` (teacher.dir empty, or that folder)."""
    return not config.teacher.dir or Path(config.teacher.dir).resolve() == (Path(out) / "teacher").resolve()


def _teacher_model_config(spec: str):
    """The config of teacher model ``spec`` (minilm, tiny-bert, a folder or a hub name), read without weights."""
    if spec == "tiny-bert":
        return tiny_bert_config(2, 2)
    path = embedded_teacher_path() if spec == EMBEDDED_TEACHER else spec
    require_hub(path)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise LayergeoError(f"cannot read the config of teacher model {spec!r} ({reason}); offline, use the embedded "
                            "default 'minilm'") from None


def teacher_model_config(config: RunConfig, out: Path):
    """The config of the teacher a student run will use: its finished checkpoint, or the model it will fine-tune."""
    teacher_dir = teacher_run_dir(config, out)
    best = RunDir(teacher_dir).checkpoint("best")
    if RunDir(teacher_dir).finished and (best / "config.json").is_file():
        try:
            return AutoConfig.from_pretrained(best)
        except (OSError, ValueError) as exc:
            raise LayergeoError(f"the teacher checkpoint {best} is damaged ({exc.__class__.__name__}); restore it "
                                "or fine-tune the teacher again") from None
    if not owns_teacher(config, out):
        raise LayergeoError(
            f"teacher directory {teacher_dir} holds no finished teacher run; create it with "
            f"layergeo teacher --out {teacher_dir}, or leave teacher.dir empty to train one"
        )
    return _teacher_model_config(config.teacher.model)


def teacher_depth(config: RunConfig, out: Path) -> int:
    """Depth of the teacher a student run will use, read without loading weights."""
    return depth(teacher_model_config(config, out))


def _check_max_length(config: RunConfig, model_config) -> None:
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None and config.data.max_length > int(limit):
        raise LayergeoError(f"data.max_length={config.data.max_length} is above the teacher's limit of {limit} "
                            f"positions; choose data.max_length <= {limit}")


def validate_teacher_config(config: RunConfig) -> data.TaskData:
    """Check a teacher run before any file is written: device, processes, model, data. Returns the task."""
    state, _ = distributed_state(config.device)
    check_batch_size(config.teacher.train, state.num_processes, "teacher.train")
    _check_max_length(config, _teacher_model_config(config.teacher.model))
    return load_task(config)


def validate_student_config(config: RunConfig, out: Path) -> tuple[Mapper, data.TaskData]:
    """Check everything that can be checked before any file is written; return the mapper and the task."""
    teacher_config = teacher_model_config(config, out)
    teacher_layers = depth(teacher_config)
    if config.student.layers > teacher_layers:
        raise LayergeoError(
            f"the student ({config.student.layers} layers) is deeper than its teacher ({teacher_layers} layers); "
            f"choose student.layers <= {teacher_layers}"
        )
    mapper = build_mapper(config.matching, teacher_layers, config.student.layers, config.seed)
    for k in config.student.copy_layers or []:
        if not 1 <= k <= teacher_layers:
            raise LayergeoError(f"student.copy_layers: teacher layer {k} is out of range 1..{teacher_layers}")
    if config.student.copy_layers is not None and len(config.student.copy_layers) != config.student.layers:
        raise LayergeoError(f"student.copy_layers names {len(config.student.copy_layers)} teacher layers for a "
                            f"{config.student.layers}-layer student; give one per student layer")
    if config.student.init == "copy" and config.student.hidden_size not in (None, width(teacher_config)):
        raise LayergeoError("student.init=copy needs the teacher's width; use student.init=random for a narrower student")
    if config.student.hidden_size is not None:
        student_config(teacher_config, config.student)  # heads must divide the width
    state, _ = distributed_state(config.device)
    check_batch_size(student_optim(config), state.num_processes, "train")
    if owns_teacher(config, out) and not RunDir(teacher_run_dir(config, out)).finished:
        check_batch_size(config.teacher.train, state.num_processes, "teacher.train")
    _check_max_length(config, teacher_config)
    labels = getattr(teacher_config, "num_labels", None) if RunDir(teacher_run_dir(config, out)).finished else None
    task = load_task(config)
    if labels is not None and labels != task.num_labels:
        raise LayergeoError(f"the teacher in {teacher_run_dir(config, out)} predicts {labels} labels but {task.name} "
                            f"has {task.num_labels}; fine-tune a teacher on this task")
    return mapper, task


def student_optim(config: RunConfig) -> OptimConfig:
    """``config.train`` with the random-init learning rate and epochs applied when the student is random."""
    optim = config.train
    if config.student.init != "random":
        return optim
    return dataclasses.replace(optim, lr=optim.random_init_lr or optim.lr, epochs=optim.random_init_epochs or optim.epochs)


def distil_student(config: RunConfig, out: Path, resume: bool = False) -> dict:
    """Distil a student of the teacher into the run directory ``out`` (training the teacher first if needed)."""
    mapper, task = validate_student_config(config, out)
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
    teacher, tokenizer = load_checkpoint(RunDir(teacher_dir).checkpoint("best"))
    encoded = encode_splits(config, task, tokenizer)
    if teacher.config.num_labels != task.num_labels:
        raise LayergeoError(
            f"the teacher in {teacher_dir} predicts {teacher.config.num_labels} labels but {task.name} has "
            f"{task.num_labels}; fine-tune a teacher on this task"
        )
    env = _start(run, config, "student", device, resume, state, teacher_sha256=teacher_digest(RunDir(teacher_dir).checkpoint("best")))
    copy_layers = config.student.copy_layers or forward_targets(depth(teacher.config), config.student.layers)
    student = build_student(teacher, config.student, mapper.student_states(), copy_layers)
    student.model.config.id2label, student.model.config.label2id = teacher.config.id2label, teacher.config.label2id

    def save_init() -> None:
        if not resume or not run.checkpoint("init").is_dir():
            with atomic_dir(run.checkpoint("init")) as tmp:
                student.save(tmp, tokenizer)

    on_main(state, save_init)
    teacher.to(device).eval()
    student.to(device)
    eval_loader = {s: data.make_loader(encoded[s], tokenizer, EVAL_BATCH_SIZE, shuffle=False, seed=0) for s in ("dev", "test")}
    dev_loader = data.make_loader(encoded["dev"], tokenizer, eval_batch_size(state.num_processes), shuffle=False, seed=0)
    cache = None

    def open_cache() -> None:
        nonlocal cache
        cache = open_teacher_cache(config, teacher_dir, teacher, tokenizer, task.name, encoded["train"], mapper)

    on_main(state, open_cache)  # the main process builds it when needed; the others then only open it
    if not state.is_main_process:
        open_cache()
    env["teacher_cache"] = cache.describe() if cache is not None else {"used": False}
    if cache is not None and device.type == "cuda":
        teacher.cpu()  # only its config is needed from here on
    _, match = _teacher_needs(mapper, config)
    unused_projections = len(student.projections) > 0 and not match  # kept for the geometry, never trained
    accelerator = make_accelerator(device, find_unused_parameters=unused_projections)
    if accelerator.distributed_type == DistributedType.FSDP and len(student.projections):
        raise LayergeoError("a narrower student's projections run outside the student's forward pass, which FSDP "
                            "does not allow; distil it with DDP (no FSDP config) or give it the teacher's width")

    def step_losses_for(module: nn.Module) -> StepLosses:
        return distillation_losses(module, teacher, mapper, config, cache=cache)

    loss = config.loss
    loop = Loop(run=run, accelerator=accelerator, module=student, step_losses_for=step_losses_for,
                save_best=lambda path: student.save(path, tokenizer), train_data=encoded["train"], dev_loader=dev_loader,
                tokenizer=tokenizer, num_labels=task.num_labels, optim=student_optim(config), device=device,
                seed=config.seed, mapper=mapper, env=env,
                term_weights={"ce": loss.alpha_ce, "kl": loss.alpha_kl, "hidden": loss.alpha_hidden})
    loop_state = fit(loop, resume)

    def evaluate_best():
        best, _ = Student.load(run.checkpoint("best"), width(teacher.config))
        best.to(device)
        return {s: evaluate(best.model, eval_loader[s], device, task.num_labels) for s in ("dev", "test")}

    extra = {"kind": "student", "task": task.name, "strategy": mapper.name, "init": config.student.init,
             "student_layers": config.student.layers, "teacher_layers": depth(teacher.config), "seed": config.seed,
             "teacher_results": RunDir(teacher_dir).results(), "teacher_cache": env["teacher_cache"],
             "teacher_sha256": env["teacher_sha256"]}
    return _finish(run, env, loop, loop_state, evaluate_best, extra)


def _teacher_needs(mapper: Mapper, config: RunConfig) -> tuple[bool, bool]:
    """(whether the loss reads the teacher at all, whether it matches hidden states)."""
    match = config.loss.alpha_hidden > 0 and mapper.name != "none"
    return config.loss.alpha_kl > 0 or match, match


def open_teacher_cache(
    config: RunConfig, teacher_dir: Path, teacher: PreTrainedModel, tokenizer, task_name: str,
    train_data: data.EncodedSplit, mapper: Mapper,
) -> TeacherCache | None:
    """The teacher's train-split outputs from ``<teacher run>/cache/`` when ``train.teacher_cache`` is on.

    Stores (or reuses) the logits and the states the run can ever match: all of them for rail,
    the targets of a fixed strategy, none when no hidden state is matched. None when the option
    is off or the loss never reads the teacher.
    """
    need_teacher, match = _teacher_needs(mapper, config)
    if not config.train.teacher_cache or not need_teacher:
        return None
    with torch.random.fork_rng(devices=[]):  # building draws nothing, but the student's RNG stream must not move
        return TeacherCache.open_or_build(
            teacher, tokenizer, train_data, checkpoint=RunDir(teacher_dir).checkpoint("best"), task=task_name,
            split="train", max_length=config.data.max_length, layers=mapper.teacher_states() if match else [],
            dtype=config.train.cache_dtype, root=Path(teacher_dir) / "cache",
        )


TeacherOutputs = Callable[[dict, list[int]], tuple[torch.Tensor, "tuple[torch.Tensor, ...] | dict[int, torch.Tensor]"]]


def live_teacher(teacher: PreTrainedModel, hidden_states: bool) -> TeacherOutputs:
    """(batch, layers) -> the teacher's logits and hidden states, computed now (``layers`` unused)."""

    def outputs(batch, layers):
        with torch.no_grad():
            out = teacher(**model_inputs(batch), output_hidden_states=hidden_states)
        return out.logits, out.hidden_states

    return outputs


def cached_teacher(cache: TeacherCache) -> TeacherOutputs:
    """(batch, layers) -> the teacher's logits and states ``layers`` for ``batch["index"]``, read from the cache."""

    def outputs(batch, layers):
        return cache.lookup(batch["index"], batch["attention_mask"], layers, host_mask=batch.get("host_attention_mask"))

    return outputs


def distillation_losses(student: nn.Module, teacher: PreTrainedModel, mapper: Mapper, config: RunConfig,
                        cache: TeacherCache | None = None) -> StepLosses:
    """The per-batch loss of distillation: CE + T^2 KL + alpha * hidden matching (each term returned).

    ``student`` is the module the forward pass goes through: a :class:`Student`, or what
    :func:`fit` made of it (DDP-wrapped, compiled); the projections are read from the Student
    inside. The teacher's outputs come from ``cache`` when given (batches must carry "index"),
    else from running ``teacher`` on the batch; the loss arithmetic is the same either way. On
    several processes the hidden term is scaled by this process's share of the batch's tokens
    (see :func:`token_share`).
    """
    loss_cfg = config.loss
    need_teacher, match = _teacher_needs(mapper, config)
    teacher_outputs = cached_teacher(cache) if cache is not None else live_teacher(teacher, match)
    project = extract_model_from_parallel(student, keep_torch_compile=False).project

    def step_losses(batch, epoch, step):
        inputs = model_inputs(batch)
        out = student(**inputs)
        terms = {"ce": F.cross_entropy(out.logits.float(), batch["labels"])}
        total = loss_cfg.alpha_ce * terms["ce"]
        if need_teacher:
            pairs = mapper.pairs_at(epoch, step) if match else []
            teacher_logits, teacher_states = teacher_outputs(batch, sorted({t for _, t in pairs}))
            terms["kl"] = kl_to_teacher(out.logits, teacher_logits, loss_cfg.temperature)
            total = total + loss_cfg.alpha_kl * terms["kl"]
        if match:
            terms["hidden"] = hidden_matching_loss(
                out.hidden_states, teacher_states, pairs, inputs["attention_mask"], project, loss_cfg.normalize,
            )
            share = token_share(inputs["attention_mask"])
            if share is not None:
                terms["hidden"] = terms["hidden"] * share
            total = total + loss_cfg.alpha_hidden * terms["hidden"]
        return {"loss": total, **terms}

    return step_losses


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
