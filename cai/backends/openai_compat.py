"""Judge and policy calls to any OpenAI-compatible server (vLLM, llama.cpp server, Ollama, OpenAI)
through the `openai` SDK. Retries are ours (cai.backends.base.retry_transient), so the SDK's own
are off and every HTTP outcome becomes a checked completion, a TransientError (with Retry-After)
or a PermanentError, whose message names the server's URL."""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import itertools
import json
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx2
import openai

from cai.backends.base import (
    ChatRequest,
    ChatResult,
    PermanentError,
    Retry,
    Sample,
    SampleRequest,
    SamplingIncomplete,
    SamplingParams,
    TokenUsage,
    TransientError,
    retry_transient,
)
from cai.backends.negotiation import (
    TOP_LOGPROBS,
    EndpointFeatures,
    choice_probs_from_logprobs,
    is_refusal,
    names_feature,
    schema_instruction,
)
from cai.backends.ratelimit import EndpointGate, estimate_tokens

SAMPLER_RETRY = Retry()
"""Tries per policy request and the backoff between them, as the judge's defaults."""

SHOWN_CHARS = 160
"""How much of an unexpected reply an error message quotes."""


class BadRequest(PermanentError):
    """HTTP 4xx other than load (408, 409, 429); `detail` is the server's own message, which
    feature negotiation reads for what was refused."""

    def __init__(self, message: str, status: int, detail: str) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


class ServerFault(TransientError):
    """HTTP 5xx: retried, unless its body shows it refused a request feature."""

    def __init__(self, message: str, status: int, detail: str, retry_after: float | None = None) -> None:
        super().__init__(message, retry_after=retry_after)
        self.status = status
        self.detail = detail


Choice = dict[str, Any]
"""One element of a chat completion's `choices`: a `message` whose `content` is a text or null."""
Usage = dict[str, Any]


async def create_completion(
    client: openai.AsyncOpenAI, base_url: str, body: dict[str, Any], gate: EndpointGate | None = None
) -> tuple[list[Choice], Usage | None]:
    """One chat-completions request: its choices (at least one) and usage, as the server's JSON.
    Anything else raises TransientError or PermanentError naming `base_url`. With a `gate`, the
    request waits for the endpoint's rate limits and pauses, and a 429 with Retry-After pauses
    the whole endpoint.

    Through the SDK's `post`, not `chat.completions.create`: that one walks the body against its
    typed parameters and builds models of the reply, a third of the SDK's CPU per request on
    plain JSON that needs neither (transport, errors and timeouts are the same)."""
    estimated = estimate_tokens(body) if gate is not None and gate.tpm is not None else 0
    if gate is not None:
        await gate.admit(estimated)
    try:
        response = await client.post("/chat/completions", body=body, cast_to=httpx2.Response)
        completion = _json_body(response)
    except (openai.OpenAIError, ValueError) as exc:
        fault = server_fault(exc, base_url)
        wait = fault.retry_after if isinstance(fault, TransientError) else None
        if gate is not None and isinstance(exc, openai.RateLimitError) and wait is not None:
            gate.pause(wait)  # a 429 that says how long holds every request to the endpoint
        raise fault from None
    choices = completion.get("choices") if isinstance(completion, dict) else None
    # A proxy's HTML page, or JSON that is not a chat completion, would crash far from here.
    if not isinstance(choices, list) or not all(is_choice(choice) for choice in choices):
        content_type = response.headers.get("content-type", "no content type").split(";")[0]
        raise TransientError(
            f"{base_url}: HTTP {response.status_code} ({content_type}) is not a chat completion: "
            f"{shorten(response.text)}"
        )
    if not choices:
        raise TransientError(f"{base_url}: the server returned no choices")
    usage = completion.get("usage")
    usage = usage if isinstance(usage, dict) else None
    if gate is not None:
        gate.settle(estimated, _used_tokens(usage))
    return choices, usage


def _json_body(response: httpx2.Response) -> Any:
    """The body as JSON, as the SDK reads it: one of a JSON content type must parse (else
    ValueError), any other is JSON only if it parses (else None: a proxy's HTML page)."""
    try:
        return response.json()
    except ValueError:
        if response.headers.get("content-type", "").split(";")[0].endswith("json"):
            raise
        return None


