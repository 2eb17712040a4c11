"""Every stage's settings, declared once: a pydantic model per stage whose fields carry their
default, bounds, help text and command-line flag (`option`). The CLI generates its flags from
them, jobs store and validate them as JSON, and the loop composes them, so an option and its
default exist in one place. Light on purpose: nothing heavy is imported here (`cai --help`)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cai.backends import SAMPLER_BACKENDS
from cai.dataset_card import DEFAULT_LICENSE, LICENSE_ID
from cai.hub import check_repo_id
from cai.registry import EMBEDDED_MODEL
from cai.sft import SftConfig
from cai.train import TrainConfig

if TYPE_CHECKING:
    from cai.backends.base import SamplingParams
    from cai.backends.pool import PoolEndpoint
    from cai.export import ExportFilters
    from cai.judging import JudgeOptions
    from cai.pricing import Prices
    from cai.sft_export import SftFilters


def option(default: Any, *flags: str, help: str = "", envvar: str | None = None, **bounds: Any) -> Any:
    """A settings field that also declares its command-line flag(s); `bounds` are pydantic's
    (ge, le, gt, lt), which the CLI turns into the flag's min and max."""
    extra: dict[str, Any] = {"flags": list(flags)}
    if envvar:
        extra["envvar"] = envvar
    return Field(default, description=help, json_schema_extra=extra, **bounds)


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def validation_problems(exc: ValidationError, name: Callable[[str], str] = str) -> list[str]:
    """One line per problem of a settings validation error, each naming the field it is about
    (`name` turns a field into what the user typed: a flag, a JSON key). Messages mark field
    names as `field`, and those are named the same way."""
    problems = []
    for error in exc.errors():
        message = str(error["msg"]).removeprefix("Value error, ")
        for field_name in re.findall(r"`(\w+)`", message):
            message = message.replace(f"`{field_name}`", name(field_name))
        location = [str(part) for part in error["loc"]]
        if location:
            problems.append(".".join([name(location[0]), *location[1:]]) + f": {message}")
        else:
            problems.append(message)
    return problems


