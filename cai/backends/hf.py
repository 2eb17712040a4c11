"""In-process transformers backends: HFSampler (batched policy sampling, one seed per request) and
HFChat (the local judge, which also reads the choice's next-token probabilities and reuses the
KV cache of the prompt prefix it shares with the previous request)."""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    DynamicLayer,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from cai.backends.base import (
    ChatRequest,
    ChatResult,
    Messages,
    PermanentError,
    Sample,
    SampleRequest,
    SamplingParams,
    TransientError,
)
from cai.backends.convert import ensure_local_model
from cai.token_count import chat_token_ids

# ensure_local_model is re-exported: callers load a model and build a backend from one import.
__all__ = [
    "HFChat",
    "HFSampler",
    "LoadedModel",
    "PrefixCache",
    "answer_with_choice",
    "decode",
    "ensure_local_model",
    "nucleus_floor",
    "pick_tokens",
]

# End-of-turn markers of common chat templates; a model stops on whichever its tokenizer has.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


class LoadedModel:
    """A causal LM and its tokenizer, ready for left-padded batched decoding."""

    def __init__(self, model_dir_or_id: str | Path, device: str = "cpu", dtype: torch.dtype | None = None):
        source = str(model_dir_or_id)
        # Left padding keeps every row's last prompt token in the last column, where decoding starts.
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(source, padding_side="left")
        if not self.tokenizer.chat_template:
            raise ValueError(f"{source}: the tokenizer has no chat template")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # float32 on CPU by default: bf16 is slow there, and fp32 keeps seeded samples reproducible.
        self.lm: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype or (torch.float32 if device == "cpu" else "auto"), device_map=device
        )
        self.lm.eval()
        self.device = torch.device(device)
        self.pad_id: int = self.tokenizer.pad_token_id
        self.stop_ids: frozenset[int] = stop_token_ids(self.lm, self.tokenizer)
        self.quote_ids = ids_containing(self.tokenizer, '"')
        # transformers 5 renamed forward's `past_key_values` to `cache` (the old name warns).
        params = inspect.signature(self.lm.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    def forward(
        self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache
    ) -> Any:
        """One forward pass that extends `cache` in place; logits for the last position only."""
        kwargs = {self._cache_kwarg: cache, "use_cache": True, "logits_to_keep": 1}
        return self.lm(input_ids=input_ids, attention_mask=mask, position_ids=positions, **kwargs)

    def encode_chat(self, messages: Messages) -> list[int]:
        """Token ids of `messages` rendered by the chat template, ending with the assistant header
        (counted the same way by estimates: cai.token_count)."""
        return chat_token_ids(self.tokenizer, messages)

    def text(self, ids: list[int], strip: bool = True) -> str:
        """Generated ids as text, special tokens dropped."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        assert isinstance(text, str)  # one sequence in, one string out
        return text.strip() if strip else text


def stop_token_ids(lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """EOS from the tokenizer and generation config, plus any end-of-turn token the vocabulary has."""
    ids: set[int] = set()
    for eos in (tokenizer.eos_token_id, lm.generation_config.eos_token_id):
        if isinstance(eos, int):
            ids.add(eos)
        elif eos is not None:
            ids.update(eos)
    added = tokenizer.get_added_vocab()
    ids.update(added[token] for token in END_OF_TURN_TOKENS if token in added)
    return frozenset(ids)


@torch.inference_mode()
def decode(
    loaded: LoadedModel,
    prompts: Sequence[Sequence[int]],
    seeds: Sequence[int],
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
) -> list[tuple[list[int], str]]:
    """Generate for one batch of prompts; per row, the new token ids (its stop token included) and
    'stop' or 'length'. Row i draws its randomness only from a generator seeded with seeds[i], so
    its sample does not depend on which other rows share the batch (up to float rounding: see
    pick_tokens)."""
    n = len(prompts)
    if n == 0:
        return []
    if max_new_tokens <= 0:
        return [([], "length") for _ in prompts]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((n, width), loaded.pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    # Positions count real tokens only, so a left-padded row sees the same positions as when alone.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    next_pos = mask.sum(-1, keepdim=True)
    device = loaded.device
    input_ids, mask, positions, next_pos = (t.to(device) for t in (input_ids, mask, positions, next_pos))
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    cache = DynamicCache(config=loaded.lm.config)
    out = loaded.forward(input_ids, mask, positions, cache)
    live = list(range(n))  # original row of each row still in the batch
    tokens: list[list[int]] = [[] for _ in prompts]
    reasons = ["length"] * n
    while True:
        picked = pick_tokens(out.logits[:, -1, :], [generators[r] for r in live], temperature, top_p)
        keep = []
        for i, (row, token) in enumerate(zip(live, picked.tolist(), strict=True)):
            tokens[row].append(token)
            if token in loaded.stop_ids:
                reasons[row] = "stop"
            elif len(tokens[row]) < max_new_tokens:
                keep.append(i)
        if not keep:
            return list(zip(tokens, reasons, strict=True))
        if len(keep) < len(live):
            # Finished rows leave the batch so the rest stop paying for them.
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask, next_pos, picked = mask[index], next_pos[index], picked[index]
            live = [live[i] for i in keep]
        mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=-1)
        out = loaded.forward(picked[:, None], mask, next_pos, cache)
        next_pos = next_pos + 1


def pick_tokens(
    logits: torch.Tensor, generators: Sequence[torch.Generator], temperature: float, top_p: float
) -> torch.Tensor:
    """Next token per row: argmax when temperature <= 0, else a nucleus (top-p) sample at
    `temperature`, by the Gumbel-max trick with noise from the row's own generator."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    probs = torch.softmax(logits, dim=-1)
    rows_n = probs.shape[0]
    if top_p < 1.0:
        head_probs, head = probs.topk(min(NUCLEUS_HEAD, probs.shape[-1]), dim=-1)
        floor = nucleus_floor(probs, top_p, top=head_probs)
        # A row's nucleus lies in its head unless the head falls short of top_p, or ties at the
        # floor may continue past it; such rows take the whole vocabulary.
        inside_head = (head_probs[:, -1:] < floor).squeeze(-1)
    else:
        floor = probs.new_zeros((rows_n, 1))
        inside_head = torch.zeros(rows_n, dtype=torch.bool, device=probs.device)
    # argmax(logits + Gumbel noise) is an exact sample. One noise value per vocabulary entry makes
    # a row's pick as robust as greedy to the ~1e-6 logit differences a different batch causes;
    # inverting a CDF with one uniform draw instead flips picks measurably often at temperature 1.
    # Every row draws the whole vocabulary's noise (so its stream does not depend on the nucleus),
    # but the logs are taken only where they can win: inside the nucleus.
    uniforms = torch.stack([torch.rand(logits.shape[-1], generator=g) for g in generators]).to(logits.device)
    picked = torch.empty(rows_n, dtype=torch.long, device=probs.device)
    if inside_head.any():
        rows = inside_head.nonzero().squeeze(-1)
        index = head[rows]
        noise = -torch.log(-torch.log(uniforms[rows].gather(-1, index)))
        score = (logits[rows].gather(-1, index) + noise).masked_fill(
            head_probs[rows] < floor[rows], float("-inf")
        )
        picked[rows] = index.gather(-1, score.argmax(-1, keepdim=True)).squeeze(-1)
    if not inside_head.all():
        rows = (~inside_head).nonzero().squeeze(-1)
        gumbel = -torch.log(-torch.log(uniforms[rows]))
        score = (logits[rows] + gumbel).masked_fill(probs[rows] < floor[rows], float("-inf"))
        picked[rows] = score.argmax(-1)
    return picked


NUCLEUS_HEAD = 256
"""How many of a row's most probable tokens nucleus_floor sorts, and pick_tokens scores, before
falling back to the whole vocabulary."""


def nucleus_floor(
    probs: torch.Tensor, top_p: float, k: int = NUCLEUS_HEAD, top: torch.Tensor | None = None
) -> torch.Tensor:
    """Per row, the smallest probability inside the nucleus (the most probable tokens whose mass
    first reaches top_p; ties at the edge all stay in). Sorting a 49k vocabulary costs ~8 ms a row
    on CPU, so only the top k are sorted, and a whole row only when they fall short of top_p.
    `top`: those top k probabilities, sorted, when the caller has them already."""
    if top_p >= 1.0:
        return probs.new_zeros((probs.shape[0], 1))
    if top is None:
        top = probs.topk(min(k, probs.shape[-1]), dim=-1).values
    floor = torch.empty((probs.shape[0], 1), dtype=probs.dtype, device=probs.device)
    short = top.sum(-1) < top_p
    for rows, head in ((~short, top[~short]), (short, probs[short].sort(dim=-1, descending=True).values)):
        if head.shape[0]:
            inside = (head.cumsum(-1) - head) < top_p
            floor[rows] = head.gather(-1, inside.sum(-1, keepdim=True) - 1)
    return floor


class HFSampler:
    """`Sampler` over a local transformers model: batches of up to `batch_size` prompts of similar
    length, left-padded, each request sampled with its own seed."""

    def __init__(
        self,
        model_dir_or_id: str | Path,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        batch_size: int = 16,
        *,
        name: str | None = None,
    ):
        self.model = name or str(model_dir_or_id)
        self.batch_size = batch_size
        self.loaded = LoadedModel(model_dir_or_id, device, dtype)

    def sample(self, requests: Sequence[SampleRequest], params: SamplingParams) -> list[Sample]:
        """One sample per request, in input order. `completion_tokens` counts the stop token too."""
        prompts = [self.loaded.encode_chat(r.messages) for r in requests]
        # Similar lengths share a batch, so little compute goes to padding.
        order = sorted(range(len(requests)), key=lambda i: len(prompts[i]))
        results: list[Sample | None] = [None] * len(requests)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            generated = decode(
                self.loaded,
                [prompts[i] for i in batch],
                [requests[i].seed for i in batch],
                temperature=params.temperature,
                top_p=params.top_p,
                max_new_tokens=params.max_new_tokens,
            )
            for i, (ids, reason) in zip(batch, generated, strict=True):
                results[i] = Sample(self.loaded.text(ids), len(prompts[i]), len(ids), reason)
        return [r for r in results if r is not None]


class HFChat:
    """`ChatBackend` over a local transformers model, for the in-process judge. One request runs
    at a time (one model, one forward pass at a time), in a worker thread.

    With `choice_field` and `choices` set, `choice_probs` are the next-token probabilities of each
    choice's first token right after `"<choice_field>": "`, normalised over the choices. `text` is
    then the model's own text if it is a JSON object whose choice field holds one of the choices;
    otherwise a JSON object built from the rationale found in the text (or "") and the most
    probable choice. `json_schema` is not enforced (no constrained decoding).

    With `prefix_cache` (the default), choice requests reuse the KV cache of the longest token
    prefix they share with the previous one (see PrefixCache); models whose cache cannot be cut
    back (sliding-window or linear-attention layers) run without it."""

    def __init__(
        self,
        model_dir_or_id: str | Path,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        *,
        name: str | None = None,
        prefix_cache: bool = True,
    ):
        self.model = name or str(model_dir_or_id)
        self._loaded: LoadedModel | None = LoadedModel(model_dir_or_id, device, dtype)
        self.prefix: PrefixCache | None = (
            PrefixCache() if prefix_cache and PrefixCache.supports(self._loaded.lm) else None
        )
        self._lock = threading.Lock()

    async def complete(self, request: ChatRequest) -> ChatResult:
        return await asyncio.to_thread(self._complete, request)

    async def aclose(self) -> None:
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        with self._lock:
            self._loaded = None
            self.prefix = None

    def _complete(self, request: ChatRequest) -> ChatResult:
        with self._lock:
            if self._loaded is None:
                raise PermanentError(f"{self.model}: backend is closed")
            try:
                return self._run(self._loaded, request)
            except torch.OutOfMemoryError as e:
                raise TransientError(f"{self.model}: out of memory: {e}") from e
            except (PermanentError, TransientError):
                raise
            except Exception as e:  # deterministic in-process failure: a retry would fail the same way
                raise PermanentError(f"{self.model}: {type(e).__name__}: {e}") from e

    def _run(self, loaded: LoadedModel, request: ChatRequest) -> ChatResult:
        prompt = loaded.encode_chat(request.messages)
        if request.choice_field and request.choices:
            answer = answer_with_choice(
                loaded, prompt, request.choice_field, request.choices, request.max_tokens, self.prefix
            )
            # The choice counts as one written token; the steering text around it does not.
            return ChatResult(answer.text, len(prompt), len(answer.rationale_ids) + 1, answer.probs)
        # Seed 0: a judge with temperature > 0 still answers the same request the same way.
        [(ids, _)] = decode(
            loaded,
            [prompt],
            [0],
            temperature=request.temperature,
            top_p=1.0,
            max_new_tokens=request.max_tokens,
        )
        return ChatResult(loaded.text(ids), len(prompt), len(ids), None)


class PrefixCache:
    """The KV cache of the last choice request's prompt, kept so that the next request runs only the
    tokens after the longest token prefix the two share: every judge request of a round starts with
    the same chat template and judge template opening. Token ids are compared, not text: the cached
    keys and values at position i depend only on ids[: i + 1], so an equal id prefix has an equal
    cache, whereas equal text may tokenize differently where it meets different text. The cache is
    cut back in place (DynamicCache.crop), never copied."""

    def __init__(self) -> None:
        self._ids: list[int] = []
        self._cache: DynamicCache | None = None
        self.reused_tokens = 0
        """Prompt tokens not run again, over all requests so far."""

    @staticmethod
    def supports(lm: PreTrainedModel) -> bool:
        """Whether every layer keeps all past positions, so a crop restores an earlier state exactly."""
        return all(type(layer) is DynamicLayer for layer in DynamicCache(config=lm.config).layers)

    def take(self, ids: list[int], config: PreTrainedConfig) -> tuple[DynamicCache, int]:
        """A cache holding the first n tokens of `ids`, and n; the last token is always left to run,
        for its logits. The stored cache is handed over, so a request that fails midway leaves
        nothing half-extended behind; `keep` stores one again."""
        cache, self._cache = self._cache, None
        reused = common_prefix_length(self._ids, ids[:-1]) if cache is not None else 0
        if cache is None or reused == 0:
            return DynamicCache(config=config), 0
        cache.crop(reused - cache.get_seq_length())  # a negative count removes from the end
        self.reused_tokens += reused
        return cache, reused

    def keep(self, ids: list[int], cache: DynamicCache) -> None:
        """Store `cache`, cut back to `ids`: the tokens the next request may share."""
        cache.crop(len(ids) - cache.get_seq_length())
        self._ids, self._cache = ids, cache


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):  # up to the shorter one
        if x != y:
            return i
    return min(len(a), len(b))


