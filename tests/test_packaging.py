"""What a user gets from `pip install`: a `cai` that starts without importing the heavy stack, and
a non-editable wheel that carries its migrations, templates, constitutions and prompt set."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cai.templates import REQUIRED
from tests.conftest import REPO

HEAVY = ("torch", "transformers", "trl", "datasets", "openai", "sqlalchemy", "alembic", "pyarrow")


def test_help_imports_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "from cai.cli import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert "constitution" in result.stdout


@pytest.mark.slow
def test_installed_wheel_works_outside_the_checkout(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, REPO],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("cai-*.whl")
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", site, wheel],
        check=True,
        capture_output=True,
    )
    work = tmp_path / "work"
    work.mkdir()
    # PYTHONPATH puts the installed wheel ahead of the editable checkout; cwd is outside the repo.
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("CAI_DATABASE_URL", None)

    def cai(*args: str) -> str:
        code = "import sys; from cai.cli import main; sys.argv = ['cai', *sys.argv[1:]]; main()"
        result = subprocess.run(
            [sys.executable, "-c", code, *args], cwd=work, env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        return result.stdout + result.stderr

    where = subprocess.run(
        [sys.executable, "-c", "import cai.resources as r; print(r.data_dir('alembic'))"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert where.startswith(str(site))
    assert "upgraded empty" in cai("db", "upgrade")
    assert (work / "cai.db").is_file()  # the default database lands in the working directory
    shipped = site / "cai/_data/constitutions/helpful-harmless/v1.yaml"
    assert "registered" in cai("constitution", "register", str(shipped))
    assert "imported 240" in cai(
        "prompts", "import", str(site / "cai/_data/prompt_sets/helpful-harmless.jsonl")
    )
    assert cai("templates", "check").count("ok ") == len(REQUIRED)
    assert "imported 22" in cai("prompts", "import", str(site / "cai/_data/prompt_sets/multi-turn.jsonl"))
