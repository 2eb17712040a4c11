"""Shared fixtures. Every test that touches a database runs against the URL the suite was started
with: SQLite by default, PostgreSQL when CAI_TEST_DATABASE_URL points at one (each test then
gets a schema of its own, dropped afterwards)."""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from typer.testing import CliRunner

from cai.cli import app
from cai.store.db import make_engine

REPO = Path(__file__).resolve().parents[1]
TEST_DATABASE_URL = os.environ.get("CAI_TEST_DATABASE_URL", "sqlite")


@pytest.fixture
def db_url(tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database for one test."""
    if TEST_DATABASE_URL == "sqlite":
        yield f"sqlite:///{tmp_path / 'cai.db'}"
        return
    schema = f"cai_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(TEST_DATABASE_URL)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        # libpq `options` sets search_path for every connection, so alembic and cai both see
        # only this test's schema.
        yield f"{TEST_DATABASE_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    store = make_engine(db_url)
    yield store
    store.dispose()


class Cli:
    """Runs `cai --db URL ...` in-process through typer's runner and keeps stdout/stderr apart."""

    def __init__(self, db_url: str) -> None:
        self.db_url = db_url
        self.runner = CliRunner()

    def __call__(self, *args: str | Path, expect: int | None = 0) -> object:
        result = self.runner.invoke(app, ["--db", self.db_url, *map(str, args)])
        if expect is not None and result.exit_code != expect:
            raise AssertionError(
                f"cai {' '.join(map(str, args))}: exit {result.exit_code}, expected {expect}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}\n{result.exception!r}"
            )
        return result


@pytest.fixture
def cli(db_url: str) -> Cli:
    return Cli(db_url)


def table_counts(engine: Engine) -> dict[str, int]:
    """Rows per table: the yardstick for 'bad input changes nothing'."""
    from cai.store.models import Base

    with engine.connect() as connection:
        return {
            name: connection.execute(text(f'SELECT COUNT(*) FROM "{name}"')).scalar_one()
            for name in Base.metadata.tables
        }


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail a test that hangs rather than hang the suite (SIGALRM interrupts the main thread)."""

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"the test ran past its {seconds} s deadline")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On the PostgreSQL pass, run only the tests that touch a database (every such test takes
    `db_url`): the rest (pure logic, tiny-model training, the browser) ran on the SQLite pass
    already, and running them again would only double CI's time."""
    if TEST_DATABASE_URL == "sqlite":
        return
    once = pytest.mark.skip(reason="touches no database: runs once, on the SQLite pass")
    for item in items:
        if "db_url" not in getattr(item, "fixturenames", ()):
            item.add_marker(once)
