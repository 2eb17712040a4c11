"""In-process vLLM engine for sampling on a GPU (optional: `pip install vllm`)."""

from __future__ import annotations

from collections.abc import Sequence

from cai.backends.base import Sample, SampleRequest, SamplingParams
from cai.errors import BadInput


class VLLMSampler:
    def __init__(self, model: str) -> None:
        try:
            import vllm
        except ImportError:
            raise BadInput("the vllm backend needs vLLM installed (pip install vllm) and a GPU") from None
        self.model = model
        self._vllm = vllm
        self._llm = vllm.LLM(model=model)

    def sample(self, requests: Sequence[SampleRequest], params: SamplingParams) -> list[Sample]:
        # vLLM takes a seed per request, so samples do not depend on batch composition here either.
        sampling = [
            self._vllm.SamplingParams(
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_new_tokens,
                seed=request.seed,
            )
            for request in requests
        ]
        outputs = self._llm.chat([r.messages for r in requests], sampling, use_tqdm=False)
        samples = []
        for output in outputs:
            completion = output.outputs[0]
            samples.append(
                Sample(
                    text=completion.text.strip(),
                    prompt_tokens=len(output.prompt_token_ids or []),
                    completion_tokens=len(completion.token_ids),
                    finish_reason=completion.finish_reason,
                )
            )
        return samples
