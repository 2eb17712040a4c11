"""The supervised stage (SL-CAI): critique-revision chains stored step by step and resumable after a
SIGKILL, the SFT snapshot through `datasets` and TRL's SFTTrainer, the SFT model's lineage, and
`cai loop --sl-first` starting the preference rounds from it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from cai.chains import step_principle
from cai.constitution import load_constitution
from cai.registry import EMBEDDED_MODEL
from cai.stages.status import SL_STEPS, steps_left
from cai.store.db import session_scope
from cai.store.models import (
    PolicyRow,
    PrincipleRow,
    ResponseRow,
    RevisionStepRow,
    RoundRow,
    TrainingRunRow,
)
from tests import fake_openai as fake
from tests.conftest import REPO, Cli, table_counts
from tests.test_judging import judge_args
from tests.tiny_model import smollm2_tokenizer_dir, tiny_model_dir

__all__ = ["smollm2_tokenizer_dir", "tiny_model_dir"]  # session fixtures

CONSTITUTION = REPO / "constitutions/helpful-harmless/v1.yaml"
TINY = ("--max-new-tokens", 12, "--critique-max-tokens", 8)


def start_sl_round(cli: Cli, policy: Path | str, *, sl: bool = True) -> int:
    cli("constitution", "register", CONSTITUTION)
    cli("prompts", "import", REPO / "prompt_sets/helpful-harmless.jsonl")
    args = ["round", "start", "-c", "helpful-harmless@1", "--policy", policy]
    return int(cli(*args, *(["--sl"] if sl else [])).stdout)


def sft_export(round_id: int, out: Path, *extra: object) -> list[object]:
    return ["export", "--round", round_id, "--kind", "sft", "--out", out, *extra]


def steps(engine: Engine, round_id: int) -> list[RevisionStepRow]:
    with session_scope(engine) as session:
        rows = session.scalars(
            select(RevisionStepRow)
            .where(RevisionStepRow.round_id == round_id)
            .order_by(RevisionStepRow.prompt_id, RevisionStepRow.step)
        ).all()
        session.expunge_all()
        return list(rows)


def test_sl_rounds_have_their_own_stages() -> None:
    assert steps_left("created", kind="sl") == list(SL_STEPS)
    assert steps_left("revised", kind="sl") == ["sft-export", "sft"]
    assert steps_left("exported", kind="sl") == ["sft"]
    assert steps_left("failed", "revise", kind="sl") == ["revise", "sft-export", "sft"]
    assert steps_left("done", kind="sl") == []


def test_chains_of_length_two_are_stored_step_by_step(cli: Cli, engine: Engine, tiny_model_dir: Path) -> None:
    round_id = start_sl_round(cli, tiny_model_dir)
    stats = json.loads(
        cli("revise", "--round", round_id, "--limit", 3, "--revisions", 2, *TINY, "--json").stdout
    )
    assert stats["prompts"] == stats["answered"] == stats["chains_complete"] == 3
    assert stats["steps_done"] + stats["steps_failed"] == 6

    constitution = load_constitution(CONSTITUTION).constitution
    with session_scope(engine) as session:
        keys = dict(session.execute(select(PrincipleRow.id, PrincipleRow.key)).all())
        responses = {r.id: r for r in session.scalars(select(ResponseRow)).all()}
        status = session.get_one(RoundRow, round_id).status
        session.expunge_all()
    assert status == "revised"
    for row in steps(engine, round_id):
        assert row.status == "done"
        # Step k revises step k-1's revision (step 1 the first answer), under the principle
        # drawn for it, and says who revised it with which templates.
        source, revision = responses[row.source_response_id], responses[row.revision_response_id]
        assert revision.revised_from_id == source.id and revision.prompt_id == row.prompt_id
        expected_origin = "chain" if row.step == 1 else "revision"
        assert source.origin == expected_origin and revision.origin == "revision"
        if row.step == 2:
            first = steps(engine, round_id)
            assert any(s.revision_response_id == source.id and s.step == 1 for s in first)
        assert keys[row.principle_id] == step_principle(constitution, 0, row.prompt_id, row.step).id
        assert row.critique is not None and row.reviser_model == str(tiny_model_dir)
        assert row.template_sha256 is not None and len(row.template_sha256) == 64
        assert revision.text.strip() and revision.text != source.text

    counts = table_counts(engine)
    again = json.loads(
        cli("revise", "--round", round_id, "--limit", 3, "--revisions", 2, *TINY, "--json").stdout
    )
    assert again["answered"] == again["steps_done"] == 0
    assert table_counts(engine) == counts


def test_preference_stages_refuse_an_sl_round_and_change_nothing(
    cli: Cli, engine: Engine, tiny_model_dir: Path, tmp_path: Path
) -> None:
    round_id = start_sl_round(cli, tiny_model_dir)
    before = table_counts(engine)
    for args in (
        ["generate", "--round", round_id],
        ["judge", "--round", round_id, "--mode", "score"],
        ["export", "--round", round_id, "--out", tmp_path / "dpo"],
        ["train", "--round", round_id, "--snapshot", tmp_path],
    ):
        result = cli(*args, expect=2)
        assert f"round {round_id} is a" in result.stderr, args
    rl_round = int(cli("round", "start", "-c", "helpful-harmless@1", "--policy", tiny_model_dir).stdout)
    before = table_counts(engine)
    for args in (["revise", "--round", rl_round], ["sft", "--round", rl_round]):
        assert "is a preference (RL-CAI) round" in cli(*args, expect=2).stderr
    assert (
        "is a preference (RL-CAI) round"
        in cli("export", "--round", rl_round, "--kind", "sft", expect=2).stderr
    )
    assert table_counts(engine) == before


def _revise_process(db_url: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "cai", "--db", db_url, "revise", *map(str, args)],
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_chain_killed_mid_way_resumes_without_redoing_a_step(
    cli: Cli, engine: Engine, db_url: str, tiny_model_dir: Path
) -> None:
    round_id = start_sl_round(cli, tiny_model_dir)
    # top-p 1: a random model's flat distributions would make every step sort the vocabulary.
    args = (
        "--round",
        round_id,
        "--limit",
        24,
        "--revisions",
        2,
        "--top-p",
        1,
        "--batch-size",
        2,
        "--max-new-tokens",
        48,
    )
    process = _revise_process(db_url, *args)
    deadline = time.monotonic() + 120
    done: list[RevisionStepRow] = []
    while time.monotonic() < deadline and process.poll() is None:
        done = [s for s in steps(engine, round_id) if s.status == "done"]
        if len(done) >= 4:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 4 <= len(done) < 48, f"the kill came too late to test anything ({len(done)} steps done)"
    kept = {
        (s.prompt_id, s.step): s.revision_response_id for s in steps(engine, round_id) if s.status == "done"
    }

    # The rerun takes bigger batches: how the work is cut does not matter to what is stored.
    finished = json.loads(
        cli("revise", *args[:-4], "--batch-size", 48, "--max-new-tokens", 48, "--json").stdout
    )
    rows = steps(engine, round_id)
    assert [(r.status, r.step) for r in rows].count(("pending", 1)) == 0
    assert all(r.status in ("done", "failed") for r in rows) and len(rows) == 48
    # What the killed run stored is kept as it was: no step was redone.
    assert {k: v for k, v in kept.items()} == {
        (r.prompt_id, r.step): r.revision_response_id for r in rows if (r.prompt_id, r.step) in kept
    }
    assert finished["steps_done"] + finished["steps_failed"] == 48 - len(kept)
    with session_scope(engine) as session:
        per_slot = session.execute(
            select(ResponseRow.prompt_id, ResponseRow.sample_index, func.count())
            .where(ResponseRow.round_id == round_id)
            .group_by(ResponseRow.prompt_id, ResponseRow.sample_index)
        ).all()
        status = session.get_one(RoundRow, round_id).status
    assert per_slot and all(n == 1 for _, _, n in per_slot)  # one first answer, one revision per step
    assert len(per_slot) == 24 + sum(r.status == "done" for r in rows)
    assert status == "revised"


def test_sft_snapshot_trains_with_sfttrainer_and_the_policy_names_its_round(
    cli: Cli, engine: Engine, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datasets import load_dataset
    from safetensors.torch import load_file

    round_id = start_sl_round(cli, tiny_model_dir)
    cli("revise", "--round", round_id, "--limit", 6, "--revisions", 2, *TINY)
    snapshot = tmp_path / "sft"
    exported = json.loads(cli(*sft_export(round_id, snapshot, "--eval-fraction", 0.3, "--json")).stdout)
    assert exported["format"] == "cai-sft-snapshot/1"
    assert exported["revisers"] == [
        {"model": str(tiny_model_dir), "template_sha256": steps(engine, round_id)[0].template_sha256}
    ]

    dataset = load_dataset(str(snapshot))
    rows = [*dataset["train"], *dataset.get("eval", [])]
    assert len(rows) == exported["counts"]["train"] + exported["counts"]["eval"] > 0
    with session_scope(engine) as session:
        finals = {
            r.prompt_id: r.text
            for r in session.scalars(select(ResponseRow).where(ResponseRow.sample_index == 2)).all()
        }
    for row in rows:
        # The prompt's turns, then the chain's final revision as the answer.
        assert row["messages"][-1] == {"role": "assistant", "content": finals[row["prompt_id"]]}
        assert row["messages"][0]["role"] == "user" and row["chain_length"] == len(row["chain"])

    before = load_file(str(tiny_model_dir / "model.safetensors"))
    sft = ["sft", "--round", round_id, "--max-steps", 2, "--batch-size", 2, "--max-length", 128, "--lr", 1e-3]
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    summary = json.loads(cli(*sft, "--output", tmp_path / "run", "--report-to", "mlflow", "--json").stdout)
    after = load_file(str(Path(summary["model_dir"]) / "model.safetensors"))
    assert summary["steps"] == 2
    assert any(not (before[name] == after[name]).all() for name in before), "SFT changed no weight"
    with session_scope(engine) as session:
        run = session.scalars(select(TrainingRunRow)).one()
        policy = session.get_one(PolicyRow, summary["policy_id"])
        round_ = session.get_one(RoundRow, round_id)
        assert (run.method, run.round_id, run.output_policy_id) == ("sft", round_id, policy.id)
        assert policy.parent_id == round_.policy_id and "+sft-r" in policy.name
        assert policy.snapshot_sha256 == exported["manifest_sha256"]
        assert round_.status == "done"
        base = session.get_one(PolicyRow, round_.policy_id).name
    import mlflow

    (tracked,) = mlflow.MlflowClient(mlflow_uri).search_runs(["0"])
    assert tracked.info.run_name == f"cai-round-{round_id}-sft"
    assert tracked.data.tags["cai.method"] == "sft" and tracked.data.tags["cai.lineage"] == base
    assert "eval_loss" in tracked.data.metrics
    # DPO refuses an SFT snapshot (their columns differ), before anything is recorded.
    rl_round = int(cli("round", "start", "-c", "helpful-harmless@1", "--policy", tiny_model_dir).stdout)
    before = table_counts(engine)
    refused = cli("train", "--round", rl_round, "--snapshot", snapshot, expect=2).stderr
    assert "a cai-sft-snapshot/1 snapshot, where cai-snapshot/1 is needed" in refused
    assert table_counts(engine) == before


def sl_policy(request: dict[str, Any], draws: Iterator[int]) -> str:
    """A policy on the loopback server that critiques and revises when asked (each call new text)."""
    last = fake.prompt_text(request)
    draw = request.get("seed", 0) + next(draws)  # each choice of an n > 1 request is a new draw
    if last.startswith("Critique request"):
        return f"The answer could be kinder. (critique {draw})"
    if last.startswith("Revision request"):
        return f"Here is a kinder answer, GOOD and careful. (revision {draw})"
    if "<<<RESPONSE A " in last:
        return fake.prefer_marker("GOOD")(request)
    return f"A plain answer. (draw {draw})" if draw % 2 else f"A GOOD answer. (draw {draw})"


def test_loop_sl_first_runs_the_supervised_round_then_rl_rounds_from_its_model(
    cli: Cli, engine: Engine, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = start_sl_round(cli, tiny_model_dir, sl=False)
    with fake.FakeOpenAI(fake.with_draws(sl_policy)) as server:
        args = [
            "loop", "--rounds", 1, "--sl-first", "--limit", 6, "--eval-limit", 4, "--revisions", 1,
            "--backend", "openai", "--base-url", server.base_url,
            "--judge-base-url", server.base_url, "--judge-model", "fake-judge",
            "--max-steps", 1, "--sft-max-steps", 1, "--train-batch-size", 2, "--max-length", 128,
            "--artifacts", tmp_path, "--json",
        ]  # fmt: skip
        summaries = json.loads(cli(*args).stdout)
        counts, requests = table_counts(engine), server.count
        again = json.loads(cli(*args).stdout)
        assert table_counts(engine) == counts and server.count == requests
    assert [(s["kind"], s["status"]) for s in summaries] == [("sl", "done"), ("rl", "done")]
    supervised = summaries[0]["round_id"]
    assert summaries[1]["round_id"] == first and [s["round_id"] for s in again] == [supervised, first]
    with session_scope(engine) as session:
        sft_run = session.scalars(select(TrainingRunRow).where(TrainingRunRow.method == "sft")).one()
        rl = session.get_one(RoundRow, first)
        dpo_run = session.scalars(select(TrainingRunRow).where(TrainingRunRow.method == "dpo")).one()
        # The RL round continues the SL round and sampled from its SFT model.
        assert (rl.parent_round_id, rl.policy_id) == (supervised, sft_run.output_policy_id)
        assert dpo_run.round_id == first and dpo_run.reference_policy_id == sft_run.output_policy_id
        sft_policy = session.get_one(PolicyRow, sft_run.output_policy_id)
        assert sft_run.round_id == supervised and "+sft-r" in sft_policy.name

    # What `cai demo --sl` prints about the SL round: lengths, rule pass rates, one chain.
    from cai.cli import demo
    from cai.config import load_settings
    from cai.workspace import Workspace

    ws = Workspace(load_settings(database_url=cli.db_url))
    try:
        demo._explain_sl(ws, supervised)
    finally:
        ws.close()
    printed = " ".join(capsys.readouterr().out.split())
    assert f"SL round {supervised}: 6 answers revised. Mean length" in printed
    assert (
        "all rules pass" in printed
        and "before: A " in printed
        and "after: Here is a kinder answer" in printed
    )


def test_sl_first_needs_a_round_that_has_not_started(cli: Cli, engine: Engine, tiny_model_dir: Path) -> None:
    first = start_sl_round(cli, tiny_model_dir, sl=False)
    cli("generate", "--round", first, "--limit", 1, "--max-new-tokens", 4)
    before = table_counts(engine)
    result = cli("loop", "--rounds", 1, "--sl-first", "--from-round", first, expect=2)
    assert f"round {first} has started" in result.stderr
    assert table_counts(engine) == before


@pytest.mark.slow
def test_one_prompt_chain_end_to_end_on_the_embedded_model(cli: Cli, engine: Engine, tmp_path: Path) -> None:
    round_id = start_sl_round(cli, EMBEDDED_MODEL)
    revise = ["revise", "--round", round_id, "--limit", 1, "--revisions", 1, "--max-new-tokens", 64]
    stats = json.loads(cli(*revise, "--critique-max-tokens", 48, "--json").stdout)
    [step] = steps(engine, round_id)
    assert stats["answered"] == 1 and step.status in ("done", "failed")
    assert step.critique and step.critique.strip()  # the model wrote a critique of its own answer
    if step.status == "done":
        export = sft_export(round_id, tmp_path / "s", "--eval-fraction", 0)
        exported = json.loads(cli(*export, "--json").stdout)
        assert exported["counts"]["train"] == 1


def test_the_judge_confirms_revisions_and_the_sft_export_keeps_those_it_preferred(
    cli: Cli, engine: Engine, tmp_path: Path
) -> None:
    round_id = start_sl_round(cli, "fake/policy")
    with fake.FakeOpenAI(fake.with_draws(sl_policy)) as server:
        sampling = ["--backend", "openai", "--base-url", server.base_url]
        cli("revise", "--round", round_id, "--limit", 8, "--revisions", 1, *sampling)
        export = ["export", "--round", round_id, "--kind", "sft", "--judge-agrees", "--eval-fraction", 0]
        assert "no chain of round" in cli(*export, "--out", tmp_path / "early", expect=2).stderr
        judge = judge_args(server, round_id)
        assert "judged pairwise" in cli(*judge, "--mode", "score", expect=2).stderr
        summary = json.loads(cli(*judge, "--json").stdout)
    with session_scope(engine) as session:
        assert session.get_one(RoundRow, round_id).status == "revised"  # judging is optional here
        firsts = dict(
            session.execute(
                select(ResponseRow.prompt_id, ResponseRow.text).where(ResponseRow.origin == "chain")
            ).all()
        )
    # The loopback judge prefers answers saying GOOD: every revision does, half the first answers.
    plain = sum("GOOD" not in text for text in firsts.values())
    assert summary["pairs"] == 8 and summary["labeled"] == 8 and summary["ties"] == 8 - plain > 0
    exported = json.loads(cli(*export, "--out", tmp_path / "s", "--json").stdout)
    assert exported["counts"]["train"] == plain
    assert exported["counts"]["dropped"]["judge_disagrees"] == 8 - plain
    assert exported["filters"]["judge_agrees"] is True


def test_revise_export_and_sft_run_as_jobs(
    cli: Cli, engine: Engine, db_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from cai.config import load_settings
    from cai.worker import Worker, WorkerOptions
    from cai.workspace import Workspace

    round_id = start_sl_round(cli, tiny_model_dir)
    ws = Workspace(load_settings(database_url=db_url))
    submitted = [
        cli("revise", "--round", round_id, "--limit", 3, "--revisions", 1, *TINY, "--submit").stdout,
        cli("export", "--round", round_id, "--kind", "sft", "--out", tmp_path / "s", "--submit").stdout,
        cli(
            "sft",
            "--round",
            round_id,
            "--max-steps",
            1,
            "--batch-size",
            2,
            "--output",
            tmp_path / "r",
            "--submit",
        ).stdout,
    ]
    try:
        for kind in ("revise", "export", "sft"):
            Worker(ws, WorkerOptions(kinds=(kind,), once=True, poll_s=0.05), say=lambda line: None).run()
    finally:
        ws.close()
    jobs = [json.loads(cli("jobs", "show", int(job), "--json").stdout) for job in submitted]
    assert [job["status"] for job in jobs] == ["succeeded"] * 3, [job.get("error") for job in jobs]
    assert jobs[0]["result"]["steps_done"] + jobs[0]["result"]["steps_failed"] == 3
    with session_scope(engine) as session:
        assert session.get_one(RoundRow, round_id).status == "done"
        assert session.scalars(select(TrainingRunRow.method)).one() == "sft"


def test_a_reviser_server_that_keeps_failing_loses_and_duplicates_nothing(
    cli: Cli, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cai.backends import openai_compat
    from cai.backends.base import Retry

    monkeypatch.setattr(openai_compat, "SAMPLER_RETRY", Retry(max_attempts=2, backoff_base=0.01))
    round_id = start_sl_round(cli, "fake/policy")
    failing = {"on": True}

    def fault(request: dict[str, Any]) -> fake.Fault | None:
        # The revision requests of every other prompt fail, on every try, while `failing`.
        last, first = fake.prompt_text(request), request["messages"][0]["content"]
        if failing["on"] and last.startswith("Revision request") and len(first) % 2:
            return fake.status(503)
        return None

    with fake.FakeOpenAI(fake.with_draws(sl_policy), fault_for=fault) as server:
        revise = ["revise", "--round", round_id, "--limit", 10, "--revisions", 2]
        revise += ["--backend", "openai", "--base-url", server.base_url]
        failed = cli(*revise, expect=1)
        assert "got no critique or revision" in failed.stderr and "rerun to resume" in failed.stderr
        with session_scope(engine) as session:
            round_ = session.get_one(RoundRow, round_id)
            assert (round_.status, round_.failed_step) == ("failed", "revise")
        done_before = {
            (s.prompt_id, s.step): s.revision_response_id
            for s in steps(engine, round_id)
            if s.status == "done"
        }
        assert 0 < len(done_before) < 20
        failing["on"] = False
        cli(*revise)
    rows = steps(engine, round_id)
    assert [r.status for r in rows] == ["done"] * 20
    assert all(
        done_before[(r.prompt_id, r.step)] == r.revision_response_id
        for r in rows
        if (r.prompt_id, r.step) in done_before
    )
    with session_scope(engine) as session:
        revisions = session.scalar(select(func.count()).where(ResponseRow.origin == "revision"))
        assert revisions == 20 and session.get_one(RoundRow, round_id).status == "revised"


def test_trl_sft_cli_trains_on_an_sft_snapshot_as_is(tiny_model_dir: Path, tmp_path: Path) -> None:
    from tests.test_dataset_card import write_sft
    from tests.test_train_multiprocess import run, trl_command, weights_moved

    write_sft(tmp_path / "snap", [f"A clearer answer {i}." for i in range(1, 9)])  # eval fraction 0.3
    out = tmp_path / "trl-out"
    done = run(trl_command("sft", tmp_path / "snap", tiny_model_dir, out), tmp_path)
    assert "eval_loss" in done.stdout + done.stderr  # the eval split was found and scored
    assert weights_moved(tiny_model_dir, out)
