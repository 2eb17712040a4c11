"""Bounds shared by the API's parameters. Row ids are PostgreSQL `integer` keys: a larger number
would fail in the database (500) instead of being refused (422) or simply not found (404)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query

MAX_ID = 2**31 - 1

RowId = Annotated[int, Path(ge=1, le=MAX_ID)]
"""A row id in the path."""
RoundFilter = Annotated[int | None, Query(ge=1, le=MAX_ID, description="Only this round.")]
