"""Runs a judge over a round: claim pending items, call the backend with bounded concurrency and
retries, write results as they arrive (batching whatever arrives during a write), then aggregate
labels. A killed run loses only its in-flight requests, at most `concurrency` of them; the next run
(or another worker) picks up everything else."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine

from cai.backends.base import (
    ChatBackend,
    ChatRequest,
    ChatResult,
    PermanentError,
    TransientError,
    backoff_delay,
    retry_transient,
)
from cai.constitution import Constitution
from cai.judge import (
    Parsed,
    ParseError,
    pairwise_request,
    parse_pairwise,
    parse_revision,
    parse_score,
    revise_request,
    score_request,
)
from cai.store import claims, queue
from cai.store.db import session_scope
from cai.templates import TemplateSet


@dataclass(frozen=True)
class JudgeOptions:
    concurrency: int = 16
    max_attempts: int = 4
    """Per item and run: transport failures and unparseable replies both count."""
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    lease_s: float = 600.0
    budget_usd: float | None = None
    price_in_per_mtok: float | None = None
    price_out_per_mtok: float | None = None
    retry_failed: bool = False
    """Also retry items that failed to parse or were refused (transient failures always are)."""
    wake_every_s: float = 0.25
    """How often the run looks at stop requests while every request is still out."""
    max_tokens: int = 384
    rules_first: bool = False
    """Skip the LLM judge on pairs the rule principles already separate (see plan_judgments)."""
    max_judge_pairs: int | None = None
    """Ask the LLM judge about at most this many pairs per round and pair kind."""

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        if self.price_in_per_mtok is None and self.price_out_per_mtok is None:
            return None
        return (
            prompt_tokens * (self.price_in_per_mtok or 0.0)
            + completion_tokens * (self.price_out_per_mtok or 0.0)
        ) / 1e6

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        return backoff_delay(attempt, retry_after, self.backoff_base, self.backoff_cap)


Parser = Callable[[ChatResult], Parsed]


def pairwise_parser(order: str) -> Parser:
    return lambda result: parse_pairwise(result.text, order, result.choice_probs)


@dataclass
class Outcome:
    """What one item came to after all its attempts."""

    parsed: Parsed | None
    attempts: int
    raw_output: str | None = None
    error: str | None = None
    error_kind: str | None = None
    latency_ms: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Unparsed(TransientError):
    """A reply that did not parse: it uses up an attempt and is asked again at once."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retry_after=0.0)


async def judge_once(
    backend: ChatBackend, request: ChatRequest, parse: Parser, options: JudgeOptions
) -> Outcome:
    """Ask until the reply parses or the attempts run out; never raises for a bad reply."""
    outcome = Outcome(parsed=None, attempts=0)

    async def attempt() -> Parsed:
        outcome.attempts += 1
        started = time.perf_counter()
        result = await backend.complete(request)
        outcome.latency_ms = (time.perf_counter() - started) * 1000
        outcome.prompt_tokens += result.prompt_tokens or 0
        outcome.completion_tokens += result.completion_tokens or 0
        outcome.raw_output = result.text
        try:
            return parse(result)
        except ParseError as exc:
            raise _Unparsed(str(exc)) from None

    try:
        outcome.parsed = await retry_transient(attempt, options.max_attempts, options.backoff)
    except PermanentError as exc:
        outcome.error, outcome.error_kind = str(exc), "permanent"
    except TransientError as exc:
        outcome.error = str(exc)
        outcome.error_kind = "parse" if isinstance(exc, _Unparsed) else "transient"
    return outcome


@dataclass
class RunStats:
    judged: int = 0
    failed: int = 0
    spent_usd: float = 0.0
    stopped_by_budget: bool = False
    stopped_on_request: bool = False
    wall_s: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    last_error: str | None = None

    @property
    def unreachable(self) -> bool:
        """Every request failed in transport (refused, timed out, 5xx): no judge answered."""
        return self.judged == 0 and self.failed > 0 and set(self.errors) <= {"transient", "permanent"}


