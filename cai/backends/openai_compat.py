"""Judge calls to any OpenAI-compatible server (vLLM, llama.cpp server, Ollama, OpenAI) through
the `openai` SDK. Retries are the judge runner's job, so the SDK's own are off and every HTTP
outcome becomes a ChatResult, a TransientError (with Retry-After) or a PermanentError."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from collections.abc import Sequence
from typing import Any

import openai

from cai.backends.base import (
    ChatRequest,
    ChatResult,
    PermanentError,
    Sample,
    SampleRequest,
    SamplingParams,
    TransientError,
)


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
            completion = await self._client.chat.completions.create(**kwargs)
        except openai.BadRequestError as exc:
            if "response_format" in kwargs and _mentions_schema(exc):
                self.structured_output = False  # an older server: fall back to plain JSON prompting
                return await self.complete(request)
            raise PermanentError(f"HTTP 400: {_detail(exc)}") from None
        except (openai.RateLimitError, openai.InternalServerError) as exc:
            raise TransientError(
                f"HTTP {exc.status_code}: {_detail(exc)}", retry_after=retry_after(exc.response.headers)
            ) from None
        except openai.APIStatusError as exc:
            if exc.status_code in (408, 409) or exc.status_code >= 500:
                raise TransientError(f"HTTP {exc.status_code}: {_detail(exc)}") from None
            raise PermanentError(f"HTTP {exc.status_code}: {_detail(exc)}") from None
        except openai.APITimeoutError:
            raise TransientError("timed out") from None
        except openai.APIConnectionError as exc:
            raise TransientError(f"connection failed: {exc}") from None
        except (openai.OpenAIError, ValueError) as exc:
            # e.g. a 200 whose body is not JSON: the server misbehaved; worth another try.
            raise TransientError(f"unreadable response: {type(exc).__name__}: {exc}") from None
        if not completion.choices:
            raise TransientError("the server returned no choices")
        usage = completion.usage
        return ChatResult(
            text=completion.choices[0].message.content or "",
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
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
    return str(exc.message)[:300]


def _mentions_schema(exc: openai.BadRequestError) -> bool:
    text = _detail(exc).lower()
    return any(word in text for word in ("response_format", "json_schema", "structured"))


class OpenAISampler:
    """Sampler over an OpenAI-compatible server. Requests for the same conversation are sent as
    one request with `n` choices (one prefill on the server); a server that ignores `n` is asked
    again for the rest. Each request carries a seed, which servers such as vLLM honour."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 120.0,
        concurrency: int = 16,
    ) -> None:
        self.model = model
        self.base_url = base_url
        self.api_key = api_key
        self.timeout = timeout
        self.concurrency = concurrency

    def sample(self, requests: Sequence[SampleRequest], params: SamplingParams) -> list[Sample]:
        return asyncio.run(self._sample_all(requests, params))

    async def _sample_all(self, requests: Sequence[SampleRequest], params: SamplingParams) -> list[Sample]:
        # The SDK retries transient failures itself here: a sample has no verdict to keep apart.
        client = openai.AsyncOpenAI(
            base_url=self.base_url, api_key=self.api_key or "unused", timeout=self.timeout
        )
        semaphore = asyncio.Semaphore(self.concurrency)
        results: list[Sample | None] = [None] * len(requests)

        async def draw(indices: list[int]) -> None:
            seed = requests[indices[0]].seed
            async with semaphore:
                completion = await client.chat.completions.create(
                    model=self.model,
                    messages=requests[indices[0]].messages,  # type: ignore[arg-type]
                    temperature=params.temperature,
                    top_p=params.top_p,
                    max_tokens=params.max_new_tokens,
                    seed=seed,
                    n=len(indices),
                )
            if not completion.choices:
                raise RuntimeError(f"{self.base_url}: the server returned no choices")
            usage, shared = completion.usage, len(completion.choices) > 1
            for index, choice in zip(indices, completion.choices, strict=False):
                results[index] = Sample(
                    text=(choice.message.content or "").strip(),
                    prompt_tokens=usage.prompt_tokens if usage else None,
                    # Usage covers all choices together; per-choice counts are unknown.
                    completion_tokens=None if shared or not usage else usage.completion_tokens,
                    finish_reason=choice.finish_reason,
                    seed=seed if shared and index != indices[0] else None,
                )
            if len(indices) > len(completion.choices):
                await draw(indices[len(completion.choices) :])

        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.messages, sort_keys=True), []).append(index)
        try:
            await asyncio.gather(*(draw(indices) for indices in groups.values()))
        finally:
            await client.close()
        return [r for r in results if r is not None]
