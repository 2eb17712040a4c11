"""Error types that the CLI maps to exit codes (2 = bad input, 1 = anything else)."""

from __future__ import annotations


class BadInput(Exception):
    """The user gave us something we cannot accept; the message names the file, line or field.

    ``problems`` holds one line per problem so callers can report every error at once
    instead of making the user fix them one run at a time.
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


class NotFound(BadInput):
    """A named thing (constitution, round, prompt...) does not exist in the store."""


class Conflict(BadInput):
    """Valid input that clashes with what is stored (a name already taken, a job already over)."""
