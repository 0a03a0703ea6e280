"""One training loop for teacher fine-tuning and student distillation.

AdamW with linear warm-up and decay, gradient clipping, periodic dev evaluation,
the best checkpoint by dev accuracy, optional early stop, bf16 autocast on CUDA,
resumable from ``checkpoints/last``. Loss values stay on the device and are read
only at log intervals, so the step itself never waits for the host.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, PreTrainedModel, get_linear_schedule_with_warmup, set_seed

from layergeo import data
from layergeo.cache import DTYPES as CACHE_DTYPES
from layergeo.cache import TeacherCache
from layergeo.config import OptimConfig, RunConfig
from layergeo.errors import LayergeoError
from layergeo.losses import hidden_matching_loss, kl_to_teacher, normalize_states
from layergeo.models import (
    EMBEDDED_TEACHER,
    Student,
    build_student,
    depth,
    embedded_teacher_path,
    load_checkpoint,
    load_pretrained,
    tiny_bert_config,
    width,
)
from layergeo.runs import RunDir, append_jsonl, atomic_dir, environment, now, read_jsonl, truncate_jsonl, write_config, write_json
from layergeo.strategies import Mapper, build_mapper, forward_targets

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise LayergeoError(f"device {spec!r} asked for but no CUDA GPU is visible; use --set device=cpu")
    try:
        return torch.device(spec)
    except RuntimeError:
        raise LayergeoError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from None


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
def evaluate(model: nn.Module, loader, device: torch.device, num_labels: int) -> dict[str, float]:
    """Accuracy (and macro-F1 when there are more than two classes) of ``model`` on ``loader``."""
    was_training = model.training
    model.eval()
    predictions, labels = [], []
    for batch in loader:
        logits = model(**{k: v.to(device) for k, v in model_inputs(batch).items()}).logits
        predictions.append(logits.argmax(-1).cpu())
        labels.append(batch["labels"])
    model.train(was_training)
    y_pred, y_true = torch.cat(predictions).numpy(), torch.cat(labels).numpy()
    metrics = {"accuracy": float((y_pred == y_true).mean()), "n": int(len(y_true))}
    if num_labels > 2:
        metrics["macro_f1"] = float(f1_score(y_true, y_pred, average="macro", labels=list(range(num_labels))))
    return metrics


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
    """Everything :func:`fit` needs; the two kinds of run differ only in these callables."""

    run: RunDir
    module: nn.Module  # all trainable parameters (student + projections, or the teacher)
    classifier: nn.Module  # what evaluate() runs
    step_losses: Callable[[dict, int, int], dict[str, torch.Tensor]]  # batch, epoch, step -> {"loss", terms...}
    save_best: Callable[[Path], None]
    train_data: object  # an encoded split
    dev_loader: object
    tokenizer: object
    num_labels: int
    optim: OptimConfig
    device: torch.device
    seed: int
    mapper: Mapper | None = None
    term_weights: dict[str, float] = field(default_factory=dict)  # loss term -> alpha, for term_grad_norms


def _loader(loop: Loop, epoch: int):
    return data.make_loader(
        loop.train_data, loop.tokenizer, loop.optim.batch_size, shuffle=True, seed=loop.seed * 100_003 + epoch,
        pin_memory=loop.device.type == "cuda",
    )


def fit(loop: Loop, resume: bool) -> LoopState:
    """Train with periodic dev evaluation; the best checkpoint goes to ``checkpoints/best``."""
    optim = loop.optim
    steps_per_epoch = math.ceil(len(loop.train_data) / optim.batch_size)
    total = optim.max_steps or steps_per_epoch * optim.epochs
    if total < 1:
        raise LayergeoError("the training budget is zero steps; raise train.epochs or train.max_steps")
    eval_every = optim.eval_every or steps_per_epoch
    fused = {"fused": True} if loop.device.type == "cuda" else {}
    decay = [p for n, p in loop.module.named_parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for n, p in loop.module.named_parameters() if p.requires_grad and p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=optim.lr, **fused,
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, int(optim.warmup_ratio * total), total)
    state = LoopState()
    last = loop.run.checkpoint("last")
    if resume and (last / "state.pt").is_file():
        saved = torch.load(last / "state.pt", map_location=loop.device, weights_only=False)
        loop.module.load_state_dict(saved["module"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = LoopState(**saved["loop"])
        torch.set_rng_state(saved["rng"])
    if resume:  # forget what was logged after the state we restart from
        truncate_jsonl(loop.run.metrics_file, lambda r: r["step"] <= state.step)
        truncate_jsonl(loop.run.mapping_file, lambda r: r["step"] < state.step)
        state.logged_periods = [loop.mapper.period(r["epoch"], r["step"]) for r in read_jsonl(loop.run.mapping_file)] if loop.mapper else []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if loop.device.type == "cuda" else nullcontext()
    sums: dict[str, torch.Tensor] = {}
    window = 0
    quiet = os.environ.get("CI") == "true" or not sys.stderr.isatty()
    bar = tqdm(total=total, initial=state.step, desc=loop.run.path.name, disable=quiet, dynamic_ncols=True)
    loop.module.train()
    while state.step < total:
        for i, batch in enumerate(_loader(loop, state.epoch)):
            if i < state.step_in_epoch:
                continue
            if loop.mapper is not None:
                _log_mapping(loop, state)
            # "index" stays on the host: only the teacher cache reads it, and so without waiting for the device
            batch = {k: v if k == "index" else v.to(loop.device, non_blocking=True) for k, v in batch.items()}
            with autocast:
                losses = loop.step_losses(batch, state.epoch, state.step)
            log_now = (state.step + 1) % optim.log_every == 0 or state.step + 1 == total
            term_norms = _term_grad_norms(loop, losses) if optim.term_grad_norms and log_now else {}
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            losses["grad_norm"] = torch.nn.utils.clip_grad_norm_(loop.module.parameters(), optim.grad_clip)
            optimizer.step()
            scheduler.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
            window += 1
            state.step += 1
            state.step_in_epoch = i + 1
            bar.update(1)
            if log_now:
                record = {k: float(v) / window for k, v in sums.items()} | {k: float(v) for k, v in term_norms.items()}
                append_jsonl(loop.run.metrics_file, {"step": state.step, "epoch": state.epoch, "lr": scheduler.get_last_lr()[0], **record})
                bar.set_postfix(loss=f"{record['loss']:.3f}", dev_acc=f"{max(state.best_accuracy, 0):.3f}")
                sums, window = {}, 0
            if state.step % eval_every == 0 or state.step == total:
                metrics = evaluate(loop.classifier, loop.dev_loader, loop.device, loop.num_labels)
                append_jsonl(loop.run.metrics_file, {"step": state.step, "epoch": state.epoch, "split": "dev", **metrics})
                if metrics["accuracy"] > state.best_accuracy:
                    state.best_accuracy, state.best_step, state.evals_since_best = metrics["accuracy"], state.step, 0
                    with atomic_dir(loop.run.checkpoint("best")) as tmp:
                        loop.save_best(tmp)
                else:
                    state.evals_since_best += 1
                _save_last(last, loop.module, optimizer, scheduler, state)
                bar.set_postfix(loss=bar.postfix, dev_acc=f"{state.best_accuracy:.3f}")
                if optim.early_stop and state.evals_since_best >= optim.early_stop:
                    total = state.step
            if state.step >= total:
                break
        else:
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
    bar.close()
    return state


def _term_grad_norms(loop: Loop, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gradient norm of each weighted loss term on this batch: grad_norm_<term> = alpha * |d term / d theta|."""
    params = [p for p in loop.module.parameters() if p.requires_grad]
    norms = {}
    for name, weight in loop.term_weights.items():
        if name in losses and losses[name].requires_grad:
            grads = torch.autograd.grad(losses[name], params, retain_graph=True, allow_unused=True)
            norms[f"grad_norm_{name}"] = weight * torch.linalg.vector_norm(torch.stack([g.norm() for g in grads if g is not None]))
    return norms


