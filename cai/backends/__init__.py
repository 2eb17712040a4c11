"""Backends behind the Sampler and ChatBackend protocols, and the factories the CLI uses to pick
one. Implementations are imported on demand: torch loads only when an in-process model is used."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cai.backends.base import ChatBackend, Sampler
from cai.errors import BadInput
from cai.registry import EMBEDDED_MODEL, resolve_model

if TYPE_CHECKING:
    from cai.backends.pool import PoolEndpoint

SAMPLER_BACKENDS = ("hf", "openai", "vllm")


def make_sampler(
    backend: str,
    policy_name: str,
    model_ref: str,
    base_url: str | None = None,
    api_key: str | None = None,
    batch_size: int = 16,
    cache_dir: Path | None = None,
    rpm: float | None = None,
    tpm: float | None = None,
) -> Sampler:
    """A Sampler for a policy on `backend`. Servers know the policy by its name; in-process
    backends load from its stored location (the embedded model is converted from its GGUF).
    `rpm` and `tpm` limit a server's requests and tokens per minute."""
    if backend == "openai":
        if not base_url:
            raise BadInput("the openai backend needs a base URL (an OpenAI-compatible server)")
        from cai.backends.openai_compat import OpenAISampler

        return OpenAISampler(base_url, policy_name, api_key=api_key, concurrency=batch_size, rpm=rpm, tpm=tpm)
    if backend == "hf":
        from cai.backends.hf import HFSampler

        return HFSampler(
            policy_location(policy_name, model_ref, cache_dir), name=policy_name, batch_size=batch_size
        )
    if backend == "vllm":
        from cai.backends.vllm import VLLMSampler

        return VLLMSampler(model_ref if policy_name != EMBEDDED_MODEL else policy_name)
    raise BadInput(f"backend: {backend!r} is not one of {', '.join(SAMPLER_BACKENDS)}")


def policy_location(policy_name: str, model_ref: str, cache_dir: Path | None = None) -> Path | str:
    """What `from_pretrained` loads for a stored policy: the embedded model's converted cache,
    a trained policy's directory, or a hub id."""
    from cai.backends.convert import ensure_local_model

    return ensure_local_model(
        resolve_model(policy_name if policy_name == EMBEDDED_MODEL else model_ref), cache_dir
    )


def make_judge(
    model: str,
    base_url: str | None = None,
    api_key: str | None = None,
    timeout: float = 60.0,
    cache_dir: Path | None = None,
    rpm: float | None = None,
    tpm: float | None = None,
    pool: Sequence[PoolEndpoint] = (),
    concurrency: int = 16,
) -> tuple[ChatBackend, str]:
    """The judge backend and its kind: 'openai' with a base URL, or over a `pool` of endpoints
    (each with its own concurrency, else `concurrency`), else 'hf' in-process. `rpm` and `tpm`
    limit each server's requests and tokens per minute (an in-process judge has none)."""
    if pool:
        from cai.backends.openai_compat import OpenAIChat
        from cai.backends.pool import PooledChat

        members = [
            (
                e.url,
                OpenAIChat(e.url, model, api_key=api_key, timeout=timeout, rpm=rpm, tpm=tpm),
                e.concurrency or concurrency,
            )
            for e in pool
        ]
        return PooledChat(members, model), "openai"
    if base_url:
        from cai.backends.openai_compat import OpenAIChat

        return OpenAIChat(base_url, model, api_key=api_key, timeout=timeout, rpm=rpm, tpm=tpm), "openai"
    from cai.backends.hf import HFChat, ensure_local_model

    return HFChat(ensure_local_model(resolve_model(model), cache_dir), name=model), "hf"
