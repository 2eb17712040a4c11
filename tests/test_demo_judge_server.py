"""`cai demo --judge-server llama.cpp`: the flag's contract (bad combinations and a missing
llama-cpp-python exit 2 before anything is written), and, where llama.cpp's server is installed,
a small demo judged through it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from cai.backends.llamacpp_server import unavailable_reason
from cai.registry import EMBEDDED_MODEL
from cai.store.db import make_engine, session_scope
from cai.store.models import JudgeRow, JudgmentRow
from tests.conftest import TEST_DATABASE_URL, Cli


def test_llama_cpp_judge_server_without_llama_cpp_python_exits_2_saying_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # None in sys.modules is how Python marks a module that cannot be imported: find_spec
    # answers None and `import llama_cpp` raises ImportError, as on a machine without it.
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    demo_dir = tmp_path / "demo"
    result = Cli("sqlite:///unused.db")("demo", "--dir", demo_dir, "--judge-server", "llama.cpp", expect=2)
    assert "llama-cpp-python is not installed" in result.stderr
    assert "pip install 'llama-cpp-python[server]'" in result.stderr
    assert not demo_dir.exists()  # refused before the demo wrote anything


def test_llama_cpp_judge_server_with_a_judge_base_url_exits_2(tmp_path: Path) -> None:
    demo_dir = tmp_path / "demo"
    args = ["--judge-server", "llama.cpp", "--judge-base-url", "http://127.0.0.1:9/v1", "--judge-model", "m"]
    result = Cli("sqlite:///unused.db")("demo", "--dir", demo_dir, *args, expect=2)
    assert "drop --judge-base-url" in result.stderr
    assert not demo_dir.exists()


def test_an_unknown_judge_server_is_a_usage_error(tmp_path: Path) -> None:
    result = Cli("sqlite:///unused.db")(
        "demo", "--dir", tmp_path / "demo", "--judge-server", "vllm", expect=2
    )
    assert "in-process" in result.stderr and "llama.cpp" in result.stderr


@pytest.mark.peer
@pytest.mark.slow
@pytest.mark.skipif(TEST_DATABASE_URL != "sqlite", reason="the demo keeps its own SQLite database")
@pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
def test_a_small_demo_judges_through_llama_cpp_server(tmp_path: Path) -> None:
    """A demo cut down (8 prompts x 3 answers of at most 48 tokens, one DPO step; about 2 minutes
    on 2 cores): the rules label enough pairs to export and train on, and the judge behind the
    server is asked about 2 of the pairs they leave, per round and per eval."""
    demo_dir = tmp_path / "demo"
    sizes = ["--prompts", "8", "--samples", "3", "--eval-prompts", "2", "--max-new-tokens", "48"]
    result = Cli("sqlite:///unused.db")(
        "demo",
        "--dir",
        demo_dir,
        "--judge-server",
        "llama.cpp",
        "--judge-pairs",
        "2",
        "--epochs",
        "0.1",
        *sizes,
    )
    assert "Where to look next" in result.stdout

    engine = make_engine(f"sqlite:///{demo_dir / 'cai.db'}")
    with session_scope(engine) as session:
        judge = session.scalars(select(JudgeRow).where(JudgeRow.backend == "openai")).first()
        assert judge is not None and judge.model == EMBEDDED_MODEL and judge.endpoint_features
        # What the server accepted was learned and stored: llama.cpp's schema-carrying json_object.
        [features] = judge.endpoint_features.values()
        assert features["response_format"] == "json_object_schema" and features["logprobs"] is True
        asked = session.scalars(select(JudgmentRow).where(JudgmentRow.judge_id == judge.id)).all()
    engine.dispose()
    assert asked and all(j.attempts == 1 for j in asked)
    assert any(j.status == "ok" and j.choice_probs for j in asked)
