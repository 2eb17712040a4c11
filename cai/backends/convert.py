"""Turns a ModelRef into something `from_pretrained` can load: the embedded GGUF is converted once
into a cached transformers directory, built atomically so a killed conversion leaves no half cache."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from cai.registry import ModelRef

# Part of the cache key: bump it when the conversion recipe changes so old caches are not reused.
CONVERT_VERSION = 1
# A temp dir this old is a conversion that was killed, not one still running (one takes < 1 min).
STALE_TEMP_S = 3600.0


def cache_root() -> Path:
    """Where converted models live: `$CAI_CACHE_DIR` (the CLI's `cache_dir` setting reads the same
    variable), else `$XDG_CACHE_HOME/cai/models`, else `~/.cache/cai/models`."""
    if base := os.environ.get("CAI_CACHE_DIR"):
        return Path(base).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "cai" / "models"


def file_key(path: Path) -> str:
    """Short content hash of a file (plus the recipe version): same GGUF bytes, same cache."""
    digest = hashlib.sha256(f"cai-convert-v{CONVERT_VERSION}\n".encode())
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def ensure_local_model(ref: ModelRef, cache_dir: Path | None = None) -> Path | str:
    """A directory (or, for kind 'hub', the hub id) that `AutoModelForCausalLM.from_pretrained` and
    `AutoTokenizer.from_pretrained` load. `cache_dir` overrides `cache_root()` for converted models."""
    if ref.kind == "local":
        return Path(ref.location)
    if ref.kind == "hub":
        return ref.location
    if ref.kind != "embedded":
        raise ValueError(f"unknown model kind {ref.kind!r} for {ref.name!r}")
    gguf = Path(ref.location)
    target = (cache_dir or cache_root()) / f"{ref.name}-{file_key(gguf)}"
    return build_atomically(target, lambda tmp: convert_gguf(gguf, tmp))


def build_atomically(target: Path, build: Callable[[Path], None]) -> Path:
    """Return `target`, building it first if absent. `build` fills a temp dir beside the target,
    which is then renamed into place: `target` exists only complete. If a concurrent builder got
    there first, ours is discarded. A failed build removes its temp dir; a killed one leaves a
    `.<name>.tmp-*` dir that is never read and is removed by a later call once stale."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    if target.is_dir():
        return target
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        build(tmp)
        try:
            # os.rename of a directory is atomic on one filesystem, and fails if another builder
            # already renamed a (non-empty) directory onto the target.
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _gguf_memoized() -> Iterator[None]:
    """Memoise two slow gguf calls while converting. transformers parses the whole GGUF metadata
    for the tokenizer, again for the config and again for the weights (~10 s each for SmolLM2's
    49k-token vocabulary on 2 cores), and rebuilds the tensor-name map for each of the model's
    ~400 modules. It imports both names from `gguf` at call time, so swapping the module attributes
    reaches it; should that change, conversion is only slower, not wrong."""
    import gguf

    originals = {name: getattr(gguf, name) for name in ("GGUFReader", "get_tensor_name_map")}
    for name, function in originals.items():
        setattr(gguf, name, functools.cache(function))
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(gguf, name, function)


def _remove_stale_temps(target: Path) -> None:
    now = time.time()
    for leftover in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            if now - leftover.stat().st_mtime > STALE_TEMP_S:
                shutil.rmtree(leftover, ignore_errors=True)
        except FileNotFoundError:
            pass


def convert_gguf(gguf: Path, out: Path) -> None:
    """Write `gguf` as a float32 transformers model + tokenizer into `out`."""
    with _gguf_memoized():
        _convert(gguf, out)


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # padding_side as a load argument, not an attribute set later, so save_pretrained records it.
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, padding_side="left")
    if not tokenizer.chat_template:
        raise ValueError(f"{gguf}: the GGUF carries no chat template")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain one from its config. Meta-device
    # construction skips the random init that load_state_dict would overwrite anyway.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
