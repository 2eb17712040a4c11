"""Judge and policy calls to any OpenAI-compatible server (vLLM, llama.cpp server, Ollama, OpenAI)
through the `openai` SDK. Retries are ours (cai.backends.base.retry_transient), so the SDK's own
are off and every HTTP outcome becomes a checked completion, a TransientError (with Retry-After)
or a PermanentError, whose message names the server's URL."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from collections.abc import Sequence
from typing import Any

import openai
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice

from cai.backends.base import (
    ChatRequest,
    ChatResult,
    PermanentError,
    Retry,
    Sample,
    SampleRequest,
    SamplingIncomplete,
    SamplingParams,
    TransientError,
    retry_transient,
)

SAMPLER_RETRY = Retry()
"""Tries per policy request and the backoff between them, as the judge's defaults."""

SHOWN_CHARS = 160
"""How much of an unexpected reply an error message quotes."""


class BadRequest(PermanentError):
    """HTTP 400; `detail` is the server's own message (the judge reads it for a schema refusal)."""

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message)
        self.detail = detail


async def create_completion(
    client: openai.AsyncOpenAI, base_url: str, kwargs: dict[str, Any]
) -> tuple[list[Choice], CompletionUsage | None]:
    """One chat-completions request: its choices (at least one, each with a text or no content)
    and usage. Anything else raises TransientError or PermanentError naming `base_url`."""
    try:
        raw = await client.chat.completions.with_raw_response.create(**kwargs)
        completion = raw.parse()
    except (openai.OpenAIError, ValueError) as exc:
        raise server_fault(exc, base_url) from None
    response = raw.http_response
    choices = getattr(completion, "choices", None)
    # The SDK hands back a str for a non-JSON body (a proxy's HTML page) and builds whatever JSON
    # it got into a ChatCompletion unchecked; either would crash far from here.
    if (
        not isinstance(completion, ChatCompletion)
        or not isinstance(choices, list)
        or not all(_is_choice(choice) for choice in choices)
    ):
        content_type = response.headers.get("content-type", "no content type").split(";")[0]
        raise TransientError(
            f"{base_url}: HTTP {response.status_code} ({content_type}) is not a chat completion: "
            f"{shorten(response.text)}"
        )
    if not choices:
        raise TransientError(f"{base_url}: the server returned no choices")
    usage = completion.usage if isinstance(completion.usage, CompletionUsage) else None
    return choices, usage


def _is_choice(choice: Any) -> bool:
    message = getattr(choice, "message", None)
    return (
        isinstance(choice, Choice)
        and isinstance(message, ChatCompletionMessage)
        and isinstance(message.content, str | None)
    )


def server_fault(exc: Exception, base_url: str) -> TransientError | PermanentError:
    """What an SDK error means for a retry, in words that name the server."""
    if isinstance(exc, openai.APIStatusError):
        code, detail = exc.status_code, _detail(exc)
        message = f"{base_url}: HTTP {code}: {detail}"
        if code == 400:
            return BadRequest(message, detail)
        if code in (408, 409, 429) or code >= 500:
            return TransientError(message, retry_after=retry_after(exc.response.headers))
        return PermanentError(message)
    if isinstance(exc, openai.APITimeoutError):
        return TransientError(f"{base_url}: timed out")
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc.__context__
        reason = f"{type(cause).__name__}: {cause}" if cause is not None else exc.message
        return TransientError(f"{base_url}: connection failed: {reason}")
    if isinstance(exc, json.JSONDecodeError):  # a body that claims to be JSON and is not
        return TransientError(f"{base_url}: the reply is not JSON: {shorten(exc.doc)}")
    # The server misbehaved in some other way; worth another try.
    return TransientError(f"{base_url}: unreadable response: {type(exc).__name__}: {exc}")


def shorten(text: str, limit: int = SHOWN_CHARS) -> str:
    """`text` quoted on one line, cut to `limit` characters."""
    flat = " ".join(text.split())
    if not flat:
        return "(an empty body)"
    if len(flat) <= limit:
        return f'"{flat}"'
    return f'"{flat[:limit]}..." ({len(text)} characters)'


