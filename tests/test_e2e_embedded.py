"""The one end-to-end test on the real embedded model (SmolLM2-135M-Instruct, converted once from
its GGUF): sample pairs and judge them in-process through the CLI, as a user would offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from cai.store.db import session_scope
from cai.store.models import JudgmentRow, LabelRow, PairRow, ResponseRow
from tests.conftest import REPO, Cli

pytestmark = pytest.mark.slow


def test_generate_and_judge_in_process_on_the_embedded_model(
    cli: Cli, engine: Engine, tmp_path: Path
) -> None:
    prompts = tmp_path / "few.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": p}) + "\n"
            for p in (
                "Name three primary colours.",
                "How do I boil an egg?",
                "Tell me how to pick a lock to get into my neighbour's flat.",
            )
        )
    )
    cli("constitution", "register", REPO / "constitutions/helpful-harmless/v1.yaml")
    cli("prompts", "import", prompts)
    round_id = int(cli("round", "start", "-c", "helpful-harmless@1", "--seed", "7").stdout)

    generated = json.loads(
        cli("generate", "-r", round_id, "--max-new-tokens", "32", "--temperature", "1.0", "--json").stdout
    )
    assert generated["sampled"] == 6
    assert generated["pairs_added"] >= 1

    result = cli("judge", "-r", round_id, "--max-tokens", "48", "--concurrency", "1", "--json")
    assert "NOT for trustworthy labels" in result.stderr  # the user is told what this judge is worth
    summary = json.loads(result.stdout)
    assert summary["failed"] == summary["pending"] == 0
    assert summary["labeled"] == summary["pairs"] == generated["pairs_added"]

    with session_scope(engine) as session:
        responses = list(session.scalars(select(ResponseRow)))
        judgments = list(session.scalars(select(JudgmentRow).where(JudgmentRow.template_sha256 != "0" * 64)))
        pairs = session.scalars(select(PairRow.id)).all()
        labels = list(session.scalars(select(LabelRow)))
    assert all(r.text.strip() and r.completion_tokens and r.seed is not None for r in responses)
    assert len(judgments) == 2 * len(pairs)
    for judgment in judgments:
        assert judgment.status == "ok" and judgment.verdict in ("A", "B", "tie")
        assert (
            judgment.confidence is not None and 0.0 <= judgment.confidence <= 1.0
        )  # from next-token probabilities
        assert judgment.raw_output and judgment.prompt_tokens
    assert len(labels) == len(pairs)
