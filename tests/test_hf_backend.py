"""The in-process transformers backends (HFSampler, HFChat) on a tiny random Llama, the atomic
conversion cache, and one slow end-to-end run on the real embedded model."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest
import torch

from cai.backends import convert
from cai.backends.base import ChatRequest, PermanentError, SampleRequest, SamplingParams
from cai.backends.convert import build_atomically, ensure_local_model
from cai.backends.hf import HFChat, HFSampler, answer_with_choice, decode, nucleus_floor, pick_tokens
from cai.constitution import load_constitution
from cai.judge import ORDERS, pairwise_request
from cai.registry import ModelRef
from cai.templates import TemplateSet
from tests.conftest import REPO
from tests.tiny_model import smollm2_tokenizer_dir, tiny_model_dir

# Session fixtures from tests/tiny_model.py; listing them marks the import as used (pytest finds
# them by name, and a noqa would not cover the parameters that shadow them).
__all__ = ["smollm2_tokenizer_dir", "tiny_model_dir"]

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)
# On the tiny model, top_p 0.5 at temperature 0.8 is reached within the top 256 tokens, and 1.0
# samples from the whole vocabulary (its flat distributions would make top_p 0.95 sort whole rows,
# which test_nucleus_floor_matches_a_full_sort covers).
SAMPLED = [
    SamplingParams(temperature=0.8, top_p=0.5, max_new_tokens=8),
    SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8),
]


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def requests(n: int) -> list[SampleRequest]:
    """Prompts of many different lengths, so a batch needs real padding."""
    return [
        SampleRequest(ask(f"Question {i}:" + " tell me more" * (i * 7 % 23)), seed=100 + i) for i in range(n)
    ]


@pytest.fixture(scope="module")
def sampler(tiny_model_dir: Path) -> HFSampler:
    return HFSampler(tiny_model_dir, batch_size=16)


@pytest.mark.parametrize("params", [GREEDY, *SAMPLED], ids=["greedy", "t0.8-p0.5", "t1.0-p1.0"])
def test_a_request_samples_the_same_alone_or_in_a_batch_of_16(
    sampler: HFSampler, params: SamplingParams
) -> None:
    batch = requests(16)
    together = sampler.sample(batch, params)
    alone = [sampler.sample([request], params)[0] for request in batch]
    assert together == alone
    assert len({s.text for s in together}) > 1


def test_greedy_decoding_matches_transformers_generate(sampler: HFSampler) -> None:
    loaded = sampler.loaded
    prompts = [loaded.encode_chat(r.messages) for r in requests(3)]
    ours = decode(loaded, prompts, [0, 0, 0], temperature=0.0, top_p=1.0, max_new_tokens=8)
    for prompt, (ids, _) in zip(prompts, ours, strict=True):
        reference = loaded.lm.generate(
            input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=8, pad_token_id=loaded.pad_id
        )
        assert ids == reference[0, len(prompt) :].tolist()


def test_seed_decides_the_sample(sampler: HFSampler) -> None:
    params = SAMPLED[1]
    messages = ask("Say something.")
    same = sampler.sample([SampleRequest(messages, 7), SampleRequest(messages, 7)], params)
    assert same[0] == same[1]
    varied = sampler.sample([SampleRequest(messages, seed) for seed in range(6)], params)
    assert len({s.text for s in varied}) > 1


def test_short_prompt_padded_beside_a_long_one_decodes_as_alone(sampler: HFSampler) -> None:
    short = SampleRequest(ask("Hi"), 1)
    long = SampleRequest(ask("Explain this at length. " * 40), 2)
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    pair = sampler.sample([short, long], params)
    assert pair[1].prompt_tokens > 5 * pair[0].prompt_tokens
    assert pair == [sampler.sample([short], params)[0], sampler.sample([long], params)[0]]


def test_results_come_back_in_input_order(tiny_model_dir: Path) -> None:
    # batch_size 3 over prompts given longest first: batches are formed shortest first.
    small = HFSampler(tiny_model_dir, batch_size=3)
    batch = sorted(requests(8), key=lambda r: -len(r.messages[0]["content"]))
    lengths = [len(small.loaded.encode_chat(r.messages)) for r in batch]
    samples = small.sample(batch, GREEDY)
    assert [s.prompt_tokens for s in samples] == lengths
    assert samples == [small.sample([r], GREEDY)[0] for r in batch]
    assert small.sample([], GREEDY) == []


def test_hitting_max_new_tokens_finishes_with_length(sampler: HFSampler) -> None:
    [sample] = sampler.sample([SampleRequest(ask("Count."), 3)], SamplingParams(max_new_tokens=5))
    assert (sample.finish_reason, sample.completion_tokens) == ("length", 5)
    assert sample.text == sample.text.strip()


def test_each_row_stops_at_its_own_end_of_turn(sampler: HFSampler, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = sampler.loaded
    prompts = [loaded.encode_chat(r.messages) for r in requests(4)]
    kwargs = {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 10}
    free = decode(loaded, prompts, [0] * 4, **kwargs)
    # Pretend the third token row 0 generates is the end-of-turn token: row 0 (and any other row
    # that generates it) must stop there, the rest must run on exactly as before.
    stop = free[0][0][2]
    monkeypatch.setattr(loaded, "stop_ids", frozenset({stop}))
    stopped = decode(loaded, prompts, [0] * 4, **kwargs)
    for (ids, _), (got, reason) in zip(free, stopped, strict=True):
        if stop in ids:
            assert (got, reason) == (ids[: ids.index(stop) + 1], "stop")
        else:
            assert (got, reason) == (ids, "length")
    assert stopped[0][0] == free[0][0][:3]


@pytest.mark.parametrize("peak", [0.5, 20.0])  # flat (whole-row sort) and peaked (top-k is enough)
def test_nucleus_floor_matches_a_full_sort(peak: float) -> None:
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(5, 3000) * peak, dim=-1)
    for top_p in (0.5, 0.9, 0.95):
        head = probs.sort(dim=-1, descending=True).values
        count = ((head.cumsum(-1) - head) < top_p).sum(-1, keepdim=True)
        assert torch.equal(nucleus_floor(probs, top_p, k=64), head.gather(-1, count - 1))
    assert torch.equal(nucleus_floor(probs, 1.0), torch.zeros(5, 1))


@pytest.mark.parametrize("peak", [0.5, 3.0, 20.0])  # nucleus past the head, inside it, a few tokens
def test_pick_tokens_scores_only_the_nucleus_and_picks_what_the_whole_vocabulary_would(peak: float) -> None:
    torch.manual_seed(1)
    logits = torch.randn(12, 5000) * peak
    logits[3, :400] = logits[3, 0]  # a row whose floor ties far past the head: the whole-row path
    for temperature, top_p in ((0.8, 0.95), (1.0, 0.5), (0.7, 1.0)):
        seeds = range(100, 112)
        got = pick_tokens(logits, [torch.Generator().manual_seed(s) for s in seeds], temperature, top_p)
        scaled = logits / temperature
        probs = torch.softmax(scaled, dim=-1)
        floor = nucleus_floor(probs, top_p, k=probs.shape[-1])  # a full sort: the definition
        noise = torch.stack([torch.rand(5000, generator=torch.Generator().manual_seed(s)) for s in seeds])
        want = (scaled - torch.log(-torch.log(noise))).masked_fill(probs < floor, float("-inf")).argmax(-1)
        assert torch.equal(got, want)


@pytest.fixture(scope="module")
def chat(tiny_model_dir: Path) -> HFChat:
    return HFChat(tiny_model_dir, name="tiny")


PAIRWISE = ChatRequest(
    ask('Which response is better? Answer {"rationale": "...", "preferred": "A" | "B" | "tie"}'),
    max_tokens=6,
    choice_field="preferred",
    choices=("A", "B", "tie"),
)


def test_chat_reports_choice_probabilities_and_valid_json(chat: HFChat) -> None:
    result = asyncio.run(chat.complete(PAIRWISE))
    assert chat.model == "tiny"
    assert result.choice_probs is not None and set(result.choice_probs) == {"A", "B", "tie"}
    assert sum(result.choice_probs.values()) == pytest.approx(1.0, abs=1e-6)
    # The reply is steered into the JSON shape, and its verdict is the most probable choice.
    verdict = json.loads(result.text)
    assert set(verdict) == {"rationale", "preferred"}
    assert verdict["preferred"] == max(result.choice_probs, key=result.choice_probs.__getitem__)
    assert result.prompt_tokens and 1 <= (result.completion_tokens or 0) <= PAIRWISE.max_tokens + 1


def test_choice_probabilities_come_after_the_models_own_rationale(chat: HFChat) -> None:
    loaded = chat._loaded
    assert loaded is not None
    prompt = loaded.encode_chat(PAIRWISE.messages)
    answer = answer_with_choice(loaded, prompt, "preferred", PAIRWISE.choices, max_tokens=12)
    assert len(answer.rationale_ids) <= 12 and not set(answer.rationale_ids) & loaded.quote_ids
    assert json.loads(answer.text)["rationale"] == loaded.text(answer.rationale_ids)
    # Reading through the decode's cache gives what one uncached pass over the whole reply gives.
    whole = prompt + answer.head_ids + answer.rationale_ids + answer.tail_ids
    with torch.inference_mode():
        logits = loaded.lm(input_ids=torch.tensor([whole])).logits[0, -1]
    firsts = [loaded.tokenizer(c, add_special_tokens=False).input_ids[0] for c in PAIRWISE.choices]
    expected = torch.softmax(logits, -1)[firsts]
    assert list(answer.probs.values()) == pytest.approx((expected / expected.sum()).tolist(), rel=1e-3)
    assert loaded.text(answer.head_ids) == '{"rationale": "'
    assert loaded.text(answer.tail_ids, strip=False) == '", "preferred": "'
    with pytest.raises(PermanentError, match="distinct"):
        answer_with_choice(loaded, prompt, "preferred", ("1", "10"), max_tokens=4)


def judge_requests() -> list[ChatRequest]:
    """Real pairwise judge requests (both orders of three pairs, two principles), then one with a
    different prompt, then the first one twice: the last shares every token with the one before."""
    constitution = load_constitution(REPO / "constitutions/concise-safe/v2.yaml").constitution
    principles = [p for p in constitution.principles if p.kind == "llm"]
    pairs = [
        ("Name a colour.", "Red.", "Colours are many."),
        ("2+2?", "4", "It is 5."),
        ("Hi", "Hello!", "Go away."),
    ]
    judged = [
        pairwise_request(TemplateSet(), constitution, principle, ask(prompt), a, b, order, max_tokens=10)[1]
        for principle in principles
        for prompt, a, b in pairs
        for order in ORDERS
    ]
    return [*judged, PAIRWISE, judged[0], judged[0]]


def test_prefix_cache_judges_exactly_as_without_it(tiny_model_dir: Path) -> None:
    cached, plain = HFChat(tiny_model_dir), HFChat(tiny_model_dir, prefix_cache=False)
    assert cached.prefix is not None and plain.prefix is None
    loaded = cached._loaded
    assert loaded is not None
    head = loaded.tokenizer('{"rationale": "', add_special_tokens=False).input_ids
    previous: list[int] = []
    for request in judge_requests():
        reused_before = cached.prefix.reused_tokens
        got, expected = (asyncio.run(chat.complete(request)) for chat in (cached, plain))
        assert (got.text, got.prompt_tokens, got.completion_tokens) == (
            expected.text,
            expected.prompt_tokens,
            expected.completion_tokens,
        )
        assert got.choice_probs is not None and expected.choice_probs is not None
        assert list(got.choice_probs.values()) == pytest.approx(
            list(expected.choice_probs.values()), abs=1e-5
        )
        # Reused: the longest token prefix shared with the previous request, short of the last token.
        opening = loaded.encode_chat(request.messages) + head
        shared, most = 0, min(len(previous), len(opening) - 1)
        while shared < most and previous[shared] == opening[shared]:
            shared += 1
        assert cached.prefix.reused_tokens - reused_before == shared
        previous = opening
    assert cached.prefix.reused_tokens > 40 * len(judge_requests())


def test_chat_serialises_concurrent_requests_and_refuses_after_close(tiny_model_dir: Path) -> None:
    chat = HFChat(tiny_model_dir)
    plain = ChatRequest(ask("Hello"), max_tokens=4)

    async def run() -> list[str]:
        results = await asyncio.gather(*(chat.complete(plain) for _ in range(3)))
        await chat.aclose()
        with pytest.raises(PermanentError, match="closed"):
            await chat.complete(plain)
        return [r.text for r in results]

    texts = asyncio.run(run())
    assert texts[0] == texts[1] == texts[2]


# --- the conversion cache ---------------------------------------------------------------------


def test_a_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    def half_then_fail(out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed midway")

    with pytest.raises(RuntimeError, match="midway"):
        build_atomically(tmp_path / "model", half_then_fail)
    assert list(tmp_path.iterdir()) == []


def test_a_killed_builds_leftover_is_never_the_cache(tmp_path: Path) -> None:
    # What a SIGKILL mid-conversion leaves: a temp dir beside the target, half written.
    leftover = tmp_path / ".model.tmp-999-deadbeef"
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")
    built = build_atomically(tmp_path / "model", lambda out: (out / "weights").write_text("complete"))
    assert (built / "weights").read_text() == "complete"
    assert leftover.exists()  # young: may be a conversion still running elsewhere
    old = time.time() - 2 * convert.STALE_TEMP_S
    os.utime(leftover, (old, old))
    build_atomically(tmp_path / "model", lambda out: pytest.fail("rebuilt a complete cache"))
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_concurrent_builder_that_finishes_first_wins(tmp_path: Path) -> None:
    target = tmp_path / "model"

    def slower(out: Path) -> None:
        (out / "weights").write_text("ours")
        target.mkdir()  # another process renamed its finished build into place meanwhile
        (target / "weights").write_text("theirs")

    assert (build_atomically(target, slower) / "weights").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_embedded_models_convert_once_into_a_keyed_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF not really")
    calls = []
    monkeypatch.setattr(convert, "convert_gguf", lambda src, out: calls.append((src, out)))
    monkeypatch.setenv("CAI_CACHE_DIR", str(tmp_path / "cache"))
    ref = ModelRef("smollm2-135m-instruct", "embedded", str(gguf))
    first = ensure_local_model(ref)
    assert first == tmp_path / "cache" / f"smollm2-135m-instruct-{convert.file_key(gguf)}"
    assert ensure_local_model(ref) == first and len(calls) == 1
    gguf.write_bytes(b"GGUF, another version")
    assert ensure_local_model(ref) != first and len(calls) == 2
    assert ensure_local_model(ref, tmp_path / "explicit").parent == tmp_path / "explicit"
    assert ensure_local_model(ModelRef("x", "local", "/models/x")) == Path("/models/x")
    assert ensure_local_model(ModelRef("org/x", "hub", "org/x")) == "org/x"


# --- the real embedded model --------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_model_end_to_end() -> None:
    """Converts SmolLM2 once (cached under $CAI_CACHE_DIR or ~/.cache/cai), samples, and judges."""
    from cai.registry import EMBEDDED_MODEL, resolve_model
    from cai.templates import TemplateSet, sample_context

    model_dir = ensure_local_model(resolve_model(EMBEDDED_MODEL))
    sampler = HFSampler(model_dir, name=EMBEDDED_MODEL)
    prompts = [ask("What is the capital of France?"), ask("Name a primary colour.")]
    batch = [SampleRequest(messages, seed) for messages in prompts for seed in (1, 2)]
    samples = sampler.sample(batch, SamplingParams(max_new_tokens=16))
    assert all(s.text and s.finish_reason in ("stop", "length") for s in samples)
    assert sampler.sample(batch[:1], SamplingParams(max_new_tokens=16)) == samples[:1]

    judge = HFChat(model_dir, name=EMBEDDED_MODEL)
    rendered = TemplateSet().render("judge_pairwise", **sample_context("judge_pairwise"))
    request = ChatRequest(ask(rendered.text), max_tokens=32, choice_field="preferred", choices=("A", "B"))
    result = asyncio.run(judge.complete(request))
    assert result.choice_probs is not None
    assert sum(result.choice_probs.values()) == pytest.approx(1.0, abs=1e-6)
    assert json.loads(result.text)["preferred"] in ("A", "B")
