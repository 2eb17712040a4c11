"""Fixtures for fast backend tests: the SmolLM2 tokenizer (read once from the embedded GGUF) and a
tiny random Llama that uses it, saved as a transformers directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from cai.backends.convert import build_atomically, file_key
from cai.registry import embedded_gguf


def save_smollm2_tokenizer(out: Path) -> None:
    """The embedded model's tokenizer (with its chat template), without loading its weights."""
    gguf = embedded_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, padding_side="left")
    tokenizer.save_pretrained(out)


def cached_smollm2_tokenizer(root: Path) -> Path:
    """The embedded model's tokenizer saved under `root`, read from the GGUF only once: that read
    takes ~10 s, since transformers parses all the GGUF's metadata."""
    return build_atomically(root / f"smollm2-{file_key(embedded_gguf())}", save_smollm2_tokenizer)


def build_tiny_model(
    out: Path, tokenizer_dir: Path, *, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0
) -> Path:
    """A random LlamaForCausalLM over the SmolLM2 vocabulary, saved with the tokenizer into `out`."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=2048,
        # Larger than the default 0.02 so next-token distributions are peaked, not near-uniform:
        # greedy picks are then clear winners rather than near-ties.
        initializer_range=0.3,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Reading the tokenizer from the GGUF takes ~10 s (transformers parses all its metadata), so keep
    # it in pytest's cache between runs when the cache is enabled; otherwise in this session's tmp.
    cache = getattr(request.config, "cache", None)
    root = cache.mkdir("cai-tokenizers") if cache is not None else tmp_path_factory.mktemp("tokenizers")
    return cached_smollm2_tokenizer(root)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), smollm2_tokenizer_dir)
