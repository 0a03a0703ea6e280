"""Load a finished run's teacher and student, and stream their hidden states over texts.

Only the positions that count are kept, per stack (an encoder's non-padding tokens, [CLS] and
[SEP] included; a decoder's non-padding target tokens, teacher-forced on the reference): for
each batch and stack the teacher states come out as (N, L_T+1, d_t) and the student states as
(N, L_S+1, d_s), N = number of positions kept in the batch.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from transformers import PreTrainedModel

from layergeo import data
from layergeo.config import RunConfig, data_seed
from layergeo.errors import LayergeoError
from layergeo.families import Family, get_family
from layergeo.models import Student
from layergeo.runs import RunDir
from layergeo.strategies import Pair, forward_targets

CHECKPOINTS = ("init", "best")


@dataclass
class StackView:
    """One stack of a loaded run: what its geometry needs besides the states."""

    stack: str
    teacher_layers: int
    student_layers: int
    matched_pairs: list[Pair]  # every (student, teacher) pair of this stack realised during training
    forward_pairs: list[Pair]  # the pairs forward matching would have used


@dataclass
class LoadedRun:
    """A student run ready for analysis."""

    run: RunDir
    config: RunConfig
    checkpoint: str
    family: Family
    teacher: PreTrainedModel
    student: Student
    tokenizer: object
    strategy: str
    stacks: dict[str, StackView]

    @property
    def teacher_width(self) -> int:
        return self.family.width(self.teacher.config)

    @property
    def student_width(self) -> int:
        return self.family.width(self.student.model.config)

    @property
    def one_stack(self) -> StackView | None:
        """The only stack of a one-stack family; None when there are several."""
        return next(iter(self.stacks.values())) if len(self.stacks) == 1 else None


def teacher_dir_of(run: RunDir, config: RunConfig) -> Path:
    """The recorded teacher directory, or ``<run>/teacher`` when the run was moved."""
    recorded = Path(config.teacher.dir) if config.teacher.dir else None
    for candidate in (recorded, run.path / "teacher"):
        if candidate is not None and (candidate / "checkpoints" / "best" / "config.json").is_file():
            return candidate
    raise LayergeoError(
        f"the teacher of run {run.path} is missing (looked in {recorded} and {run.path / 'teacher'}); "
        "restore it or re-run training"
    )


def load_run(path: str | Path, checkpoint: str = "best") -> LoadedRun:
    """Teacher, student (``init`` or ``best``) and mapping of the student run at ``path``."""
    if checkpoint not in CHECKPOINTS:
        raise LayergeoError(f"unknown checkpoint {checkpoint!r}; choose init (untrained student) or best")
    run = RunDir(path)
    if not run.path.is_dir():
        raise LayergeoError(f"{run.path} does not exist; give a run directory written by layergeo train --out")
    config = run.config()
    if run.kind() != "student":
        raise LayergeoError(f"{run.path} is a teacher run; give a student run directory written by layergeo train")
    folder = run.checkpoint(checkpoint)
    if not (folder / "config.json").is_file():
        raise LayergeoError(f"run {run.path} has no checkpoints/{checkpoint}; finish it with layergeo train --resume")
    teacher_checkpoint = RunDir(teacher_dir_of(run, config)).checkpoint("best")
    _check_teacher_identity(run, teacher_checkpoint)
    family = get_family(config.teacher.family)
    teacher, teacher_tokenizer = family.load_checkpoint(teacher_checkpoint)
    student, tokenizer = Student.load(folder, family.width(teacher.config), family)
    if tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise LayergeoError(f"the student in {folder} uses a different tokenizer from its teacher; they must share one")
    vocab = {name: model.get_input_embeddings().num_embeddings for name, model in (("student", student.model), ("teacher", teacher))}
    if vocab["student"] != vocab["teacher"]:
        raise LayergeoError(f"the student in {folder} has a vocabulary of {vocab['student']}, "
                            f"its teacher {vocab['teacher']}; they must share one")
    mappings = run.mappings()
    strategy = mappings[0]["strategy"] if mappings else config.matching.strategy
    stacks = stack_views(family, teacher.config, student.model.config, mappings)
    return LoadedRun(run, config, checkpoint, family, teacher.eval(), student.eval(), tokenizer, strategy, stacks)


def stack_views(family: Family, teacher_config, student_config, mappings: list[dict]) -> dict[str, StackView]:
    """Each stack's depths, the pairs of every logged mapping (``mapping.jsonl`` records) and the forward pairs."""
    teacher_depths, student_depths = family.depths(teacher_config), family.depths(student_config)
    stacks = {}
    for stack in family.stacks:
        logged = [m["pairs"] if isinstance(m["pairs"], list) else m["pairs"].get(stack, []) for m in mappings]
        matched = sorted({(s, t) for pairs in logged for s, t in pairs})
        n_teacher, n_student = teacher_depths[stack], student_depths[stack]
        forward = [(j + 1, t) for j, t in enumerate(forward_targets(n_teacher, n_student))]
        stacks[stack] = StackView(stack, n_teacher, n_student, matched, forward)
    return stacks


