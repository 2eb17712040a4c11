"""Schemathesis against the API's own OpenAPI schema: for every operation, requests generated from
the schema (valid ones and, where the schema allows it, invalid ones) get no 5xx, and every
response conforms to the schema: its status is documented, its content type and body match.
Examples per operation are bounded (CAI_SCHEMA_EXAMPLES, default 12) to keep CI's time."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="the dev extra installs schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import checks  # noqa: E402

from cai.api.app import create_api  # noqa: E402
from cai.config import load_settings  # noqa: E402
from cai.workspace import Workspace  # noqa: E402
from tests.conftest import Cli  # noqa: E402
from tests.test_audit import World, world  # noqa: E402

__all__ = ["world"]

TOKEN = "schema-test-admin-token-0123456789"
# No 5xx, and every response within the schema. Not "schema-valid requests are accepted": a YAML
# or prompt file can be well-formed bytes and still a bad constitution, refused with a 422.
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
]
EXAMPLES = int(os.environ.get("CAI_SCHEMA_EXAMPLES", "12"))


@pytest.fixture
def api_schema(db_url: str, world: World, cli: Cli, tmp_path: Path) -> Any:
    """The API over a database holding the audit tests' judged round and an export of it, so
    that reads find rows and not only 404s."""
    cli("export", "--round", world.round_id, "--out", tmp_path / "snapshot")
    app = create_api(Workspace(load_settings(database_url=db_url)), bootstrap_token=TOKEN)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_every_operation_answers_within_its_schema(api_schema: Any) -> None:
    # One test over every operation (schemathesis' pytest plugin does not run under pytest 9):
    # each gets its own Hypothesis run, and every operation's failure is reported at the end.
    failures: dict[str, str] = {}
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) > 30  # the whole API, not an empty schema
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,  # the same examples in every run: CI does not flake on a new draw
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        def check(case: Any) -> None:
            case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, checks=CHECKS)

        try:
            check()
        except (Exception, BaseExceptionGroup) as exc:  # collected, then reported together
            failures[operation.label] = f"{type(exc).__name__}: {exc}"[:2000]
    assert not failures, "\n\n".join(f"{label}: {why}" for label, why in failures.items())
