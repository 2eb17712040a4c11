"""How a stage reports progress and learns that it should stop: one small interface that the CLI
draws as progress bars and a job writes to its row (and its cancel flag feeds)."""

from __future__ import annotations

from typing import Protocol


class Stopped(Exception):
    """The stage stopped at a batch boundary because it was asked to (a cancelled job, a worker
    shutting down). What it finished is stored; rerunning resumes."""


class Progress(Protocol):
    def task(self, label: str, total: int | None = None) -> None:
        """A new phase of work (a new bar); `total` may be learned later through `update`."""

    def update(self, done: int, total: int | None = None, info: str = "") -> None:
        """How far the current phase is; `info` is a short extra ('3 failed', 'loss 0.61')."""

    def note(self, message: str) -> None:
        """A line for whoever watches: a warning, a step finished."""

    def stop_requested(self) -> bool:
        """True once the stage should stop at its next batch boundary."""


class Silent:
    """Progress that goes nowhere and never asks to stop (tests, library use)."""

    def task(self, label: str, total: int | None = None) -> None:
        pass

    def update(self, done: int, total: int | None = None, info: str = "") -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def stop_requested(self) -> bool:
        return False


def check(progress: Progress, where: str = "") -> None:
    """Raise Stopped when asked to stop: call it at batch boundaries."""
    if progress.stop_requested():
        raise Stopped(f"stopped on request{f' {where}' if where else ''}")