@dataclass
class JudgeRun:
    engine: Engine
    round_id: int
    judge_id: int
    constitution: Constitution
    backend: ChatBackend
    templates: TemplateSet
    options: JudgeOptions
    on_result: Callable[[RunStats], None] | None = None
    mode: str = "pairwise"
    """How to judge single-response items (score or revise); pair items are always pairwise."""
    evaluation: bool = False
    """Judge the round's evaluation pairs instead of its labeling work."""
    worker: str = field(default_factory=claims.new_worker_id)
    """Who the claims are made as (a job passes its owner's id)."""
    should_stop: Callable[[], bool] | None = None
    """Asked between results: True stops claiming; in-flight requests finish and are stored."""

    def __post_init__(self) -> None:
        self.stats = RunStats()
        self._results: list[queue.JudgmentResult] = []

    async def run(self) -> RunStats:
        """Judge until nothing is left to claim (or the budget is spent). Claims and writes run
        in background threads so that judge requests never wait on the database."""
        started = time.perf_counter()
        options = self.options
        buffer: list[queue.WorkItem] = []
        # Futures of three kinds share one wait: judge calls, a claim, a write.
        in_flight: set[asyncio.Future[Any]] = set()
        claiming: asyncio.Future[Any] | None = None
        flushing: asyncio.Future[Any] | None = None
        writing = 0  # results in the write under way
        exhausted = stopping = False
        try:
            while True:
                if claiming is None and not (exhausted or stopping) and len(buffer) < options.concurrency:
                    claiming = asyncio.ensure_future(
                        asyncio.to_thread(self._claim, 2 * options.concurrency - len(buffer))
                    )
                if claiming is not None and claiming.done():
                    claimed = claiming.result()
                    claiming, exhausted = None, not claimed
                    buffer += claimed
                # A slot frees when its result is written, not when it arrives: a killed run
                # then loses at most `concurrency` answered-or-asked requests.
                while (
                    buffer
                    and not stopping
                    and len(in_flight) + len(self._results) + writing < options.concurrency
                ):
                    in_flight.add(asyncio.ensure_future(self._judge(buffer.pop(0))))
                if not in_flight and claiming is None and (not buffer or stopping):
                    break
                waiting = set(in_flight) | {f for f in (claiming, flushing) if f is not None}
                done, _ = await asyncio.wait(
                    waiting, timeout=options.wake_every_s, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done & in_flight:
                    in_flight.discard(task)
                    self._collect(*task.result())
                if options.budget_usd is not None and self.stats.spent_usd >= options.budget_usd:
                    stopping = self.stats.stopped_by_budget = True
                if not stopping and self.should_stop is not None and self.should_stop():
                    stopping = self.stats.stopped_on_request = True
                if flushing is not None and flushing.done():
                    flushing.result()  # surface a failed write
                    flushing, writing = None, 0
                # Write as soon as results are in; what arrives during a write is the next batch.
                if flushing is None and self._results:
                    batch, self._results = self._results, []
                    flushing, writing = (
                        asyncio.ensure_future(asyncio.to_thread(self._write, batch)),
                        len(batch),
                    )
        finally:
            for task in in_flight:
                task.cancel()
            if flushing is not None:
                await flushing
            if claiming is not None:
                await asyncio.gather(claiming, return_exceptions=True)
            batch, self._results = self._results, []
            await asyncio.to_thread(self._write, batch)
            await asyncio.to_thread(self._release)
        self.stats.wall_s = time.perf_counter() - started
        return self.stats

    async def _judge(self, item: queue.WorkItem) -> tuple[queue.WorkItem, Outcome, str]:
        principle = self.constitution.principle(item.principle_key)
        args = (self.templates, self.constitution, principle, item.conversation)
        parse: Parser
        if item.pair_id is not None:
            assert item.response_a is not None and item.response_b is not None
            rendered, request = pairwise_request(
                *args, item.response_a, item.response_b, item.order, max_tokens=self.options.max_tokens
            )
            parse = pairwise_parser(item.order)
        elif self.mode == "score":
            assert item.response is not None
            rendered, request = score_request(*args, item.response, max_tokens=self.options.max_tokens)
            parse = lambda result: parse_score(result.text)  # noqa: E731
        else:
            original = item.response
            assert original is not None
            rendered, request = revise_request(*args, original, max_tokens=2 * self.options.max_tokens)
            parse = lambda result: parse_revision(result.text, original)  # noqa: E731
        outcome = await judge_once(self.backend, request, parse, self.options)
        return item, outcome, rendered.request_sha256

    def _collect(self, item: queue.WorkItem, outcome: Outcome, request_sha256: str) -> None:
        cost = self.options.cost(outcome.prompt_tokens, outcome.completion_tokens)
        self.stats.spent_usd += cost or 0.0
        if outcome.parsed is not None:
            self.stats.judged += 1
        else:
            self.stats.failed += 1
            kind = outcome.error_kind or "unknown"
            self.stats.errors[kind] = self.stats.errors.get(kind, 0) + 1
            self.stats.last_error = outcome.error
        self._results.append(
            queue.JudgmentResult(
                judgment_id=item.judgment_id,
                status="ok" if outcome.parsed is not None else "failed",
                attempts=outcome.attempts,
                raw_output=outcome.raw_output,
                request_sha256=request_sha256,
                parsed=outcome.parsed,
                error=outcome.error,
                error_kind=outcome.error_kind,
                latency_ms=outcome.latency_ms,
                prompt_tokens=outcome.prompt_tokens,
                completion_tokens=outcome.completion_tokens,
                cost_usd=cost,
            )
        )
        if self.on_result:
            self.on_result(self.stats)

    def _claim(self, n: int) -> list[queue.WorkItem]:
        with session_scope(self.engine) as session:
            return queue.claim(
                session, self.round_id, self.judge_id, self.worker, n, self.options.lease_s, self.evaluation
            )

    def _write(self, results: list[queue.JudgmentResult]) -> None:
        if results:
            with session_scope(self.engine) as session:
                queue.record(session, self.worker, results)

    def _release(self) -> None:
        with session_scope(self.engine) as session:
            queue.release(session, self.worker)
