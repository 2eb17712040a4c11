"""Labels -> a snapshot directory TRL loads as is: `data/train-*.parquet`, `data/eval-*.parquet`
(conversational `prompt` / `chosen` / `rejected` plus provenance), a dataset card `README.md`
(cai.dataset_card) and `manifest.json`, written last. Deterministic: the same labels and
filters give byte-identical files."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai.dataset_card import CARD, DEFAULT_LICENSE, render_card
from cai.errors import BadInput
from cai.store.snapshots import LabelledPair, PrincipleVerdict, RoundProvenance

MANIFEST = "manifest.json"
FORMAT = "cai-snapshot/1"
STALE_AFTER_S = 24 * 3600
"""A work directory untouched this long is a dead export's, whoever made it: exports take minutes."""
# `.<out name>.tmp-<host>-<pid>-<8 hex>` (being built) or `.old-` (a replaced snapshot being removed).
# Host and pid say whose it is; without them (written before they were added) only age can tell.
_ACTIVE: set[Path] = set()  # this process's work directories in use (its pid alone may be reused)
_WORK_DIR = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?:(?P<host>.+)-(?P<pid>\d+)-)?[0-9a-f]{8}$")


@dataclass(frozen=True)
class ExportFilters:
    min_confidence: float | None = None
    principle: str | None = None
    eval_fraction: float = 0.1
    seed: int = 0
    length_balance: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "min_confidence": self.min_confidence,
            "principle": self.principle,
            "eval_fraction": self.eval_fraction,
            "seed": self.seed,
            "length_balance": self.length_balance,
            "ties": "excluded",
            "revision_pairs": "kept only when the revision is preferred",
            "identical_texts": "excluded",
            "duplicates": "one pair per prompt and pair of texts, in either order",
        }


def select_pairs(
    pairs: list[LabelledPair], filters: ExportFilters
) -> tuple[list[LabelledPair], dict[str, int]]:
    """The pairs a DPO snapshot can use, and why the others were dropped. A pair whose chosen and
    rejected texts are the same teaches nothing; pairs with the same prompt and the same two texts
    (in either order, e.g. identical samples paired twice) are one example, exported once."""
    dropped = {
        "ties": 0,
        "identical_texts": 0,
        "low_confidence": 0,
        "other_principle": 0,
        "revision_not_preferred": 0,
        "duplicates": 0,
        "length_balance": 0,
    }
    usable = []
    for pair in pairs:
        if pair.verdict == "tie":
            dropped["ties"] += 1
        elif pair.chosen == pair.rejected:
            dropped["identical_texts"] += 1
        elif pair.kind == "revision" and pair.verdict != "B":
            dropped["revision_not_preferred"] += 1  # B is the revision: keep it only when it won
        elif filters.principle is not None and filters.principle not in principles_of(pair):
            dropped["other_principle"] += 1
        elif (
            filters.min_confidence is not None
            and pair.source != "human"
            and (pair.confidence if pair.confidence is not None else 1.0) < filters.min_confidence
        ):
            dropped["low_confidence"] += 1
        else:
            usable.append(pair)
    # After the filters, so a duplicate they drop never hides one they keep.
    best: dict[tuple[Any, ...], LabelledPair] = {}
    for pair in usable:
        key = _content_key(pair)
        if key not in best or _precedence(pair) < _precedence(best[key]):
            best[key] = pair
    kept = [pair for pair in usable if best[_content_key(pair)] is pair]
    dropped["duplicates"] = len(usable) - len(kept)
    if filters.length_balance:
        balanced = length_balanced(kept, filters.seed)
        dropped["length_balance"] = len(kept) - len(balanced)
        kept = balanced
    return kept, dropped


def principles_of(pair: LabelledPair) -> set[str | None]:
    """The judged principles a pair was labelled under: one, or an ensemble's K."""
    return {pair.principle} | {v.principle for v in pair.verdicts}


def length_balanced(pairs: list[LabelledPair], seed: int) -> list[LabelledPair]:
    """As many pairs whose chosen response is longer (in words) as pairs where it is shorter: the
    larger side is cut down to the smaller by a seeded hash of the pair id, so the same labels
    give the same snapshot. Pairs of equal length stay."""
    longer = [p for p in pairs if p.lengths[0] > p.lengths[1]]
    shorter = [p for p in pairs if p.lengths[0] < p.lengths[1]]
    larger, smaller = (longer, shorter) if len(longer) > len(shorter) else (shorter, longer)

    def draw(pair: LabelledPair) -> bytes:
        return hashlib.sha256(f"{seed}:length-balance:{pair.pair_id}".encode()).digest()

    cut = {p.pair_id for p in sorted(larger, key=draw)[len(smaller) :]}
    return [p for p in pairs if p.pair_id not in cut]