def is_choice(choice: Any) -> bool:
    message = choice.get("message") if isinstance(choice, dict) else None
    return isinstance(message, dict) and isinstance(message.get("content"), str | None)


def server_fault(exc: Exception, base_url: str) -> TransientError | PermanentError:
    """What an SDK error means for a retry, in words that name the server."""
    if isinstance(exc, openai.APIStatusError):
        code, detail = exc.status_code, _detail(exc)
        message = f"{base_url}: HTTP {code}: {detail}"
        wait = retry_after(exc.response.headers)
        if code >= 500:
            return ServerFault(message, code, detail, retry_after=wait)
        if code in (408, 409, 429):
            return TransientError(message, retry_after=wait)
        return BadRequest(message, code, detail)
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
    """ChatBackend over `AsyncOpenAI` that negotiates what its endpoint accepts (see
    cai.backends.negotiation): JSON-schema output, else `json_object` with a schema, else
    `json_object` with the schema in the prompt, else plain text; and logprobs for a verdict's
    probabilities. While something is
    unknown, requests go one at a time and a refusal steps down and asks again at once, so it
    costs one extra request per endpoint, never a work item's attempt; after that they run
    concurrently. `features` holds the outcome (stored with the judge by the caller). `rpm` and
    `tpm` bound the requests and tokens per minute across all of them (cai.backends.ratelimit)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        features: EndpointFeatures | None = None,
        rpm: float | None = None,
        tpm: float | None = None,
    ) -> None:
        self.model = model
        self.base_url = base_url
        self.gate = EndpointGate(rpm, tpm)
        """Every request of this backend passes it: rate limits and 429 pauses (cai.backends.ratelimit)."""
        self.features = features or EndpointFeatures()
        self.refusals = 0
        """Requests the endpoint refused for a feature (each asked again without it)."""
        self._probing: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None
        self._client = openai.AsyncOpenAI(
            base_url=base_url, api_key=api_key or "unused", timeout=timeout, max_retries=0
        )

    async def complete(self, request: ChatRequest) -> ChatResult:
        while True:
            if not self._unknown(request):
                try:
                    return await self._ask(request)
                except (BadRequest, ServerFault) as exc:
                    # Once settled, only an error that names a feature reopens the question: a
                    # plain 400 (a prompt too long, say) is about this request alone.
                    if not (names_feature(exc.detail) and self._step_down(request, exc)):
                        raise
                    continue
            async with self._probe_lock():
                if self._unknown(request):
                    return await self._probe(request)

    async def _probe(self, request: ChatRequest) -> ChatResult:
        """Ask, stepping down after each refusal. If every step is refused with a 4xx, the
        refusals were about the request, not the features: those are put back as they were."""
        before = dataclasses.replace(self.features)
        while True:
            try:
                return await self._ask(request)
            except (BadRequest, ServerFault) as exc:
                if is_refusal(exc.status, exc.detail) and self._step_down(request, exc):
                    continue
                if isinstance(exc, BadRequest):
                    self.features = before
                raise

    def wants_logprobs(self, request: ChatRequest) -> bool:
        return bool(request.choice_field and request.choices) and self.features.logprobs is not False

    def _unknown(self, request: ChatRequest) -> bool:
        format_unknown = request.json_schema is not None and not self.features.format_settled
        return format_unknown or (self.wants_logprobs(request) and self.features.logprobs is None)

    def _step_down(self, request: ChatRequest, exc: BadRequest | ServerFault) -> bool:
        """Stop asking for what `exc` refused; False when nothing is left to give up."""
        if not self.features.step_down(exc.detail, self.wants_logprobs(request)):
            return False
        self.refusals += 1
        return True

    def _probe_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._probing is None or self._probing[0] is not loop:  # one backend, several runs
            self._probing = (loop, asyncio.Lock())
        return self._probing[1]

    def request_body(self, request: ChatRequest) -> dict[str, Any]:
        """The chat-completions parameters `request` goes out with, given what the endpoint is
        known to accept."""
        messages = request.messages
        body: dict[str, Any] = {
            "model": self.model,
            "temperature": request.temperature,
            "max_tokens": request.max_tokens,
        }
        response_format = self.features.response_format
        if request.json_schema is not None:
            if response_format == "json_schema":
                body["response_format"] = {"type": "json_schema", "json_schema": request.json_schema}
            else:
                messages = _with_instruction(messages, schema_instruction(request.json_schema))
            if response_format == "json_object_schema":
                body["response_format"] = {"type": "json_object", "schema": request.json_schema["schema"]}
            elif response_format == "json_object":
                body["response_format"] = {"type": "json_object"}
        if self.wants_logprobs(request):
            body |= {"logprobs": True, "top_logprobs": TOP_LOGPROBS}
        return body | {"messages": messages}

    async def _ask(self, request: ChatRequest) -> ChatResult:
        response_format, logprobs = self.features.response_format, self.wants_logprobs(request)
        choices, usage = await create_completion(
            self._client, self.base_url, self.request_body(request), self.gate
        )
        if request.json_schema is not None and self.features.response_format == response_format:
            self.features.format_settled = True
        if logprobs and self.features.logprobs is None:
            # A server may ignore the parameter.
            self.features.logprobs = _token_logprobs(choices[0]) is not None
        return self.chat_result(choices, usage, request, logprobs)

    def chat_result(
        self, choices: list[Choice], usage: Usage | None, request: ChatRequest, logprobs: bool
    ) -> ChatResult:
        """A completion's first choice as a ChatResult: its text, usage, and (when `logprobs`
        were asked for and came) the probabilities of the request's choices. Also for the
        completions a Batch API output file holds (cai.judge_batch)."""
        text = choices[0]["message"]["content"] or ""
        tokens = _token_logprobs(choices[0]) if logprobs else None
        probs = None
        if tokens is not None and request.choice_field:
            probs = choice_probs_from_logprobs(text, tokens, request.choice_field, request.choices)
        return ChatResult(
            text=text,
            prompt_tokens=_tokens(usage, "prompt_tokens"),
            completion_tokens=_tokens(usage, "completion_tokens"),
            choice_probs=probs,
        )

    @property
    def client(self) -> openai.AsyncOpenAI:
        """The SDK client (files and batches go through it too)."""
        return self._client

    async def aclose(self) -> None:
        await self._client.close()


def _with_instruction(messages: list[dict[str, str]], instruction: str) -> list[dict[str, str]]:
    """`messages` with `instruction` appended to the last user turn."""
    last = max(i for i, message in enumerate(messages) if message["role"] == "user")
    return [
        {**message, "content": message["content"] + instruction} if i == last else message
        for i, message in enumerate(messages)
    ]


def _token_logprobs(choice: Choice) -> Iterator[tuple[str, list[tuple[str, float]]]] | None:
    """Each reply token with its top alternatives (itself included), up to the first malformed
    one; None without logprobs. Lazily: a verdict needs the tokens up to its value only."""
    logprobs = choice.get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list) or not content:
        return None
    return ((item["token"], _alternatives(item)) for item in itertools.takewhile(_is_token, content))


def _is_token(item: Any) -> bool:
    return (
        isinstance(item, dict)
        and isinstance(item.get("token"), str)
        and isinstance(item.get("logprob"), int | float)
    )


def _alternatives(item: dict[str, Any]) -> list[tuple[str, float]]:
    top = item.get("top_logprobs")
    alternatives = (
        [(alt["token"], alt["logprob"]) for alt in top if _is_token(alt)] if isinstance(top, list) else []
    )
    if all(token != item["token"] for token, _ in alternatives):
        alternatives.append((item["token"], item["logprob"]))
    return alternatives


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


def _tokens(usage: Usage | None, name: str) -> int | None:
    value = usage.get(name) if usage is not None else None
    return value if isinstance(value, int) else None


def _used_tokens(usage: Usage | None) -> int | None:
    """Prompt plus completion tokens, as the server reported them (None when it did not)."""
    prompt, completion = _tokens(usage, "prompt_tokens"), _tokens(usage, "completion_tokens")
    return None if prompt is None or completion is None else prompt + completion


class OpenAISampler:
    """Sampler over an OpenAI-compatible server. Requests for the same conversation are sent as
    one request with `n` choices (one prefill on the server). A server that refuses `n` or
    returns fewer choices than asked is remembered (`n_supported`), and from then on each sample
    is its own request with its own seed; the first such answer is awaited before the other
    conversations ask, so finding out costs one request. Each request carries a seed, which
    servers such as vLLM honour, and is retried on transient faults (`retry`, default
    SAMPLER_RETRY) with the judge's backoff. `rpm` and `tpm` bound the requests and tokens per
    minute across all of them, from one `sample` call to the next (cai.backends.ratelimit)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 120.0,
        concurrency: int = 16,
        retry: Retry | None = None,
        rpm: float | None = None,
        tpm: float | None = None,
    ) -> None:
        self.model = model
        self.base_url = base_url
        self.gate = EndpointGate(rpm, tpm)
        self.api_key = api_key
        self.timeout = timeout
        self.concurrency = concurrency
        self.retry = retry
        self.n_supported: bool | None = None
        """Whether the endpoint honours `n` > 1; None until a request shows it."""
        self.usage = TokenUsage()
        """Every answered request's usage, summed (what a generation budget is charged)."""

    def sample(self, requests: Sequence[SampleRequest], params: SamplingParams) -> list[Sample]:
        return asyncio.run(self._sample_all(requests, params))

    async def _sample_all(self, requests: Sequence[SampleRequest], params: SamplingParams) -> list[Sample]:
        client = openai.AsyncOpenAI(
            base_url=self.base_url, api_key=self.api_key or "unused", timeout=self.timeout, max_retries=0
        )
        retry = self.retry or SAMPLER_RETRY  # looked up per call, so tests can make it quick
        semaphore = asyncio.Semaphore(self.concurrency)
        probing = asyncio.Lock()
        results: list[Sample | None] = [None] * len(requests)
        errors: list[str] = []

        async def ask(indices: list[int]) -> list[Choice]:
            """One request for the samples at `indices` (n = their count, their first seed)."""
            kwargs: dict[str, Any] = {
                "model": self.model,
                "messages": requests[indices[0]].messages,
                "temperature": params.temperature,
                "top_p": params.top_p,
                "max_tokens": params.max_new_tokens,
                "seed": requests[indices[0]].seed,
            }
            if len(indices) > 1:
                kwargs["n"] = len(indices)
            async with semaphore:
                choices, usage = await retry_transient(
                    lambda: create_completion(client, self.base_url, kwargs, self.gate),
                    retry.max_attempts,
                    retry.delay,
                )
            self.usage.add(_tokens(usage, "prompt_tokens"), _tokens(usage, "completion_tokens"))
            shared = len(indices) > 1 and len(choices) > 1
            for index, choice in zip(indices, choices, strict=False):
                results[index] = Sample(
                    text=(choice["message"]["content"] or "").strip(),
                    prompt_tokens=_tokens(usage, "prompt_tokens"),
                    # Usage covers all choices together; per-choice counts are unknown.
                    completion_tokens=None if shared else _tokens(usage, "completion_tokens"),
                    finish_reason=choice.get("finish_reason"),
                    seed=kwargs["seed"] if shared and index != indices[0] else None,
                )
            return choices

        async def one_each(indices: list[int]) -> None:
            await asyncio.gather(*(draw([index]) for index in indices))

        async def draw(indices: list[int]) -> None:
            if len(indices) > 1 and self.n_supported is None:
                async with probing:  # the first conversation finds out for all
                    if self.n_supported is None:
                        await draw_many(indices)
                        return
            if len(indices) > 1 and not self.n_supported:
                await one_each(indices)
                return
            await draw_many(indices)

        async def draw_many(indices: list[int]) -> None:
            try:
                choices = await ask(indices)
            except BadRequest as exc:
                if len(indices) > 1 and is_refusal(exc.status, exc.detail):
                    self.n_supported = False  # `n` refused: one request per sample
                    await one_each(indices)
                else:
                    errors.append(str(exc))
                return
            except (TransientError, PermanentError) as exc:
                errors.append(str(exc))  # these samples stay missing; the others are kept
                return
            if len(indices) > 1:
                self.n_supported = len(choices) >= len(indices)
            if len(choices) < len(indices):  # `n` ignored: the rest each with its own seed
                await one_each(indices[len(choices) :])

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
