"""Prompt -> completion tasks for decoder-only LMs: fixed splits, tokenisation, completion masks.

Every task comes back as a :class:`CompletionTask` with "train", "dev" and "test" frames whose
columns are "text" (the part of the prompt that may be cut to fit) and "completion". The prompt
of an example is ``head + text + tail``; when a task has a closed set of answers (``choices``),
its examples can also be scored by ranking the choices by log-likelihood, as lm-evaluation-harness
scores multiple-choice tasks. Splits and caps are those of the classification tasks they come
from, so a sentiment completion task and its classification twin hold the same examples.

Tasks, by name:
  rt_sentiment     a Rotten Tomatoes critic snippet -> " positive" / " negative" (fresh / rotten)
  bbc_topic        a BBC News article (headline and body) -> its topic word (" business", " sport", ...)
  a .csv/.tsv/.jsonl path   local files with "prompt" and "completion" columns (and an optional
                   "split"); an open task, scored by exact match of the greedy completion
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.utils.data import Dataset

from layergeo import data
from layergeo.config import POSITIONS
from layergeo.errors import LayergeoError
from layergeo.registry import Registry

IGNORE = -100  # label of a position that is not a completion token


@dataclass(frozen=True)
class CompletionTask:
    """One prompt -> completion task with its three splits."""

    name: str
    splits: dict[str, pd.DataFrame]  # columns: text, completion
    source: str
    head: str = ""  # prompt = head + text + tail
    tail: str = ""
    choices: tuple[str, ...] | None = None  # the closed set of completions, when there is one


COMPLETION_TASKS: Registry[CompletionTask] = Registry("completion task")
_CLASSIFICATION_TWINS = {  # completion task -> (classification task, head, tail, completion per label name)
    "rt_sentiment": ("rotten_tomatoes", "Review: ", "\nSentiment:", {"rotten": " negative", "fresh": " positive"}),
    "bbc_topic": ("bbc_news", "Article: ", "\nTopic:", None),  # the topic names themselves
}


def completion_task_names() -> list[str]:
    return COMPLETION_TASKS.names()


def load_completion_task(name: str, max_examples: dict[str, int | None] | None = None, seed: int = 0) -> CompletionTask:
    """A completion task by name or local path, with the splits capped as ``max_examples`` says."""
    if (loader := COMPLETION_TASKS.find(name)) is not None:
        task = loader()
    elif Path(name).exists() or Path(name).suffix.lower() in (".csv", ".tsv", ".jsonl", ".json"):
        task = _load_local(Path(name))
    else:
        raise LayergeoError(f"unknown completion task {name!r} for the causal family; choose one of "
                            f"{COMPLETION_TASKS.known()}, or a path to a local .csv/.tsv/.jsonl file with "
                            "prompt and completion columns")
    task = replace(task, splits=data.cap_splits(task.splits, max_examples or {}, seed))
    for split in data.SPLITS:
        if len(task.splits.get(split, ())) == 0:
            raise LayergeoError(f"completion task {task.name!r} has an empty {split} split; give more examples")
    return task


def _from_classification(name: str, twin: str, head: str, tail: str, words: dict[str, str] | None) -> CompletionTask:
    source = data.load_task(twin)  # uncapped: the caps are applied to the completion task, with the same seed
    words = words or {label: f" {label}" for label in source.label_names}
    completion = [words[label] for label in source.label_names]
    splits = {s: pd.DataFrame({"text": df["text"].to_numpy(), "completion": [completion[i] for i in df["label"]]},
                              index=df.index)
              for s, df in source.splits.items()}
    return CompletionTask(name, splits, f"{source.source}, as {head.strip()} ...{tail!r} -> label word",
                          head=head, tail=tail, choices=tuple(completion))


for _name, _twin in _CLASSIFICATION_TWINS.items():
    COMPLETION_TASKS.register(_name)(functools.partial(_from_classification, _name, *_twin))


def _load_local(path: Path) -> CompletionTask:
    """A file of examples (columns prompt, completion; optional split = train/dev/test)."""
    table = data._read_table(path)
    missing = [c for c in ("prompt", "completion") if c not in table]
    if missing:
        raise LayergeoError(f"{path} lacks the column{'s' if len(missing) > 1 else ''} {', '.join(missing)}; "
                            "a completion file needs prompt and completion columns")
    table = table.rename(columns={"prompt": "text"})
    table = table[(table["text"].astype(str) != "") & (table["completion"].astype(str) != "")]
    if "split" in table:
        frames = {s: table[table["split"] == s][["text", "completion"]].astype(str) for s in data.SPLITS}
    else:
        frames = data._split_by_key(table[["text", "completion"]].astype(str), table["text"].astype(str))
    return CompletionTask(path.stem, frames, f"local: {path}")


# --------------------------------------------------------------------------------------------
# Tokenisation


class EncodedCompletions(Dataset):
    """One split tokenised once without padding.

    Items: "input_ids" = prompt + completion + eos, "labels" (the completion and eos; IGNORE on the
    prompt), "distil_mask" (1 at the positions whose next-token prediction the KL and hidden terms
    count) and "index". ``prompts`` (token ids) and ``completions`` (text) serve generation;
    ``choice_ids`` and ``gold`` the ranking of a task's choices.
    """

    def __init__(self, items: list[dict[str, list[int]]], prompts: list[list[int]], completions: list[str],
                 choice_ids: list[list[int]] | None, gold: list[int] | None):
        self.items = items
        self.prompts = prompts
        self.completions = completions
        self.choice_ids = choice_ids
        self.gold = gold
        self.longest_completion = max((sum(1 for t in item["labels"] if t != IGNORE) for item in items), default=0)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.items[i], "index": i}


def encode_completions(df: pd.DataFrame, task: CompletionTask, tokenizer, max_length: int,
                       positions: str = "completion") -> EncodedCompletions:
    """Tokenise prompts and completions into at most ``max_length`` tokens per example.

    The text in the middle of the prompt is cut from its end to make room for the head, the tail
    and the completion; a bos token starts the prompt when the tokenizer has one. ``positions``:
    ``completion`` (the KL and hidden terms count the positions that predict a completion token)
    or ``all`` (every non-padding position but the last, as the authors' LLM code).
    """
    if positions not in POSITIONS:
        raise LayergeoError(f"unknown loss.positions {positions!r}; choose one of {', '.join(POSITIONS)}")
    if tokenizer.eos_token_id is None:
        raise LayergeoError("the tokenizer has no eos token; a completion must end with one")
    start = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    head = start + _ids(tokenizer, task.head)
    tail = _ids(tokenizer, task.tail)
    items, prompts = [], []
    for text, completion in zip(df["text"].astype(str), df["completion"].astype(str)):
        answer = _ids(tokenizer, completion) + [tokenizer.eos_token_id]
        room = max_length - len(head) - len(tail) - len(answer)
        if room < 1:
            raise LayergeoError(f"data.max_length={max_length} leaves no room for the text of a prompt (the prompt "
                                f"frame and a completion take {max_length - room} tokens); raise data.max_length")
        prompt = head + _ids(tokenizer, text)[:room] + tail
        ids = prompt + answer
        labels = [IGNORE] * len(prompt) + answer
        counted = labels[1:] if positions == "completion" else ids[1:]
        distil = [int(positions == "all" or c != IGNORE) for c in counted] + [0]
        items.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "distil_mask": distil})
        prompts.append(prompt)
    choice_ids = gold = None
    if task.choices is not None:
        choice_ids = [_ids(tokenizer, c) for c in task.choices]
        gold = [task.choices.index(c) for c in df["completion"]]
    return EncodedCompletions(items, prompts, [normalise_answer(c) for c in df["completion"].astype(str)], choice_ids, gold)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def normalise_answer(text: str) -> str:
    """Lower case, no punctuation, single spaces: what exact match compares (as SQuAD/CoQA scoring)."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


class CompletionCollator:
    """Right-pads a list of items: input_ids with the pad token, labels with IGNORE, masks with 0."""

    def __init__(self, pad_token_id: int):
        self.pad = {"input_ids": pad_token_id, "labels": IGNORE, "attention_mask": 0, "distil_mask": 0}

    def __call__(self, items: list[dict]) -> dict:
        width = max(len(item["input_ids"]) for item in items)
        batch = {key: torch.tensor([item[key] + [fill] * (width - len(item[key])) for item in items])
                 for key, fill in self.pad.items()}
        batch["index"] = torch.tensor([item["index"] for item in items])
        return batch
