"""`cai report`: the numbers on the page come from the store, the plots are real PNGs, hostile
names are escaped, and rounds that have not reached training or evaluation still get a page."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from cai.report import PLOTS, render_plots
from cai.store.db import ensure_schema, session_scope
from cai.store.models import (
    ConstitutionRow,
    EvaluationRow,
    JudgeRow,
    JudgmentRow,
    LabelRow,
    PairRow,
    PolicyRow,
    PrincipleRow,
    PromptRow,
    ResponseRow,
    RoundRow,
    SnapshotRow,
    TrainingRunRow,
    TrainingStepRow,
)
from cai.store.reporting import gather_report
from tests.conftest import Cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EVIL_PRINCIPLE = r"<script>$\notacommand$</script>"
EVIL_POLICY = "<script>alert('p1')</script>"


def _add(session: Session, row: object) -> int:
    session.add(row)
    session.flush()
    return row.id  # type: ignore[attr-defined]


def seed_history(session: Session) -> dict[str, int]:
    """Round 1 went through the whole loop; round 2 (sampled from round 1's policy) has samples
    only. Word counts, labels and rule checks are chosen so every rate below is exact."""
    constitution = _add(
        session,
        ConstitutionRow(name="c", version=1, sha256="c" * 64, description="", body={}, source_text=""),
    )
    principle = {}
    for position, (key, kind) in enumerate(
        [("helpful", "llm"), (EVIL_PRINCIPLE, "llm"), ("no-emoji", "rule")]
    ):
        principle[key] = _add(
            session,
            PrincipleRow(
                constitution_id=constitution, key=key, position=position, kind=kind, critique="", weight=1.0
            ),
        )
    p0 = _add(session, PolicyRow(name="p0", model_ref="/m/p0"))
    p1 = _add(session, PolicyRow(name=EVIL_POLICY, model_ref="/m/p1", parent_id=p0))
    judge, rules = (
        _add(
            session,
            JudgeRow(
                config_sha256=c * 64,
                backend="x",
                model="m",
                mode="pairwise",
                template_sha256="t" * 64,
                params={},
            ),
        )
        for c in "jr"
    )
    round1 = _add(session, RoundRow(constitution_id=constitution, policy_id=p0, status="done", config={}))
    round2 = _add(
        session,
        RoundRow(
            constitution_id=constitution, policy_id=p1, parent_round_id=round1, status="generated", config={}
        ),
    )
    prompt = _add(session, PromptRow(sha256="p" * 64, messages=[], text="hi", split="train"))

    def response(round_id: int, policy: int, index: int, words: int, origin: str = "sample") -> int:
        text = " ".join(["word"] * words)
        return _add(
            session,
            ResponseRow(
                round_id=round_id,
                prompt_id=prompt,
                policy_id=policy,
                sample_index=index,
                origin=origin,
                text=text,
                sampling={},
            ),
        )

    r1, r2, r3, r4 = (response(round1, p0, i, words) for i, words in enumerate([2, 4, 6, 8]))  # mean 5
    revised = response(round1, p0, 10, 100, origin="revision")  # not a sample of p0: left out
    evaluated = response(round1, p1, 20, 50, origin="eval")  # belongs to the evaluation: left out
    response(round2, p1, 0, 3)
    response(round2, p1, 1, 3)

    def pair(a: int, b: int, kind: str = "sample") -> int:
        return _add(
            session, PairRow(round_id=round1, prompt_id=prompt, response_a_id=a, response_b_id=b, kind=kind)
        )

    def judged(pair_id: int, key: str, verdict: str, inconsistent: bool) -> None:
        for order in ("AB", "BA"):
            session.add(
                JudgmentRow(
                    pair_id=pair_id,
                    order=order,
                    principle_id=principle[key],
                    judge_id=judge,
                    constitution_sha256="c" * 64,
                    template_sha256="t" * 64,
                    status="ok",
                )
            )
        session.add(
            LabelRow(
                pair_id=pair_id, judge_id=judge, source="judge", verdict=verdict, inconsistent=inconsistent
            )
        )

    def rule_check(pair_id: int, a_passes: bool, b_passes: bool) -> None:
        session.add(
            JudgmentRow(
                pair_id=pair_id,
                order="AB",
                principle_id=principle["no-emoji"],
                judge_id=rules,
                constitution_sha256="c" * 64,
                template_sha256="r" * 64,
                status="ok",
                raw_output=json.dumps({"a_passes": a_passes, "b_passes": b_passes}),
            )
        )

    first, second, third = pair(r1, r2), pair(r3, r4), pair(r1, r3)
    judged(first, "helpful", "A", False)
    judged(second, EVIL_PRINCIPLE, "tie", True)
    judged(pair(r1, revised, "revision"), "helpful", "tie", False)
    judged(pair(evaluated, r2, "eval"), "helpful", "tie", True)  # an eval pair: not a training label
    session.add(LabelRow(pair_id=first, source="human", verdict="B"))  # humans are not the judge
    # r1 is checked twice; each response counts once: r1, r3, r4 pass and r2 fails.
    rule_check(first, True, False)
    rule_check(second, True, True)
    rule_check(third, True, True)

    snapshot = _add(
        session, SnapshotRow(round_id=round1, path="/s", manifest_sha256="s" * 64, counts={}, filters={})
    )
    run = _add(
        session,
        TrainingRunRow(
            round_id=round1,
            snapshot_id=snapshot,
            reference_policy_id=p0,
            output_policy_id=p1,
            status="done",
            output_dir="/o",
            config={},
        ),
    )
    for step, accuracy in enumerate([0.5, 0.625, 0.75, 0.875], start=1):
        metrics = {"loss": 0.7, "rewards/accuracies": accuracy, "rewards/margins": step / 10}
        session.add(TrainingStepRow(training_run_id=run, step=step, metrics=metrics))
    session.add(TrainingStepRow(training_run_id=run, step=5, metrics={"train_loss": 0.6}))
    session.add(
        EvaluationRow(
            round_id=round1,
            candidate_policy_id=p1,
            baseline_policy_id=p0,
            judge_id=judge,
            prompts=8,
            wins=5,
            ties=1,
            losses=2,
            metrics={
                "samples_per_prompt": 1,
                "candidate": {
                    "policy": EVIL_POLICY,
                    "mean_words": 7.5,
                    "mean_tokens": None,
                    "rule_pass_rate": {"no-emoji": 0.875},
                    "all_rules_pass_rate": 0.875,
                },
                "baseline": {"policy": "p0", "mean_words": 5.0, "rule_pass_rate": {"no-emoji": 0.75}},
                "judge_only": {"wins": 4, "ties": 2, "losses": 2, "inconsistent": 1, "failed": 0},
            },
        )
    )
    return {"round1": round1, "round2": round2}


@pytest.fixture
def history(engine: Engine) -> dict[str, int]:
    ensure_schema(engine)
    with session_scope(engine) as session:
        return seed_history(session)


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk follows the signature
    assert width > 100 and height > 100 and len(data) > 2000, path


def test_numbers_come_from_the_store(engine: Engine, history: dict[str, int]) -> None:
    with session_scope(engine) as session:
        data = gather_report(session)
    first, second = data.rounds
    assert (first.samples, first.mean_words) == (4, 5.0)
    assert (second.samples, second.mean_words) == (2, 3.0)
    stats = {s.principle: (s.labeled, s.ties, s.flips) for s in first.principles}
    assert stats == {"helpful": (2, 1, 0), EVIL_PRINCIPLE: (1, 1, 1)}
    assert first.sample_rule_pass_rate == {"no-emoji": 0.75}
    assert first.training is not None and first.training.steps == 5
    assert first.training.accuracy[-1] == (4, 0.875) and first.training.margin[0] == (1, 0.1)
    assert first.evaluation is not None and first.evaluation.win_rate == 0.625
    assert first.evaluation.candidate.policy == EVIL_POLICY
    assert second.training is None and second.evaluation is None and second.principles == []


def test_report_writes_the_page_and_every_plot(cli: Cli, history: dict[str, int], tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = cli("report", "--out", out, "--json")
    files = json.loads(result.stdout)["files"]
    assert {Path(f).name for f in files} == {"index.html", *PLOTS}
    for name in PLOTS:
        assert_png(out / name)
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "62.5%" in page  # 5 wins of 8 prompts
    assert "5 wins, 1 ties, 2 losses" in page
    assert "5.0" in page and "7.5" in page  # mean words of the samples and of the eval candidate
    assert "75.0%" in page  # rule pass rate of round 1's samples
    assert "87.5%" in page  # last reward accuracy, and the candidate's rule pass rate
    for name in PLOTS:
        assert f'src="{name}"' in page


def test_hostile_names_are_escaped(cli: Cli, history: dict[str, int], tmp_path: Path) -> None:
    cli("report", "--out", tmp_path)
    page = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "<script" not in page
    assert "&lt;script&gt;alert(&#39;p1&#39;)&lt;/script&gt;" in page
    assert r"&lt;script&gt;$\notacommand$&lt;/script&gt;" in page


def test_a_round_without_training_or_evaluation_says_so(
    cli: Cli, history: dict[str, int], tmp_path: Path
) -> None:
    cli("report", "--round", history["round2"], "--out", tmp_path)
    page = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "Round 2" in page and "Round 1<" not in page
    assert "No training yet." in page and "No evaluation yet." in page and "No judge labels yet." in page
    assert "history up to round 2" in page
    # The history plots still carry round 1; the per-principle plot covers round 2 only.
    assert_png(tmp_path / "win_rate.png")
    assert_png(tmp_path / "training.png")
    assert not (tmp_path / "principles.png").exists()


def test_a_fresh_round_gets_a_page_and_no_plots(cli: Cli, engine: Engine, tmp_path: Path) -> None:
    ensure_schema(engine)
    with session_scope(engine) as session:
        constitution = _add(
            session,
            ConstitutionRow(name="c", version=1, sha256="c" * 64, description="", body={}, source_text=""),
        )
        policy = _add(session, PolicyRow(name="p0", model_ref="/m"))
        _add(session, RoundRow(constitution_id=constitution, policy_id=policy, config={}))
    out = tmp_path / "r"
    cli("report", "--out", out)
    assert sorted(p.name for p in out.iterdir()) == ["index.html"]
    page = (out / "index.html").read_text(encoding="utf-8")
    for note in ("No samples yet.", "No judge labels yet.", "No training yet.", "No evaluation yet."):
        assert note in page


def test_an_empty_store_gets_a_page(cli: Cli, tmp_path: Path) -> None:
    cli("report", "--out", tmp_path / "r")
    assert "No rounds yet" in (tmp_path / "r/index.html").read_text(encoding="utf-8")


def test_missing_metrics_keys_are_tolerated(engine: Engine, history: dict[str, int]) -> None:
    with session_scope(engine) as session:
        evaluation = session.query(EvaluationRow).one()
        evaluation.metrics = {"candidate": "not a dict", "judge_only": {"wins": "x"}}
    with session_scope(engine) as session:
        data = gather_report(session)
    e = data.rounds[0].evaluation
    assert e is not None and e.candidate.mean_words is None and e.judge_only == {}
    plots = render_plots(data)  # the web dashboard's entry point: bytes, no files
    assert plots["win_rate.png"].startswith(PNG_SIGNATURE)
    assert set(plots) == set(PLOTS)  # length and rule plots still have the round's samples


def test_unknown_round_is_bad_input_and_writes_nothing(
    cli: Cli, history: dict[str, int], tmp_path: Path
) -> None:
    result = cli("report", "--round", 99, "--out", tmp_path / "r", expect=2)
    assert "round 99 not found" in result.stderr  # type: ignore[attr-defined]
    assert not (tmp_path / "r").exists()


def test_out_must_be_a_directory(cli: Cli, history: dict[str, int], tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("keep me")
    cli("report", "--out", target, expect=2)
    assert target.read_text() == "keep me"