def _save_last(path: Path, module: nn.Module, optimizer, scheduler, state: LoopState) -> None:
    with atomic_dir(path) as tmp:
        torch.save(
            {
                "module": module.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "loop": vars(state),
                "rng": torch.get_rng_state(),
            },
            tmp / "state.pt",
        )


def _log_mapping(loop: Loop, state: LoopState) -> None:
    period = loop.mapper.period(state.epoch, state.step)
    if period not in state.logged_periods:
        state.logged_periods.append(period)
        pairs = loop.mapper.pairs_at(state.epoch, state.step)
        append_jsonl(loop.run.mapping_file, {"epoch": state.epoch, "step": state.step, "strategy": loop.mapper.name, "pairs": pairs})


def _finish(run: RunDir, env: dict, loop: Loop, state: LoopState, evaluate_best: Callable[[], dict], extra: dict) -> dict:
    results = {**extra, "best_step": state.best_step, "steps": state.step, **evaluate_best()}
    env["end"] = now()
    env["wall_time_s"] = round(time.time() - env.pop("_t0"), 1)
    results["wall_time_s"] = env["wall_time_s"]
    write_json(run.env_file, env)
    shutil.rmtree(run.checkpoint("last"), ignore_errors=True)
    write_json(run.results_file, results)
    return results


