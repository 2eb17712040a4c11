"""llama.cpp's OpenAI-compatible server (the `llama-cpp-python[server]` package) run as a child
process on a GGUF file, by default the embedded SmolLM2: a real, stricter peer for cai's OpenAI
backend (JSON-object output but no JSON schema, logprobs, `n` ignored), used by `cai demo
--judge-server llama.cpp` and by the test suite's peer tests."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from cai.errors import BadInput
from cai.net import free_port

INSTALL = "pip install 'llama-cpp-python[server]'  (builds llama.cpp from source: minutes)"
STARTUP_TIMEOUT_S = 120.0


def unavailable_reason() -> str | None:
    """Why the server cannot be started here, or None when it can."""
    if importlib.util.find_spec("llama_cpp") is None:
        return f"llama-cpp-python is not installed ({INSTALL})"
    for module in ("uvicorn", "sse_starlette", "starlette_context", "pydantic_settings"):
        if importlib.util.find_spec(module) is None:
            return f"llama-cpp-python's server extra is missing {module} ({INSTALL})"
    return None


@contextlib.contextmanager
def llama_cpp_server(
    gguf: Path,
    *,
    model_alias: str = "judge",
    n_ctx: int = 4096,
    threads: int | None = None,
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
) -> Iterator[str]:
    """Start the server on `gguf` on a free loopback port and yield its base URL (ending in
    /v1); stop it on the way out. BadInput when it is not installed or does not come up (its
    log's tail is in the message)."""
    if (reason := unavailable_reason()) is not None:
        raise BadInput(reason)
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--model_alias",
        model_alias,
        "--chat_format",
        "chatml",  # SmolLM2's template; the server's own detection of it is unreliable
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
        "--n_threads",
        str(threads or os.cpu_count() or 1),
        "--logits_all",
        "true",  # logprobs need the logits of every position
    ]
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            base_url = f"http://127.0.0.1:{port}/v1"
            _wait_until_up(base_url, process, log, startup_timeout_s)
            yield base_url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_until_up(base_url: str, process: subprocess.Popen[str], log: IO[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BadInput(f"llama.cpp's server exited with code {process.returncode}: {_tail(log)}")
        try:
            with urllib.request.urlopen(f"{base_url}/models", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise BadInput(f"llama.cpp's server did not answer within {timeout_s:.0f} s: {_tail(log)}")


def _tail(log: IO[str], chars: int = 1500) -> str:
    log.seek(0)
    return " ".join(log.read()[-chars:].split())
