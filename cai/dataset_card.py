"""The dataset card (`README.md`) every snapshot carries: a YAML header that the Hub and
`datasets` read (configs naming each split's files, task, license, tags, size) and a Markdown
body saying where the data came from (the constitution and its principles, the judges and their
calibration, label sources, counts, the round and the policy's lineage). Deterministic, with no
timestamps: the same manifest and provenance give the same bytes."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from cai.store.snapshots import RoundProvenance

CARD = "README.md"
DEFAULT_LICENSE = "unknown"  # also imported by settings: this module stays light
"""cai cannot know the terms: responses fall under the policy model's license, prompts under their
source's. `cai export --license` states them."""
LICENSE_ID = re.compile(r"[a-z0-9][a-z0-9.+-]{0,63}")
"""The shape of a Hub license identifier (apache-2.0, cc-by-4.0, other): the Hub's own list grows,
so it is not copied here."""
TEMPLATES = Path(__file__).resolve().parent / "report_templates"
TAGS = {
    "dpo": ["cai", "constitutional-ai", "rlaif", "dpo", "preference", "trl", "synthetic"],
    "sft": ["cai", "constitutional-ai", "sft", "critique-revision", "trl", "synthetic"],
}
# The Hub's size buckets, by total rows.
SIZES = (
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
)
# Characters that start inline Markdown or HTML (emphasis, code, links, autolinks, entities,
# strikethrough, math) or end a table cell: escaped, so any text renders as itself.
_INLINE = re.compile(r"([\\`*_\[\]<>|&~$])")
_BLOCK_START = re.compile(r"^([#+\-=>]|\d+[.)](?=\s|$))")  # heading, list, quote, rule, setext


def size_category(rows: int) -> str:
    for bound, name in SIZES:
        if rows < bound:
            return name
    return "n>1B"


def md(value: object) -> str:
    """`value` as literal Markdown on one line: whitespace collapsed, markup escaped, and a
    leading block marker (heading, list, quote) escaped too."""
    text = _INLINE.sub(r"\\\1", " ".join(str(value).split()))
    return _BLOCK_START.sub(r"\\\1", text)


def code(value: object) -> str:
    """`value` as an inline code span on one line: fenced by more backticks than it holds in a
    row, with `|` escaped (a table cell would end there, even inside code)."""
    text = " ".join(str(value).split()).replace("|", "\\|")
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def card_header(
    kind: str,
    data_files: Mapping[str, str],
    data_sha256: str,
    rows: int,
    license_id: str,
    pretty_name: str,
) -> dict[str, Any]:
    """The card's YAML metadata. `configs` names each split's file, so `load_dataset(DIR)` and the
    Hub's viewer give exactly the splits the snapshot has (train, and eval when it is not empty).
    The config's description carries `data_sha256`, a digest of the data files: `datasets` keys
    its cache for a folder with `configs` on the config alone (not on the folder or its files), so
    without it a snapshot would load the cached rows of another one of the same directory name,
    or of what an --overwrite replaced."""
    return {
        "pretty_name": pretty_name,
        "license": license_id,
        "task_categories": ["text-generation"],
        "tags": TAGS[kind],
        "size_categories": [size_category(rows)],
        "configs": [
            {
                "config_name": "default",
                "description": f"cai snapshot, data sha256 {data_sha256}",
                "data_files": [{"split": split, "path": path} for split, path in data_files.items()],
            }
        ],
    }


def render_card(
    kind: str,
    manifest: Mapping[str, Any],
    provenance: RoundProvenance,
    data_files: Mapping[str, str],
    data_sha256: str,
    license_id: str = DEFAULT_LICENSE,
) -> str:
    """The README.md of a `kind` ('dpo' or 'sft') snapshot, from its manifest (before the file
    hashes are added) and the round's provenance. `data_files`: split -> file in the snapshot;
    `data_sha256`: a digest of those files (see card_header)."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    counts = manifest["counts"]
    constitution = provenance.constitution
    ref = f"{constitution.get('name', '?')}@{constitution.get('version', '?')}"
    pretty_name = (
        f"cai round {provenance.round_id}: {'preference pairs' if kind == 'dpo' else 'revisions'} ({ref})"
    )
    rows = counts["train"] + counts["eval"]
    header = card_header(kind, data_files, data_sha256, rows, license_id, pretty_name)
    # safe_dump quotes and escapes whatever a name holds: text can never end the header early.
    front_matter = yaml.safe_dump(header, sort_keys=False, allow_unicode=True, width=100)
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=False,  # Markdown, not HTML: every user-controlled value goes through md or code
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["md"] = md
    env.filters["code"] = code
    env.filters["num"] = lambda v, fmt=".3f": "—" if v is None else format(v, fmt)
    body = env.get_template("dataset_card.md.j2").render(
        kind=kind,
        title=pretty_name,
        ref=ref,
        constitution=constitution,
        description=provenance.description,
        principles=provenance.principles,
        judges=_judges(provenance),
        revisers=manifest.get("revisers", []),
        round_id=provenance.round_id,
        round_kind=provenance.kind,
        lineage=provenance.lineage or [_bare_policy(provenance.policy)],
        splits=list(data_files),
        counts=counts,
        filters=[(name, json.dumps(value)) for name, value in manifest.get("filters", {}).items()],
        license_id=license_id,
    )
    return f"---\n{front_matter}---\n\n{body}"


def _judges(provenance: RoundProvenance) -> list[dict[str, Any]]:
    """Each judge with its details (parameters, template hash, latest calibration) merged in."""
    details = provenance.judge_details or [{} for _ in provenance.judges]
    return [
        {
            **judge,
            "params": json.dumps(detail.get("params", {}), sort_keys=True),
            "template_sha256": detail.get("template_sha256"),
            "calibration": detail.get("calibration"),
        }
        for judge, detail in zip(provenance.judges, details, strict=True)
    ]


def _bare_policy(policy: Mapping[str, Any]) -> dict[str, Any]:
    """The round's policy when no lineage was gathered (a provenance built by hand)."""
    return {
        "name": policy.get("name", "?"),
        "model_ref": policy.get("model_ref", "?"),
        "snapshot_sha256": None,
        "trained_by": None,
    }
