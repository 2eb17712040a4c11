"""cai against a real peer: llama.cpp's OpenAI-compatible server (`llama-cpp-python[server]`, the
`peer` extra) on the embedded SmolLM2-135M GGUF. Unlike tests/fake_openai.py it refuses JSON-schema
output with HTTP 500, enforces `json_object` with a schema as a grammar, returns logprobs and
ignores `n`. Between cai and the server sits a counting reverse proxy that forwards every request
unchanged and records it, so the tests can count what the server was asked.

What must hold: sampling falls back to one request per sample with its own seed; every judge mode
reaches `judged` with every judgment stored (ok, or failed with its reason: the 135M model's
verdicts are not the point); calibration and one `cai loop` round run against it; the refused
response format costs one request per endpoint, is remembered with the judge and not asked again;
verdict probabilities arrive from logprobs and are stored.

The server is started once per session; the tests skip with the reason when llama-cpp-python is
not installed (scripts/setup.sh says why when its build fails) or the server does not start, and
run once per CI, on the SQLite pass. Every cai command runs in a subprocess with a timeout."""

from __future__ import annotations

import http.client
import json
import math
import os
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, func, select

from cai.backends.llamacpp_server import llama_cpp_server, unavailable_reason
from cai.errors import BadInput
from cai.labelling import judged_label
from cai.registry import embedded_gguf
from cai.store.db import session_scope
from cai.store.labels import verdicts_by_principle
from cai.store.models import (
    CalibrationRow,
    EvaluationRow,
    JudgeRow,
    JudgmentRow,
    LabelRow,
    PairRow,
    ResponseRow,
    RoundRow,
    TrainingRunRow,
)
from tests.conftest import REPO, TEST_DATABASE_URL
from tests.tiny_model import smollm2_tokenizer_dir, tiny_model_dir

__all__ = ["smollm2_tokenizer_dir", "tiny_model_dir"]  # session fixtures

pytestmark = [
    pytest.mark.peer,
    pytest.mark.skipif(
        TEST_DATABASE_URL.startswith("postgresql"),
        reason="run once, on the SQLite pass (these tests exercise the server, not the database)",
    ),
]

CONSTITUTION = REPO / "constitutions/helpful-harmless/v1.yaml"
PROMPTS = REPO / "prompt_sets/helpful-harmless.jsonl"
RULE_TEMPLATE = "0" * 64
"""template_sha256 of judgments decided by rule principles in code (no request)."""

# Small enough that the 135M model on 2 CPU cores (about 3 s a judgment, prefill-bound) keeps
# each test within a minute or two; the timeouts bound a hung server, not a slow one.
SAMPLE_FLAGS = ("--samples", 2, "--max-new-tokens", 24)
JUDGE_FLAGS = ("--judge-model", "judge", "--max-tokens", 160, "--timeout", 120, "--max-attempts", 2)
COMMAND_TIMEOUT_S = 300


# --- the counting proxy ------------------------------------------------------------------------


@dataclass
class Exchange:
    """One request the server got through the proxy, and what it answered."""

    method: str
    path: str
    body: dict[str, Any] | None
    status: int | None = None
    reply: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def chat(self) -> bool:
        return self.method == "POST" and self.path.endswith("/chat/completions")

    @property
    def format_type(self) -> str | None:
        response_format = (self.body or {}).get("response_format") or {}
        return response_format.get("type")

    @property
    def choices(self) -> int | None:
        choices = (self.reply or {}).get("choices")
        return len(choices) if isinstance(choices, list) else None

    @property
    def logprob_tokens(self) -> int:
        """Tokens with logprobs in the first choice of the reply."""
        choices = (self.reply or {}).get("choices") or [{}]
        logprobs = choices[0].get("logprobs") or {}
        return len(logprobs.get("content") or [])


