"""The round state machine of `cai loop`. A round's status (stored in `rounds.status`) says which
step to run next: generate -> judge -> export -> train -> eval. Every step is idempotent (it
stores results as it goes and skips what is stored), so resuming at the recorded step after a
crash redoes nothing; a status that could not have been left by a finished step resumes at the
step that sets it."""

from __future__ import annotations

STEPS = ("generate", "judge", "export", "train", "eval")

RESUME_AT: dict[str, str | None] = {
    "created": "generate",
    "generating": "generate",
    "generated": "judge",
    "judging": "judge",
    "judged": "export",
    "exported": "train",
    "training": "train",
    "trained": "eval",
    "evaluating": "eval",
    "done": None,
    # Nothing is lost by starting over: each step skips the work it finds stored.
    "failed": "generate",
}

FINISHED_BY = {
    "generate": "generated",
    "judge": "judged",
    "export": "exported",
    "train": "trained",
    "eval": "done",
}
"""The status a step leaves when it completed; anything else means it stopped early."""


def steps_left(status: str) -> list[str]:
    """The steps still to run for a round in `status`, in order."""
    if status not in RESUME_AT:
        raise ValueError(f"unknown round status {status!r}")
    first = RESUME_AT[status]
    return [] if first is None else list(STEPS[STEPS.index(first) :])
