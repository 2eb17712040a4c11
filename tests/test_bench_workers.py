"""bench/workers.py runs end to end in a tiny configuration (PostgreSQL only: several workers
judge one round only there). It checks that the bench completes, not how fast anything is."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from sqlalchemy.engine import make_url

from tests.conftest import REPO


def test_workers_bench_completes(db_url: str) -> None:
    url = make_url(db_url)
    if url.get_backend_name() != "postgresql":
        pytest.skip("the workers bench needs PostgreSQL (run with CAI_TEST_DATABASE_URL)")
    # The bench makes (and drops) a schema per run itself; the fixture's schema goes unused.
    base = url.difference_update_query(["options"]).render_as_string(hide_password=False)
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench/workers.py"),
            "--db",
            base,
            "--pairs",
            "8",
            "--workers",
            "2",
            "--latency",
            "0.01",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^1 worker: [\d.]+ judgments/s", result.stdout, re.MULTILINE), result.stdout
    assert re.search(r"^2 workers: [\d.]+ judgments/s", result.stdout, re.MULTILINE), result.stdout
    assert re.search(r"^ratio 2 workers / 1 worker: [\d.]+x", result.stdout, re.MULTILINE), result.stdout
