"""Rule principles, checked in code without a model, and how their verdicts combine with a
judge's: a response that breaks more rules than the other loses, whatever the judge said."""

from __future__ import annotations

from dataclasses import dataclass

from cai.constitution import Constitution
from cai.judge import PairLabel


@dataclass(frozen=True)
class RuleCheck:
    principle_id: str
    a_passes: bool
    b_passes: bool

    @property
    def verdict(self) -> str:
        if self.a_passes == self.b_passes:
            return "tie"
        return "A" if self.a_passes else "B"

    @property
    def rationale(self) -> str:
        def state(passes: bool) -> str:
            return "passes" if passes else "fails"

        return f"rule {self.principle_id}: A {state(self.a_passes)}, B {state(self.b_passes)}"


def check_rules(constitution: Constitution, response_a: str, response_b: str) -> list[RuleCheck]:
    return [
        RuleCheck(p.id, p.rule.passes(response_a), p.rule.passes(response_b))
        for p in constitution.principles
        if p.kind == "rule" and p.rule is not None
    ]


def rule_winner(checks: list[RuleCheck]) -> str | None:
    """'A' or 'B' when one response breaks fewer rules; None when the rules do not separate them."""
    a_failures = sum(not c.a_passes for c in checks)
    b_failures = sum(not c.b_passes for c in checks)
    if a_failures == b_failures:
        return None
    return "A" if a_failures < b_failures else "B"


def combine(checks: list[RuleCheck], judged: PairLabel | None) -> PairLabel | None:
    """Rules decide when they separate the pair (certainty 1.0); otherwise the judge's label."""
    winner = rule_winner(checks)
    if winner is not None:
        return PairLabel(winner, 1.0, judged.inconsistent if judged else False)
    return judged
