"""Revision chains -> an SFT snapshot that TRL's SFTTrainer (and `trl sft --dataset_name DIR`)
loads as is: `data/train-*.parquet` and `data/eval-*.parquet` with a conversational `messages`
column (the prompt's turns, then the chain's final revision as the assistant's answer) plus
provenance, a dataset card and `manifest.json` written last, as for preference snapshots (cai.export)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai.dataset_card import DEFAULT_LICENSE, render_card
from cai.errors import BadInput
from cai.export import ExportFilters, in_eval, publish_snapshot
from cai.store.chains import Chain
from cai.store.snapshots import RoundProvenance

SFT_FORMAT = "cai-sft-snapshot/1"


@dataclass(frozen=True)
class SftFilters:
    min_chain_length: int = 1
    """Chains with fewer revision steps done are left out (a chain ends early at an unusable revision)."""
    principle: str | None = None
    """Only chains with a step under this principle."""
    eval_fraction: float = 0.1
    seed: int = 0
    judge_agrees: bool = False
    """Only chains whose final revision the judge (or a human) preferred to the first answer."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "min_chain_length": self.min_chain_length,
            "principle": self.principle,
            "judge_agrees": self.judge_agrees,
            "eval_fraction": self.eval_fraction,
            "seed": self.seed,
            "answer": "the chain's final revision",
        }


def select_chains(
    chains: list[Chain], filters: SftFilters, verdicts: Mapping[tuple[int, int], str]
) -> tuple[list[Chain], dict[str, int]]:
    """The chains the snapshot keeps, and how many were dropped for each reason. `verdicts`:
    the label of each judged (first answer, final revision) pair, 'B' when the revision won."""
    dropped = {"short_chain": 0, "other_principle": 0, "unjudged": 0, "judge_disagrees": 0}
    kept = []
    for chain in chains:
        verdict = verdicts.get((chain.first_answer_id, chain.final_id))
        if len(chain.steps) < max(1, filters.min_chain_length):
            dropped["short_chain"] += 1
        elif filters.principle is not None and filters.principle not in {s.principle for s in chain.steps}:
            dropped["other_principle"] += 1
        elif filters.judge_agrees and verdict is None:
            dropped["unjudged"] += 1
        elif filters.judge_agrees and verdict != "B":
            dropped["judge_disagrees"] += 1
        else:
            kept.append(chain)
    return kept, dropped


def write_sft_snapshot(
    out: Path,
    chains: list[Chain],
    provenance: RoundProvenance,
    filters: SftFilters,
    revisers: list[dict[str, str | None]],
    verdicts: Mapping[tuple[int, int], str],
    overwrite: bool = False,
    license_id: str = DEFAULT_LICENSE,
) -> dict[str, Any]:
    """Write the SFT snapshot into `out`, with its dataset card under `license_id`, and return its
    manifest; the train/eval split is by prompt hash, as for preference snapshots. An identical
    snapshot there is left as it is."""
    if filters.judge_agrees and not verdicts:
        raise BadInput(
            f"judge_agrees: no chain of round {provenance.round_id} is judged yet: "
            f"run cai judge --round {provenance.round_id} first"
        )
    kept, dropped = select_chains(chains, filters, verdicts)
    if not kept:
        reasons = ", ".join(f"{k} {v}" for k, v in dropped.items() if v) or "no chains yet: run cai revise"
        raise BadInput(f"round {provenance.round_id}: no revision chain passes the filters ({reasons})")
    split_by = ExportFilters(eval_fraction=filters.eval_fraction, seed=filters.seed)
    splits = {
        "train": [c for c in kept if not in_eval(c.prompt_sha256, split_by)],
        "eval": [c for c in kept if in_eval(c.prompt_sha256, split_by)],
    }
    lengths: dict[str, int] = {}
    for chain in kept:
        lengths[str(len(chain.steps))] = lengths.get(str(len(chain.steps)), 0) + 1
    manifest = {
        "format": SFT_FORMAT,
        "round": provenance.round_id,
        "constitution": provenance.constitution,
        "policy": provenance.policy,
        "revisers": revisers,
        "filters": filters.as_dict(),
        "counts": {
            "train": len(splits["train"]),
            "eval": len(splits["eval"]),
            "dropped": dropped,
            "by_chain_length": dict(sorted(lengths.items())),
        },
    }
    writers = {split: functools.partial(_write_parquet, rows=rows) for split, rows in splits.items() if rows}
    card = functools.partial(render_card, "sft", manifest, provenance, license_id=license_id)
    return publish_snapshot(out, writers, manifest, overwrite, card)


def _write_parquet(path: Path, rows: list[Chain]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    step = pa.struct([("principle", pa.string()), ("critique", pa.string()), ("revision", pa.string())])
    schema = pa.schema(
        [
            ("messages", pa.list_(message)),
            ("prompt_id", pa.int64()),
            ("first_answer", pa.string()),
            ("chain_length", pa.int64()),
            ("chain", pa.list_(step)),
        ]
    )
    table = pa.Table.from_pylist(
        [
            {
                "messages": [
                    *({"role": m["role"], "content": m["content"]} for m in chain.conversation),
                    {"role": "assistant", "content": chain.final},
                ],
                "prompt_id": chain.prompt_id,
                "first_answer": chain.first_answer,
                "chain_length": len(chain.steps),
                "chain": [
                    {"principle": s.principle, "critique": s.critique, "revision": s.revision}
                    for s in chain.steps
                ],
            }
            for chain in sorted(rows, key=lambda c: c.prompt_id)
        ],
        schema=schema,
    )
    pq.write_table(table, path)