def _start(run: RunDir, config: RunConfig, kind: str, device: torch.device, resume: bool) -> dict:
    run.path.mkdir(parents=True, exist_ok=True)
    write_config(run, config)
    env = environment(kind, str(device), config.seed)
    if resume and run.env_file.is_file():
        env["resumed"] = True
    write_json(run.env_file, env)
    env["_t0"] = time.time()
    return env


def fine_tune_teacher(config: RunConfig, out: Path, resume: bool = False) -> dict:
    """Fine-tune ``config.teacher.model`` on ``config.data.task`` into the run directory ``out``."""
    device = resolve_device(config.device)
    set_seed(config.seed)
    run = RunDir(out)
    task = load_task(config)
    model, tokenizer = load_pretrained(config.teacher.model, task.num_labels)
    env = _start(run, config, "teacher", device, resume)
    model.config.id2label = dict(enumerate(task.label_names))
    model.config.label2id = {n: i for i, n in enumerate(task.label_names)}
    model.to(device)
    encoded = encode_splits(config, task, tokenizer)
    eval_loader = {s: data.make_loader(encoded[s], tokenizer, 64, shuffle=False, seed=0) for s in ("dev", "test")}

    def step_losses(batch, epoch, step):
        loss = F.cross_entropy(model(**model_inputs(batch)).logits.float(), batch["labels"])
        return {"loss": loss}

    def save_best(path: Path) -> None:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)

    loop = Loop(run, model, model, step_losses, save_best, encoded["train"], eval_loader["dev"], tokenizer,
                task.num_labels, config.teacher.train, device, config.seed)
    state = fit(loop, resume)

    def evaluate_best():
        best, _ = load_checkpoint(run.checkpoint("best"))
        best.to(device)
        return {s: evaluate(best, eval_loader[s], device, task.num_labels) for s in ("dev", "test")}

    return _finish(run, env, loop, state, evaluate_best, {"kind": "teacher", "task": task.name, "labels": list(task.label_names)})


def teacher_depth(config: RunConfig, out: Path) -> int:
    """Depth of the teacher a student run will use, read without loading weights."""
    teacher_dir = teacher_run_dir(config, out)
    best = RunDir(teacher_dir).checkpoint("best")
    if config.teacher.dir:
        if not RunDir(teacher_dir).finished or not (best / "config.json").is_file():
            raise LayergeoError(
                f"teacher directory {teacher_dir} holds no finished teacher run; create it with "
                f"layergeo teacher --out {teacher_dir}, or leave teacher.dir empty to train one"
            )
        return depth(AutoConfig.from_pretrained(best))
    if config.teacher.model == "tiny-bert":
        return depth(tiny_bert_config(2, 2))
    spec = embedded_teacher_path() if config.teacher.model == EMBEDDED_TEACHER else config.teacher.model
    try:
        return depth(AutoConfig.from_pretrained(spec))
    except OSError:
        raise LayergeoError(f"cannot read the config of teacher model {spec!r}; offline, use the embedded default 'minilm'") from None


def validate_student_config(config: RunConfig, out: Path) -> Mapper:
    """Check everything that can be checked before any file is written; return the mapper."""
    teacher_layers = teacher_depth(config, out)
    if config.student.layers > teacher_layers:
        raise LayergeoError(
            f"the student ({config.student.layers} layers) is deeper than its teacher ({teacher_layers} layers); "
            f"choose student.layers <= {teacher_layers}"
        )
    mapper = build_mapper(config.matching, teacher_layers, config.student.layers, config.seed)
    for k in config.student.copy_layers or []:
        if not 1 <= k <= teacher_layers:
            raise LayergeoError(f"student.copy_layers: teacher layer {k} is out of range 1..{teacher_layers}")
    normalize_states(torch.zeros(1, 1), config.loss.normalize)
    if config.student.init not in ("copy", "random"):
        raise LayergeoError(f"unknown student.init {config.student.init!r}; choose 'copy' or 'random'")
    resolve_device(config.device)
    if config.train.cache_dtype not in CACHE_DTYPES:
        raise LayergeoError(f"unknown train.cache_dtype {config.train.cache_dtype!r}; choose one of {', '.join(CACHE_DTYPES)}")
    return mapper


