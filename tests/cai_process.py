"""`cai web` / `cai serve` in a child process, as a user starts them: for the tests that need a
real server (a browser, HTTP clients, a worker in the server's process)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def running_cai(
    db_url: str, command: str, log_path: Path, env: dict[str, str] | None = None, *args: str
) -> Iterator[str]:
    """`cai --db URL COMMAND --port P ARGS` until the block ends (SIGTERM, then SIGKILL after 10 s);
    yields its base URL once it listens. Its output goes to `log_path`, quoted if it fails to start."""
    port = free_port()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "cai", "--db", db_url, command, "--port", str(port), *args],
            env={**os.environ, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                if process.poll() is not None:
                    raise AssertionError(f"cai {command} exited: {log_path.read_text()}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"cai {command} did not start listening within 60 s") from None
                    time.sleep(0.2)
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