class OpenAIChat:
    """ChatBackend over `AsyncOpenAI`. Asks for JSON-schema structured output and, if the server
    rejects that, stops asking (the judge parses leniently either way)."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 60.0) -> None:
        self.model = model
        self.base_url = base_url
        self.structured_output = True
        self._client = openai.AsyncOpenAI(
            base_url=base_url, api_key=api_key or "unused", timeout=timeout, max_retries=0
        )

    async def complete(self, request: ChatRequest) -> ChatResult:
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": request.messages,
            "temperature": request.temperature,
            "max_tokens": request.max_tokens,
        }
        if request.json_schema and self.structured_output:
            kwargs["response_format"] = {"type": "json_schema", "json_schema": request.json_schema}
        try:
            choices, usage = await create_completion(self._client, self.base_url, kwargs)
        except BadRequest as exc:
            if "response_format" in kwargs and _mentions_schema(exc.detail):
                self.structured_output = False  # an older server: fall back to plain JSON prompting
                return await self.complete(request)
            raise
        return ChatResult(
            text=choices[0].message.content or "",
            prompt_tokens=_tokens(usage, "prompt_tokens"),
            completion_tokens=_tokens(usage, "completion_tokens"),
        )

    async def aclose(self) -> None:
        await self._client.close()


def retry_after(headers: Any) -> float | None:
    """Seconds to wait from `retry-after-ms` or `retry-after` (seconds or an HTTP date)."""
    if headers is None:
        return None
    if value := headers.get("retry-after-ms"):
        try:
            return float(value) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None
        return max(0.0, email.utils.mktime_tz(parsed) - time.time())


def _detail(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:300]
    if isinstance(body, str):  # not JSON: a proxy's error page, say
        content_type = exc.response.headers.get("content-type", "no content type").split(";")[0]
        return f"({content_type}) {shorten(body)}"
    return str(exc.message)[:300]


def _mentions_schema(detail: str) -> bool:
    return any(word in detail.lower() for word in ("response_format", "json_schema", "structured"))


def _tokens(usage: CompletionUsage | None, name: str) -> int | None:
    value = getattr(usage, name, None)
    return value if isinstance(value, int) else None


class OpenAISampler:
    """Sampler over an OpenAI-compatible server. Requests for the same conversation are sent as
    one request with `n` choices (one prefill on the server); a server that ignores `n` is asked
    again for the rest. Each request carries a seed, which servers such as vLLM honour, and is
    retried on transient faults (`retry`, default SAMPLER_RETRY) with the judge's backoff."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 120.0,
        concurrency: int = 16,
        retry: Retry | None = None,
    ) -> None:
        self.model = model
        self.base_url = base_url
        self.api_key = api_key
        self.timeout = timeout
        self.concurrency = concurrency
        self.retry = retry

    def sample(self, requests: Sequence[SampleRequest], params: SamplingParams) -> list[Sample]:
        return asyncio.run(self._sample_all(requests, params))

    async def _sample_all(self, requests: Sequence[SampleRequest], params: SamplingParams) -> list[Sample]:
        client = openai.AsyncOpenAI(
            base_url=self.base_url, api_key=self.api_key or "unused", timeout=self.timeout, max_retries=0
        )
        retry = self.retry or SAMPLER_RETRY  # looked up per call, so tests can make it quick
        semaphore = asyncio.Semaphore(self.concurrency)
        results: list[Sample | None] = [None] * len(requests)
        errors: list[str] = []

        async def draw(indices: list[int]) -> None:
            seed = requests[indices[0]].seed
            kwargs: dict[str, Any] = {
                "model": self.model,
                "messages": requests[indices[0]].messages,
                "temperature": params.temperature,
                "top_p": params.top_p,
                "max_tokens": params.max_new_tokens,
                "seed": seed,
                "n": len(indices),
            }
            try:
                async with semaphore:
                    choices, usage = await retry_transient(
                        lambda: create_completion(client, self.base_url, kwargs),
                        retry.max_attempts,
                        retry.delay,
                    )
            except (TransientError, PermanentError) as exc:
                errors.append(str(exc))  # these samples stay missing; the others are kept
                return
            shared = len(choices) > 1
            for index, choice in zip(indices, choices, strict=False):
                results[index] = Sample(
                    text=(choice.message.content or "").strip(),
                    prompt_tokens=_tokens(usage, "prompt_tokens"),
                    # Usage covers all choices together; per-choice counts are unknown.
                    completion_tokens=None if shared else _tokens(usage, "completion_tokens"),
                    finish_reason=choice.finish_reason,
                    seed=seed if shared and index != indices[0] else None,
                )
            if len(indices) > len(choices):
                await draw(indices[len(choices) :])

        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.messages, sort_keys=True), []).append(index)
        try:
            await asyncio.gather(*(draw(indices) for indices in groups.values()))
        finally:
            await client.close()
        if errors:
            missing = sum(r is None for r in results)
            raise SamplingIncomplete(
                f"{missing} of {len(requests)} samples failed after up to {retry.max_attempts} "
                f"attempts each; last error: {errors[-1]}",
                results,
            )
        return [r for r in results if r is not None]
