"""Starting a round: a registered constitution, a policy and the train prompts to sample from."""

from __future__ import annotations

from dataclasses import dataclass

from cai.errors import BadInput
from cai.store.repo import RoundRecord
from cai.workspace import Workspace


@dataclass(frozen=True)
class StartedRound:
    round: RoundRecord
    prompts: int
    """Train prompts the round will sample from."""


def start_round(
    ws: Workspace,
    constitution: str,
    policy: str,
    tag: str | None = None,
    seed: int = 0,
    actor: str | None = None,
    kind: str = "rl",
) -> StartedRound:
    """Create a round over the train prompts (those tagged `tag`, if given) for `constitution`
    (NAME or NAME@VERSION) and `policy` (the embedded model, a directory or a hub id). Nothing is
    stored when the constitution is unknown or there is no prompt to sample. `actor`: who asked
    (the action log). `kind`: 'rl' (the preference stages) or 'sl' (revision chains, then SFT)."""
    from cai.constitution import parse_ref
    from cai.registry import resolve_model
    from cai.store import repo

    name, version = parse_ref(constitution)
    model = resolve_model(policy)
    with ws.session() as session:
        stored = repo.get_constitution(session, name, version)
        prompts = repo.count_prompts(session, "train", tag)
        if prompts == 0:
            which = f"train prompts tagged {tag!r}" if tag else "train prompts"
            raise BadInput(f"no {which} in the store; import some first: cai prompts import FILE")
        policy_record = repo.ensure_policy(session, model.name, model.location)
        config = {"split": "train", "tag": tag, "seed": seed, "policy_kind": model.kind}
        if kind not in ("rl", "sl"):
            raise BadInput(f"kind: {kind!r} is not one of rl, sl")
        created = repo.create_round(session, stored.record, policy_record, config, kind=kind)
        if actor is not None:
            from cai.store.actions import record

            record(session, actor, "round.create", f"round {created.id}", constitution=stored.record.ref)
        return StartedRound(created, prompts)