def student_optim(config: RunConfig) -> OptimConfig:
    """``config.train`` with the random-init learning rate and epochs applied when the student is random."""
    optim = config.train
    if config.student.init != "random":
        return optim
    return dataclasses.replace(optim, lr=optim.random_init_lr or optim.lr, epochs=optim.random_init_epochs or optim.epochs)


def distil_student(config: RunConfig, out: Path, resume: bool = False) -> dict:
    """Distil a student of the teacher into the run directory ``out`` (training the teacher first if needed)."""
    mapper = validate_student_config(config, out)
    task = load_task(config)
    teacher_dir = teacher_run_dir(config, out)
    if not RunDir(teacher_dir).finished:
        fine_tune_teacher(config, teacher_dir, resume=resume and (teacher_dir / "config.yaml").is_file())
    config.teacher.dir = str(teacher_dir.resolve())
    device = resolve_device(config.device)
    set_seed(config.seed)
    run = RunDir(out)
    teacher, tokenizer = load_checkpoint(RunDir(teacher_dir).checkpoint("best"))
    encoded = encode_splits(config, task, tokenizer)
    if teacher.config.num_labels != task.num_labels:
        raise LayergeoError(
            f"the teacher in {teacher_dir} predicts {teacher.config.num_labels} labels but {task.name} has "
            f"{task.num_labels}; fine-tune a teacher on this task"
        )
    env = _start(run, config, "student", device, resume)
    copy_layers = config.student.copy_layers or forward_targets(depth(teacher.config), config.student.layers)
    student = build_student(teacher, config.student, mapper.student_states(), copy_layers)
    student.model.config.id2label, student.model.config.label2id = teacher.config.id2label, teacher.config.label2id
    if not resume or not run.checkpoint("init").is_dir():
        with atomic_dir(run.checkpoint("init")) as tmp:
            student.save(tmp, tokenizer)
    teacher.to(device).eval()
    student.to(device)
    eval_loader = {s: data.make_loader(encoded[s], tokenizer, 64, shuffle=False, seed=0) for s in ("dev", "test")}
    cache = open_teacher_cache(config, teacher_dir, teacher, tokenizer, task.name, encoded["train"], mapper)
    env["teacher_cache"] = cache.describe() if cache is not None else {"used": False}
    if cache is not None and device.type == "cuda":
        teacher.cpu()  # only its config is needed from here on
    step_losses = distillation_losses(student, teacher, mapper, config, cache=cache)

    loss = config.loss
    loop = Loop(run, student, student.model, step_losses, lambda path: student.save(path, tokenizer), encoded["train"],
                eval_loader["dev"], tokenizer, task.num_labels, student_optim(config), device, config.seed, mapper,
                term_weights={"ce": loss.alpha_ce, "kl": loss.alpha_kl, "hidden": loss.alpha_hidden})
    state = fit(loop, resume)

    def evaluate_best():
        best, _ = Student.load(run.checkpoint("best"), width(teacher.config))
        best.to(device)
        return {s: evaluate(best.model, eval_loader[s], device, task.num_labels) for s in ("dev", "test")}

    extra = {"kind": "student", "task": task.name, "strategy": mapper.name, "init": config.student.init,
             "student_layers": config.student.layers, "teacher_layers": depth(teacher.config), "seed": config.seed,
             "teacher_results": RunDir(teacher_dir).results(), "teacher_cache": env["teacher_cache"]}
    return _finish(run, env, loop, state, evaluate_best, extra)


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
        return cache.lookup(batch["index"], batch["attention_mask"], layers)

    return outputs


def distillation_losses(student: Student, teacher: PreTrainedModel, mapper: Mapper, config: RunConfig,
                        cache: TeacherCache | None = None):
    """The per-batch loss of distillation: CE + T^2 KL + alpha * hidden matching (each term returned).

    The teacher's outputs come from ``cache`` when given (batches must carry "index"), else from
    running ``teacher`` on the batch; the loss arithmetic is the same either way.
    """
    loss_cfg = config.loss
    need_teacher, match = _teacher_needs(mapper, config)
    teacher_outputs = cached_teacher(cache) if cache is not None else live_teacher(teacher, match)

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
                out.hidden_states, teacher_states, pairs, inputs["attention_mask"], student.project, loss_cfg.normalize,
            )
            total = total + loss_cfg.alpha_hidden * terms["hidden"]
        return {"loss": total, **terms}

    return step_losses
