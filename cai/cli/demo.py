"""`cai demo`: the whole loop offline on a CPU, with the embedded SmolLM2-135M-Instruct as policy
and judge, a fresh SQLite database, the shipped constitution and prompt set. The judge runs
in-process, or behind llama.cpp's OpenAI-compatible server started for the demo."""

from __future__ import annotations

import contextlib
import enum
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from cai.cli.app import RichProgress, err, out, quiet_libraries, settings
from cai.cli.flags import Flags, with_settings
from cai.stages.settings import JudgeEndpoint

if TYPE_CHECKING:
    from cai.store.progress import RoundSummary
    from cai.workspace import Workspace

DEMO_CONSTITUTION = ("constitutions", "concise-safe/v2.yaml")
DEMO_PROMPTS = ("prompt_sets", "helpful-harmless.jsonl")


class JudgeServer(enum.StrEnum):
    """Where the demo's embedded judge runs."""

    IN_PROCESS = "in-process"
    LLAMA_CPP = "llama.cpp"


@with_settings(endpoint=Flags(JudgeEndpoint, only=("judge_base_url", "judge_model")))
def demo(
    ctx: typer.Context,
    directory: Path = typer.Option(
        Path("cai-demo"), "--dir", help="Where the demo keeps its database, snapshots and models."
    ),
    rounds: int = typer.Option(1, "--rounds", min=1, help="Rounds of generate -> judge -> train -> eval."),
    prompts: int = typer.Option(72, "--prompts", min=4, help="Train prompts per round."),
    samples: int = typer.Option(3, "--samples", min=2, help="Answers per train prompt."),
    eval_prompts: int = typer.Option(32, "--eval-prompts", min=2, help="Held-out prompts for the eval."),
    max_new_tokens: int = typer.Option(96, "--max-new-tokens", min=16, help="Answer length limit."),
    judge_pairs: int = typer.Option(
        6,
        "--judge-pairs",
        min=0,
        help="Pairs the LLM judge is asked about per round and per eval (the in-process judge "
        "takes seconds a call on a CPU); rules decide the rest where they can.",
    ),
    # Measured: 3 epochs at 5e-5 took 66.8 -> 15.0 words but collapsed into short nonsense (the
    # rules reward brevity, and a 135M judge cannot object); one epoch moves it less, and sanely.
    epochs: float = typer.Option(1.0, "--epochs", min=0.1, help="DPO epochs over the round's pairs."),
    learning_rate: float = typer.Option(5e-4, "--lr", min=0.0, help="DPO learning rate (of LoRA adapters)."),
    sl: bool = typer.Option(
        False,
        "--sl",
        help="Run the supervised stage first (SL-CAI): the policy critiques and revises its own answers "
        "to --sl-prompts prompts, is fine-tuned on the revisions, and the RL round starts from that "
        "model. Prints what the revisions changed. Adds about 4 minutes.",
    ),
    sl_prompts: int = typer.Option(
        24, "--sl-prompts", min=2, help="Prompts the SL stage revises (with --sl)."
    ),
    judge_server: JudgeServer = typer.Option(
        JudgeServer.IN_PROCESS,
        "--judge-server",
        help="Where the embedded judge runs: 'in-process' (transformers, in this process) or "
        "'llama.cpp' (llama.cpp's OpenAI-compatible server on the embedded GGUF, started on a free "
        "loopback port for the demo and stopped after it; needs pip install "
        "'llama-cpp-python\\[server]'). Not with --judge-base-url.",  # \[: not rich markup
        case_sensitive=False,
    ),
    *,
    endpoint: JudgeEndpoint,
) -> None:
    """Run the loop end to end, offline: register the shipped concise-safe@2 constitution and
    prompt set in a fresh SQLite database under --dir, start a round with the embedded
    SmolLM2-135M-Instruct, then generate, judge (rules in code, the embedded model for the
    judged principles), export, train LoRA adapters with DPO, and compare the trained policy with
    its parent on held-out prompts. About 8 minutes on 2 CPU cores, each stage's time shown at the
    end. Rerun it to resume. With --sl, the supervised stage of Constitutional AI runs first. With
    --judge-server llama.cpp the same embedded model judges from behind llama.cpp's server."""
    from cai.backends import llamacpp_server
    from cai.cli.loop import print_summaries
    from cai.errors import BadInput
    from cai.resources import data_dir
    from cai.sft import SftConfig
    from cai.stages.loop import run_loop
    from cai.stages.settings import (
        GenerateSettings,
        JudgeSettings,
        LoopSettings,
        ReviseSettings,
        SftSettings,
        TrainSettings,
    )
    from cai.store import progress, repo
    from cai.train import TrainConfig
    from cai.workspace import Workspace

    # Checked before anything is written: bad input changes nothing.
    on_llama_cpp = judge_server is JudgeServer.LLAMA_CPP
    if on_llama_cpp and endpoint.judge_base_url:
        raise BadInput(
            "--judge-server llama.cpp starts its own judge endpoint; drop --judge-base-url "
            "(or keep it and drop --judge-server)"
        )
    if on_llama_cpp and (reason := llamacpp_server.unavailable_reason()) is not None:
        raise BadInput(f"--judge-server llama.cpp: {reason}")

    directory.mkdir(parents=True, exist_ok=True)
    database = directory.resolve() / "cai.db"
    ws = Workspace(settings(ctx).model_copy(update={"database_url": f"sqlite:///{database}"}))
    ctx.find_root().obj = ws
    constitution_file = data_dir(DEMO_CONSTITUTION[0]) / DEMO_CONSTITUTION[1]
    prompt_file = data_dir(DEMO_PROMPTS[0]) / DEMO_PROMPTS[1]
    err.print(f"demo database: {database}", highlight=False)

    from cai.constitution import load_constitution
    from cai.promptsets import read_prompt_file
    from cai.registry import EMBEDDED_MODEL, embedded_gguf, resolve_model

    with ws.session() as session:
        record, _ = repo.register_constitution(session, load_constitution(constitution_file))
        repo.import_prompts(session, read_prompt_file(prompt_file), source=prompt_file.name)
        first = progress.latest_first_round(session)
        if first is None:
            model = resolve_model(EMBEDDED_MODEL)
            policy = repo.ensure_policy(session, model.name, model.location)
            config = {"split": "train", "tag": None, "seed": 0, "policy_kind": model.kind, "demo": True}
            first = repo.create_round(session, record, policy, config).id
        elif repo.get_round(session, first).constitution != record.ref:
            raise BadInput(f"--dir: {directory} holds another project's rounds; choose a fresh --dir")
    with contextlib.ExitStack() as stack:
        judge_base_url, judge_model = endpoint.judge_base_url, endpoint.judge_model
        if on_llama_cpp:
            err.print("starting llama.cpp's server on the embedded GGUF for the judge", highlight=False)
            # Served under the embedded model's name, so the stored judge says which model it is.
            judge_base_url = stack.enter_context(
                llamacpp_server.llama_cpp_server(embedded_gguf(), model_alias=EMBEDDED_MODEL)
            )
            judge_model = EMBEDDED_MODEL
        loop_settings = LoopSettings.compose(
            GenerateSettings(samples=samples, limit=prompts, max_new_tokens=max_new_tokens),
            JudgeSettings(
                judge_base_url=judge_base_url,
                judge_model=judge_model,
                timeout=600.0,
                concurrency=1,
                # The in-process judge bounds the rationale alone and appends the verdict itself;
                # a server writes the whole JSON object, which must fit, or it is unparseable.
                max_tokens=128 if on_llama_cpp else 48,
                rules_first=True,
                # A capable remote judge sees every pair the rules leave; the embedded model,
                # wherever it runs, takes seconds a call on these CPUs.
                max_judge_pairs=None if endpoint.judge_base_url else judge_pairs,
            ),
            eval_limit=eval_prompts,
            train=TrainSettings(
                # LoRA adapters (merged after training): no gradients or optimizer state for
                # the 135M base weights, and the reference is the base with adapters off, so a
                # step costs far less on a CPU than full fine-tuning (bench/train.py).
                dpo=TrainConfig(
                    num_train_epochs=epochs,
                    learning_rate=learning_rate,
                    per_device_train_batch_size=4,
                    save_steps=10,
                    lora_r=16,
                    lora_alpha=32,
                )
            ),
            artifacts=directory,
            # One critique-revision pass per prompt, then LoRA SFT on the revisions (--sl).
            revise=ReviseSettings(revisions=1, critique_max_tokens=64, limit=sl_prompts),
            sft=SftSettings(
                sft=SftConfig(
                    learning_rate=2e-4,
                    per_device_train_batch_size=4,
                    save_steps=10,
                    lora_r=16,
                    lora_alpha=32,
                )
            ),
            sl_first=sl,
        )
        quiet_libraries()
        with RichProgress() as bars:
            summaries = run_loop(ws, rounds, first, loop_settings, bars)
    print_summaries(summaries, as_json=False)
    for summary in summaries:
        if summary.kind == "sl":
            _explain_sl(ws, summary.round_id)
    _explain(summaries, directory, database, endpoint.judge_base_url is None)


