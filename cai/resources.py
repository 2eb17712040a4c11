"""Where the shipped data lives: `cai/_data/<name>` in an installed wheel, the repository root in a
checkout (editable install or tests)."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """Directory of shipped data `name` (alembic, prompts, constitutions, prompt_sets)."""
    for candidate in (_PACKAGE / "_data" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"shipped data directory {name!r} is missing from this installation of cai")
