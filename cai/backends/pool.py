"""A judge served by several OpenAI-compatible endpoints of the same model (say, one vLLM server
per GPU box): a pool file names them, each with its own concurrency limit, and one ChatBackend
spreads the requests over them. An endpoint that keeps failing is set aside for a while, and
its requests go to the others; it is tried again when its time is up.

The endpoints are one judge: a judge's identity is its model, mode, templates and parameters,
never its address (cai.store.judges.JudgeConfig)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cai.backends.base import ChatBackend, ChatRequest, ChatResult, TransientError
from cai.config import config_from_file
from cai.errors import BadInput

FAILURES_TO_SET_ASIDE = 3
"""Transient failures in a row (timeouts, refused connections, 5xx) that set an endpoint aside."""
SET_ASIDE_S = 30.0
"""How long an endpoint is first set aside; each time it fails again on return, twice as long..."""
MAX_SET_ASIDE_S = 300.0
"""...up to this."""


class PoolEndpoint(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1)
    concurrency: int | None = Field(default=None, ge=1)
    """Requests in flight to this endpoint at once (None: the judge's --concurrency)."""


class PoolFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    endpoints: list[PoolEndpoint] = Field(min_length=1)


def load_pool(path: Path) -> list[PoolEndpoint]:
    """The endpoints of a pool file (YAML or JSON: `endpoints: [{url, concurrency}]`); BadInput
    naming the file and field for anything else, and for an endpoint listed twice."""
    endpoints = config_from_file(PoolFile, path, "judge pool", {}).endpoints
    urls = [e.url.rstrip("/") for e in endpoints]
    repeated = sorted({u for u in urls if urls.count(u) > 1})
    if repeated:
        raise BadInput(f"{path}: endpoints: listed more than once: {', '.join(repeated)}")
    return endpoints


@dataclass
class _Member:
    backend: ChatBackend
    url: str
    capacity: int
    in_flight: int = 0
    failures_in_a_row: int = 0
    set_aside_until: float = 0.0
    set_aside_for: float = 0.0
    served: int = 0
    failed: int = 0


class PooledChat:
    """One ChatBackend over several endpoints. Each request goes to the available endpoint (not
    set aside, a free slot) with the fewest requests in flight; a transient failure there
    (`FAILURES_TO_SET_ASIDE` in a row set it aside) is asked again at once of another one, so
    its work moves on without waiting out a backoff. When every endpoint is set aside, the
    request fails transiently with the wait until the first comes back as its Retry-After, and
    the caller's retry loop waits that long."""

    def __init__(
        self,
        members: Sequence[tuple[str, ChatBackend, int]],
        model: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self._members = [_Member(backend, url, capacity) for url, backend, capacity in members]
        self._clock = clock
        self._changed: tuple[asyncio.AbstractEventLoop, asyncio.Condition] | None = None

    async def complete(self, request: ChatRequest) -> ChatResult:
        tried: set[int] = set()
        while True:
            member = await self._take(tried)
            try:
                result = await member.backend.complete(request)
            except TransientError:
                self._failed(member)
                tried.add(id(member))
                if len(tried) == len(self._members):
                    raise  # every endpoint failed this request: the caller's retry takes over
                continue
            finally:
                await self._release(member)
            member.failures_in_a_row, member.set_aside_for = 0, 0.0
            member.served += 1
            return result

    def health(self) -> list[dict[str, Any]]:
        """Each endpoint: requests served and failed, and seconds it is still set aside for."""
        now = self._clock()
        return [
            {
                "url": m.url,
                "served": m.served,
                "failed": m.failed,
                "set_aside_s": round(max(0.0, m.set_aside_until - now), 1),
            }
            for m in self._members
        ]

    async def aclose(self) -> None:
        for member in self._members:
            await member.backend.aclose()

    async def _take(self, tried: set[int]) -> _Member:
        """Wait for a slot on an endpoint this request has not tried and that is not set aside."""
        changed = self._condition()
        async with changed:
            while True:
                now = self._clock()
                usable = [m for m in self._members if id(m) not in tried and m.set_aside_until <= now]
                if not usable:
                    returning = min(m.set_aside_until for m in self._members if id(m) not in tried)
                    raise TransientError(
                        "every endpoint of the judge pool is set aside after repeated failures",
                        retry_after=max(0.0, returning - now),
                    )
                free = [m for m in usable if m.in_flight < m.capacity]
                if free:
                    member = min(free, key=lambda m: m.in_flight / m.capacity)
                    member.in_flight += 1
                    return member
                # All busy: wait for a slot, or for a set-aside endpoint's time to be up.
                aside = [m.set_aside_until - now for m in self._members if m.set_aside_until > now]
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), timeout=min(aside) if aside else None)

    async def _release(self, member: _Member) -> None:
        changed = self._condition()
        async with changed:
            member.in_flight -= 1
            changed.notify_all()

    def _failed(self, member: _Member) -> None:
        member.failed += 1
        member.failures_in_a_row += 1
        if member.failures_in_a_row >= FAILURES_TO_SET_ASIDE:
            member.set_aside_for = min(MAX_SET_ASIDE_S, member.set_aside_for * 2 or SET_ASIDE_S)
            member.set_aside_until = self._clock() + member.set_aside_for
            member.failures_in_a_row = FAILURES_TO_SET_ASIDE - 1  # on return, one failure sets it aside again

    def _condition(self) -> asyncio.Condition:
        # One per event loop (an asyncio.Condition belongs to the loop it is first used in).
        loop = asyncio.get_running_loop()
        if self._changed is None or self._changed[0] is not loop:
            self._changed = (loop, asyncio.Condition())
        return self._changed[1]
