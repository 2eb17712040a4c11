"""Runs a judge over a round: claim pending items, call the backend with bounded concurrency and
retries, write results as they arrive (batching whatever arrives during a write), then aggregate
labels. A killed run loses only its in-flight requests, at most `concurrency` of them; the next
run (or another worker) picks up everything else."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker

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
from cai.pricing import cost_usd
from cai.store import claims, queue
from cai.templates import Rendered, TemplateSet


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
    max_tokens: int = 384
    reasoning: str = "brief"
    """'cot': the judge reasons step by step before its pairwise verdict (JudgeEndpoint.reasoning)."""
    rules_first: bool = False
    """Skip the LLM judge on pairs the rule principles already separate (see plan_judgments)."""
    max_judge_pairs: int | None = None
    """Ask the LLM judge about at most this many pairs per round and pair kind."""

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        if self.price_in_per_mtok is None and self.price_out_per_mtok is None:
            return None
        return cost_usd(
            prompt_tokens, completion_tokens, self.price_in_per_mtok or 0.0, self.price_out_per_mtok or 0.0
        )

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        return backoff_delay(attempt, retry_after, self.backoff_base, self.backoff_cap)


Parser = Callable[[ChatResult], Parsed]
T = TypeVar("T")


def pairwise_parser(order: str) -> Parser:
    return lambda result: parse_pairwise(result.text, order, result.choice_probs)


def render_request(
    item: queue.WorkItem, constitution: Constitution, templates: TemplateSet, options: JudgeOptions, mode: str
) -> tuple[Rendered, ChatRequest, Parser]:
    """The judge request for a work item (and how to parse its reply): a pair in its order, or a
    single response to score or revise (`mode`). What a run sends, and what an estimate counts."""
    principle = constitution.principle(item.principle_key)
    args = (templates, constitution, principle, item.conversation)
    if item.pair_id is not None:
        assert item.response_a is not None and item.response_b is not None
        rendered, request = pairwise_request(
            *args,
            item.response_a,
            item.response_b,
            item.order,
            max_tokens=options.max_tokens,
            reasoning=options.reasoning,
        )
        return rendered, request, pairwise_parser(item.order)
    original = item.response
    assert original is not None
    if mode == "score":
        rendered, request = score_request(*args, original, max_tokens=options.max_tokens)
        return rendered, request, lambda result: parse_score(result.text)
    rendered, request = revise_request(*args, original, max_tokens=2 * options.max_tokens)
    return rendered, request, lambda result: parse_revision(result.text, original)


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
    """Asked before each item is started: True stops claiming; in-flight requests finish and are
    stored."""

    def __post_init__(self) -> None:
        self.stats = RunStats()
        self._buffer: deque[queue.WorkItem] = deque()
        self._claiming: asyncio.Future[list[queue.WorkItem]] | None = None
        self._exhausted = False
        self._results: list[queue.JudgmentResult] = []
        """The next batch to write; `_written` resolves once it is written."""
        self._written: asyncio.Future[None] | None = None
        self._writing = False
        # One factory for the run's many claims and writes: a session of a new factory (which
        # session_scope makes per call) costs about as much CPU as a claim.
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    async def run(self) -> RunStats:
        """Judge until nothing is left to claim (or the budget is spent). `concurrency` workers
        each take an item, judge it and wait for its result to be written; claims and writes run
        in a background thread, in batches, so that judge requests never wait on the database."""
        started = time.perf_counter()
        # One thread for claims and writes, so that they never wait on each other's locks
        # (SQLite's is the whole database, and its busy wait sleeps in steps of up to 100 ms).
        self._database = ThreadPoolExecutor(max_workers=1, thread_name_prefix="judge-db")
        workers = [asyncio.ensure_future(self._work()) for _ in range(self.options.concurrency)]
        try:
            done, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
            for worker in done:
                worker.result()  # surface a failed claim, write or render
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.wait(workers)
            await self._settle()
        self.stats.wall_s = time.perf_counter() - started
        return self.stats

    async def _work(self) -> None:
        # A slot frees when its result is written, not when it arrives: a killed run then loses
        # at most `concurrency` answered-or-asked requests.
        while (item := await self._next_item()) is not None:
            await self._store(self.collect(*await self._judge(item)))

    async def _next_item(self) -> queue.WorkItem | None:
        """The next claimed item, claiming more in the background as the buffer runs low; None
        once nothing is left to claim or the run is stopping."""
        while not self._stopping():
            if self._claiming is not None and self._claiming.done():
                claimed = self._claiming.result()  # surface a failed claim
                self._claiming, self._exhausted = None, not claimed
                self._buffer.extend(claimed)
            self._claim_more()
            if self._buffer:
                return self._buffer.popleft()
            if self._claiming is None:
                return None
            # asyncio.wait, not await: a cancelled worker must not cancel the claim under way.
            await asyncio.wait((self._claiming,))
        return None

    def _claim_more(self) -> None:
        """Once fewer than `concurrency` items are left, claim up to twice that many ahead."""
        if self._claiming is None and not self._exhausted and len(self._buffer) < self.options.concurrency:
            wanted = 2 * self.options.concurrency - len(self._buffer)
            loop = asyncio.get_running_loop()
            self._claiming = loop.run_in_executor(self._database, self._claim, wanted)

    def _stopping(self) -> bool:
        stats, budget = self.stats, self.options.budget_usd
        if budget is not None and stats.spent_usd >= budget:
            stats.stopped_by_budget = True
        if not stats.stopped_by_budget and not stats.stopped_on_request and self.should_stop is not None:
            stats.stopped_on_request = self.should_stop()
        return stats.stopped_by_budget or stats.stopped_on_request

    def _store(self, result: queue.JudgmentResult) -> asyncio.Future[None]:
        """Queue `result` for writing; the future resolves once it is written. All workers are
        cancelled together, so one cancelling the shared future cancels no other's wait."""
        if self._written is None:
            self._written = asyncio.get_running_loop().create_future()
        written = self._written
        self._results.append(result)
        self._write_batch()
        return written

    def _write_batch(self) -> None:
        """Hand the queued results to the database thread, unless it is writing: what arrives
        during a write is the next batch, handed over when that write is back."""
        if self._writing or not self._results:
            return
        batch, written = self._results, self._written
        assert written is not None  # made with the batch's first result
        self._results, self._written, self._writing = [], None, True
        loop = asyncio.get_running_loop()
        self._database.submit(self._write, batch).add_done_callback(
            lambda done: loop.call_soon_threadsafe(self._written_back, written, done.exception())
        )

    def _written_back(self, written: asyncio.Future[None], error: BaseException | None) -> None:
        self._writing = False
        if written.cancelled():  # the run is over: _settle writes the rest
            return
        if error is not None:
            written.set_exception(error)  # its workers fail, and so the run
            return
        written.set_result(None)
        self._write_batch()

    async def _settle(self) -> None:
        """After the workers: write what is left and give back the claims not judged, after the
        claim and the write under way (the database thread takes its work in order)."""
        batch, self._results = self._results, []
        try:
            await self._in_database(self._write, batch)
            await self._in_database(self._release)
        finally:
            self._database.shutdown()
            if self._claiming is not None:
                await asyncio.gather(self._claiming, return_exceptions=True)

    async def _in_database(self, call: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._database, call, *args)

    async def _judge(self, item: queue.WorkItem) -> tuple[queue.WorkItem, Outcome, str]:
        rendered, request, parse = render_request(
            item, self.constitution, self.templates, self.options, self.mode
        )
        outcome = await judge_once(self.backend, request, parse, self.options)
        return item, outcome, rendered.request_sha256

    def collect(
        self, item: queue.WorkItem, outcome: Outcome, request_sha256: str, price_factor: float = 1.0
    ) -> queue.JudgmentResult:
        """The result to record for `item`, counted in the run's stats (its cost at the prices
        times `price_factor`: the Batch API's discount)."""
        cost = self.options.cost(outcome.prompt_tokens, outcome.completion_tokens)
        cost = cost * price_factor if cost is not None else None
        self.stats.spent_usd += cost or 0.0
        if outcome.parsed is not None:
            self.stats.judged += 1
        else:
            self.stats.failed += 1
            kind = outcome.error_kind or "unknown"
            self.stats.errors[kind] = self.stats.errors.get(kind, 0) + 1
            self.stats.last_error = outcome.error
        if self.on_result:
            self.on_result(self.stats)
        return queue.JudgmentResult(
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

    def _claim(self, n: int) -> list[queue.WorkItem]:
        with self._sessions.begin() as session:
            return queue.claim(
                session, self.round_id, self.judge_id, self.worker, n, self.options.lease_s, self.evaluation
            )

    def _write(self, results: list[queue.JudgmentResult]) -> None:
        if results:
            with self._sessions.begin() as session:
                queue.record(session, self.worker, results)

    def _release(self) -> None:
        with self._sessions.begin() as session:
            queue.release(session, self.worker)