@dataclass(frozen=True)
class ChoiceAnswer:
    text: str
    """`{"rationale": ..., "<field>": <most probable choice>}` as JSON."""
    probs: dict[str, float]
    rationale_ids: list[int]
    """The tokens the model wrote inside the rationale string."""
    head_ids: list[int]
    tail_ids: list[int]


@torch.inference_mode()
def answer_with_choice(
    loaded: LoadedModel,
    prompt: list[int],
    field: str,
    choices: Sequence[str],
    max_tokens: int,
    prefix: PrefixCache | None = None,
) -> ChoiceAnswer:
    """The answer and choice probabilities for a judge reply shaped
    `{"rationale": "...", "<field>": "<choice>"}`. The model is steered into that shape rather
    than trusted to produce it: its reply starts as `{"rationale": "`, it writes the rationale
    greedily until it closes the string (or `max_tokens`), then `", "<field>": "` is appended and
    the next-token probabilities of each choice's first token, renormalised over the choices, are
    read in the same pass over the cache. The verdict is the most probable choice. A small model
    left to itself rarely writes valid JSON and often never stops, so this is both faster and
    more faithful than parsing free text. With `prefix`, the prompt's shared prefix is read from
    there, and the prompt's cache is left there for the next request."""
    tokenizer = loaded.tokenizer
    first_ids = [tokenizer(c, add_special_tokens=False).input_ids[0] for c in choices]
    if len(set(first_ids)) < len(first_ids):
        raise PermanentError(f"choices {list(choices)} do not start with distinct tokens")
    head = tokenizer('{"rationale": "', add_special_tokens=False).input_ids
    opening = prompt + head
    config = loaded.lm.config
    cache, start = prefix.take(opening, config) if prefix is not None else (DynamicCache(config=config), 0)
    length = len(opening)
    out = loaded.forward(
        torch.tensor([opening[start:]], device=loaded.device),
        torch.ones((1, length), dtype=torch.long, device=loaded.device),
        torch.arange(start, length, device=loaded.device)[None],
        cache,
    )
    written: list[int] = []
    while len(written) < max_tokens:
        token = int(out.logits[0, -1].argmax())
        if token in loaded.quote_ids or token in loaded.stop_ids:
            break  # the string is closed (or the turn ended): the rationale is complete
        written.append(token)
        length += 1
        mask = torch.ones((1, length), dtype=torch.long, device=loaded.device)
        out = loaded.forward(
            torch.tensor([[token]], device=loaded.device),
            mask,
            torch.tensor([[length - 1]], device=loaded.device),
            cache,
        )
    rationale = loaded.text(written)
    tail = tokenizer(f'", {json.dumps(field)}: "', add_special_tokens=False).input_ids
    mask = torch.ones((1, length + len(tail)), dtype=torch.long, device=loaded.device)
    positions = torch.arange(length, length + len(tail), device=loaded.device)[None]
    logits = loaded.forward(torch.tensor([tail], device=loaded.device), mask, positions, cache).logits[0, -1]
    if prefix is not None:
        prefix.keep(opening, cache)
    # Softmax over the choices' logits = the full softmax renormalised over them, without underflow.
    weights = torch.softmax(logits[first_ids].float(), dim=-1).tolist()
    probs = dict(zip(choices, weights, strict=True))
    best = max(choices, key=probs.__getitem__)
    return ChoiceAnswer(json.dumps({"rationale": rationale, field: best}), probs, written, head, tail)


def ids_containing(tokenizer: PreTrainedTokenizerBase, char: str) -> frozenset[int]:
    """Vocabulary ids whose text contains `char`. Byte-level BPE shows '"' as itself in token
    strings, so they are enough to find it."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return frozenset(i for i, piece in enumerate(pieces) if piece is not None and char in piece)
