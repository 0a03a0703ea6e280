"""Load a finished run's teacher and student, and stream their hidden states over texts.

Only non-padding tokens are kept ([CLS] and [SEP] included): for each batch the
teacher states come out as (N, L_T+1, d_t) and the student states as
(N, L_S+1, d_s), N = number of real tokens in the batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from transformers import PreTrainedModel

from layergeo import data
from layergeo.config import RunConfig
from layergeo.errors import LayergeoError
from layergeo.models import Student, load_checkpoint, width
from layergeo.runs import RunDir
from layergeo.strategies import Pair, forward_targets

CHECKPOINTS = ("init", "best")


@dataclass
class LoadedRun:
    """A student run ready for analysis."""

    run: RunDir
    config: RunConfig
    checkpoint: str
    teacher: PreTrainedModel
    student: Student
    tokenizer: object
    strategy: str
    matched_pairs: list[Pair]  # every (student, teacher) pair realised during training
    forward_pairs: list[Pair]  # the pairs forward matching would have used

    @property
    def teacher_layers(self) -> int:
        return int(self.teacher.config.num_hidden_layers)

    @property
    def student_layers(self) -> int:
        return int(self.student.model.config.num_hidden_layers)


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
    teacher, teacher_tokenizer = load_checkpoint(teacher_checkpoint)
    student, tokenizer = Student.load(folder, width(teacher.config))
    if tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise LayergeoError(f"the student in {folder} uses a different tokenizer from its teacher; they must share one")
    if student.model.config.vocab_size != teacher.config.vocab_size:
        raise LayergeoError(f"the student in {folder} has a vocabulary of {student.model.config.vocab_size}, "
                            f"its teacher {teacher.config.vocab_size}; they must share one")
    mappings = run.mappings()
    strategy = mappings[0]["strategy"] if mappings else config.matching.strategy
    matched = sorted({(s, t) for m in mappings for s, t in m["pairs"]})
    n_teacher, n_student = int(teacher.config.num_hidden_layers), int(student.model.config.num_hidden_layers)
    forward = [(j + 1, t) for j, t in enumerate(forward_targets(n_teacher, n_student))]
    return LoadedRun(run, config, checkpoint, teacher.eval(), student.eval(), tokenizer, strategy, matched, forward)


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
    if texts is not None:
        lines = data.read_texts_file(texts)[:max_examples]
        frame = data.pd.DataFrame({"text": lines, "label": 0})
        columns, source = ("text",), f"texts:{texts}"
        limit = max_length or int(loaded.teacher.config.max_position_embeddings) - 2
    else:
        if split not in ("train", "dev", "test"):
            raise LayergeoError(f"unknown split {split!r}; choose train, dev or test")
        cap = {split: max_examples} if max_examples else None
        task = data.load_task(loaded.config.data.task, max_examples=cap, seed=loaded.config.seed)
        frame, columns, source = task.splits[split], task.text_columns, f"{task.name}:{split}"
        limit = max_length or loaded.config.data.max_length
    encoded = data.encode(frame, loaded.tokenizer, columns, limit)
    return data.make_loader(encoded, loaded.tokenizer, batch_size, shuffle=False, seed=0), len(frame), source


@torch.inference_mode()
def hidden_states(loaded: LoadedRun, loader, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (teacher (N, L_T+1, d_t), student (N, L_S+1, d_s)) float32 states of the real tokens of each batch."""
    loaded.teacher.to(device)
    loaded.student.to(device)
    for batch in loader:
        inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        keep = inputs["attention_mask"].bool()
        teacher = loaded.teacher(**inputs, output_hidden_states=True).hidden_states
        student = loaded.student(**inputs).hidden_states
        yield torch.stack([h[keep] for h in teacher], 1).float(), torch.stack([h[keep] for h in student], 1).float()


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
        "dev_accuracy": results.get("dev", {}).get("accuracy"),
        "dev_accuracy_n_examples": results.get("dev", {}).get("n"),  # the run's data.max_eval cap, not the angles' examples
    }
