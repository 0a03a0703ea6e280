"""The teacher of a run: where it lives, what model it is, and fine-tuning it on the task.

A student run either names a finished teacher run (``teacher.dir``) or fine-tunes its own into
``<out>/teacher`` first. The teacher's model family (``teacher.family``) decides how it is loaded,
what task it trains on and how it is scored; this module only knows the run directory.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers import set_seed

from layergeo import data
from layergeo.adapters import save_model
from layergeo.config import RunConfig
from layergeo.errors import LayergeoError
from layergeo.families import Family, get_family
from layergeo.loop import Loop, StepLosses, finish_run, fit, start_env
from layergeo.processes import EVAL_BATCH_SIZE, check_batch_size, distributed_state, eval_batch_size, make_accelerator
from layergeo.runs import RunDir
from layergeo.tracking import tracked, tracker_settings


def family_of(config: RunConfig) -> Family:
    return get_family(config.teacher.family)


def teacher_run_dir(config: RunConfig, out: Path) -> Path:
    return Path(config.teacher.dir) if config.teacher.dir else out / "teacher"


def owns_teacher(config: RunConfig, out: Path) -> bool:
    """Whether the run trains its own teacher into ``<out>/teacher`` (teacher.dir empty, or that folder)."""
    return not config.teacher.dir or Path(config.teacher.dir).resolve() == (Path(out) / "teacher").resolve()


def teacher_model_config(config: RunConfig, out: Path):
    """The config of the teacher a student run will use: its finished checkpoint, or the model it will fine-tune."""
    family = family_of(config)
    teacher_dir = teacher_run_dir(config, out)
    best = RunDir(teacher_dir).checkpoint("best")
    if RunDir(teacher_dir).finished and (best / "config.json").is_file():
        recorded = RunDir(teacher_dir).config().teacher.family
        if recorded != family.name:
            raise LayergeoError(f"the teacher in {teacher_dir} is a {recorded} model but this run has teacher.family="
                                f"{family.name}; use a {family.name} teacher or set teacher.family={recorded}")
        try:
            from transformers import AutoConfig

            return AutoConfig.from_pretrained(best)
        except (OSError, ValueError) as exc:
            raise LayergeoError(f"the teacher checkpoint {best} is damaged ({exc.__class__.__name__}); restore it "
                                "or fine-tune the teacher again") from None
    if not owns_teacher(config, out):
        raise LayergeoError(
            f"teacher directory {teacher_dir} holds no finished teacher run; create it with "
            f"layergeo teacher --out {teacher_dir}, or leave teacher.dir empty to train one"
        )
    return family.model_config(config.teacher.model)


def check_adapters(config: RunConfig, family: Family) -> None:
    """Refuse LoRA settings for a family that does not train adapters."""
    for key, lora in (("teacher.lora.r", config.teacher.lora), ("student.lora.r", config.student.lora)):
        if lora.r and not family.adapters:
            raise LayergeoError(f"{key}={lora.r}: LoRA adapters are for the causal family, not the {family.name} family; "
                                f"set {key}=null")


def check_max_length(config: RunConfig, family: Family, model_config) -> None:
    limit = family.max_positions(model_config)
    for key in family.length_keys:
        value = getattr(config.data, key)
        if limit is not None and value > limit:
            raise LayergeoError(f"data.{key}={value} is above the teacher's limit of {limit} positions; "
                                f"choose data.{key} <= {limit}")


def encode_splits(config: RunConfig, family: Family, task, tokenizer, model_config) -> dict:
    return {s: family.encode(config, task, s, tokenizer, model_config) for s in data.SPLITS}


def validate_teacher_config(config: RunConfig):
    """Check a teacher run before any file is written: device, processes, model, data. Returns the task."""
    family = family_of(config)
    state, _ = distributed_state(config.device)
    check_batch_size(config.teacher.train, state.num_processes, "teacher.train")
    check_adapters(config, family)
    check_max_length(config, family, family.model_config(config.teacher.model))
    return family.load_task(config)


def loaders(family: Family, encoded: dict, tokenizer, model, processes: int) -> tuple[dict, dict]:
    """Final dev/test loaders (one process) and the dev/test loaders of training (sharded over ``processes``)."""
    collate = family.collator(tokenizer, model)
    final = {s: data.make_loader(encoded[s], tokenizer, EVAL_BATCH_SIZE, shuffle=False, seed=0, collate_fn=collate)
             for s in ("dev", "test")}
    during = {s: data.make_loader(encoded[s], tokenizer, eval_batch_size(processes), shuffle=False, seed=0, collate_fn=collate)
              for s in ("dev", "test")}
    return final, during


def fine_tune_teacher(config: RunConfig, out: Path, resume: bool = False) -> dict:
    """Fine-tune ``config.teacher.model`` on ``config.data.task`` into the run directory ``out``."""
    family = family_of(config)
    state, device = distributed_state(config.device)
    check_batch_size(config.teacher.train, state.num_processes, "teacher.train")
    set_seed(config.seed)
    run = RunDir(out)
    task = family.load_task(config)
    model, tokenizer = family.load_pretrained(config.teacher.model, task)
    model = family.prepare_teacher(model, config)
    env = start_env(run, config, "teacher", device, resume, state)
    model.to(device)
    encoded = encode_splits(config, family, task, tokenizer, model.config)
    eval_loader, during = loaders(family, encoded, tokenizer, model, state.num_processes)
    accelerator = make_accelerator(device, **tracker_settings(config.teacher.train.log_with, run))

    def step_losses_for(module: nn.Module) -> StepLosses:
        def step_losses(batch, epoch, step):
            return {"loss": family.task_loss(module(**family.inputs(batch)).logits, batch)}

        return step_losses

    def save_best(path: Path) -> None:
        save_model(model, path)
        tokenizer.save_pretrained(path)

    loop = Loop(run=run, accelerator=accelerator, module=model, step_losses_for=step_losses_for,
                save_best=save_best, train_data=encoded["train"], eval_loaders=during, tokenizer=tokenizer,
                collate=family.collator(tokenizer, model),
                evaluate=lambda m, loader: family.evaluate(m, loader, device, config, tokenizer, accelerator),
                metric=family.metric, optim=config.teacher.train, device=device, seed=config.seed, env=env)
    with tracked(accelerator, config, run):
        loop_state = fit(loop, resume)

    def evaluate_best():
        best, _ = family.load_checkpoint(run.checkpoint("best"))
        best.to(device)
        return {s: family.evaluate(best, eval_loader[s], device, config, tokenizer) for s in ("dev", "test")}

    labels = {"labels": list(task.label_names)} if hasattr(task, "label_names") else {}
    return finish_run(run, env, loop, loop_state, evaluate_best,
                      {"kind": "teacher", "task": task.name, **labels})  # the family is in config.yaml