def _content_key(pair: LabelledPair) -> tuple[Any, ...]:
    """What a snapshot row says, orientation aside: the prompt's messages and the two texts."""
    prompt = tuple((m["role"], m["content"]) for m in pair.prompt)
    return prompt, tuple(sorted((pair.chosen, pair.rejected)))


def _precedence(pair: LabelledPair) -> tuple[int, int]:
    """Which of several pairs with the same content is exported: a human's label, then one that
    rule principles decided, then the judge's; among equals the lowest pair id (deterministic,
    and one orientation only)."""
    return {"human": 0, "rule": 1}.get(pair.source, 2), pair.pair_id


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
    license_id: str = DEFAULT_LICENSE,
) -> dict[str, Any]:
    """Write the snapshot into `out` (built beside it, then renamed into place), with its dataset
    card under `license_id`, and return its manifest. An existing identical snapshot is left as
    it is."""
    kept, dropped = select_pairs(pairs, filters)
    if not kept:
        raise BadInput(
            f"round {provenance.round_id}: no labelled pairs pass the filters "
            f"({', '.join(f'{k} {v}' for k, v in dropped.items() if v) or 'no labels yet: run cai judge'})"
        )
    splits = {"train": [p for p in kept if not in_eval(p.prompt_sha256, filters)]}
    splits["eval"] = [p for p in kept if in_eval(p.prompt_sha256, filters)]
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
    }
    writers = {split: functools.partial(_write_parquet, rows=rows) for split, rows in splits.items() if rows}
    card = functools.partial(render_card, "dpo", manifest, provenance, license_id=license_id)
    return publish_snapshot(out, writers, manifest, overwrite, card)


