"""What a judge or generate run would send and cost, worked out before it runs and without
spending anything: the work is planned and claimed by the stages' own code in a transaction that
is rolled back (nothing is kept), the requests are rendered by the code that sends them, and no
request goes out. Input tokens are counted on those requests (cai.token_count); output tokens
are the reply limit, or the mean of the replies stored so far when there is history."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from cai.backends.base import ChatRequest, Messages
from cai.generate import plan_sampling
from cai.judge_round import PAIR_PHASES, first_phase, plan_phase
from cai.judging import render_request
from cai.pricing import Prices
from cai.stages.judge import judged_kind, round_options
from cai.stages.settings import GenerateSettings, JudgeSettings
from cai.store import judges, queue, repo, samples
from cai.store.db import rolled_back, session_scope
from cai.store.usage import History, judge_history, policy_history, policy_texts
from cai.token_count import TokenCounter, counter_for
from cai.workspace import Workspace

ESTIMATE_WORKER = "estimate"
"""Who the estimate's claims are made as (they are rolled back with everything else)."""
LEASE_S = 60.0


@dataclass(frozen=True)
class Estimate:
    stage: str
    model: str
    requests: int
    input_tokens: int
    output_tokens: int
    """Expected: replies x the expected reply length."""
    output_per_reply: float
    output_source: str
    """Where the reply length comes from: the limit, or the history (whose, over how many)."""
    tokenizer: str
    exact_tokens: bool
    """Input tokens counted with the model's own tokenizer and chat template."""
    prices: Prices | None
    cost_usd: float | None
    """None when no price is known (the tokens are still counted)."""
    budget_usd: float | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def expected_output(limit: int, history: History | None, what: str) -> tuple[float, str]:
    """Tokens a reply is expected to take: the history's mean (capped at the limit) when there
    is history, else the limit itself (an upper bound)."""
    if history is None:
        return float(limit), f"{what} {limit}, the most a reply may take: no history yet"
    mean = min(float(limit), history.mean_completion_tokens)
    return mean, (
        f"history: mean {history.mean_completion_tokens:.1f} completion tokens over {history.requests} "
        f"earlier requests of {history.whose} ({what} {limit})"
    )


def _estimate(
    stage: str,
    model: str,
    prompts: Iterable[Messages],
    counter: TokenCounter,
    output: tuple[float, str],
    prices: Prices | None,
    budget: float | None,
    notes: list[str],
    replies: int | None = None,
) -> Estimate:
    """`replies`: how many replies the requests get (several samples per request), if not one each."""
    counts = [counter.chat(messages) for messages in prompts]
    per_reply, source = output
    output_tokens = round(per_reply * (len(counts) if replies is None else replies))
    input_tokens = sum(counts)
    cost = prices.cost(input_tokens, output_tokens) if prices else None
    if cost is not None and budget is not None and cost > budget:
        notes.append(f"the budget (${budget:g}) stops the run at about {budget / cost:.0%} of this")
    return Estimate(
        stage,
        model,
        len(counts),
        input_tokens,
        output_tokens,
        per_reply,
        source,
        counter.label,
        counter.exact,
        prices,
        cost,
        budget,
        notes,
    )


def estimate_judge(ws: Workspace, round_id: int, settings: JudgeSettings) -> Estimate:
    """The requests `cai judge` would send now with `settings`, counted and priced. Revise mode
    covers its first phase only: the revisions it then judges do not exist yet."""
    with ws.session() as session:
        kind = judged_kind(session, round_id, settings)
        options = round_options(session, round_id, settings.options())
    spec = ws.judge_spec(settings)
    templates = ws.templates
    phase = first_phase(settings.mode, kind)
    mode = "pairwise" if phase in PAIR_PHASES else phase
    config = spec.config(mode, templates)
    with rolled_back(ws.engine) as connection:
        plan = plan_phase(connection, round_id, options, config, phase)
        with session_scope(connection) as session:
            items = queue.claim(session, round_id, plan.judge_id, ESTIMATE_WORKER, plan.pending, LEASE_S)
            history = judge_history(session, plan.judge_id)
            features = (
                judges.endpoint_features(session, plan.judge_id, spec.base_url) if spec.base_url else None
            )
    requests = [render_request(item, plan.constitution, templates, options, mode)[1] for item in items]
    limit = 2 * options.max_tokens if mode == "revise" else options.max_tokens
    notes = ["assumes every request is answered at the first try (retries and refusals cost more)"]
    if len(items) < plan.pending:
        notes.append(
            f"{plan.pending - len(items)} pending judgments are held by running workers: not counted"
        )
    if mode == "revise":
        notes.append(
            "revise mode: the revisions are then judged against their originals, in both orders; "
            "those requests are not counted (the revisions do not exist yet)"
        )
    prices = settings.prices()
    if prices is None and spec.base_url is None:
        notes.append("the judge runs in-process: no per-token price (give --price-in/--price-out to cost it)")
    return _estimate(
        f"judge ({settings.mode})",
        spec.model,
        sent_messages(requests, spec.model, spec.base_url, features),
        counter_for(spec.model),
        expected_output(limit, history, "--max-tokens" if mode != "revise" else "2 x --max-tokens"),
        prices,
        settings.budget,
        notes,
    )


