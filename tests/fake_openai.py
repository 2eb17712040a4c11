"""A loopback OpenAI-compatible chat-completions server with deterministic fault injection."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import random
import re
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal

import openai

from cai.token_count import TokenCounter
from tests.fake_batches import FakeBatches


@dataclass(frozen=True)
class Reply:
    """A responder's answer with the probabilities the judge put on each value of its verdict
    field ('A', 'B', 'tie'): the server reports them as the top logprobs of that value's token."""

    content: str
    verdict_probs: dict[str, float]
    field: str = "preferred"


Responder = Callable[[dict[str, Any]], "str | Reply"]


@dataclass
class Usage:
    """Completions served and the tokens their usage reported."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class Arrival:
    """One chat-completions request as the server saw it: when (time.monotonic(), read on the
    server's thread, so comparable with the client's clock in the same process), what, and the
    fault it was answered with (None: served normally)."""

    at: float
    request: dict[str, Any]
    fault: Fault | None


FaultKind = Literal[
    "status",
    "sleep",
    "drop",
    "garbage",
    "truncated",
    "bad_verdict",
    "empty_choices",
    "invalid_body",
    "html",
    "json_body",
    "ok",
]

PROXY_PAGE = (
    "<!DOCTYPE html>\n<html>\n<head><title>502 Bad Gateway</title></head>\n<body>\n"
    "<center><h1>502 Bad Gateway</h1></center>\n<hr><center>nginx/1.25.3</center>\n"
    + "<!-- a padding comment, as proxies add to defeat browsers' friendly error pages -->\n" * 6
    + "</body>\n</html>\n"
)


@dataclass(frozen=True)
class Fault:
    """What the server does to one chat-completions request instead of serving it normally."""

    kind: FaultKind
    code: int = 200
    retry_after: float | str | None = None
    seconds: float = 0.0
    then: Literal["respond", "drop"] = "respond"
    text: str = ""


def status(code: int, retry_after: float | str | None = None, message: str | None = None) -> Fault:
    """An HTTP error with an OpenAI-style error body; `retry_after` sets the Retry-After header."""
    if not 400 <= code <= 599:
        raise ValueError(f"status fault needs a 4xx/5xx code, got {code}")
    return Fault("status", code=code, retry_after=retry_after, text=message or "")


def sleep(seconds: float, then: Literal["respond", "drop"] = "respond") -> Fault:
    """Stall `seconds` (beyond the client's timeout, typically), then respond normally or drop."""
    return Fault("sleep", seconds=seconds, then=then)


def drop() -> Fault:
    """Read the request, then close the connection without sending a byte."""
    return Fault("drop")


def garbage(text: str = "I think A is better!!") -> Fault:
    """200 OK whose message content is `text` (not JSON by default)."""
    return Fault("garbage", text=text)


def truncated() -> Fault:
    """200 OK whose content is the responder's JSON cut in half."""
    return Fault("truncated")


def bad_verdict() -> Fault:
    """200 OK whose content is valid JSON but names a side that does not exist."""
    return Fault("bad_verdict", text=json.dumps({"rationale": "Both are fine.", "preferred": "C"}))


def empty_choices() -> Fault:
    """200 OK completion with `choices: []`."""
    return Fault("empty_choices")


def invalid_body() -> Fault:
    """200 OK, Content-Type application/json, body that is not JSON at all."""
    return Fault("invalid_body", text="<html><body>502 Bad Gateway</body></html>")


def html_page(code: int = 200, text: str = PROXY_PAGE) -> Fault:
    """An HTML page with Content-Type text/html, as a proxy or a login wall answers (200, or an
    error code such as 502)."""
    if not 200 <= code <= 599:
        raise ValueError(f"html_page fault needs an HTTP code, got {code}")
    return Fault("html", code=code, text=text)


def json_body(body: Any, code: int = 200) -> Fault:
    """A JSON body that is not a chat completion (`{"detail": "Not Found"}`, a list...)."""
    return Fault("json_body", code=code, text=json.dumps(body))


def ok() -> Fault:
    """Served normally: a placeholder that lets a queue mix faults with good answers."""
    return Fault("ok")


# ---------------------------------------------------------------------------------------------
# Responders: (request JSON) -> assistant content.


def prompt_text(request: dict[str, Any]) -> str:
    """The last user message's text (the rendered judge prompt), joining content parts if any."""
    for message in reversed(request.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            return _text(message.get("content"))
    return ""


def fenced(prompt: str, label: str) -> str | None:
    """The text inside `<<<label TOKEN>>> ... <<<END label TOKEN>>>`, or None if absent."""
    # The backreference makes a forged closing fence (with another token) part of the text,
    # exactly as the judge's prompt intends.
    pattern = rf"<<<{re.escape(label)} ([0-9a-f]+)>>>\n?(.*?)\n?<<<END {re.escape(label)} \1>>>"
    match = re.search(pattern, prompt, re.DOTALL)
    return match.group(2) if match else None


def default_responder(request: dict[str, Any]) -> str:
    """A valid pairwise verdict that always prefers A."""
    return json.dumps({"rationale": "The fake judge prefers response A.", "preferred": "A"})


def with_draws(respond: Callable[[dict[str, Any], Iterator[int]], str]) -> Responder:
    """`respond` with a draw counter of its own (a new one each call): answers that vary by draw
    then depend on the test's own requests only, not on the tests that ran before it."""
    draws = itertools.count()
    return lambda request: respond(request, draws)


def prefer_marker(marker: str) -> Responder:
    """Pairwise verdicts preferring the fenced response containing `marker`; tie if both or neither."""

    def respond(request: dict[str, Any]) -> str:
        prompt = prompt_text(request)
        a, b = fenced(prompt, "RESPONSE A"), fenced(prompt, "RESPONSE B")
        if a is None or b is None:
            raise ValueError("prefer_marker: no RESPONSE A/B fences in the last user message")
        in_a, in_b = marker in a, marker in b
        preferred = "A" if in_a and not in_b else "B" if in_b and not in_a else "tie"
        rationale = (
            f"Only response {preferred} contains {marker!r}." if preferred != "tie" else "No difference."
        )
        return json.dumps({"rationale": rationale, "preferred": preferred})

    return respond


def knows_better(better: set[str], accuracy: float, spread: float = 1.5) -> Responder:
    """A judge that knows which responses are the better ones (`better`) and is right about a pair
    with probability `accuracy`, and calibrated: per request it draws a belief b that the better
    response wins, logit(b) ~ Normal(mu, spread) with mu set so that P(b > 0.5) = accuracy, prefers
    the side it believes in, and reports b as that verdict's logprobs. The draw is seeded by the
    prompt, so a rerun gets the same answers; each order and principle is a prompt of its own."""
    mu = spread * statistics.NormalDist().inv_cdf(accuracy)

    def respond(request: dict[str, Any]) -> Reply:
        prompt = prompt_text(request)
        a, b = fenced(prompt, "RESPONSE A"), fenced(prompt, "RESPONSE B")
        if a is None or b is None:
            raise ValueError("knows_better: no RESPONSE A/B fences in the last user message")
        if (a in better) == (b in better):
            raise ValueError("knows_better: exactly one of the two responses must be a better one")
        rng = random.Random(hashlib.sha256(prompt.encode()).digest())
        belief = 1 / (1 + math.exp(-rng.gauss(mu, spread)))
        better_side, worse_side = ("A", "B") if a in better else ("B", "A")
        preferred = better_side if belief > 0.5 else worse_side
        rationale = f"I believe {better_side} is better with probability {belief:.2f}."
        content = json.dumps({"rationale": rationale, "preferred": preferred})
        return Reply(content, {better_side: belief, worse_side: 1 - belief})

    return respond


def score_by_length(words_per_point: int = 5) -> Responder:
    """Score verdicts: scale minimum plus one point per `words_per_point` words, clamped to the scale
    the prompt states (`<integer from LO to HI>`; 1..10 if it states none)."""

    def respond(request: dict[str, Any]) -> str:
        prompt = prompt_text(request)
        response = fenced(prompt, "RESPONSE")
        if response is None:
            raise ValueError("score_by_length: no RESPONSE fence in the last user message")
        scale = re.search(r"integer from (-?\d+) to (-?\d+)", prompt)
        lo, hi = (int(scale.group(1)), int(scale.group(2))) if scale else (1, 10)
        words = len(response.split())
        score = max(lo, min(hi, lo + words // words_per_point))
        return json.dumps({"rationale": f"The response has {words} words.", "score": score})

    return respond


def revise_responder(request: dict[str, Any]) -> str:
    """A critique and a revision; the revision is the fenced original prefixed with `[revised] `."""
    original = fenced(prompt_text(request), "RESPONSE")
    revision = f"[revised] {original}" if original is not None else "[revised]"
    return json.dumps(
        {"critique": "The response could follow the principle more closely.", "revision": revision}
    )


# ---------------------------------------------------------------------------------------------
# The server.


def _content(reply: str | Reply) -> str:
    return reply.content if isinstance(reply, Reply) else reply


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _words(text: str) -> int:
    return len(text.split())


_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
}


def _error_body(code: int, message: str) -> dict[str, Any]:
    kind, err_code = _ERROR_TYPES.get(
        code, ("server_error" if code >= 500 else "invalid_request_error", None)
    )
    return {"error": {"message": message, "type": kind, "param": None, "code": err_code}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's connection pool expects
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall
    server_version = "FakeOpenAI/1"
    server: _Server
    _admitted = False  # this request is counted in flight and not yet answered

    def setup(self) -> None:
        super().setup()
        self.server.fake._opened(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fake._closed(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean

    def do_GET(self) -> None:
        fake = self.server.fake
        path = self.path.split("?")[0].rstrip("/")
        if path.startswith(("/v1/batches", "/v1/files")):
            self._batch_api_reply(*fake.batch_api.get(path))
        elif path == "/v1/models":
            model = {"id": fake.model, "object": "model", "created": 0, "owned_by": "cai-tests"}
            self._json(200, {"object": "list", "data": [model]})
        else:
            self._json(404, _error_body(404, f"unknown path {self.path}"))

    def do_POST(self) -> None:
        fake = self.server.fake
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = self.path.split("?")[0].rstrip("/")
        if path.startswith(("/v1/batches", "/v1/files")):
            content_type = self.headers.get("Content-Type") or ""
            self._batch_api_reply(*fake.batch_api.post(path, content_type, raw))
            return
        if path != "/v1/chat/completions":
            self._json(404, _error_body(404, f"unknown path {self.path}"))
            return
        try:
            request = json.loads(raw)
            if not isinstance(request, dict):
                raise ValueError("body is not a JSON object")
        except ValueError as exc:
            self._json(400, _error_body(400, f"could not parse the JSON body: {exc}"))
            return
        fault = fake._admit(request)
        self._admitted = True
        try:
            refusal = fake._refusal(request)
            if refusal is not None:
                self._json(refusal[0], _error_body(refusal[0], refusal[1]))
            else:
                self._serve(fake, request, fault)
        finally:
            self._done()

    def _done(self) -> None:
        if self._admitted:
            self._admitted = False
            self.server.fake._leave()

    def _serve(self, fake: FakeOpenAI, request: dict[str, Any], fault: Fault | None) -> None:
        kind = fault.kind if fault else None
        if fault and kind == "status":
            headers = {} if fault.retry_after is None else {"Retry-After": _header_value(fault.retry_after)}
            message = fault.text or f"injected fault: HTTP {fault.code}"
            self._json(fault.code, _error_body(fault.code, message), headers)
            return
        if kind == "drop":
            self.close_connection = True  # socketserver then shuts the socket down: EOF, no response
            return
        # An Event rather than time.sleep, so close() need not wait a stall out; a stall that
        # close() cuts short ends as a drop rather than a late success.
        closing = fake._closing.wait(fault.seconds if fault and kind == "sleep" else fake.latency)
        if closing or (fault and kind == "sleep" and fault.then == "drop"):
            self.close_connection = True
            return
        if fault and kind == "invalid_body":
            self._send(200, fault.text.encode(), {"Content-Type": "application/json"})
            return
        if fault and kind == "html":
            self._send(fault.code, fault.text.encode(), {"Content-Type": "text/html; charset=utf-8"})
            return
        if fault and kind == "json_body":
            self._send(fault.code, fault.text.encode(), {"Content-Type": "application/json"})
            return
        n = max(1, int(request.get("n") or 1)) if fake.n == "yes" else 1
        try:
            if fault and kind in ("garbage", "bad_verdict"):
                contents = [fault.text] * n
            elif kind == "empty_choices":
                contents = []
            else:
                contents = [fake.responder(request) for _ in range(n)]
                if kind == "truncated":
                    contents = [_content(c)[: len(_content(c)) // 2] for c in contents]
        except Exception as exc:  # a broken responder is a test bug: surface it, loudly, both ways
            fake._record_error(exc)
            self._json(500, _error_body(500, f"responder raised {type(exc).__name__}: {exc}"))
            return
        self._json(200, fake._completion(request, contents))

    def _batch_api_reply(self, code: int, body: Any) -> None:
        if isinstance(body, bytes):  # a file's content
            self._send(code, body, {"Content-Type": "application/octet-stream"})
        else:
            self._json(code, body)

    def _json(self, code: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self._send(code, json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _send(self, code: int, payload: bytes, headers: dict[str, str]) -> None:
        self.send_response(code)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        # Leave before the last byte goes out: once a client has its response, the stats must
        # already count the request as finished.
        self._done()
        self.wfile.write(payload)


def _header_value(value: float | str) -> str:
    return value if isinstance(value, str) else f"{value:g}"


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # the listen backlog: bursts of 64+ simultaneous connects must not be refused
    daemon_threads = True
    block_on_close = False  # FakeOpenAI.close() shuts connections down and joins with a bound instead

    def __init__(self, fake: FakeOpenAI) -> None:
        self.fake = fake
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out or was closed mid-response is an expected outcome of the faults.
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            super().handle_error(request, client_address)


class FakeOpenAI:
    """An OpenAI-compatible server on 127.0.0.1 (a free port), one thread per connection.

    `inject(*faults)` queues faults; each chat-completions request, in arrival order, takes the
    next one (or none). `fault_for(request)`, when set, picks the fault of a request the queue has
    none for (a fault per prompt, whatever the arrival order). `latency` is added to every 200
    response and can be changed while running.

    What the server supports, as real servers differ: `response_formats` it accepts (another
    type is refused the way llama.cpp's server does, HTTP `format_refusal` naming
    response_format); `logprobs` "yes" (each token at p=0.8 with one alternative at p=0.15),
    "ignore" or "refuse" (HTTP 400); `n` "yes", "ignore" (one choice whatever is asked) or
    "refuse" (HTTP 400 when n > 1). Usage is counted in words, or by `tokenizer` (a
    cai.token_count counter: the chat as the model reads it, and each reply's text); `usage`
    sums what was reported.
    """

    def __init__(
        self,
        responder: Responder = default_responder,
        *,
        latency: float = 0.0,
        model: str = "fake-judge",
        fault_for: Callable[[dict[str, Any]], Fault | None] | None = None,
        response_formats: tuple[str, ...] = ("json_schema", "json_object", "text"),
        format_refusal: int = 500,
        logprobs: Literal["yes", "ignore", "refuse"] = "yes",
        n: Literal["yes", "ignore", "refuse"] = "yes",
        tokenizer: TokenCounter | None = None,
    ) -> None:
        self.responder = responder
        self.tokenizer = tokenizer
        self.latency = latency
        self.model = model
        self.fault_for = fault_for
        self.response_formats = response_formats
        self.format_refusal = format_refusal
        self.logprobs = logprobs
        self.n = n
        self._usage = Usage()
        self._lock = threading.Lock()
        self._faults: collections.deque[Fault] = collections.deque()
        self._requests: list[dict[str, Any]] = []
        self._arrivals: list[Arrival] = []
        self._errors: list[Exception] = []
        self._in_flight = 0
        self._max_in_flight = 0
        self._ids = 0
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._closing = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.batch_api = FakeBatches(self)
        """The Files and Batch API (tests/fake_batches.py)."""

    # -- lifecycle

    def start(self) -> FakeOpenAI:
        if self._server is not None:
            raise RuntimeError("FakeOpenAI is already started")
        self._closing.clear()
        self._server = _Server(self)
        self._thread = threading.Thread(
            # A short poll keeps close() (which waits for the loop to notice) at ~10 ms.
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.01},
            name="fake-openai",
            daemon=True,
        )
        self._thread.start()
        return self

    def close(self, timeout: float = 2.0) -> None:
        """Stop accepting, end stalls, shut every open connection down and join their threads."""
        server, self._server = self._server, None
        if server is None:
            return
        self._closing.set()
        server.shutdown()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            connections = dict(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # wakes a keep-alive thread blocked reading
        deadline = time.monotonic() + timeout
        for thread in connections.values():
            thread.join(max(0.0, deadline - time.monotonic()))
        server.server_close()

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FakeOpenAI is not running")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self, **kwargs: Any) -> openai.OpenAI:
        """A real SDK client for this server; defaults: no retries, no CA bundle loaded."""
        kwargs.setdefault("api_key", "test")
        kwargs.setdefault("max_retries", 0)
        if "http_client" not in kwargs:
            # verify=False only skips loading certifi (~50 ms a client); the URL is plain http.
            kwargs["http_client"] = openai.DefaultHttpxClient(verify=False)
        return openai.OpenAI(base_url=self.base_url, **kwargs)

    def async_client(self, **kwargs: Any) -> openai.AsyncOpenAI:
        """The AsyncOpenAI counterpart of `client()`."""
        kwargs.setdefault("api_key", "test")
        kwargs.setdefault("max_retries", 0)
        if "http_client" not in kwargs:
            kwargs["http_client"] = openai.DefaultAsyncHttpxClient(verify=False)
        return openai.AsyncOpenAI(base_url=self.base_url, **kwargs)

    # -- faults and instrumentation

    def inject(self, *faults: Fault) -> None:
        """Queue faults; the next chat-completions requests take one each, in arrival order."""
        with self._lock:
            self._faults.extend(faults)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    @property
    def pending_faults(self) -> int:
        with self._lock:
            return len(self._faults)

    @property
    def requests(self) -> list[dict[str, Any]]:
        """The chat-completions request bodies received so far, faulted ones included (a copy)."""
        with self._lock:
            return list(self._requests)

    @property
    def arrivals(self) -> list[Arrival]:
        """When each chat-completions request arrived, with its body and the fault it got, in the
        order they were admitted (a copy)."""
        with self._lock:
            return list(self._arrivals)

    @property
    def usage(self) -> Usage:
        """The usage reported in every completion served so far, summed (a copy)."""
        with self._lock:
            return dataclasses.replace(self._usage)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._requests)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    @property
    def max_in_flight(self) -> int:
        """Peak number of chat-completions requests in progress at once."""
        with self._lock:
            return self._max_in_flight

    @property
    def errors(self) -> list[Exception]:
        """Exceptions the responder raised (each was answered with a 500)."""
        with self._lock:
            return list(self._errors)

    def reset_stats(self) -> None:
        """Forget requests, usage, errors and the peak (queued faults stay)."""
        with self._lock:
            self._requests.clear()
            self._arrivals.clear()
            self._usage = Usage()
            self._errors.clear()
            self._max_in_flight = self._in_flight

    # -- called from handler threads

    def _opened(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections[conn] = threading.current_thread()

    def _closed(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.pop(conn, None)

    def _admit(self, request: dict[str, Any]) -> Fault | None:
        at = time.monotonic()
        with self._lock:
            self._requests.append(request)
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            queued = self._faults.popleft() if self._faults else None
            fault_for = self.fault_for
        if queued is None and fault_for is not None:
            queued = fault_for(request)  # outside the lock: it may be slow
        with self._lock:
            self._arrivals.append(Arrival(at, request, queued))
        return queued

    def _answer(self, request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """(status, body) for one chat-completions request of a batch's input file, as the
        endpoint would answer it: its refusals, the next queued status or garbage fault, else
        the responder."""
        fault = self._admit(request)
        try:
            refusal = self._refusal(request)
            if refusal is not None:
                return refusal[0], _error_body(*refusal)
            if fault is not None and fault.kind == "status":
                return fault.code, _error_body(fault.code, fault.text or f"injected fault: HTTP {fault.code}")
            if fault is not None and fault.kind in ("garbage", "bad_verdict"):
                return 200, self._completion(request, [fault.text])
            return 200, self._completion(request, [self.responder(request)])
        finally:
            self._leave()

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _record_error(self, exc: Exception) -> None:
        with self._lock:
            self._errors.append(exc)

    def _refusal(self, request: dict[str, Any]) -> tuple[int, str] | None:
        """(status, message) when this server does not support something the request asks."""
        response_format = request.get("response_format")
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind is not None and kind not in self.response_formats:
            accepted = " or ".join(repr(k) for k in self.response_formats)
            return (
                self.format_refusal,
                f"1 validation error: response_format.type: Input should be {accepted}",
            )
        if request.get("logprobs") and self.logprobs == "refuse":
            return 400, "logprobs are not supported by this server"
        if int(request.get("n") or 1) > 1 and self.n == "refuse":
            return 400, "n > 1 is not supported: only one choice per request"
        return None

    def _logprobs(self, request: dict[str, Any], reply: str | Reply) -> dict[str, Any] | None:
        if not request.get("logprobs") or self.logprobs != "yes":
            return None
        content = _content(reply)
        tokens = re.findall(r"\w+|\s+|[^\w\s]", content)
        # With a Reply, the token where its verdict's value starts carries the verdict's probabilities.
        value_at = -1
        if isinstance(reply, Reply):
            found = re.search(rf'"{re.escape(reply.field)}"\s*:\s*"', content)
            value_at = found.end() if found else -1

        def alternative(token: str) -> str:
            return {"A": "B", "B": "A"}.get(token, token + "_")

        def entry(token: str, offset: int) -> dict[str, Any]:
            if offset == value_at and isinstance(reply, Reply):
                ranked = sorted(reply.verdict_probs.items(), key=lambda kv: -kv[1])
                top = [{"token": t, "logprob": math.log(max(p, 1e-12)), "bytes": None} for t, p in ranked]
                chosen = math.log(max(reply.verdict_probs.get(token, 0.0), 1e-12))
            else:
                top = [
                    {"token": token, "logprob": math.log(0.8), "bytes": None},
                    {"token": alternative(token), "logprob": math.log(0.15), "bytes": None},
                ]
                chosen = math.log(0.8)
            return {
                "token": token,
                "logprob": chosen,
                "bytes": None,
                "top_logprobs": top[: int(request.get("top_logprobs") or 0)],
            }

        offsets = [0]
        for token in tokens:
            offsets.append(offsets[-1] + len(token))
        return {"content": [entry(token, offset) for token, offset in zip(tokens, offsets, strict=False)]}

    def _completion(self, request: dict[str, Any], contents: list[str | Reply]) -> dict[str, Any]:
        with self._lock:
            self._ids += 1
            ident = self._ids
        messages = [m for m in request.get("messages") or [] if isinstance(m, dict)]
        if self.tokenizer is not None:
            chat = [{"role": str(m.get("role")), "content": _text(m.get("content"))} for m in messages]
            prompt_tokens = self.tokenizer.chat(chat)
            completion_tokens = sum(self.tokenizer.text(_content(c)) for c in contents)
        else:
            prompt_tokens = sum(_words(_text(m.get("content"))) for m in messages)
            completion_tokens = sum(_words(_content(c)) for c in contents)
        with self._lock:
            self._usage.requests += 1
            self._usage.prompt_tokens += prompt_tokens
            self._usage.completion_tokens += completion_tokens
        return {
            "id": f"chatcmpl-fake-{ident}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model") or self.model,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": _content(content), "refusal": None},
                    "logprobs": self._logprobs(request, content),
                    "finish_reason": "stop",
                }
                for i, content in enumerate(contents)
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "system_fingerprint": "fp_fake",
        }