def publish_snapshot(
    out: Path,
    writers: Mapping[str, Callable[[Path], None]],
    manifest: dict[str, Any],
    overwrite: bool,
    card: Callable[[Mapping[str, str], str], str] | None = None,
) -> dict[str, Any]:
    """Build a snapshot beside `out` and rename it into place: each split's parquet file (only
    non-empty splits have a writer: datasets cannot read a 0-row file), the dataset card (`card`
    renders it from split -> file and the data's digest), then `manifest` with every file's hash,
    the card's too,
    written last. An identical snapshot already at `out` is left as it is. Returns the manifest
    as read back."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_work_dirs(out.parent)
    with _work_dir(out, "tmp") as tmp:
        (tmp / "data").mkdir(parents=True)
        files = {}
        data_files = {}
        for split, write in writers.items():
            name = f"data/{split}-00000-of-00001.parquet"
            write(tmp / name)
            files[name] = hashlib.sha256((tmp / name).read_bytes()).hexdigest()
            data_files[split] = name
        if card is not None:
            text = card(
                data_files, hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
            ).encode()
            (tmp / CARD).write_bytes(text)
            files[CARD] = hashlib.sha256(text).hexdigest()
        # Written last: a directory without a manifest is not a snapshot.
        (tmp / MANIFEST).write_text(json.dumps(manifest | {"files": files}, indent=2, sort_keys=True) + "\n")
        _move_into_place(tmp, out, overwrite)
    return load_manifest(out)


def manifest_sha256(snapshot: Path) -> str:
    return hashlib.sha256((snapshot / MANIFEST).read_bytes()).hexdigest()


def load_manifest(snapshot: Path, expected_format: str | None = None) -> dict[str, Any]:
    """The manifest of a complete, unaltered snapshot (of `expected_format`, when given: a
    preference snapshot FORMAT or an SFT one); BadInput for anything else."""
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
    found = manifest.get("format", FORMAT)
    if expected_format is not None and found != expected_format:
        raise BadInput(
            f"{snapshot}: a {found} snapshot, where {expected_format} is needed "
            "(cai export --kind dpo makes one for cai train, --kind sft one for cai sft)"
        )
    return dict(manifest)


def _write_parquet(path: Path, rows: list[LabelledPair]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    # Each judged principle's verdict per order, in the row's own terms: which of chosen and
    # rejected it preferred, and its probability that the chosen one is better.
    verdict = pa.struct(
        [
            ("principle", pa.string()),
            ("order", pa.string()),
            ("preferred", pa.string()),
            ("p_chosen", pa.float64()),
        ]
    )
    schema = pa.schema(
        [
            ("prompt", pa.list_(message)),
            ("chosen", pa.list_(message)),
            ("rejected", pa.list_(message)),
            ("pair_id", pa.int64()),
            ("principle", pa.string()),
            ("principle_verdicts", pa.list_(verdict)),
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
                "principle_verdicts": [_in_row_terms(v, p.verdict) for v in p.verdicts],
                "confidence": p.confidence,
                "label_source": p.source,
                "pair_kind": p.kind,
            }
            for p in ordered
        ],
        schema=schema,
    )
    pq.write_table(table, path)


def _in_row_terms(verdict: PrincipleVerdict, label: str) -> dict[str, Any]:
    """A verdict about A and B, told as chosen and rejected (the label says which A was)."""
    chosen = label  # 'A' or 'B': ties are never exported
    preferred = "tie" if verdict.verdict == "tie" else ("chosen" if verdict.verdict == chosen else "rejected")
    p_chosen = None if verdict.prob_a is None else (verdict.prob_a if chosen == "A" else 1 - verdict.prob_a)
    return {
        "principle": verdict.principle,
        "order": verdict.order,
        "preferred": preferred,
        "p_chosen": p_chosen,
    }


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    if out.exists():
        if (out / MANIFEST).is_file() and (out / MANIFEST).read_bytes() == (tmp / MANIFEST).read_bytes():
            return  # the same snapshot, already there
        if any(out.iterdir()) and not overwrite:
            raise BadInput(
                f"{out} exists and holds something else; choose another directory, or overwrite it"
            )
        with _work_dir(out, "old") as old:
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)  # keep what was there rather than nothing
                raise
        return
    os.rename(tmp, out)


@contextlib.contextmanager
def _work_dir(out: Path, kind: str) -> Iterator[Path]:
    """A path beside `out` for a directory this export builds or retires, removed on the way out.
    Its name says which host and process own it, for remove_stale_work_dirs after a kill."""
    path = out.parent / f".{out.name}.{kind}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    _ACTIVE.add(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        _ACTIVE.discard(path)


def remove_stale_work_dirs(parent: Path, stale_after_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the work directories that killed exports left in `parent` (the `.NAME.tmp-...` a
    snapshot is built in, the `.NAME.old-...` a replaced one is moved to before removal); returns
    them. Only names this module makes are considered, and one is removed only when its process
    is gone (made on this host, pid no longer running) or nothing in it changed for
    `stale_after_s`: a live export's directory is never touched."""
    removed = []
    for entry in parent.iterdir() if parent.is_dir() else ():
        match = _WORK_DIR.match(entry.name)
        if match is None or not entry.is_dir() or entry.is_symlink():
            continue
        host, pid = match.group("host"), match.group("pid")
        ours_and_dead = host == _host() and pid is not None and not _in_use(entry, int(pid))
        if ours_and_dead or time.time() - _newest_mtime(entry) > stale_after_s:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _host() -> str:
    """This machine, as work directory names carry it: several machines may share a directory
    (workers on a shared volume), and a pid means something only on its own host."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"  # no '-': it ends the host


def _in_use(directory: Path, pid: int) -> bool:
    """Whether process `pid` of this host may still be using `directory`."""
    if pid == os.getpid():
        # A process restarted with the same pid (common in containers) is not the one that made it.
        return directory in _ACTIVE
    if pid <= 0:
        return True  # not a pid we wrote: leave it to the age bound
    try:
        os.kill(pid, 0)  # signal 0: an existence check, nothing is sent
    except ProcessLookupError:
        return False
    except OSError:
        return True  # e.g. EPERM: it exists, under another user
    return True


def _newest_mtime(directory: Path) -> float:
    newest = 0.0
    for root, dirs, files in os.walk(directory):
        for path in [root, *(os.path.join(root, name) for name in dirs + files)]:
            with contextlib.suppress(OSError):  # removed while we looked
                newest = max(newest, os.lstat(path).st_mtime)
    return newest


def _count(pairs: list[LabelledPair], field: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for pair in pairs:
        key = str(getattr(pair, field))
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))
