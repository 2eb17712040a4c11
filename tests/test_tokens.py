"""API tokens (`cai token`, cai.store.tokens): the plaintext is shown once and stored nowhere, a
presented token maps to its name and role until revoked, and bad input changes nothing."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from cai.auth import Actor, Role
from cai.store import tokens
from cai.store.models import Base
from tests.conftest import Cli, table_counts


def every_stored_value(engine: Engine) -> str:
    """Every row of every table, as text: where a leaked token would show up."""
    with engine.connect() as connection:
        return "\n".join(
            repr(tuple(row))
            for name in Base.metadata.tables
            for row in connection.execute(text(f'SELECT * FROM "{name}"'))
        )


def test_a_created_token_is_shown_once_stored_as_a_hash_and_maps_to_its_role(
    cli: Cli, engine: Engine
) -> None:
    result = cli("token", "create", "--name", "alice", "--role", "Annotator")
    token = result.stdout.strip()
    assert token.startswith(tokens.PREFIX) and len(token) == len(tokens.PREFIX) + 43
    assert token not in result.stderr

    stored = every_stored_value(engine)
    assert token not in stored and token[len(tokens.PREFIX) :] not in stored
    assert tokens.token_sha256(token) in stored

    listed = cli("token", "list", "--json").stdout
    assert token not in listed and tokens.token_sha256(token) not in listed
    assert [(t["name"], t["role"], t["last_used_at"]) for t in json.loads(listed)] == [
        ("alice", "annotator", None)
    ]

    with Session(engine) as session, session.begin():
        assert tokens.authenticate(session, token) == Actor("alice", Role.ANNOTATOR)
        assert tokens.authenticate(session, token + "x") is None
        assert tokens.authenticate(session, "") is None
    assert json.loads(cli("token", "list", "--json").stdout)[0]["last_used_at"] is not None

    cli("token", "revoke", "alice")
    with Session(engine) as session:
        assert tokens.authenticate(session, token) is None
    revoked_again = cli("token", "revoke", "alice", expect=2)
    assert "alice: no token of that name, or it is revoked already" in revoked_again.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "bob", "--role", "root"], "--role: unknown role 'root'; choose one of viewer, annotator"),
        (["--name", "bob smith", "--role", "viewer"], "name: 'bob smith' is not a token name"),
        (["--name", "alice", "--role", "admin"], "name: a token named 'alice' exists already"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(
    cli: Cli, engine: Engine, args: list[str], message: str
) -> None:
    cli("token", "create", "--name", "alice", "--role", "viewer")
    before = table_counts(engine)
    result = cli("token", "create", *args, expect=2)
    assert message in result.stderr
    assert not result.stdout.strip()
    assert table_counts(engine) == before


def test_each_role_allows_the_ones_below_it_and_not_the_ones_above() -> None:
    order = [Role.VIEWER, Role.ANNOTATOR, Role.OPERATOR, Role.ADMIN]
    for i, role in enumerate(order):
        assert [role.allows(other) for other in order] == [j <= i for j in range(len(order))]
