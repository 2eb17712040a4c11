"""Who is asking: roles, and the actor a request or a command acts as.

Four roles, each allowed everything the ones before it are: a viewer reads; an annotator also
overrides and reviews labels; an operator also registers constitutions, imports prompts, and
submits and cancels jobs; an admin also manages tokens."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from cai.errors import BadInput

BOOTSTRAP_ACTOR = "bootstrap-admin"
"""The actor CAI_WEB_TOKEN stands for: an admin that no `cai token` manages."""


class Role(enum.IntEnum):
    VIEWER = 0
    ANNOTATOR = 1
    OPERATOR = 2
    ADMIN = 3

    @classmethod
    def parse(cls, value: str, where: str = "role") -> Role:
        """The role named `value` (any case); BadInput naming `where` otherwise."""
        try:
            return cls[value.strip().upper()]
        except KeyError:
            names = ", ".join(role.label for role in cls)
            raise BadInput(f"{where}: unknown role {value!r}; choose one of {names}") from None

    @property
    def label(self) -> str:
        return self.name.lower()

    def allows(self, needed: Role) -> bool:
        return self >= needed


@dataclass(frozen=True)
class Actor:
    """The token holder a request acts as; `name` is what writes record as their author."""

    name: str
    role: Role
