"""Rate limits per endpoint: requests per minute and tokens per minute as aiolimiter leaky
buckets, and the endpoint-wide pause that a 429 with Retry-After asks for. Every request to an
OpenAI-compatible endpoint passes that endpoint's EndpointGate before it is sent."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from aiolimiter import AsyncLimiter

CHARS_PER_TOKEN = 4
"""The usual rule of thumb for BPE tokenizers on English text; no tokenizer is loaded per request."""
TOKENS_PER_MESSAGE = 4
"""What chat templates add around each message (role markers, separators)."""
MAX_PAUSE_S = 120.0
"""The longest pause a Retry-After may impose (the judge's backoff honours it within the same bound)."""


def estimate_tokens(body: dict[str, Any]) -> int:
    """What a chat-completions request may cost before it is sent, as a provider's TPM limit
    counts it: its messages' characters / CHARS_PER_TOKEN (plus TOKENS_PER_MESSAGE each), and
    `max_tokens` for each of its `n` choices."""
    messages = body.get("messages") or []
    chars = sum(len(_text(message.get("content"))) for message in messages if isinstance(message, dict))
    prompt = math.ceil(chars / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE * len(messages)
    return prompt + int(body.get("max_tokens") or 0) * max(1, int(body.get("n") or 1))


def _text(content: Any) -> str:
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


class SteadyRate:
    """A per-minute limit as an aiolimiter leaky bucket draining `per_minute` / 60 a second that
    holds one second's worth (at least 1): a steady rate, where aiolimiter's own
    AsyncLimiter(per_minute, 60) would let a whole minute's worth through at once and so send up
    to twice the limit in the first minute. Over any W seconds it lets through at most
    `capacity + W * per_minute / 60`.

    An AsyncLimiter belongs to one event loop, and a sampler runs a loop per batch: the level is
    mirrored here and carried into the next loop's bucket, so a new loop gets no fresh burst."""

    def __init__(self, per_minute: float) -> None:
        self.capacity = max(1.0, per_minute / 60)
        self.per_second = per_minute / 60
        self._level = 0.0  # the bucket's level at time.monotonic() `_at` (aiolimiter's clock too)
        self._at = 0.0
        self._bound: tuple[asyncio.AbstractEventLoop, AsyncLimiter] | None = None

    async def take(self, amount: float) -> None:
        """Wait until `amount` fits. aiolimiter refuses more than the bucket holds, so a larger
        amount is taken a bucketful at a time: it waits as long as its size asks for."""
        bucket = await self._bucket()
        while amount > 0:
            chunk = min(amount, self.capacity)
            await bucket.acquire(chunk)
            self._level, self._at = self._drained() + chunk, time.monotonic()
            amount -= chunk

    def _drained(self) -> float:
        return max(0.0, self._level - (time.monotonic() - self._at) * self.per_second)

    async def _bucket(self) -> AsyncLimiter:
        loop = asyncio.get_running_loop()
        if self._bound is None or self._bound[0] is not loop:
            bucket = AsyncLimiter(self.capacity, self.capacity / self.per_second)
            if (carried := self._drained()) > 0:
                await bucket.acquire(carried)  # at once: the bucket is empty and carried <= capacity
            self._bound = (loop, bucket)
        return self._bound[1]


class EndpointGate:
    """Admits the requests to one endpoint: at most `rpm` requests and `tpm` tokens a minute
    (None: no limit), and none while a 429's Retry-After pause lasts.

    Requests are admitted one at a time, in arrival order: each waits out any pause, then takes
    its estimated tokens (estimate_tokens) and then one request from the buckets, and goes out
    as soon as it has them. The buckets cannot give back, so a reply shorter than its
    `max_tokens` still counts in full (as providers count TPM); a reply that used more than
    its estimate (`settle`) is charged to the next request admitted.

    Both the buckets and the pause outlive event loops (a sampler runs one per batch)."""

    def __init__(self, rpm: float | None = None, tpm: float | None = None) -> None:
        for name, value in (("rpm", rpm), ("tpm", tpm)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be a positive number, not {value!r}")
        self.rpm = rpm
        self.tpm = tpm
        self.admitted = 0
        """Requests let through so far."""
        self.charged_tokens = 0
        """Tokens taken from the TPM bucket so far (estimates, plus what replies used beyond them)."""
        self.pauses = 0
        """429s with Retry-After that paused the endpoint."""
        self._resume_at = 0.0  # time.monotonic() before which nothing is sent
        self._debt = 0  # tokens replies used beyond their estimates, not yet charged
        self._rpm = SteadyRate(rpm) if rpm is not None else None
        self._tpm = SteadyRate(tpm) if tpm is not None else None
        self._lock: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None

    @property
    def limited(self) -> bool:
        return self.rpm is not None or self.tpm is not None

    def pause(self, seconds: float) -> None:
        """Hold every request to the endpoint for `seconds` (from now; MAX_PAUSE_S at most). A
        shorter pause never shortens one in force."""
        self.pauses += 1
        self._resume_at = max(self._resume_at, time.monotonic() + min(seconds, MAX_PAUSE_S))

    def paused_for(self) -> float:
        """Seconds left of the pause in force (0 when none)."""
        return max(0.0, self._resume_at - time.monotonic())

    async def admit(self, tokens: int) -> None:
        """Wait until a request estimated at `tokens` may go out."""
        if not self.limited:
            await self._pause_over()
            self.admitted += 1
            return
        async with self._admitting():
            while True:
                await self._pause_over()
                charge = tokens + self._debt
                if self._tpm is not None:
                    await self._tpm.take(charge)
                    self._debt = 0
                    self.charged_tokens += charge
                if self._rpm is not None:
                    await self._rpm.take(1)
                # A pause that began while this request waited holds it too; what it took from
                # the buckets is spent (taking it again after the pause keeps the bound).
                if not self.paused_for():
                    break
            self.admitted += 1

    def settle(self, estimated: int, used: int | None) -> None:
        """Record what a reply used (prompt + completion tokens, as the server reported them):
        beyond `estimated`, it is charged to the next request admitted."""
        if self.tpm is not None and used is not None and used > estimated:
            self._debt += used - estimated

    async def _pause_over(self) -> None:
        while (wait := self.paused_for()) > 0:
            await asyncio.sleep(wait)

    def _admitting(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock[0] is not loop:  # an asyncio.Lock belongs to one loop
            self._lock = (loop, asyncio.Lock())
        return self._lock[1]