def sent_messages(
    requests: list[ChatRequest], model: str, base_url: str | None, features: dict[str, Any] | None
) -> list[Messages]:
    """The messages each request goes out with: a server that was found to refuse structured
    output gets the schema written into the prompt, as the judge backend does."""
    if base_url is None:
        return [request.messages for request in requests]
    from cai.backends.negotiation import EndpointFeatures
    from cai.backends.openai_compat import OpenAIChat

    backend = OpenAIChat(base_url, model, features=EndpointFeatures.from_json(features) if features else None)
    try:
        return [backend.request_body(request)["messages"] for request in requests]
    finally:
        asyncio.run(backend.aclose())


def estimate_generate(ws: Workspace, round_id: int, settings: GenerateSettings) -> Estimate:
    """The samples `cai generate` would draw now with `settings`, as requests to the server (or
    sequences for an in-process model), counted and priced."""
    with ws.session() as session:
        round_ = repo.get_round(session, round_id)
        policy = repo.get_policy(session, round_.policy)
        prompts = samples.round_prompts(session, round_id, settings.limit)
    seed = int(round_.config.get("seed", 0))
    with rolled_back(ws.engine) as connection, session_scope(connection) as session:
        todo = plan_sampling(session, round_id, round_.policy_id, prompts, settings.samples, seed)
        items = samples.claim_samples(
            session, round_id, round_.policy_id, "sample", ESTIMATE_WORKER, len(todo), LEASE_S
        )
        pending = samples.pending_samples(session, round_id, round_.policy_id)
        history = policy_history(session, round_.policy_id)
        texts = policy_texts(session, round_.policy_id) if history is None else []
    served = settings.backend == "openai"
    if served:
        counter = counter_for(policy.name, policy.model_ref)
    else:
        from cai.backends import policy_location

        counter = counter_for(policy.name, policy_location(policy.name, policy.model_ref, ws.cache_dir))
    notes = []
    conversations = [item.messages for item in items]
    if served:
        conversations = server_requests(conversations, settings.batch_size)
        notes.append(
            "assumes the server honours `n` (one request per conversation and batch); one that does "
            "not gets a request per sample, each paying for its prompt"
        )
    else:
        notes.append(f"--backend {settings.backend} runs in-process: requests are samples, not server calls")
    if len(items) < pending:
        notes.append(f"{pending - len(items)} pending samples are held by running workers: not counted")
    if history is None and texts:
        history = History(
            sum(map(counter.text, texts)) / len(texts), len(texts), "this policy (texts counted)"
        )
    return _estimate(
        f"generate ({settings.backend})",
        policy.name,
        conversations,
        counter,
        expected_output(settings.max_new_tokens, history, "--max-new-tokens"),
        settings.prices(policy.name),
        settings.budget,
        notes,
        replies=len(items),
    )


def server_requests(conversations: list[Messages], batch_size: int) -> list[Messages]:
    """The requests a server sampler sends for these samples, in claim order: a batch's samples
    of one conversation are one request with `n` (cai.backends.openai_compat.OpenAISampler)."""
    requests: list[Messages] = []
    for start in range(0, len(conversations), batch_size):
        batch = conversations[start : start + batch_size]
        requests.extend({json.dumps(messages, sort_keys=True): messages for messages in batch}.values())
    return requests