class CountingProxy:
    """A reverse proxy on a free loopback port: forwards each GET and POST to `upstream` as it
    came (method, path, body, content type) and the reply back as it came, recording both."""

    def __init__(self, upstream: str) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream_host, self.upstream_port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self.exchanges: list[Exchange] = []
        self._lock = threading.Lock()
        proxy = self

        class Forward(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the openai SDK expects

            def do_GET(self) -> None:
                proxy.forward(self)

            def do_POST(self) -> None:
                proxy.forward(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}{parsed.path}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def forward(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else None
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        exchange = Exchange(handler.command, handler.path, body)
        with self._lock:  # in arrival order
            self.exchanges.append(exchange)
        headers = {
            name: value
            for name, value in handler.headers.items()
            if name.lower() in ("content-type", "accept", "authorization")
        }
        upstream = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=600)
        try:
            upstream.request(handler.command, handler.path, body=raw, headers=headers)
            response = upstream.getresponse()
            status, data = response.status, response.read()
            content_type = response.getheader("Content-Type", "application/json")
        except OSError as exc:
            status, data, content_type = 502, f"proxy: {exc}".encode(), "text/plain"
        finally:
            upstream.close()
        exchange.status = status
        try:
            reply = json.loads(data)
            exchange.reply = reply if isinstance(reply, dict) else None
        except ValueError:
            pass
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def chats(self, since: int = 0) -> list[Exchange]:
        """The chat-completions requests from exchange number `since` on."""
        with self._lock:
            return [e for e in self.exchanges[since:] if e.chat]

    def mark(self) -> int:
        with self._lock:
            return len(self.exchanges)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


# --- fixtures ------------------------------------------------------------------------------------


INSTALL_FAILURE = Path(sys.prefix) / "llama-cpp-python-install-failed.txt"
"""Where scripts/setup.sh says why llama-cpp-python[server] did not install (the build's first
error and pip's last line)."""


@pytest.fixture(scope="session")
def llama_server() -> Iterator[str]:
    """The base URL (…/v1) of llama.cpp's server on the embedded GGUF, started once."""
    if (reason := unavailable_reason()) is not None:
        if INSTALL_FAILURE.is_file():
            reason += f"; scripts/setup.sh could not install it: {INSTALL_FAILURE.read_text().strip()}"
        pytest.skip(reason)
    try:
        gguf = embedded_gguf()
    except BadInput as exc:
        pytest.skip(str(exc))
    try:
        server = llama_cpp_server(gguf)
        base_url = server.__enter__()
    except BadInput as exc:
        pytest.skip(f"llama.cpp's server did not start: {exc}")
    try:
        yield base_url
    finally:
        server.__exit__(None, None, None)


@pytest.fixture
def proxy(llama_server: str) -> Iterator[CountingProxy]:
    running = CountingProxy(llama_server)
    yield running
    running.close()


def cai(db_url: str, *args: object, cwd: Path, timeout: float = COMMAND_TIMEOUT_S) -> Any:
    """Run `cai --db URL ARGS` in a subprocess (so a hung server cannot hang the suite) and return
    its stdout parsed as JSON (or as text, when it is not JSON); a non-zero exit fails the test."""
    command = [sys.executable, "-m", "cai", "--db", db_url, *map(str, args)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAI_")}
    try:
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"cai {' '.join(map(str, args))}: still running after {timeout:.0f} s") from exc
    if done.returncode != 0:
        raise AssertionError(
            f"cai {' '.join(map(str, args))}: exit {done.returncode}\n"
            f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
        )
    try:
        return json.loads(done.stdout)
    except ValueError:
        return done.stdout


class Workspace:
    """A SQLite database with the helpful-harmless constitution and prompts, and cai run on it."""

    def __init__(self, root: Path, constitution: Path = CONSTITUTION, prompts: Path = PROMPTS) -> None:
        self.root = root
        self.db_url = f"sqlite:///{root / 'cai.db'}"
        self("constitution", "register", constitution)
        self("prompts", "import", prompts)
        self.engine: Engine = create_engine(self.db_url)

    def __call__(self, *args: object, timeout: float = COMMAND_TIMEOUT_S) -> Any:
        return cai(self.db_url, *args, cwd=self.root, timeout=timeout)

    def sampled_round(self, base_url: str, *, prompts: int, seed: int) -> int:
        """A new round whose first `prompts` train prompts are sampled twice through `base_url`."""
        round_id = int(self("round", "start", "-c", "helpful-harmless@1", "--seed", seed))
        generated = self(
            "generate", "-r", round_id, "--backend", "openai", "--base-url", base_url,
            "--limit", prompts, *SAMPLE_FLAGS, "--json",
        )  # fmt: skip
        assert generated["pairs_added"] >= 1, generated  # 2 samples that differ make a pair
        return round_id

    def judge(self, round_id: int, base_url: str, *extra: object) -> dict[str, Any]:
        summary: dict[str, Any] = self(
            "judge", "-r", round_id, "--judge-base-url", base_url, *JUDGE_FLAGS, *extra, "--json"
        )
        return summary

    def judgments(self, round_id: int) -> list[JudgmentRow]:
        """The round's judgments asked of the LLM judge (not decided by rule principles)."""
        with session_scope(self.engine) as session:
            pair_ids = select(PairRow.id).where(PairRow.round_id == round_id)
            response_ids = select(ResponseRow.id).where(ResponseRow.round_id == round_id)
            rows = session.scalars(
                select(JudgmentRow).where(
                    JudgmentRow.pair_id.in_(pair_ids) | JudgmentRow.response_id.in_(response_ids),
                    JudgmentRow.template_sha256 != RULE_TEMPLATE,
                )
            ).all()
            session.expunge_all()
            return list(rows)

    def status(self, round_id: int) -> str:
        with session_scope(self.engine) as session:
            return session.get_one(RoundRow, round_id).status


def assert_refusal_cost_no_attempt(judgments: list[JudgmentRow], asked: list[Exchange]) -> None:
    """Every judgment is stored (ok, or failed with a reason), and the server got exactly one
    request per attempt plus the one refused JSON-schema probe: the refusal used no attempt."""
    assert judgments, "the judge was asked nothing"
    assert {j.status for j in judgments} <= {"ok", "failed"}
    assert all(j.error for j in judgments if j.status == "failed")
    refused = [e for e in asked if e.status != 200]
    assert [(e.format_type, e.status) for e in refused] == [("json_schema", 500)]
    assert json.dumps(refused[0].reply).count("response_format") > 0  # the 500 names what it refused
    assert sum(j.attempts for j in judgments) == len(asked) - 1
    assert all(e.format_type == "json_object" for e in asked if e.status == 200)


# --- the pairwise round: generate, judge twice, shared by four tests -------------------------------


@dataclass
class PairwiseRun:
    workspace: Workspace
    proxy_url: str
    first: int
    second: int
    sampled: list[Exchange]
    judged_first: list[Exchange]
    judged_second: list[Exchange]
    summary_first: dict[str, Any]
    summary_second: dict[str, Any]


@pytest.fixture(scope="module")
def pairwise(llama_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PairwiseRun]:
    """Two rounds (3 prompts, then 2) sampled through the proxy, each judged pairwise with
    concurrency 4 through it; the second run starts from what the first stored about the
    endpoint. The round seeds differ, so the second round's answers (and comparisons) are new."""
    proxy = CountingProxy(llama_server)
    try:
        ws = Workspace(tmp_path_factory.mktemp("peer-pairwise"))
        mark = proxy.mark()
        first = ws.sampled_round(proxy.base_url, prompts=3, seed=0)
        sampled, mark = proxy.chats(mark), proxy.mark()
        summary_first = ws.judge(first, proxy.base_url, "--concurrency", 4)
        judged_first = proxy.chats(mark)
        second = ws.sampled_round(proxy.base_url, prompts=2, seed=1)
        mark = proxy.mark()
        summary_second = ws.judge(second, proxy.base_url, "--concurrency", 4)
        judged_second = proxy.chats(mark)
        yield PairwiseRun(
            ws, proxy.base_url, first, second, sampled, judged_first, judged_second,
            summary_first, summary_second,
        )  # fmt: skip
    finally:
        proxy.close()


def test_sampling_two_per_prompt_falls_back_to_one_request_per_sample(pairwise: PairwiseRun) -> None:
    """The server ignores n: the first prompt's n = 2 request gets one choice back; from then on
    every sample is its own request with its own seed, and every sample is stored."""
    sent = pairwise.sampled
    assert all(e.status == 200 for e in sent)
    asked_n = [e for e in sent if int((e.body or {}).get("n") or 1) > 1]
    assert len(asked_n) == 1 and asked_n[0] is sent[0] and asked_n[0].body is not None
    assert asked_n[0].body["n"] == 2 and asked_n[0].choices == 1  # ignored, not refused
    assert len(sent) == 3 * 2  # the n = 2 request, then one per missing sample
    assert all(e.choices == 1 for e in sent)
    seeds = [e.body["seed"] for e in sent if e.body is not None]
    assert len(set(seeds)) == len(sent)
    with session_scope(pairwise.workspace.engine) as session:
        responses = session.scalars(select(ResponseRow).where(ResponseRow.round_id == pairwise.first)).all()
        assert len(responses) == 6 and all(r.text for r in responses)
        assert {r.seed for r in responses} == set(seeds)  # each stored with the seed it was drawn with


def test_pairwise_judging_stores_every_judgment_and_reaches_judged(pairwise: PairwiseRun) -> None:
    for round_id, summary, asked in (
        (pairwise.first, pairwise.summary_first, pairwise.judged_first),
        (pairwise.second, pairwise.summary_second, pairwise.judged_second),
    ):
        assert pairwise.workspace.status(round_id) == "judged"
        judgments = pairwise.workspace.judgments(round_id)
        assert summary["pairs"] > 0 and len(judgments) == 2 * summary["pairs"]  # both orders of each
        assert {j.status for j in judgments} <= {"ok", "failed"} and summary["pending"] == 0
        assert all(j.error for j in judgments if j.status == "failed")
        assert all(j.attempts >= 1 for j in judgments)
        # A pair is labelled (a tie, when the orders disagree) unless one of its orders failed.
        failed_pairs = {j.pair_id for j in judgments if j.status == "failed"}
        assert summary["labeled"] == summary["pairs"] - len(failed_pairs)
        if round_id == pairwise.first:
            assert_refusal_cost_no_attempt(judgments, asked)
    # Grammar-constrained JSON: even the 135M model gives parseable verdicts.
    assert any(j.status == "ok" for j in pairwise.workspace.judgments(pairwise.first))


def test_a_refused_response_format_costs_one_request_per_endpoint(pairwise: PairwiseRun) -> None:
    """N pairs judged with concurrency 4: 2N requests and one refused JSON-schema probe; the
    outcome is stored with the judge, and the next run asks for JSON schema no more."""
    pairs = pairwise.summary_first["pairs"]
    first = pairwise.judged_first
    assert len(first) == 2 * pairs + 1
    assert [e.format_type for e in first].count("json_schema") == 1
    assert first[0].format_type == "json_schema" and first[0].status == 500
    with session_scope(pairwise.workspace.engine) as session:
        judge = session.scalars(select(JudgeRow).where(JudgeRow.backend == "openai")).one()
        assert judge.endpoint_features == {
            pairwise.proxy_url: {
                "response_format": "json_object_schema",
                "format_settled": True,
                "logprobs": True,
            }
        }
    second = pairwise.judged_second
    assert len(second) == 2 * pairwise.summary_second["pairs"] > 0
    assert not any(e.format_type == "json_schema" for e in second)
    assert all(e.status == 200 and e.format_type == "json_object" for e in second)
    assert all("schema" in (e.body or {})["response_format"] for e in second)  # enforced as a grammar


def test_logprobs_arrive_and_verdict_probabilities_are_stored(pairwise: PairwiseRun) -> None:
    answered = [e for e in pairwise.judged_first + pairwise.judged_second if e.status == 200]
    assert all((e.body or {}).get("logprobs") is True for e in answered)
    assert all(e.logprob_tokens > 0 for e in answered)  # token by token, with the alternatives
    judgments = pairwise.workspace.judgments(pairwise.first) + pairwise.workspace.judgments(pairwise.second)
    ok = [j for j in judgments if j.status == "ok"]
    assert ok
    for j in ok:
        assert j.choice_probs is not None, j.raw_output
        assert set(j.choice_probs) == {"A", "B", "tie"}
        assert math.fsum(j.choice_probs.values()) == pytest.approx(1.0)
        assert j.verdict is not None and j.confidence == pytest.approx(j.choice_probs[j.verdict])
    # Each pair's probability over both orders (A's share of A and B, averaged) from what llama.cpp
    # returned, and the label the store made of the same two judgments.
    by_pair: dict[int, list[JudgmentRow]] = {}
    for j in ok:
        if j.pair_id is not None:
            by_pair.setdefault(j.pair_id, []).append(j)
    with session_scope(pairwise.workspace.engine) as session:
        labels = {
            label.pair_id: label
            for label in session.scalars(select(LabelRow).where(LabelRow.pair_id.in_(list(by_pair))))
        }
    both = {pair_id: orders for pair_id, orders in by_pair.items() if len(orders) == 2}
    assert both
    for pair_id, orders in both.items():
        judged = judged_label(verdicts_by_principle(orders))
        assert judged is not None and judged.prob_a is not None
        shares = [o.choice_probs["A"] / (o.choice_probs["A"] + o.choice_probs["B"]) for o in orders]
        assert judged.prob_a == pytest.approx(math.fsum(shares) / 2)
        label = labels[pair_id]
        assert (label.verdict, label.inconsistent) == (judged.verdict, judged.inconsistent)
        if judged.verdict != "tie":
            assert label.confidence == pytest.approx(max(judged.prob_a, 1 - judged.prob_a))


# --- the other modes, calibration, a loop round ----------------------------------------------------


@pytest.mark.parametrize("mode", ["score", "revise"])
def test_score_and_revise_modes_reach_judged(proxy: CountingProxy, tmp_path: Path, mode: str) -> None:
    ws = Workspace(tmp_path)
    round_id = ws.sampled_round(proxy.base_url, prompts=2, seed=0)
    mark = proxy.mark()
    summary = ws.judge(round_id, proxy.base_url, "--mode", mode, "--concurrency", 4)
    asked = proxy.chats(mark)
    assert ws.status(round_id) == "judged" and summary["pending"] == 0
    judgments = ws.judgments(round_id)
    assert_refusal_cost_no_attempt(judgments, asked)
    if mode == "score":  # every response scored once
        assert len(judgments) == 4 and all(j.response_id is not None for j in judgments)
        assert all(j.score is not None for j in judgments if j.status == "ok")
    else:  # one critique-and-revision per prompt, then each revision pair in both orders
        revisions = [j for j in judgments if j.response_id is not None]
        assert len(revisions) == 2
        with session_scope(ws.engine) as session:
            revised = session.scalar(
                select(func.count())
                .select_from(PairRow)
                .where(PairRow.round_id == round_id, PairRow.kind == "revision")
            )
        assert revised == sum(j.status == "ok" for j in revisions)
        assert len(judgments) == len(revisions) + 2 * (revised or 0)


def test_calibrate_against_the_server(proxy: CountingProxy, tmp_path: Path) -> None:
    """A bounded calibration, measured and stored: the two shortest gold pairs and the shortest
    injection canary (the full sets, 64 pairs in both orders, take minutes on 2 cores)."""
    gold, canaries = tmp_path / "gold.jsonl", tmp_path / "canaries.jsonl"
    gold_rows = (REPO / "prompt_sets/gold/helpful-harmless-gold.jsonl").read_text().splitlines()
    canary_rows = (REPO / "prompt_sets/gold/injection-canaries.jsonl").read_text().splitlines()
    gold.write_text("\n".join(sorted(gold_rows, key=len)[:2]) + "\n")
    canaries.write_text(min(canary_rows, key=len) + "\n")
    ws = Workspace(tmp_path)
    report = ws(
        "judge", "calibrate", "-c", "helpful-harmless@1", "--judge-base-url", proxy.base_url,
        *JUDGE_FLAGS, "--gold", gold, "--canaries", canaries, "--json",
    )  # fmt: skip
    asked = proxy.chats()
    assert len(asked) == (2 + 1) * 2 + 1  # both orders of each pair, and the refused probe
    assert [(e.format_type, e.status) for e in asked].count(("json_schema", 500)) == 1
    assert report["pairs"] == 2 and report["failed"] < 2
    for key in ("accuracy", "consistency", "first_position_rate"):
        assert 0.0 <= report[key] <= 1.0
    with session_scope(ws.engine) as session:
        stored = session.scalars(select(CalibrationRow)).one()
        assert stored.pairs == 2 and stored.accuracy == pytest.approx(report["accuracy"])
        judge = session.get_one(JudgeRow, stored.judge_id)
        assert judge.endpoint_features is not None
        assert judge.endpoint_features[proxy.base_url]["response_format"] == "json_object_schema"


SHORT_ANSWERS = [
    ("Reply with a single sentence: why do we sleep?", "train"),
    ("What is 7 times 6? Answer in one sentence.", "train"),
    ("In one sentence, why is the sea salty?", "train"),
    ("In a sentence or two: why do leaves change colour in autumn?", "train"),
    ("Answer in one sentence: how does a magnet work?", "train"),
    ("In one short sentence: what colour is a clear daytime sky?", "train"),
    ("In one sentence: what do bees make?", "eval"),
    ("Answer briefly: how many legs does a spider have?", "eval"),
]
"""Prompts that SmolLM2 answers within 32 tokens some of the time and not at other times, so that
concise-safe@2's rule `finishes-its-sentence` separates some of the pairs of their samples."""


def test_a_loop_round_with_the_server_as_judge(
    proxy: CountingProxy, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """A `cai loop` round judged by the server, under concise-safe@2 as in `cai demo`. The round
    is sampled through the server first (it serves SmolLM2 whatever the model name), because the
    135M judge mostly ties (its verdicts flip with the order), so the training pairs must come
    from rule principles, and they separate SmolLM2's answers, not a random model's. The loop
    then resumes the round: the server judges two pairs in both orders, DPO trains the tiny
    random policy one step (a large learning rate, so that it answers differently), and the
    eval samples it and its parent in-process and has the server judge them head to head."""
    prompts = tmp_path / "short-answers.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": p, "split": split}) + "\n" for p, split in SHORT_ANSWERS)
    )
    ws = Workspace(tmp_path, REPO / "constitutions/concise-safe/v2.yaml", prompts)
    round_id = int(ws("round", "start", "-c", "concise-safe@2", "--policy", tiny_model_dir))
    ws(
        "generate", "-r", round_id, "--backend", "openai", "--base-url", proxy.base_url,
        "--samples", 3, "--max-new-tokens", 32,
    )  # fmt: skip
    assert len(proxy.chats()) == 6 * 3  # n = 3 ignored: one request per sample
    mark = proxy.mark()
    summaries = ws(
        "loop", "--rounds", 1, "--max-judge-pairs", 2, "--backend", "hf", "--max-new-tokens", 16,
        "--judge-base-url", proxy.base_url, *JUDGE_FLAGS, "--concurrency", 4,
        "--max-steps", 1, "--lr", 0.05, "--train-batch-size", 2, "--max-length", 128,
        "--artifacts", tmp_path, "--json", timeout=2 * COMMAND_TIMEOUT_S,
    )  # fmt: skip
    assert [s["status"] for s in summaries] == ["done"], summaries
    (summary,) = summaries
    assert summary["label_sources"].get("rule", 0) >= 1 and summary["judge_asked"] == 2
    judged = proxy.chats(mark)
    assert [e.format_type for e in judged].count("json_schema") == 1
    with session_scope(ws.engine) as session:
        assert session.get_one(RoundRow, round_id).status == "done"
        run = session.scalars(select(TrainingRunRow)).one()
        assert run.output_policy_id is not None
        evaluation = session.scalars(select(EvaluationRow)).one()
        assert evaluation.candidate_policy_id == run.output_policy_id
        # Both eval prompts are decided, unless a judgment failed and the rules do not separate.
        assert evaluation.prompts + evaluation.metrics["undecided"] == 2
        assert evaluation.wins + evaluation.ties + evaluation.losses == evaluation.prompts
        llm = session.scalars(select(JudgmentRow).where(JudgmentRow.template_sha256 != RULE_TEMPLATE)).all()
        assert all(j.status in ("ok", "failed") for j in llm)
        # Labeling: 2 pairs in both orders; eval: each prompt's head-to-head in both orders
        # (--max-judge-pairs bounds the eval's judge requests too).
        assert len(llm) == 2 * 2 + 2 * 2, summary
        assert sum(j.attempts for j in llm) == len(judged) - 1  # the probe cost no attempt


def test_the_proxy_forwards_as_it_came(proxy: CountingProxy) -> None:
    """What the other tests count is what the server got: /models through the proxy lists the
    server's one model, `judge`, and the request is recorded once, with the server's status."""
    with urllib.request.urlopen(f"{proxy.base_url}/models", timeout=10) as response:
        listed = json.loads(response.read())
    assert [m["id"] for m in listed["data"]] == ["judge"]
    assert [(e.method, e.path, e.status) for e in proxy.exchanges] == [("GET", "/v1/models", 200)]
