"""Alembic environment: runs online against the engine cai hands over, or one built from
`-x db=URL` / CAI_DATABASE_URL when alembic is run by hand."""

from __future__ import annotations

import os

from alembic import context

from cai.store.db import make_engine
from cai.store.models import Base

config = context.config


def _engine():
    engine = config.attributes.get("engine")
    if engine is not None:
        return engine
    url = context.get_x_argument(as_dictionary=True).get("db") or os.environ.get(
        "CAI_DATABASE_URL", "sqlite:///cai.db"
    )
    return make_engine(url)


def run_migrations_online() -> None:
    engine = _engine()
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
            render_as_batch=True,
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


if context.is_offline_mode():
    raise SystemExit("cai migrations run online only: pass a database with -x db=URL")
run_migrations_online()
