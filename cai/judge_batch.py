"""`cai judge --batch`: a phase's pending judgments sent as one OpenAI Batch API job (half the
price at OpenAI, answered within 24 hours) instead of request by request.

For a phase with pending work it:
1. records a batch row (cai.store.batches), then claims the pending judgments as the batch's
   own worker (`batch:<id>`) for longer than a batch may take, so no online run takes them;
2. writes them as a JSONL file, one chat-completions request per line, `custom_id` the
   judgment's key (`judgment-<id>`), rendered exactly as an online run renders them;
3. uploads it (`/v1/files`), creates the batch (`/v1/batches`, its row id in the metadata) and
   stores the batch id;
4. polls until the batch ends, then reads its output and error files and records every line
   through the keyed path online results take (queue.record: only a pending judgment this
   batch holds is written, so ingesting twice writes once), and gives back what the batch did
   not answer (expired, cancelled, failed) for the next run.

A rerun finds the open batch row and resumes where the last run stopped: polling a submitted
batch, or, for a row killed before its batch id was stored, finding the batch by its metadata
and submitting only if there is none. Nothing is submitted twice, nothing ingested twice.

The requests use the features this judge's endpoint accepted last time (stored per judge and
URL), defaulting to structured output and logprobs; a line the server refuses comes back in the
error file and is recorded as failed (`--retry-failed` asks again, online or in a batch)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy.orm import Session

from cai.backends.base import ChatBackend
from cai.backends.openai_compat import OpenAIChat, is_choice
from cai.errors import BadInput
from cai.judge import ParseError
from cai.judging import JudgeRun, Outcome, RunStats, render_request
from cai.store import batches, queue
from cai.store.db import session_scope
from cai.store.models import JudgeBatchRow

BATCH_LEASE_S = 26 * 3600.0
"""How long a batch holds its judgments: its 24-hour completion window, and time to ingest."""
MAX_BATCH_REQUESTS = 50_000
"""Requests per batch at most (OpenAI's limit); a larger phase goes out in several, in turn."""
BATCH_PRICE_FACTOR = 0.5
"""The Batch API's price against the same requests made one by one (OpenAI's: half)."""
ENDED = ("completed", "expired", "cancelled", "failed")
ENDPOINT: Literal["/v1/chat/completions"] = "/v1/chat/completions"


def custom_id(judgment_id: int) -> str:
    return f"judgment-{judgment_id}"


@dataclass
class BatchRunner:
    """A judge_round Runner that judges each phase in batches of at most `max_requests` (one
    after another), polling every `poll_s`; `note` hears what happens (submitted, status
    changes, ingested)."""

    poll_s: float = 30.0
    note: Callable[[str], None] = lambda message: None
    max_requests: int = MAX_BATCH_REQUESTS

    async def __call__(self, run: JudgeRun, pending: int, phase: str) -> RunStats:
        """Batch after batch until the phase has nothing pending, or one ends without answering
        all it held (expired, cancelled, failed): its remainder waits for the next run."""
        backend = _batch_backend(run.backend)
        while await self._one_batch(run, backend, pending, phase) == "completed":
            with session_scope(run.engine) as session:
                pending = queue.pending_count(session, run.round_id, run.judge_id, run.evaluation)
            if pending == 0:
                break
        return run.stats

    async def _one_batch(self, run: JudgeRun, backend: OpenAIChat, pending: int, phase: str) -> str | None:
        """Submit (or resume) one batch, wait for it and ingest it: how it ended (None: nothing
        to send)."""
        with session_scope(run.engine) as session:
            row = batches.open_batch(session, run.round_id, run.judge_id, phase)
            if row is None:
                if pending == 0:
                    return None
                row = batches.start_batch(session, run.round_id, run.judge_id, phase, backend.base_url)
            batch_id, worker, remote_id = row.id, row.worker, row.remote_id
        with session_scope(run.engine) as session:
            # Claimed in its own transaction, after the row is stored: a kill between the two
            # leaves a row whose worker holds what it claimed, and the rerun resumes that row.
            if remote_id is None:
                queue.claim(
                    session,
                    run.round_id,
                    run.judge_id,
                    worker,
                    min(max(pending, 1), self.max_requests),
                    BATCH_LEASE_S,
                    run.evaluation,
                )
            items = queue.claimed_by(session, worker)
        if remote_id is None and not items:  # others took the work meanwhile: nothing to send
            with session_scope(run.engine) as session:
                _finish(session, batch_id, "empty", {}, 0)
            return None
        if remote_id is None:
            remote_id = await self._submit(run, backend, batch_id, items)
        remote = await self._wait(backend, batch_id, remote_id, run)
        released = await self._ingest(run, backend, batch_id, worker, remote, items)
        # A batch that left work unanswered ends the run, whatever its status: the next run
        # sends the rest (a loop here could resubmit forever to a server that never answers).
        return str(remote.status) if released == 0 else f"{remote.status}, {released} unanswered"

    async def _submit(
        self, run: JudgeRun, backend: OpenAIChat, batch_id: int, items: list[queue.WorkItem]
    ) -> str:
        client = backend.client
        remote = None
        async for existing in client.batches.list(limit=100):
            if (existing.metadata or {}).get("cai_batch") == str(batch_id):
                remote = existing  # submitted by a run that was killed before storing its id
                break
        if remote is None:
            lines = [_request_line(run, backend, item) for item in items]
            uploaded = await client.files.create(
                file=(f"cai-batch-{batch_id}.jsonl", "".join(lines).encode(), "application/jsonl"),
                purpose="batch",
            )
            remote = await client.batches.create(
                input_file_id=uploaded.id,
                endpoint=ENDPOINT,
                completion_window="24h",
                metadata={"cai_batch": str(batch_id), "cai_round": str(run.round_id)},
            )
            self.note(f"batch {batch_id}: {len(lines)} requests submitted as {remote.id}")
        with session_scope(run.engine) as session:
            row = session.get_one(JudgeBatchRow, batch_id)
            row.remote_id, row.input_file_id = remote.id, remote.input_file_id
            row.status, row.remote_status, row.requests = "submitted", remote.status, len(items)
        return remote.id

    async def _wait(self, backend: OpenAIChat, batch_id: int, remote_id: str, run: JudgeRun) -> Any:
        last = None
        while True:
            remote = await backend.client.batches.retrieve(remote_id)
            if remote.status != last:
                last = remote.status
                counts = remote.request_counts
                done = f" ({counts.completed + counts.failed}/{counts.total})" if counts else ""
                self.note(f"batch {batch_id} ({remote_id}): {remote.status}{done}")
                with session_scope(run.engine) as session:
                    session.get_one(JudgeBatchRow, batch_id).remote_status = remote.status
            if remote.status in ENDED:
                return remote
            await asyncio.sleep(self.poll_s)

    async def _ingest(
        self,
        run: JudgeRun,
        backend: OpenAIChat,
        batch_id: int,
        worker: str,
        remote: Any,
        items: list[queue.WorkItem],
    ) -> int:
        """Record the batch's answers; returns how many judgments it held were given back."""
        by_key = {custom_id(item.judgment_id): item for item in items}
        results: dict[int, queue.JudgmentResult] = {}
        for file_id in (remote.output_file_id, remote.error_file_id):
            if not file_id:
                continue
            content = await backend.client.files.content(file_id)
            for line in content.text.splitlines():
                entry = _entry(line)
                item = by_key.get(str(entry.get("custom_id"))) if entry is not None else None
                if entry is not None and item is not None and item.judgment_id not in results:
                    results[item.judgment_id] = _result(run, backend, item, entry)
        with session_scope(run.engine) as session:
            queue.record(session, worker, list(results.values()))
            released = queue.release(session, worker)  # not answered: judged again next run
            _finish(session, batch_id, remote.status, results, released)
        answered = sum(r.status == "ok" for r in results.values())
        self.note(
            f"batch {batch_id} ({remote.id}) {remote.status}: {answered} judged, "
            f"{len(results) - answered} failed, {released} given back to judge again"
        )
        return released


def _batch_backend(backend: ChatBackend) -> OpenAIChat:
    if not isinstance(backend, OpenAIChat):
        raise BadInput(
            "--batch needs a judge behind --judge-base-url (one OpenAI-compatible endpoint with /v1/batches)"
        )
    return backend


def _request_line(run: JudgeRun, backend: OpenAIChat, item: queue.WorkItem) -> str:
    _, request, _ = render_request(item, run.constitution, run.templates, run.options, run.mode)
    line = {
        "custom_id": custom_id(item.judgment_id),
        "method": "POST",
        "url": ENDPOINT,
        "body": backend.request_body(request),
    }
    return json.dumps(line) + "\n"


def _entry(line: str) -> dict[str, Any] | None:
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


def _result(
    run: JudgeRun, backend: OpenAIChat, item: queue.WorkItem, entry: dict[str, Any]
) -> queue.JudgmentResult:
    """One output or error file line as the result an online request would have recorded."""
    rendered, request, parse = render_request(item, run.constitution, run.templates, run.options, run.mode)
    outcome = Outcome(parsed=None, attempts=1)
    response = _mapping(entry.get("response"))
    status = response.get("status_code")
    body = _mapping(response.get("body"))
    choices = body.get("choices")
    if (
        entry.get("error")
        or status != 200
        or not isinstance(choices, list)
        or not choices
        or not all(is_choice(c) for c in choices)
    ):
        message = (
            _mapping(entry.get("error")).get("message")
            or _mapping(body.get("error")).get("message")
            or "no completion in the batch's output"
        )
        outcome.error = f"{backend.base_url}: batch request failed (HTTP {status}): {message}"
        outcome.error_kind = (
            "permanent" if isinstance(status, int) and 400 <= status < 500 and status != 429 else "transient"
        )
        return run.collect(item, outcome, rendered.request_sha256, BATCH_PRICE_FACTOR)
    usage = _mapping(body.get("usage")) or None
    result = backend.chat_result(choices, usage, request, backend.wants_logprobs(request))
    outcome.raw_output = result.text
    outcome.prompt_tokens, outcome.completion_tokens = (
        result.prompt_tokens or 0,
        result.completion_tokens or 0,
    )
    try:
        outcome.parsed = parse(result)
    except ParseError as exc:
        outcome.error, outcome.error_kind = str(exc), "parse"
    return run.collect(item, outcome, rendered.request_sha256, BATCH_PRICE_FACTOR)


def _mapping(value: Any) -> dict[str, Any]:
    """`value` if it is a JSON object, else an empty one: batch files are read defensively."""
    return value if isinstance(value, dict) else {}


def _finish(
    session: Session,
    batch_id: int,
    remote_status: str,
    results: dict[int, queue.JudgmentResult],
    released: int,
) -> None:
    row = session.get_one(JudgeBatchRow, batch_id)
    row.status, row.remote_status, row.released = "ingested", remote_status, released
    row.answered = sum(r.status == "ok" for r in results.values())
    row.failed = len(results) - row.answered
