"""Engine and session factory; SQLite pragmas; schema upgrades through alembic (the only way the
schema is made)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker

from cai.errors import BadInput
from cai.resources import data_dir


def make_engine(url: str, where: str = "database URL") -> Engine:
    """An engine for `url`; SQLite gets WAL, foreign keys and a busy timeout. `where` names where
    the URL came from in error messages (a flag, a setting)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise BadInput(f"{where}: {url!r} is not a database URL") from None
    if parsed.drivername == "postgresql":
        # psycopg 3 is what the `postgres` extra installs; the bare scheme would look for psycopg2.
        parsed = parsed.set(drivername="postgresql+psycopg")
    try:
        engine = create_engine(parsed, future=True)
    except NoSuchModuleError:
        raise BadInput(f"{where}: unsupported database URL scheme {parsed.drivername!r}") from None
    except ModuleNotFoundError as exc:
        raise BadInput(
            f"{where}: the driver for {parsed.drivername!r} is not installed ({exc.name}); "
            "for PostgreSQL: pip install 'cai[postgres]'"
        ) from None
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin_immediate)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Take over transaction control from the sqlite3 module (see _sqlite_begin_immediate).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")  # concurrent CLI commands wait instead of failing
    if _is_file_database(dbapi_connection):
        cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def _sqlite_begin_immediate(connection: Any) -> None:
    # A deferred transaction that reads and then writes fails at once with SQLITE_BUSY if another
    # process wrote in between (WAL cannot upgrade a stale snapshot). Taking the write lock up
    # front makes concurrent cai processes queue on busy_timeout instead of failing.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _is_file_database(dbapi_connection: Any) -> bool:
    cursor = dbapi_connection.cursor()
    rows = cursor.execute("PRAGMA database_list").fetchall()
    cursor.close()
    return any(row[1] == "main" and row[2] for row in rows)


def alembic_config(engine: Engine) -> Any:
    """An alembic Config pointing at the shipped migrations, bound to `engine`."""
    from alembic.config import Config

    # Config's default stdout is whatever sys.stdout was when alembic was first imported.
    config = Config(stdout=sys.stdout)
    config.set_main_option("script_location", str(data_dir("alembic")))
    # The engine travels as an attribute, not as `sqlalchemy.url`: configparser would choke on
    # the `%` of URL-encoded options, and a URL would lose the SQLite pragmas set up here.
    config.attributes["engine"] = engine
    return config


def head_revision(engine: Engine) -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(engine)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(alembic_config(engine), revision)


def downgrade(engine: Engine, revision: str) -> None:
    from alembic import command

    command.downgrade(alembic_config(engine), revision)


def ensure_schema(engine: Engine) -> None:
    """Upgrade to head on first use (or after `pip install -U`); a no-op when already current."""
    if current_revision(engine) == head_revision(engine):
        return
    if _has_foreign_tables(engine):
        raise BadInput(
            f"{engine.url.render_as_string()}: this database has tables but no cai schema version; "
            "point the database URL at an empty database or a cai one"
        )
    upgrade(engine)


def _has_foreign_tables(engine: Engine) -> bool:
    from cai.store.models import Base

    names = set(inspect(engine).get_table_names())
    return bool(names) and "alembic_version" not in names and not names & set(Base.metadata.tables)


@contextmanager
def session_scope(engine: Engine | Connection) -> Iterator[Session]:
    """One transaction: committed on success, rolled back on any error (bad input changes nothing).
    On a connection already in a transaction, the session joins it and its owner decides."""
    factory = sessionmaker(engine, expire_on_commit=False)
    with factory() as session, session.begin():
        yield session


@contextmanager
def rolled_back(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction that is rolled back at the end, whatever happens. Sessions
    opened on it (session_scope) join that transaction: code that plans and claims work runs
    as it would, and nothing it wrote is kept (an estimate)."""
    with engine.connect() as connection:
        transaction = connection.begin()
        try:
            yield connection
        finally:
            transaction.rollback()
