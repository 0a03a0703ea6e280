"""Teacher-output cache: run the teacher once over a split, reuse its outputs in every student run.

A distillation run needs from its teacher, per training example, the logits and the hidden
states the run can ever match: every state T0..T_L for ``rail`` (it redraws its targets), only
the targets for a fixed strategy, none for ``none`` (logits only). With ``train.teacher_cache``
on, :meth:`TeacherCache.open_or_build` computes them once (teacher in eval mode, under
``torch.inference_mode``, batches of 64 in split order through the training collate
``data.make_loader``) and every later run with the same key memory-maps them instead of running
the teacher. The folder::

    <root>/<key>/            root = <teacher run>/cache/ (so all runs of a sweep sharing a teacher share it)
      meta.json              key, its ingredients, layers, n_examples, n_tokens, width, dtype, versions
      logits.npy             (N, C) float32 (always: tiny, and the KL term stays exact)
      offsets.npy            (N + 1) int64: example i owns token rows offsets[i]:offsets[i+1]
      state_{t}.npy          (n_tokens, d) float16 | float32: teacher state t at the non-padding
                             tokens of each example, concatenated in example order

The key is sha256 over: the torch and transformers versions and the teacher's attention
implementation (they change the kernels, hence the rounding), the teacher checkpoint's bytes (config.json and every *.safetensors;
hashing MiniLM's 90 MB takes ~0.1 s), the tokenizer (class and vocabulary), the task name, the
split, the encoded examples (every feature of every example, so the max_train cap, its seed and
any change of data show up), max_length, the storage dtype, the compute precision (fp32, or
bf16 autocast on CUDA, as the live teacher runs in ``train.fit``) and the format version. Change
any of them and a new folder is built; old folders are never used again (delete them by hand).
Layers are not in the key: the folder holds the union of what runs asked for, and a run that
needs a state not stored yet runs the teacher once more and adds only the missing files. Builds
and additions happen in a temporary folder renamed into place, under a file lock, so parallel
sweep jobs neither see a half-written cache nor build the same one twice.

Exactness. The teacher's output at a real token does not depend on how much padding follows
it (attention masks padding out; BERT-like encoders use absolute positions from 0, so the
cache requires right padding, the tokenizers' default). With ``cache_dtype=float32`` a student
therefore gets the live teacher's losses up to the rounding of kernels whose blocking depends
on the batch shape: bit-identical in the tiny tests (step losses and whole runs, on CPU); with
MiniLM, 4 batches of 16, hidden terms within 1.2e-7 relative and the (tiny, ~1e-5) KL within
3e-10 absolute. float16 rounds each stored state to 11 significant bits (2^-11 ~ 5e-4 relative
per value), which mostly averages out in the MSE: hidden term within 9e-5 relative (tiny
teacher) and 2e-6 (MiniLM, |states| <= 11, far inside float16's range); tests bound it by 1e-2.
Logits are float32 under both dtypes, so CE and KL are as exact as with float32.

Disk cost per 10k examples. bytes = 10k * (4 C + 8) + n_tok * d * b * S, with C labels,
n_tok the number of non-padding tokens of 10k examples, d the teacher width, b = 2 (float16)
or 4 (float32) bytes and S stored states (.npy headers and meta.json add ~2 kB). For the
embedded default (MiniLM-L6 teacher, d = 384, Rotten Tomatoes, max_length 64, C = 2), counted
with the MiniLM tokenizer on the real train split (10,451 examples, 282,924 non-padding tokens
with [CLS]/[SEP], mean 27.07 tokens/example, 9 truncated at 64), n_tok = 270,715 per 10k::

    logits + offsets          10k * 16 B                    =   0.16 MB
    one state, float16        270,715 * 384 * 2 B           = 207.9 MB   (float32: 415.8 MB)
    forward, 3-layer student  S = 4 (T0 + T2, T4, T6)       = 0.83 GB    (float32: 1.66 GB)
    rail                      S = 7 (T0..T6)                = 1.46 GB    (float32: 2.91 GB)
    none (logits only)        S = 0                         = 0.16 MB

(MB, GB = 10^6, 10^9 bytes.) The whole Rotten Tomatoes train split is 1.045x these: 0.87 GB
for forward, 1.52 GB for rail in float16. A sweep over all strategies stores the union, i.e.
the rail figure, once per teacher (and per train subset: data.max_train samples by seed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from layergeo import data
from layergeo.config import CACHE_DTYPES
from layergeo.device import precision, step_settings
from layergeo.errors import LayergeoError
from layergeo.progress import progress_bar
from layergeo.runs import now, write_json

FORMAT = 1
DTYPES = CACHE_DTYPES
META, LOGITS, OFFSETS = "meta.json", "logits.npy", "offsets.npy"
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
BATCH_SIZE = 64

build_count = 0  # how many times this process ran a teacher over a split to fill a cache (read by tests)


def state_file(t: int) -> str:
    return f"state_{t}.npy"


# --------------------------------------------------------------------------------------------
# The key

def _sha256_files(paths: Sequence[Path], digest=None):
    digest = digest or hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest


def teacher_digest(checkpoint: str | Path) -> str:
    """sha256 over a saved teacher's config.json and weight files (``*.safetensors``, else ``*.bin``)."""
    checkpoint = Path(checkpoint)
    weights = sorted(checkpoint.glob("*.safetensors")) or sorted(checkpoint.glob("*.bin"))
    if not (checkpoint / "config.json").is_file() or not weights:
        raise LayergeoError(f"{checkpoint} holds no saved teacher (config.json and weights); cannot key a teacher cache on it")
    return _sha256_files([checkpoint / "config.json", *weights]).hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """sha256 over the tokenizer's class and vocabulary (added tokens included)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps([type(tokenizer).__name__, vocab]).encode()).hexdigest()


def examples_digest(encoded: data.EncodedSplit) -> str:
    """sha256 over every model input of every encoded example, in order."""
    digest = hashlib.sha256()
    for name in sorted(encoded.features):
        rows = encoded.features[name]
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        flat = np.fromiter((v for r in rows for v in r), dtype=np.int64, count=int(lengths.sum()))
        digest.update(name.encode() + b"\0")
        digest.update(lengths.tobytes())
        digest.update(flat.tobytes())
    return digest.hexdigest()


def ingredients(
    checkpoint: str | Path, tokenizer, task: str, split: str, encoded: data.EncodedSplit, max_length: int,
    dtype: str, device: torch.device, attention: str = "eager",
) -> dict:
    """Everything the cached numbers depend on; the key is their sha256.

    ``attention``: the teacher's attention implementation (eager, sdpa, ...), which, like the torch
    and transformers versions, changes the kernels and so the rounding of every stored number.
    """
    import transformers

    return {
        "format": FORMAT,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attention": attention,
        "teacher": teacher_digest(checkpoint),
        "tokenizer": tokenizer_digest(tokenizer),
        "task": task,
        "split": split,
        "examples": examples_digest(encoded),
        "n_examples": len(encoded),
        "max_length": int(max_length),
        "dtype": dtype,
        "precision": precision(device),
    }


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


# --------------------------------------------------------------------------------------------
# The cache

class TeacherCache:
    """One built cache folder, memory-mapped; see the module docstring for the layout."""

    def __init__(self, path: str | Path, built: bool = False, layers: Sequence[int] | None = None):
        self.path = Path(path)
        self.meta = json.loads((self.path / META).read_text())
        self.key: str = self.meta["key"]
        self.dtype: str = self.meta["dtype"]
        self.width: int = self.meta["width"]
        self.logits = np.load(self.path / LOGITS, mmap_mode="r")
        self.offsets = np.load(self.path / OFFSETS, mmap_mode="r")
        self._offsets = np.array(self.offsets)  # N + 1 int64: small, indexed every step
        layers = self.meta["layers"] if layers is None else layers
        self.states = {t: np.load(self.path / state_file(t), mmap_mode="r") for t in layers}
        self.built = built  # True when this process ran the teacher to make or extend it

    # ---- reading

    @property
    def layers(self) -> list[int]:
        return sorted(self.states)

    @property
    def n_examples(self) -> int:
        return int(self.meta["n_examples"])

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    def __len__(self) -> int:
        return self.n_examples

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())

    def describe(self) -> dict:
        """What a run records in env.json and results.json."""
        return {"used": True, "key": self.key, "path": str(self.path), "dtype": self.dtype, "layers": self.layers,
                "n_examples": self.n_examples, "n_tokens": self.n_tokens, "disk_bytes": self.disk_bytes(),
                "built": self.built}

    def lookup(
        self, index: torch.Tensor, attention_mask: torch.Tensor, layers: Sequence[int] | None = None,
        host_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The teacher's outputs for a right-padded batch of examples of the cached split.

        index: (B,) positions in the split (``batch["index"]``); attention_mask: (B, L) of the batch
        (its width and device are used; it is checked against the cached lengths on the host: itself on
        CPU, else ``host_mask``, the same mask before it moved to the device).
        Returns float32 logits (B, C) and {t: (B, L, d)} for ``layers`` (default: all stored), zeros
        at padding, on the attention mask's device.
        """
        layers = self.layers if layers is None else list(layers)
        missing = [t for t in layers if t not in self.states]
        if missing:
            raise LayergeoError(f"teacher cache {self.path} stores states {self.layers}, not {missing}; "
                                "open it with open_or_build(..., layers=...) to add them")
        idx = index.detach().to("cpu", torch.int64).numpy()
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_examples):
            raise LayergeoError(f"example index out of range for a teacher cache of {self.n_examples} examples")
        batch, width = attention_mask.shape
        starts, ends = self._offsets[idx], self._offsets[idx + 1]
        lengths = ends - starts
        keep = torch.arange(width) < torch.from_numpy(lengths)[:, None]  # right padding: real tokens first
        # the mask is compared on the host: the batch's own when it is there, else the host copy fit keeps of it
        # (comparing a GPU mask would make the step wait for the device)
        mask = attention_mask if attention_mask.device.type == "cpu" else host_mask
        checked = mask is None or torch.equal(keep, mask.bool())
        if int(lengths.max(initial=0)) > width or not checked:
            raise LayergeoError("the batch's attention mask does not match the cached examples; the cache needs "
                                "right-padded batches of the split it was built from (same tokenizer and max_length)")
        device = attention_mask.device
        logits = torch.from_numpy(np.asarray(self.logits[idx], dtype=np.float32)).to(device, non_blocking=True)
        states = {}
        for t in layers:
            source = self.states[t]
            rows = np.concatenate([source[s:e] for s, e in zip(starts, ends)]) if batch else source[:0]
            out = torch.zeros(batch, width, source.shape[1], dtype=torch.float32)
            out[keep] = torch.from_numpy(rows.astype(np.float32, copy=False))
            states[t] = out.to(device, non_blocking=True)
        return logits, states

    # ---- building

    @classmethod
    def open_or_build(
        cls,
        teacher: torch.nn.Module,
        tokenizer,
        encoded: data.EncodedSplit,
        *,
        checkpoint: str | Path,
        task: str,
        split: str,
        max_length: int,
        layers: Sequence[int],
        dtype: str = "float16",
        root: str | Path,
        batch_size: int = BATCH_SIZE,
    ) -> "TeacherCache":
        """The cache of ``teacher`` on ``encoded``, built or extended so that it stores ``layers``.

        ``teacher`` must be the model saved at ``checkpoint`` (the key hashes the files), already on
        the device to compute on; ``encoded`` is the split as training encodes it.
        """
        if dtype not in DTYPES:
            raise LayergeoError(f"unknown train.cache_dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        if getattr(tokenizer, "padding_side", "right") != "right":
            raise LayergeoError("the teacher cache needs right padding (tokenizer.padding_side='right'): with left "
                                "padding a token's position, hence the teacher's output, depends on the batch")
        device = next(teacher.parameters()).device
        attention = str(getattr(teacher.config, "_attn_implementation", None) or "eager")
        parts = ingredients(checkpoint, tokenizer, task, split, encoded, max_length, dtype, device, attention)
        key = cache_key(parts)
        root = Path(root)
        path = root / key
        wanted = sorted({int(t) for t in layers})
        cache = cls._try_open(path, parts)
        if cache is not None and set(wanted) <= set(cache.layers):
            return cache
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LayergeoError(f"cannot create the teacher cache folder {root} ({exc.strerror}); "
                                "make it writable or set train.teacher_cache=false") from None
        with _file_lock(root / f".{key}.lock"):
            cache = cls._try_open(path, parts)  # another process may have built it while we waited
            if cache is not None and set(wanted) <= set(cache.layers):
                return cache
            for stale in root.glob(f".{key}.*"):  # temporary folders of builds that died (we hold the lock)
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
            if cache is None:
                if path.exists():  # unreadable or foreign: replace it
                    shutil.rmtree(path)
                _build(path, key, parts, teacher, tokenizer, encoded, wanted, dtype, batch_size)
            else:
                stored = cache.layers
                del cache  # drop our maps before touching the folder
                _add_states(path, sorted(set(wanted) - set(stored)), stored, teacher, tokenizer, encoded, dtype, batch_size)
            return cls(path, built=True)

    @classmethod
    def _try_open(cls, path: Path, parts: dict) -> "TeacherCache | None":
        """The cache at ``path`` when it was made from ``parts``; a state whose file is damaged is left out."""
        try:
            meta = json.loads((path / META).read_text())
            if meta.get("ingredients") != parts:
                return None
            logits = np.load(path / LOGITS, mmap_mode="r")
            offsets = np.load(path / OFFSETS, mmap_mode="r")
            if logits.shape[0] != meta["n_examples"] or offsets.shape != (meta["n_examples"] + 1,):
                return None
            good = []
            for t in meta["layers"]:
                try:
                    if np.load(path / state_file(t), mmap_mode="r").shape == (meta["n_tokens"], meta["width"]):
                        good.append(t)
                except (OSError, ValueError):
                    pass
            return cls(path, layers=good)
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            return None


def _run_teacher(
    teacher: torch.nn.Module, tokenizer, encoded: data.EncodedSplit, offsets: np.ndarray,
    logits_sink: np.ndarray | None, state_sinks: dict[int, np.ndarray], batch_size: int,
) -> None:
    """One pass of the teacher in eval mode over ``encoded`` in order, written into the sinks."""
    global build_count
    build_count += 1
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    loader = data.make_loader(encoded, tokenizer, batch_size, shuffle=False, seed=0)
    bar = progress_bar(len(loader), "teacher cache", unit="batch")
    try:
        with torch.inference_mode(), step_settings(device).autocast(device):
            for batch in loader:
                bar.update(1)
                idx = batch["index"].numpy()
                first, last = int(idx[0]), int(idx[-1])
                if not np.array_equal(idx, np.arange(first, last + 1)):
                    raise LayergeoError("the cache loader did not return the split in order")
                inputs = {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS}
                out = teacher(**inputs, output_hidden_states=bool(state_sinks))
                if logits_sink is not None:
                    logits_sink[first:last + 1] = out.logits.float().cpu().numpy()
                if state_sinks:
                    keep = inputs["attention_mask"].bool()
                    start, end = int(offsets[first]), int(offsets[last + 1])
                    if int(keep.sum()) != end - start:
                        raise LayergeoError("the attention mask and the encoded lengths disagree; cannot cache the teacher")
                    for t, sink in state_sinks.items():
                        sink[start:end] = out.hidden_states[t][keep].float().cpu().numpy()
    finally:
        bar.close()
        teacher.train(was_training)


def _offsets(encoded: data.EncodedSplit) -> np.ndarray:
    lengths = np.fromiter((len(r) for r in encoded.features["input_ids"]), dtype=np.int64, count=len(encoded))
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def _open_sinks(folder: Path, layers: Sequence[int], n_tokens: int, width: int, dtype: str) -> dict[int, np.ndarray]:
    return {t: np.lib.format.open_memmap(folder / state_file(t), mode="w+", dtype=dtype, shape=(n_tokens, width))
            for t in layers}


def _teacher_width(teacher: torch.nn.Module) -> int:
    return int(teacher.config.hidden_size)


def _build(path: Path, key: str, parts: dict, teacher, tokenizer, encoded, layers: list[int], dtype: str, batch_size: int) -> None:
    offsets = _offsets(encoded)
    n_tokens, width = int(offsets[-1]), _teacher_width(teacher)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        np.save(tmp / OFFSETS, offsets)
        logits = np.lib.format.open_memmap(tmp / LOGITS, mode="w+", dtype=np.float32,
                                           shape=(len(encoded), int(teacher.config.num_labels)))
        sinks = _open_sinks(tmp, layers, n_tokens, width, dtype)
        _run_teacher(teacher, tokenizer, encoded, offsets, logits, sinks, batch_size)
        for array in (logits, *sinks.values()):
            array.flush()
        del logits, sinks
        write_json(tmp / META, _meta(key, parts, layers, len(encoded), n_tokens, width, dtype))
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _add_states(path: Path, missing: list[int], stored: list[int], teacher, tokenizer, encoded, dtype: str, batch_size: int) -> None:
    """Compute the states ``missing`` and move each file into the existing folder, then update meta.json."""
    offsets = np.load(path / OFFSETS)
    meta = json.loads((path / META).read_text())
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.add."))
    try:
        sinks = _open_sinks(tmp, missing, int(offsets[-1]), meta["width"], dtype)
        _run_teacher(teacher, tokenizer, encoded, offsets, None, sinks, batch_size)
        for array in sinks.values():
            array.flush()
        del sinks
        for t in missing:
            os.replace(tmp / state_file(t), path / state_file(t))
        meta["layers"] = sorted(set(stored) | set(missing))
        meta["updated"] = now()
        write_json(path / META, meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _meta(key: str, parts: dict, layers: list[int], n_examples: int, n_tokens: int, width: int, dtype: str) -> dict:
    import transformers

    return {
        "key": key, "ingredients": parts, "layers": layers, "n_examples": n_examples, "n_tokens": n_tokens,
        "width": width, "dtype": dtype, "logits_dtype": "float32", "padding_side": "right", "created": now(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__},
    }


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX); a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield
        return
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
