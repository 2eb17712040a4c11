"""`cai demo` on the real embedded model: one round, offline, on the CPU. The trained policy must
move the way the constitution's rules point (shorter, finished answers) on held-out prompts, by
more than the untrained policy moves between sampling seeds."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from cai.backends import policy_location
from cai.backends.base import SampleRequest, SamplingParams
from cai.backends.hf import HFSampler
from cai.constitution import load_constitution
from cai.generate import sample_seed
from cai.registry import EMBEDDED_MODEL
from cai.store.db import make_engine, session_scope
from cai.store.evaluation import eval_prompts, latest_evaluation
from tests.conftest import REPO, TEST_DATABASE_URL, Cli

pytestmark = pytest.mark.slow


@pytest.mark.skipif(TEST_DATABASE_URL != "sqlite", reason="the demo keeps its own SQLite database")
def test_demo_trains_the_policy_toward_the_rules(tmp_path: Path) -> None:
    demo_dir = tmp_path / "demo"
    result = Cli("sqlite:///unused.db")("demo", "--dir", demo_dir)
    assert "Where to look next" in result.stdout and "decided by the constitution's rules" in result.stdout
    assert all(f"time: {stage}" in result.stdout for stage in ("generate", "judge", "train", "eval", "total"))

    engine = make_engine(f"sqlite:///{demo_dir / 'cai.db'}")
    with session_scope(engine) as session:
        evaluation = latest_evaluation(session, 1)
        prompts = eval_prompts(session, 1, limit=evaluation.metrics["eval_prompts"] if evaluation else None)
    engine.dispose()
    assert evaluation is not None
    baseline, candidate = evaluation.metrics["baseline"], evaluation.metrics["candidate"]

    # The untrained policy under two more seeds, with the demo's sampling settings: how much its
    # mean length and rule pass rate move by chance alone.
    rules = [
        p for p in load_constitution(REPO / "constitutions/concise-safe/v2.yaml").constitution.principles
        if p.rule is not None
    ]  # fmt: skip
    sampler = HFSampler(policy_location(EMBEDDED_MODEL, EMBEDDED_MODEL), name=EMBEDDED_MODEL)
    params = SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=96)
    words, passing = [baseline["mean_words"]], [baseline["all_rules_pass_rate"]]
    for seed in (1, 2):
        answers = sampler.sample(
            [SampleRequest(p.messages, sample_seed(seed, p.id, 0)) for p in prompts], params
        )
        words.append(statistics.fmean(len(a.text.split()) for a in answers))
        passing.append(statistics.fmean(all(r.rule.passes(a.text) for r in rules if r.rule) for a in answers))
    word_spread, pass_spread = max(words) - min(words), max(passing) - min(passing)

    report = f"untrained over seeds: words {words}, all-rules pass {passing}; trained: {candidate}"
    assert baseline["mean_words"] - candidate["mean_words"] > word_spread, report
    assert candidate["all_rules_pass_rate"] - baseline["all_rules_pass_rate"] > pass_spread, report
    assert evaluation.wins > evaluation.losses, report