def token_states(hidden: tuple[torch.Tensor, ...], mask: torch.Tensor) -> torch.Tensor:
    """A stack's L+1 states (B, T, d) each, at the positions of ``mask`` (B, T): (N, L+1, d) float32."""
    return torch.stack([h[mask.bool()] for h in hidden], 1).float()


def _check_teacher_identity(run: RunDir, checkpoint: Path) -> None:
    """Refuse a teacher whose weights are not those the run was distilled from (recorded in env.json)."""
    from layergeo.cache import teacher_digest
    from layergeo.runs import read_json

    recorded = read_json(run.env_file).get("teacher_sha256")
    if recorded is not None and teacher_digest(checkpoint) != recorded:
        raise LayergeoError(f"the teacher in {checkpoint.parent.parent} is not the one run {run.path} was distilled "
                            "from (its weights differ from the recorded sha256); restore that teacher")


def texts_loader(loaded: LoadedRun, split: str = "dev", texts: Path | None = None, max_examples: int | None = None,
                 max_length: int | None = None, batch_size: int = 32):
    """Batches of the run's ``split`` or of a file of sentences (one per line).

    Returns (loader, n_examples, source description). Sentences from a file are
    truncated at the model's maximum length, dataset splits at the run's data.max_length.
    """
    family = loaded.family
    if texts is not None:
        if not family.reads_plain_texts:
            raise LayergeoError(f"--texts gives plain sentences, and a {family.name} run's states count the positions of "
                                "its task's targets or completions, which need the target; measure a split (--split dev) instead")
        lines = data.read_texts_file(texts)[:max_examples]
        frame = data.pd.DataFrame({"text": lines, "label": 0})
        columns, source = ("text",), f"texts:{texts}"
        limit = max_length or int(loaded.teacher.config.max_position_embeddings) - 2
        encoded = data.encode(frame, loaded.tokenizer, columns, limit)
        n = len(frame)
    else:
        if split not in ("train", "dev", "test"):
            raise LayergeoError(f"unknown split {split!r}; choose train, dev or test")
        config = loaded.config  # the whole split (the run's data.max_eval cap is not applied), cut at max_length
        config = dataclasses.replace(config, data=dataclasses.replace(
            config.data, max_length=max_length or config.data.max_length,
            max_target_length=max_length or config.data.max_target_length, max_eval=None, max_train=None))
        task = family.load_task(config)
        if max_examples:
            task = dataclasses.replace(task, splits=data.cap_splits(task.splits, {split: max_examples}, data_seed(config)))
        encoded = family.encode(config, task, split, loaded.tokenizer, loaded.teacher.config)
        source, n = f"{task.name}:{split}", len(encoded)
    loader = data.make_loader(encoded, loaded.tokenizer, batch_size, shuffle=False, seed=0,
                              collate_fn=family.collator(loaded.tokenizer, loaded.teacher))
    return loader, n, source


@torch.inference_mode()
def hidden_states(loaded: LoadedRun, loader, device: torch.device) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Yield, per batch, stack -> (teacher (N, L_T+1, d_t), student (N, L_S+1, d_s)) float32 states of its positions."""
    family = loaded.family
    loaded.teacher.to(device)
    loaded.student.to(device)
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        inputs = family.inputs(batch)
        teacher = family.hidden_states(loaded.teacher(**inputs, output_hidden_states=True))
        student = family.hidden_states(loaded.student(**inputs))
        masks = family.masks(batch)
        yield {stack: (token_states(teacher[stack], masks[stack]), token_states(student[stack], masks[stack]))
               for stack in family.stacks}


def describe(loaded: LoadedRun) -> dict:
    """Run identity used to label tables: run, strategy, init, seed, checkpoint."""
    results = json.loads(loaded.run.results_file.read_text()) if loaded.run.finished else {}
    return {
        "run": loaded.run.path.name,
        "strategy": loaded.strategy,
        "init": loaded.config.student.init,
        "seed": loaded.config.seed,
        "checkpoint": loaded.checkpoint,
        "task": loaded.config.data.task,
        f"dev_{loaded.family.metric}": results.get("dev", {}).get(loaded.family.metric),
        f"dev_{loaded.family.metric}_n_examples": results.get("dev", {}).get("n"),  # the run's data.max_eval cap, not the angles' examples
    }