def _explain_sl(ws: Workspace, round_id: int) -> None:
    """What the SL round's revisions changed, against the answers they revised, and one example."""
    from cai.chains import revision_effect
    from cai.store import chains, repo

    with ws.session() as session:
        round_ = repo.get_round(session, round_id)
        name, version = round_.constitution.split("@")
        constitution = repo.get_constitution(session, name, int(version)).constitution
        revised = [c for c in chains.round_chains(session, round_id) if c.steps]
    if not revised:
        return
    effect = revision_effect(constitution, [c.first_answer for c in revised], [c.final for c in revised])
    before, after = effect["before"], effect["after"]

    def rate(value: float | None) -> str:
        return "-" if value is None else f"{value:.0%}"

    example = min(revised, key=lambda c: len(c.first_answer) + len(c.final))
    out.print(
        f"\nSL round {round_id}: {len(revised)} answers revised. Mean length {before['mean_words']:.1f} -> "
        f"{after['mean_words']:.1f} words; all rules pass {rate(before['all_rules_pass_rate'])} -> "
        f"{rate(after['all_rules_pass_rate'])}. The SFT model trained on the revisions is what the RL "
        "round sampled from. A 135M model critiquing itself changes little (the paper's critiqued "
        "itself at 52B); with a capable reviser (cai revise --reviser-model) the revisions carry the "
        "constitution.",
        highlight=False,
        soft_wrap=True,
    )
    out.print(
        f"One chain (principle {example.steps[-1].principle}):\n"
        f"  prompt:   {_clip(example.conversation[-1]['content'])}\n"
        f"  before:   {_clip(example.first_answer)}\n"
        f"  critique: {_clip(example.steps[-1].critique)}\n"
        f"  after:    {_clip(example.final)}",
        highlight=False,
        soft_wrap=True,
        markup=False,
    )