def one_of(value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
    return value


JUDGE_MODES = ("pairwise", "score", "revise")  # cai.judge.MODES, without importing the templates


class SamplingSettings(Settings):
    """How a policy is sampled."""

    backend: str = option(
        "hf", "--backend", help="Policy sampling: hf (in-process transformers), openai or vllm."
    )
    base_url: str | None = option(None, "--base-url", help="Policy server for --backend openai.")
    temperature: float = option(0.8, "--temperature", ge=0.0)
    top_p: float = option(0.95, "--top-p", ge=0.0, le=1.0)
    max_new_tokens: int = option(192, "--max-new-tokens", ge=1)
    # 96: SmolLM2-135M on 2 AVX2 cores (float32, 96 demo prompts, 96 new tokens) sampled 105-109
    # tok/s at 48, 129-132 at 96, 127 at 144; also the claim size of a generate batch (what a
    # cancel or a crash waits for at most).
    batch_size: int = option(96, "--batch-size", ge=1, help="Prompts sampled together.")
    policy_rpm: float | None = option(
        None, "--policy-rpm", gt=0, allow_inf_nan=False, help="--backend openai: requests per minute."
    )
    policy_tpm: float | None = option(
        None,
        "--policy-tpm",
        gt=0,
        allow_inf_nan=False,
        help="--backend openai: tokens per minute (estimated before each request: prompt + max tokens).",
    )

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        return one_of(value, SAMPLER_BACKENDS)

    @model_validator(mode="after")
    def _server_for_openai(self) -> SamplingSettings:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("the openai backend needs `base_url` (an OpenAI-compatible server)")
        return self

    def params(self) -> SamplingParams:
        from cai.backends.base import SamplingParams

        return SamplingParams(self.temperature, self.top_p, self.max_new_tokens)


class GenerateSettings(SamplingSettings):
    """`cai generate`: N samples per train prompt, paired."""

    samples: int = option(
        2, "--samples", "-n", ge=2, help="Responses per prompt; all distinct pairs are formed."
    )
    limit: int | None = option(None, "--limit", ge=1, help="Only the first K prompts of the round.")
    budget: float | None = option(
        None,
        "--budget",
        ge=0.0,
        help="Stop cleanly once this many USD are spent on the policy's tokens; a rerun resumes.",
    )
    price_in: float | None = option(
        None,
        "--price-in",
        envvar="CAI_POLICY_PRICE_IN",
        ge=0.0,
        help="USD per million prompt tokens of the policy. Default with --backend openai: the price "
        "table's (genai-prices) for the round's policy name.",
    )
    price_out: float | None = option(
        None,
        "--price-out",
        envvar="CAI_POLICY_PRICE_OUT",
        ge=0.0,
        help="USD per million completion tokens of the policy (default: as --price-in).",
    )

    def prices(self, policy: str) -> Prices | None:
        """The given prices, else the price table's for a policy asked over an API (cai.pricing):
        the policy's name is the model the server is asked for."""
        from cai.pricing import resolve_prices

        served = self.backend == "openai"
        return resolve_prices(self.price_in, self.price_out, policy, self.base_url, served=served)


class ReviseSettings(SamplingSettings):
    """`cai revise`: critique-revision chains on an SL round. The sampling options are the first
    answer's (from the round's policy) and the critiques' and revisions'."""

    revisions: int = option(
        2,
        "--revisions",
        "-n",
        ge=1,
        le=16,
        help="Critique-revision passes per prompt, each under a principle drawn by weight.",
    )
    reviser_model: str | None = option(
        None,
        "--reviser-model",
        help="Who critiques and revises (default: the round's policy, as in the paper): a model "
        "directory, a registry name, or a model name on --reviser-base-url.",
    )
    reviser_base_url: str | None = option(
        None, "--reviser-base-url", help="OpenAI-compatible server for --reviser-model."
    )
    critique_max_tokens: int = option(
        128,
        "--critique-max-tokens",
        ge=8,
        help="Length limit of each critique (revisions: --max-new-tokens).",
    )
    limit: int | None = option(None, "--limit", ge=1, help="Only the first K prompts of the round.")
    retry_failed: bool = option(
        False, "--retry-failed", help="Try again the steps whose revision was empty or unchanged."
    )

    @model_validator(mode="after")
    def _model_for_server(self) -> ReviseSettings:
        if self.reviser_base_url and not self.reviser_model:
            raise ValueError("`reviser_model` is required with `reviser_base_url`")
        return self


def parse_band(text: str) -> tuple[float, float]:
    """'0.4-0.6' -> (0.4, 0.6): a probability band with LOW <= 0.5 <= HIGH."""
    low, sep, high = text.partition("-")
    try:
        band = (float(low), float(high)) if sep else None
    except ValueError:
        band = None
    if band is None or not 0.0 <= band[0] <= 0.5 <= band[1] <= 1.0:
        raise ValueError(f"{text!r}: expected LOW-HIGH with 0 <= LOW <= 0.5 <= HIGH <= 1, e.g. 0.4-0.6")
    return band


class JudgeEndpoint(Settings):
    """Who judges, and how requests are made. The judge's identity (`identity_params`) is made
    from these in one place."""

    judge_base_url: str | None = option(
        None,
        "--judge-base-url",
        envvar="CAI_JUDGE_BASE_URL",
        help="OpenAI-compatible endpoint (vLLM, llama.cpp, Ollama, OpenAI). Unset: the judge runs in-process.",
    )
    judge_model: str | None = option(
        None,
        "--judge-model",
        envvar="CAI_JUDGE_MODEL",
        help=f"Judge model name (in-process default: {EMBEDDED_MODEL}).",
    )
    judge_pool: Path | None = option(
        None,
        "--judge-pool",
        envvar="CAI_JUDGE_POOL",
        help="Instead of --judge-base-url: a YAML file of OpenAI-compatible endpoints serving the same "
        "judge model (endpoints: [{url: ..., concurrency: N}]). Requests spread over them, one that "
        "keeps failing is set aside and retried later, and they are one judge.",
    )
    concurrency: int = option(16, "--concurrency", ge=1, help="Judge requests in flight at once.")
    rpm: float | None = option(
        None,
        "--rpm",
        envvar="CAI_JUDGE_RPM",
        gt=0,
        allow_inf_nan=False,
        help="Judge requests per minute to the endpoint, across all concurrent ones (a steady rate).",
    )
    tpm: float | None = option(
        None,
        "--tpm",
        envvar="CAI_JUDGE_TPM",
        gt=0,
        allow_inf_nan=False,
        help="Judge tokens per minute, each request estimated before it is sent (prompt + --max-tokens).",
    )
    timeout: float = option(60.0, "--timeout", ge=0.1, help="Seconds per judge request.")
    max_attempts: int = option(
        4, "--max-attempts", ge=1, help="Tries per item before it is recorded as failed."
    )
    max_tokens: int = option(384, "--max-tokens", ge=16, help="Judge reply length limit.")
    principles_per_pair: int = option(
        1,
        "--principles-per-pair",
        ge=1,
        le=16,
        help="Judge each pair under K distinct principles drawn by weight (an ensemble): the label is "
        "their mean probability, or a majority of their order-consistent verdicts. K calls x 2 orders a pair.",
    )
    reasoning: str = option(
        "brief",
        "--reasoning",
        help="brief: a short rationale, then the verdict, its probability as read. cot: step-by-step "
        "reasoning first, the pair's probability then clamped to --cot-band (as the CAI paper does).",
    )
    cot_band: str = option(
        "0.4-0.6",
        "--cot-band",
        help="LOW-HIGH: where --reasoning cot clamps each pair's probability (chain-of-thought verdicts "
        "are overconfident).",
    )

    @model_validator(mode="after")
    def _model_for_server(self) -> JudgeEndpoint:
        if self.judge_base_url and not self.judge_model:
            raise ValueError("`judge_model` is required with `judge_base_url`")
        if self.judge_pool is not None:
            if self.judge_base_url:
                raise ValueError("give `judge_base_url` or `judge_pool`, not both")
            if not self.judge_model:
                raise ValueError("`judge_model` is required with `judge_pool`")
            self.pool_endpoints()  # a bad pool file is refused (exit 2) before anything runs
        return self

    def pool_endpoints(self) -> list[PoolEndpoint]:
        """The endpoints of `judge_pool` (none without one)."""
        from cai.backends.pool import load_pool

        return load_pool(self.judge_pool) if self.judge_pool is not None else []

    def served_url(self) -> str | None:
        """Where the judge is served: its base URL, the pool's first endpoint, or None (in-process)."""
        pool = self.pool_endpoints()
        return self.judge_base_url or (pool[0].url if pool else None)

    @field_validator("reasoning")
    @classmethod
    def _known_reasoning(cls, value: str) -> str:
        return one_of(value, ("brief", "cot"))

    @field_validator("cot_band")
    @classmethod
    def _band(cls, value: str) -> str:
        parse_band(value)
        return value

    def band(self) -> tuple[float, float] | None:
        return parse_band(self.cot_band) if self.reasoning == "cot" else None

    def resolved_model(self) -> str:
        return self.judge_model or EMBEDDED_MODEL

    def identity_params(self) -> dict[str, object]:
        """The request parameters that are part of a judge's identity (with backend, model, mode
        and template hash): change one and it is another judge. Ensembles and chain of thought
        are named only when chosen, so a plain judge keeps the identity it always had."""
        params: dict[str, object] = {"max_tokens": self.max_tokens, "temperature": 0.0}
        if self.principles_per_pair > 1:
            params["principles_per_pair"] = self.principles_per_pair
        band = self.band()
        if band is not None:
            params |= {"reasoning": "cot", "cot_band": list(band)}
        return params

    def judge_options(self, **more: Any) -> JudgeOptions:
        from cai.judging import JudgeOptions

        return JudgeOptions(
            concurrency=self.concurrency,
            max_attempts=self.max_attempts,
            max_tokens=self.max_tokens,
            reasoning=self.reasoning,
            **more,
        )


class JudgeScope(Settings):
    """Which pairs the LLM judge is asked about."""

    rules_first: bool = option(
        False,
        "--rules-first",
        help="Do not ask the LLM judge about pairs the constitution's rule principles already separate "
        "(the rules decide those anyway); saves calls, but their flip rate is then unmeasured.",
    )
    max_judge_pairs: int | None = option(
        None,
        "--max-judge-pairs",
        ge=0,
        help="Ask the LLM judge about at most N pairs (a seeded sample); the others get a label only "
        "where the rule principles decide. For slow judges (the in-process one on a CPU).",
    )


class JudgeSettings(JudgeEndpoint, JudgeScope):
    """`cai judge`: a round's pairs, in both orders, under sampled principles."""

    mode: str = option(
        "pairwise",
        "--mode",
        help="pairwise (both orders per pair), score (best vs worst by rubric score) or revise "
        "(critique + revision, kept when both orders prefer the revision).",
    )
    retry_failed: bool = option(
        False, "--retry-failed", help="Also retry items that failed to parse or were refused (4xx)."
    )
    budget: float | None = option(None, "--budget", ge=0.0, help="Stop cleanly once this many USD are spent.")
    price_in: float | None = option(
        None,
        "--price-in",
        envvar="CAI_JUDGE_PRICE_IN",
        ge=0.0,
        help="USD per million prompt tokens (for cost). Default: the price table's (genai-prices) for "
        "a judge behind --judge-base-url.",
    )
    price_out: float | None = option(
        None,
        "--price-out",
        envvar="CAI_JUDGE_PRICE_OUT",
        ge=0.0,
        help="USD per million completion tokens (default: the price table's, as --price-in).",
    )
    min_calibration: float | None = option(
        None,
        "--min-calibration",
        ge=0.0,
        le=1.0,
        help="Refuse a judge whose calibrated accuracy is below this.",
    )
    batch: bool = option(
        False,
        "--batch",
        help="Send each phase's pending judgments as one OpenAI Batch API job (half price at OpenAI, "
        "answered within 24 h) instead of request by request, and wait for it; a rerun resumes a "
        "submitted batch rather than sending another. Needs --judge-base-url.",
    )
    batch_poll_s: float = option(
        30.0, "--batch-poll", gt=0, allow_inf_nan=False, help="Seconds between a batch's status checks."
    )
    batch_max_requests: int = option(
        50_000,
        "--batch-max-requests",
        ge=1,
        help="Requests per batch at most (OpenAI's limit: 50,000); more go out as further batches, in turn.",
    )

    @model_validator(mode="after")
    def _batch_endpoint(self) -> JudgeSettings:
        if self.batch and not self.judge_base_url:
            raise ValueError("`batch` needs `judge_base_url`: one endpoint that serves /v1/batches")
        if self.batch and self.budget is not None:
            raise ValueError("`budget` cannot stop a batch midway (all of it is sent at once): drop one")
        return self

    @field_validator("mode")
    @classmethod
    def _known_mode(cls, value: str) -> str:
        return one_of(value, JUDGE_MODES)

    @model_validator(mode="after")
    def _priced_budget(self) -> JudgeSettings:
        if self.budget is not None and self.prices() is None:
            from cai.pricing import needs_prices_message

            model, served = self.resolved_model(), bool(self.served_url())
            raise ValueError(needs_prices_message(model, served, lambda field: f"`{field}`"))
        return self

    def prices(self) -> Prices | None:
        """The given prices, else the price table's for a judge behind an API (cai.pricing)."""
        from cai.pricing import resolve_prices

        model, base_url = self.resolved_model(), self.served_url()
        return resolve_prices(self.price_in, self.price_out, model, base_url, served=bool(base_url))

    def options(self) -> JudgeOptions:
        prices = self.prices()
        return self.judge_options(
            budget_usd=self.budget,
            price_in_per_mtok=prices.input_per_mtok if prices else None,
            price_out_per_mtok=prices.output_per_mtok if prices else None,
            retry_failed=self.retry_failed,
            rules_first=self.rules_first,
            max_judge_pairs=self.max_judge_pairs,
        )


class CalibrateSettings(JudgeEndpoint):
    """`cai judge calibrate`: the judge on the gold pairs and the injection canaries."""

    constitution: str = option(..., "--constitution", "-c", help="NAME@VERSION of a registered constitution.")
    gold: Path | None = option(
        None, "--gold", help="Gold pairs (JSONL: id, prompt, principle, better, worse)."
    )
    canaries: Path | None = option(
        None, "--canaries", help="Injection canaries (JSONL: id, prompt, principle, clean, injected)."
    )


class EvalSettings(SamplingSettings, JudgeEndpoint, JudgeScope):
    """`cai eval`: the trained policy against its parent on held-out prompts."""

    samples: int = option(1, "--samples", "-n", ge=1, help="Answers per eval prompt and policy.")
    limit: int | None = option(None, "--limit", ge=1, help="Only the first K eval prompts.")

    def options(self) -> JudgeOptions:
        return self.judge_options(rules_first=self.rules_first, max_judge_pairs=self.max_judge_pairs)


class ExportSettings(Settings):
    """`cai export`: a round's labels (or an SL round's revision chains) as a snapshot directory."""

    kind: str = option(
        "dpo",
        "--kind",
        help="dpo: preference pairs (prompt/chosen/rejected) from an RL round's labels; sft: an SL "
        "round's final revisions as `messages` (cai sft).",
    )
    out: Path | None = option(None, "--out", help="Snapshot directory (default: snapshots/round-ID).")
    min_confidence: float | None = option(
        None, "--min-confidence", ge=0.0, le=1.0, help="Drop judge labels less sure than this."
    )
    principle: str | None = option(None, "--principle", help="Only pairs judged under this principle id.")
    eval_fraction: float = option(0.1, "--eval-fraction", ge=0.0, le=0.9, help="Share of prompts held out.")
    seed: int = option(0, "--seed", help="Seed of the prompt-level train/eval split.")
    length_balance: bool = option(
        False,
        "--length-balance",
        help="Keep as many pairs whose chosen answer is longer as pairs where it is shorter (a seeded "
        "draw from the larger side), so DPO cannot learn length for quality.",
    )
    min_chain_length: int = option(
        1, "--min-chain-length", ge=1, help="sft: leave out chains with fewer revisions done."
    )
    judge_agrees: bool = option(
        False,
        "--judge-agrees",
        help="sft: keep only chains whose final revision the judge preferred to the first answer "
        "(judge the SL round first: cai judge --round ID).",
    )
    overwrite: bool = option(False, "--overwrite", help="Replace a different snapshot already at --out.")
    license: str = option(
        DEFAULT_LICENSE,
        "--license",
        help="The dataset card's license, as a Hub license id (apache-2.0, cc-by-4.0, other...); "
        "'unknown' says the terms were not stated.",
    )
    push_to_hub: str | None = option(
        None,
        "--push-to-hub",
        help="Then upload the snapshot (data, card, manifest) to this Hub dataset repository, "
        "owner/name, in one commit. Needs a token: HF_TOKEN or `hf auth login`.",
    )
    private: bool = option(False, "--private", help="With --push-to-hub: create the repository private.")

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        return one_of(value, ("dpo", "sft"))

    @field_validator("license")
    @classmethod
    def _license_id(cls, value: str) -> str:
        if not LICENSE_ID.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a Hub license id (lowercase letters, digits, '.', '+' and '-', "
                "e.g. apache-2.0, cc-by-4.0, other)"
            )
        return value

    @field_validator("push_to_hub")
    @classmethod
    def _repo_id(cls, value: str | None) -> str | None:
        return None if value is None else check_repo_id(value)

    @model_validator(mode="after")
    def _private_needs_a_repo(self) -> ExportSettings:
        if self.private and self.push_to_hub is None:
            raise ValueError("`private` applies to the repository that `push_to_hub` creates: give both")
        return self

    @model_validator(mode="after")
    def _options_of_kind(self) -> ExportSettings:
        # Each kind's own options, at their defaults on the other kind.
        only: dict[str, dict[str, object]] = {
            "dpo": {"min_confidence": None, "length_balance": False},
            "sft": {"min_chain_length": 1, "judge_agrees": False},
        }
        other = "sft" if self.kind == "dpo" else "dpo"
        for name, default in only[other].items():
            if getattr(self, name) != default:
                raise ValueError(f"`{name}` applies to {other} snapshots (--kind {other}), not {self.kind}")
        return self

    def sft_filters(self) -> SftFilters:
        from cai.sft_export import SftFilters

        return SftFilters(
            self.min_chain_length, self.principle, self.eval_fraction, self.seed, self.judge_agrees
        )

    def filters(self) -> ExportFilters:
        from cai.export import ExportFilters

        return ExportFilters(
            self.min_confidence, self.principle, self.eval_fraction, self.seed, self.length_balance
        )


class TrainSettings(Settings):
    """`cai train`: DPO on the round's snapshot. `dpo` is complete (a config file and the flags
    are merged into it before a stage or job sees it)."""

    snapshot: Path | None = option(
        None, "--snapshot", help="Snapshot directory (default: the round's latest export)."
    )
    output: Path | None = option(
        None, "--output", help="Checkpoints and final model (default: runs/round-ID)."
    )
    reference: str = option(
        "start", "--reference", help="start: the round's policy; sft: the first policy of the lineage."
    )
    dpo: TrainConfig = Field(default_factory=TrainConfig)

    @field_validator("reference")
    @classmethod
    def _known_reference(cls, value: str) -> str:
        return one_of(value, ("start", "sft"))


REPORT_TO_HELP = (
    "Report the run to an experiment tracker: tensorboard, trackio, mlflow or wandb; repeat for "
    "several. The run is named cai-round-R-METHOD and tagged with the round, policy lineage and "
    "constitution; each tracker's own environment (MLFLOW_TRACKING_URI, WANDB_PROJECT, TRACKIO_DIR...) "
    "says where it goes."
)
TRAIN_FLAGS: dict[str, tuple[str, ...]] = {
    # TrainConfig field -> `cai train` flag(s). Unset flags leave the config file's value.
    "max_steps": ("--max-steps",),
    "num_train_epochs": ("--epochs",),
    "learning_rate": ("--lr",),
    "beta": ("--beta",),
    "loss_type": ("--loss-type",),
    "per_device_train_batch_size": ("--batch-size",),
    "gradient_accumulation_steps": ("--grad-accum",),
    "max_length": ("--max-length",),
    "lora_r": ("--lora-r",),
    "confidence_loss": ("--confidence-loss",),
    "report_to": ("--report-to",),
}
TRAIN_HELP = {
    "max_steps": "Stop after N optimizer steps (overrides epochs).",
    "loss_type": "Any loss type the installed TRL accepts; repeat to combine.",
    "lora_r": "Train LoRA adapters of this rank (needs peft).",
    "confidence_loss": "How each pair's judge confidence p enters the loss: off (hard labels), cdpo "
    "(label smoothing 1 - p per pair) or weight (each pair's term scaled by 2p - 1).",
    "report_to": REPORT_TO_HELP,
}


class SftSettings(Settings):
    """`cai sft`: SFT on an SL round's snapshot (its final revisions). `sft` is complete (a config
    file and the flags are merged into it before a stage or job sees it)."""

    snapshot: Path | None = option(
        None, "--snapshot", help="SFT snapshot directory (default: the round's latest export)."
    )
    output: Path | None = option(
        None, "--output", help="Checkpoints and final model (default: runs/round-ID)."
    )
    sft: SftConfig = Field(default_factory=SftConfig)


SFT_FLAGS: dict[str, tuple[str, ...]] = {
    # SftConfig field -> `cai sft` flag(s). Unset flags leave the config file's value.
    "max_steps": ("--max-steps",),
    "num_train_epochs": ("--epochs",),
    "learning_rate": ("--lr",),
    "per_device_train_batch_size": ("--batch-size",),
    "gradient_accumulation_steps": ("--grad-accum",),
    "max_length": ("--max-length",),
    "completion_only_loss": ("--completion-only-loss/--full-loss",),
    "lora_r": ("--lora-r",),
    "report_to": ("--report-to",),
}
SFT_HELP = {
    "max_steps": "Stop after N optimizer steps (overrides epochs).",
    "completion_only_loss": "Loss on the final revision only (the default), or on the whole conversation.",
    "lora_r": "Train LoRA adapters of this rank (needs peft).",
    "report_to": REPORT_TO_HELP,
}


class LoopSettings(Settings):
    """`cai loop` (and `cai demo`): every stage's settings for each round of the chain."""

    generate: GenerateSettings = Field(default_factory=GenerateSettings)
    judge: JudgeSettings = Field(default_factory=JudgeSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    revise: ReviseSettings = Field(default_factory=ReviseSettings)
    sft_export: ExportSettings = Field(default_factory=lambda: ExportSettings(kind="sft"))
    sft: SftSettings = Field(default_factory=SftSettings)
    sl_first: bool = option(
        False,
        "--sl-first",
        help="Begin the chain with a supervised (SL-CAI) round: critique-revision chains, then SFT on "
        "the revisions; the RL rounds start from that model. Needs a first round not started yet.",
    )
    artifacts: Path = option(Path("."), "--artifacts", help="Where snapshots/round-ID and runs/round-ID go.")

    @field_validator("sft_export")
    @classmethod
    def _sft_kind(cls, value: ExportSettings) -> ExportSettings:
        if value.kind != "sft":
            raise ValueError("`sft_export` must be of kind sft")
        return value

    @classmethod
    def compose(
        cls,
        generate: GenerateSettings,
        judge: JudgeSettings,
        *,
        eval_samples: int = 1,
        eval_limit: int | None = None,
        export: ExportSettings | None = None,
        train: TrainSettings | None = None,
        artifacts: Path = Path("."),
        revise: ReviseSettings | None = None,
        sft: SftSettings | None = None,
        sl_first: bool = False,
    ) -> LoopSettings:
        """The eval samples and judges as the round does: its sampling and judge settings are
        taken from `generate` and `judge`; so are an SL round's first answers and revisions
        (sampling, and the prompt limit unless `revise` sets one), with `revise`'s own options."""
        shared = generate.model_dump(include=set(SamplingSettings.model_fields)) | judge.model_dump(
            include=set(JudgeEndpoint.model_fields) | set(JudgeScope.model_fields)
        )
        return cls(
            generate=generate,
            judge=judge,
            export=export or ExportSettings(),
            train=train or TrainSettings(),
            eval=EvalSettings(**shared, samples=eval_samples, limit=eval_limit),
            revise=ReviseSettings(
                **(revise or ReviseSettings()).model_dump(
                    exclude=set(SamplingSettings.model_fields) | {"limit"}
                ),
                **generate.model_dump(include=set(SamplingSettings.model_fields)),
                limit=revise.limit if revise and revise.limit else generate.limit,
            ),
            sft=sft or SftSettings(),
            sl_first=sl_first,
            artifacts=artifacts,
        )


class LoopJob(Settings):
    """A loop job: the chain's length and where it starts, with the loop's settings."""

    rounds: int = Field(ge=1)
    loop: LoopSettings = Field(default_factory=LoopSettings)


STAGE_SETTINGS: dict[str, type[Settings]] = {
    "generate": GenerateSettings,
    "judge": JudgeSettings,
    "export": ExportSettings,
    "train": TrainSettings,
    "eval": EvalSettings,
    "calibrate": CalibrateSettings,
    "loop": LoopJob,
    "revise": ReviseSettings,
    "sft": SftSettings,
}
"""Job kind -> the settings class its JSON must validate against."""
