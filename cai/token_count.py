"""Counting the tokens of chat messages before they are sent, for estimates. With the model's own
tokenizer where one can be had without the network (a local model directory, the embedded
model, a hub id already in the local cache); else with tiktoken, whose encodings are
downloaded on first use; and where that cannot be done either (no network, as on a machine that
reaches no hub), with a labelled approximation of 4 characters a token."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from cai.errors import BadInput

if TYPE_CHECKING:
    from pathlib import Path

    from transformers import PreTrainedTokenizerBase

Messages = list[dict[str, str]]

CHARS_PER_TOKEN = 4
"""English text runs about 4 characters a token in the BPE vocabularies of current models."""
MESSAGE_OVERHEAD = 3
REPLY_PRIMING = 3
"""Without the model's chat template: OpenAI's count of the chat format's own tokens, 3 per
message (role and separators) and 3 that open the reply."""
TIKTOKEN_FALLBACK = "o200k_base"
"""tiktoken's encoding for a model it does not know (its newest, used by OpenAI's current models)."""
TIKTOKEN_LOAD_S = 20.0
"""How long to wait for tiktoken's download: requests without a timeout can hang where packets
to the internet are dropped rather than refused."""


class TokenCounter(Protocol):
    label: str
    """How the counting is done, for the user (an approximation says so)."""
    exact: bool
    """Counted with the model's own tokenizer and chat template."""

    def chat(self, messages: Messages) -> int:
        """Prompt tokens of `messages` as the model reads them, the opening of its reply included."""
        ...

    def text(self, text: str) -> int: ...


def chat_token_ids(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> list[int]:
    """Token ids of `messages` rendered by the chat template, ending with the assistant header:
    what an in-process model is given, and what a server that uses the same template counts."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The template writes its own special tokens (BOS included, where it has one).
    return list(tokenizer(text, add_special_tokens=False).input_ids)


@dataclass
class HFCounter:
    tokenizer: PreTrainedTokenizerBase
    label: str
    exact: bool = True

    def chat(self, messages: Messages) -> int:
        return len(chat_token_ids(self.tokenizer, messages))

    def text(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)


@dataclass
class TiktokenCounter:
    encode: Callable[[str], list[int]]
    label: str
    exact: bool = False

    def chat(self, messages: Messages) -> int:
        return sum(MESSAGE_OVERHEAD + self.text(m["content"]) for m in messages) + REPLY_PRIMING

    def text(self, text: str) -> int:
        return len(self.encode(text))


@dataclass
class ApproximateCounter:
    label: str
    exact: bool = False

    def chat(self, messages: Messages) -> int:
        return sum(MESSAGE_OVERHEAD + self.text(m["content"]) for m in messages) + REPLY_PRIMING

    def text(self, text: str) -> int:
        return math.ceil(len(text) / CHARS_PER_TOKEN)


def approximation(why: str) -> ApproximateCounter:
    return ApproximateCounter(f"APPROXIMATION: {CHARS_PER_TOKEN} characters a token ({why})")


def counter_for(model: str, location: Path | str | None = None) -> TokenCounter:
    """The best counter for `model`: the HF tokenizer at `location` (a directory or a hub id,
    read from local files only) or of `model` itself; else tiktoken; else the approximation."""
    for source in (location, model):
        if source is not None and (tokenizer := local_tokenizer(source)) is not None:
            return HFCounter(tokenizer, f"{model}'s tokenizer and chat template ({source})")
    return tiktoken_counter(model)


def local_tokenizer(source: Path | str) -> PreTrainedTokenizerBase | None:
    """The tokenizer (with a chat template) at `source` from local files, or None. A name that
    is neither a model directory nor in the hub cache (an API's model name) gives None."""
    from cai.registry import resolve_model

    try:
        ref = resolve_model(str(source))
    except BadInput:
        return None
    if ref.kind == "embedded":
        from cai.backends.convert import ensure_local_model

        source = ensure_local_model(ref)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    except (OSError, ValueError):
        return None
    return tokenizer if tokenizer.chat_template else None


def tiktoken_counter(model: str) -> TokenCounter:
    try:
        import tiktoken
    except ImportError:
        return approximation("tiktoken is not installed")
    try:
        name = tiktoken.encoding_name_for_model(model)
        own = True
    except KeyError:
        name, own = TIKTOKEN_FALLBACK, False
    encoding, error = _within(TIKTOKEN_LOAD_S, lambda: tiktoken.get_encoding(name))
    if encoding is None:
        return approximation(
            f"no local tokenizer for {model!r}, and tiktoken could not load its {name} encoding, "
            f"which it downloads on first use ({error}: no network?)"
        )
    whose = f"{model}'s encoding" if own else f"not {model}'s own tokenizer"
    return TiktokenCounter(encoding.encode, f"tiktoken {name} ({whose}; chat format counted as OpenAI's)")


def _within(seconds: float, call: Callable[[], Any]) -> tuple[Any, str]:
    """`call()` in a daemon thread, waited for `seconds`: (its result, "") or (None, why not)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except Exception as exc:
            outcome["error"] = type(exc).__name__  # a download's message is a screenful of URL

    thread = threading.Thread(target=run, name="tiktoken-load", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        return None, f"no answer within {seconds:g} s"
    return outcome.get("value"), outcome.get("error", "")