def _clip(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _explain(summaries: list[RoundSummary], directory: Path, database: Path, embedded_judge: bool) -> None:
    last = summaries[-1]
    sources = last.label_sources
    out.print(
        f"\nLabels: {sources.get('rule', 0)} pairs were decided by the constitution's rules (checked in "
        f"code), {sources.get('judge', 0)} by the LLM judge"
        + (f", {sources['human']} by humans" if sources.get("human") else "")
        + f". The LLM judge saw {last.judge_asked} pairs; its order flip rate there was "
        + ("n/a" if last.flip_rate is None else f"{last.flip_rate:.0%}")
        + ".",
        highlight=False,
        soft_wrap=True,
    )
    if embedded_judge:
        out.print(
            "The judge here is the embedded 135M model: near chance on content, so the signal comes "
            "from the rules. A capable judge is one flag away: --judge-base-url URL --judge-model NAME "
            "(vLLM, llama.cpp, Ollama or OpenAI).",
            highlight=False,
            soft_wrap=True,
        )
    commands = [
        (f"cai audit list --round {last.round_id}", "the judge's verdicts and rationales"),
        ("cai audit stats", "flip rate and agreement per principle"),
        (f"cai report --out {directory / 'report'}", "plots of the rounds as HTML"),
        ("cai web", "browse pairs and override labels in a browser"),
    ]
    width = max(len(command) for command, _ in commands) + 2
    out.print(
        "\nWhere to look next (cai is in .venv/bin):\n"
        f"  export CAI_DATABASE_URL=sqlite:///{database}\n"
        + "\n".join(f"  {command:<{width}}{what}" for command, what in commands),
        highlight=False,
        soft_wrap=True,
    )
