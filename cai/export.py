"""Labels -> a snapshot directory TRL loads as is: `data/train-*.parquet`, `data/eval-*.parquet`
(conversational `prompt` / `chosen` / `rejected` plus provenance) and `manifest.json`, written
last. Deterministic: the same labels and filters give byte-identical files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai.errors import BadInput
from cai.store.snapshots import LabelledPair, RoundProvenance

MANIFEST = "manifest.json"
FORMAT = "cai-snapshot/1"


@dataclass(frozen=True)
class ExportFilters:
    min_confidence: float | None = None
    principle: str | None = None
    eval_fraction: float = 0.1
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "min_confidence": self.min_confidence,
            "principle": self.principle,
            "eval_fraction": self.eval_fraction,
            "seed": self.seed,
            "ties": "excluded",
            "revision_pairs": "kept only when the revision is preferred",
        }


def select_pairs(
    pairs: list[LabelledPair], filters: ExportFilters
) -> tuple[list[LabelledPair], dict[str, int]]:
    """The pairs a DPO snapshot can use, and why the others were dropped."""
    dropped = {"ties": 0, "low_confidence": 0, "other_principle": 0, "revision_not_preferred": 0}
    kept = []
    for pair in pairs:
        if pair.verdict == "tie":
            dropped["ties"] += 1
        elif pair.kind == "revision" and pair.verdict != "B":
            dropped["revision_not_preferred"] += 1  # B is the revision: keep it only when it won
        elif filters.principle is not None and pair.principle != filters.principle:
            dropped["other_principle"] += 1
        elif (
            filters.min_confidence is not None
            and pair.source != "human"
            and (pair.confidence if pair.confidence is not None else 1.0) < filters.min_confidence
        ):
            dropped["low_confidence"] += 1
        else:
            kept.append(pair)
    return kept, dropped


def in_eval(prompt_sha256: str, filters: ExportFilters) -> bool:
    """Split by prompt, by hash: stable however many labels there are, and seeded."""
    digest = hashlib.sha256(f"{filters.seed}:{prompt_sha256}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < filters.eval_fraction


def write_snapshot(
    out: Path,
    pairs: list[LabelledPair],
    provenance: RoundProvenance,
    filters: ExportFilters,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the snapshot into `out` (built beside it, then renamed into place) and return its
    manifest. An existing identical snapshot is left as it is."""
    kept, dropped = select_pairs(pairs, filters)
    if not kept:
        raise BadInput(
            f"round {provenance.round_id}: no labelled pairs pass the filters "
            f"({', '.join(f'{k} {v}' for k, v in dropped.items() if v) or 'no labels yet: run cai judge'})"
        )
    splits = {"train": [p for p in kept if not in_eval(p.prompt_sha256, filters)]}
    splits["eval"] = [p for p in kept if in_eval(p.prompt_sha256, filters)]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    (tmp / "data").mkdir(parents=True)
    try:
        files = {}
        for split, rows in splits.items():
            if not rows:
                continue  # datasets cannot read a 0-row parquet file: an empty split has no file
            name = f"data/{split}-00000-of-00001.parquet"
            _write_parquet(tmp / name, rows)
            files[name] = hashlib.sha256((tmp / name).read_bytes()).hexdigest()
        manifest = {
            "format": FORMAT,
            "round": provenance.round_id,
            "constitution": provenance.constitution,
            "policy": provenance.policy,
            "judges": provenance.judges,
            "filters": filters.as_dict(),
            "counts": {
                "train": len(splits["train"]),
                "eval": len(splits["eval"]),
                "dropped": dropped,
                "by_source": _count(kept, "source"),
            },
            "files": files,
        }
        # Written last: a directory without a manifest is not a snapshot.
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _move_into_place(tmp, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_manifest(out)


def manifest_sha256(snapshot: Path) -> str:
    return hashlib.sha256((snapshot / MANIFEST).read_bytes()).hexdigest()


def load_manifest(snapshot: Path) -> dict[str, Any]:
    """The manifest of a complete, unaltered snapshot; BadInput for anything else."""
    path = Path(snapshot) / MANIFEST
    if not path.is_file():
        raise BadInput(f"{snapshot}: not a snapshot (no {MANIFEST}): an interrupted export leaves none")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BadInput(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    for name, digest in manifest.get("files", {}).items():
        file = Path(snapshot) / name
        if not file.is_file() or hashlib.sha256(file.read_bytes()).hexdigest() != digest:
            raise BadInput(f"{file}: missing or changed since the snapshot was written (sha256 mismatch)")
    return dict(manifest)


def _write_parquet(path: Path, rows: list[LabelledPair]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    schema = pa.schema(
        [
            ("prompt", pa.list_(message)),
            ("chosen", pa.list_(message)),
            ("rejected", pa.list_(message)),
            ("pair_id", pa.int64()),
            ("principle", pa.string()),
            ("confidence", pa.float64()),
            ("label_source", pa.string()),
            ("pair_kind", pa.string()),
        ]
    )
    ordered = sorted(rows, key=lambda p: p.pair_id)
    table = pa.Table.from_pylist(
        [
            {
                "prompt": [{"role": m["role"], "content": m["content"]} for m in p.prompt],
                "chosen": [{"role": "assistant", "content": p.chosen}],
                "rejected": [{"role": "assistant", "content": p.rejected}],
                "pair_id": p.pair_id,
                "principle": p.principle,
                "confidence": p.confidence,
                "label_source": p.source,
                "pair_kind": p.kind,
            }
            for p in ordered
        ],
        schema=schema,
    )
    pq.write_table(table, path)


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    if out.exists():
        if (out / MANIFEST).is_file() and (out / MANIFEST).read_bytes() == (tmp / MANIFEST).read_bytes():
            return  # the same snapshot, already there
        if any(out.iterdir()) and not overwrite:
            raise BadInput(
                f"{out} exists and holds something else; choose another directory, or overwrite it"
            )
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return
    os.rename(tmp, out)


def _count(pairs: list[LabelledPair], field: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for pair in pairs:
        key = str(getattr(pair, field))
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))
