"""`cai audit`: look over the judge's shoulder. Browse pairs and rationales, override a label
(export then uses the human's), record agreement, and measure the judge per principle."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from cai.cli.app import JSON_OPTION, err, new_app, out, print_json, transaction

if TYPE_CHECKING:
    from rich.table import Table
    from rich.text import Text

    from cai.store.audit import PairDetail, PairSummary

app = new_app(
    "Audit the judge: browse pairs and rationales, override labels, review a sample, see agreement."
)

ROUND_FILTER = typer.Option(None, "--round", "-r", metavar="ID", help="Only this round.")
AUTHOR_OPTION = typer.Option(None, "--author", help="Who is deciding (default: your login name).")
MAX_AUTHOR = 200  # audits.author is VARCHAR(200)


@app.command("list")
def list_(
    ctx: typer.Context,
    round_id: int = ROUND_FILTER,
    principle: str = typer.Option(None, "--principle", help="Only pairs judged under this principle id."),
    inconsistent: bool = typer.Option(
        False, "--inconsistent", help="Only pairs whose two presentation orders disagreed."
    ),
    ties: bool = typer.Option(False, "--ties", help="Only pairs whose effective verdict is a tie."),
    failed: bool = typer.Option(False, "--failed", help="Only pairs with a failed judgment."),
    max_confidence: float = typer.Option(
        None, "--max-confidence", min=0.0, max=1.0, metavar="X", help="Only judge labels at most this sure."
    ),
    search: str = typer.Option(
        None, "--search", help="Case-insensitive text in the prompt, either response or a rationale."
    ),
    kind: str = typer.Option(None, "--kind", help="sample, revision or eval (default: all but eval)."),
    limit: int = typer.Option(50, "--limit", min=0, metavar="N", help="Show at most N pairs (0: all)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Browse pairs with their verdicts, confidence, principles and flags.

    The verdict is the effective one, what export uses: a human override beats the judge
    (the judge's own verdict is shown beside it). Pairs come in id order; filters combine
    (all must hold); evaluation pairs are left out unless --kind eval."""
    from dataclasses import asdict

    from rich.text import Text

    from cai.errors import BadInput
    from cai.store import repo
    from cai.store.audit import PAIR_KINDS, PairFilters, list_pairs, principle_keys

    if kind is not None and kind not in PAIR_KINDS:
        raise BadInput(f"--kind: expected one of {', '.join(PAIR_KINDS)}, got {kind!r}")
    filters = PairFilters(round_id, kind, principle, inconsistent, ties, failed, max_confidence, search)
    with transaction(ctx) as session:
        if round_id is not None:
            repo.get_round(session, round_id)
        if principle is not None and principle not in (known := principle_keys(session, round_id)):
            raise BadInput(f"--principle: no principle {principle!r}; known: {', '.join(sorted(known))}")
        pairs, total = list_pairs(session, filters, limit or None)
    if as_json:
        print_json({"total": total, "pairs": [asdict(p) for p in pairs]})
        return
    table = _table("pair", "round", "verdict", "judge", "conf", "principle", "flags", "prompt")
    for p in pairs:
        table.add_row(
            str(p.pair_id),
            str(p.round_id) + ("" if p.kind == "sample" else f" ({p.kind})"),
            _verdict(p),
            p.judge_verdict or "-",
            _num(p.confidence),
            Text(", ".join(p.principles)),
            ", ".join(p.flags),
            _line(p.prompt),
        )
    out.print(table)
    err.print(f"{len(pairs)} of {total} matching pairs", style="dim", highlight=False)


@app.command()
def show(
    ctx: typer.Context,
    pair_id: int = typer.Argument(..., metavar="PAIR_ID", show_default=False),
    raw: bool = typer.Option(False, "--raw", help="Also print each judgment's raw model output."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Everything about one pair, judge rationales included.

    Prompt, both responses, every judgment (principle, order, verdict, confidence, rationale,
    latency, tokens, status and error), the labels made of them, and any human overrides and
    reviews with author, note and time."""
    from dataclasses import asdict

    from cai.store.audit import pair_detail

    with transaction(ctx) as session:
        detail = pair_detail(session, pair_id)
    if as_json:
        data = asdict(detail)
        if not raw:
            for judgment in data["judgments"]:
                del judgment["raw_output"]
        print_json(data)
        return
    _print_detail(detail, raw)


@app.command()
def override(
    ctx: typer.Context,
    pair_id: int = typer.Argument(..., metavar="PAIR_ID", show_default=False),
    prefer: str = typer.Option(
        ..., "--prefer", metavar="A|B|tie", help="The response you prefer, or tie.", show_default=False
    ),
    note: str = typer.Option(
        ..., "--note", help="Why (kept with the override for whoever reads it next).", show_default=False
    ),
    author: str = AUTHOR_OPTION,
) -> None:
    """Replace the judge's label of a pair with your own.

    The next `cai export` uses your label instead of the judge's; the judge's judgments and
    label stay as they were, so the disagreement shows up in `cai audit stats`. The newest
    override of a pair wins."""
    from cai.errors import BadInput
    from cai.store.audit import add_override

    verdict = {"a": "A", "b": "B", "tie": "tie"}.get(prefer.strip().lower())
    problems = [] if verdict else [f"--prefer: expected A, B or tie, got {prefer!r}"]
    problems += _text_problems(note, author)
    if problems or verdict is None:
        raise BadInput(problems[0], problems)
    name = _author(author)
    with transaction(ctx) as session:
        audit = add_override(session, pair_id, verdict, name, note.strip())
    out.print(f"pair {pair_id}: {verdict} (override {audit.id} by {name})", highlight=False, markup=False)


@app.command()
def review(
    ctx: typer.Context,
    pair_id: int = typer.Argument(..., metavar="PAIR_ID", show_default=False),
    note: str = typer.Option("", "--note", help="Optional remark."),
    author: str = AUTHOR_OPTION,
) -> None:
    """Record that you checked a pair and agree with its judge label.

    Nothing changes for export, but the pair now counts toward judge-human agreement and
    kappa in `cai audit stats`, and `cai audit sample` no longer queues it."""
    from cai.errors import BadInput
    from cai.store.audit import add_review

    problems = _text_problems(None, author)
    if problems:
        raise BadInput(problems[0], problems)
    name = _author(author)
    with transaction(ctx) as session:
        audit = add_review(session, pair_id, name, note.strip())
    out.print(
        f"pair {pair_id}: agreed with {audit.verdict} (review {audit.id} by {name})",
        highlight=False,
        markup=False,
    )


@app.command()
def stats(ctx: typer.Context, round_id: int = ROUND_FILTER, as_json: bool = JSON_OPTION) -> None:
    """How the judge does, per principle and overall.

    Pairs, labeled, ties, flip rate (labels whose two presentation orders disagreed, over
    labeled), failed judgments, mean confidence, how often the judge chose the longer response
    (over its decisive labels on pairs of unequal length: 50% is no length bias), and agreement
    with humans plus Cohen's kappa over the pairs someone overrode or reviewed. Then each judge's injection-follow rate from
    its latest `cai judge calibrate` on the round's constitution, and agreement between humans
    (Krippendorff's alpha over the pairs two or more people labeled: see `cai audit queue`).
    Evaluation pairs are left out."""
    from dataclasses import asdict

    from cai.audit import ALL
    from cai.store.audit_stats import audit_stats

    with transaction(ctx) as session:
        found = audit_stats(session, round_id)
    rows, judges, humans = [*found.principles, found.overall], found.judges, found.humans
    if as_json:
        print_json(
            {
                "round": round_id,
                "principles": [asdict(r) for r in found.principles],
                "overall": asdict(found.overall),
                "judges": [asdict(j) for j in judges],
                "humans": asdict(humans),
            }
        )
        return
    table = _table(
        "principle",
        "pairs",
        "labeled",
        "ties",
        "flips",
        "failed",
        "conf",
        "longer",
        "checked",
        "agree",
        "kappa",
    )
    for i, r in enumerate(rows):
        table.add_row(
            f"[bold]{r.principle}[/bold]" if r.principle == ALL else r.principle,
            str(r.pairs),
            str(r.labeled),
            str(r.ties),
            _pct(r.flip_rate),
            str(r.failed),
            _num(r.mean_confidence),
            _pct(r.longer_won),
            str(r.human_checked),
            _pct(r.agreement),
            _num(r.kappa),
            end_section=i == len(rows) - 2,  # a rule above the overall row
        )
    out.print(table)
    for j in judges:
        if j.calibrated_at is None:
            line = "not calibrated on this constitution: run `cai judge calibrate`"
        else:
            line = f"injection-follow rate {_pct(j.injection_follow_rate)}, gold accuracy {_pct(j.accuracy)}"
            line += f" (calibrated {j.calibrated_at:%Y-%m-%d %H:%M})"
        out.print(f"judge {j.judge} on {j.constitution}: {line}", highlight=False, markup=False)
    if humans.items:
        out.print(
            f"humans: Krippendorff's alpha {_num(humans.alpha)} over {humans.items} pairs labeled by "
            f"two or more of {humans.raters} people",
            highlight=False,
        )


@app.command()
def sample(
    ctx: typer.Context,
    round_id: int = typer.Option(..., "--round", "-r", metavar="ID", show_default=False),
    n: int = typer.Option(50, "--n", min=1, help="How many pairs to queue."),
    seed: int = typer.Option(0, "--seed", help="Seed of the draws within each stratum."),
    as_json: bool = JSON_OPTION,
) -> None:
    """A stratified review queue for a round.

    First inconsistent pairs, then the least confident labels (a third of --n each at most),
    then pairs spread over the principles. No duplicates; pairs already overridden or reviewed
    are skipped; the same --seed gives the same queue. Work through it with `cai audit show`,
    then `cai audit review` or `cai audit override`."""
    from rich.text import Text

    from cai.audit import review_queue
    from cai.store import repo
    from cai.store.audit import review_candidates

    with transaction(ctx) as session:
        repo.get_round(session, round_id)
        candidates = review_candidates(session, round_id)
    picks = review_queue(candidates, n, seed)
    by_id = {p.pair_id: p for p in candidates}
    if as_json:
        print_json(
            [
                {
                    "pair_id": k.pair_id,
                    "reason": k.reason,
                    "principle": k.principle,
                    **_brief(by_id[k.pair_id]),
                }
                for k in picks
            ]
        )
        return
    table = _table("#", "pair", "why", "principle", "verdict", "conf", "prompt")
    for rank, pick in enumerate(picks, 1):
        p = by_id[pick.pair_id]
        table.add_row(
            str(rank),
            str(p.pair_id),
            pick.reason,
            Text(pick.principle or "-"),
            p.judge_verdict or "-",
            _num(p.confidence),
            _line(p.prompt),
        )
    out.print(table)
    err.print(
        f"{len(picks)} of {len(candidates)} unreviewed labeled pairs queued", style="dim", highlight=False
    )


@app.command()
def queue(
    ctx: typer.Context,
    round_id: int = typer.Option(..., "--round", "-r", metavar="ID", show_default=False),
    annotators: list[str] = typer.Option(
        ...,
        "--annotator",
        "-a",
        help="An annotator's name, as their token carries it (repeatable).",
        show_default=False,
    ),
    per_annotator: int = typer.Option(20, "--per-annotator", min=1, help="Pairs in each queue."),
    overlap: float = typer.Option(
        0.2, "--overlap", min=0.0, max=1.0, help="Share of each queue every annotator gets (for agreement)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the stratified draw."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Give each annotator a review queue on a round, drawn by the stratified sampler of `cai audit
    sample`, the first --overlap share of it the same pairs for everyone: `cai audit stats` then
    reports Krippendorff's alpha between them. Annotators work through their queue in the web UI
    (My queue) or the API; a queue given again replaces the pairs not done yet."""
    import getpass

    from cai.store import annotators as queues
    from cai.store import repo

    with transaction(ctx) as session:
        repo.get_round(session, round_id)
        assigned = queues.assign_queues(
            session, round_id, annotators, per_annotator, overlap, seed, f"cli:{getpass.getuser()}"
        )
    if as_json:
        print_json({"round": round_id, "queues": assigned})
        return
    for name, pair_ids in assigned.items():
        out.print(
            f"{name}: {len(pair_ids)} pairs: {' '.join(map(str, pair_ids))}", highlight=False, markup=False
        )


# --- helpers -----------------------------------------------------------------------------------


def _table(*columns: str) -> Table:
    """Numbers and flags never wrap; only the principle and prompt columns give up width on a
    narrow terminal (a prompt preview is cut with an ellipsis, see _line)."""
    from rich.box import SIMPLE_HEAD
    from rich.table import Table

    table = Table(box=SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0))
    for name in columns:
        table.add_column(
            name, no_wrap=name not in ("principle", "prompt"), min_width=18 if name == "principle" else None
        )
    return table


def _line(text: str) -> Text:
    from rich.text import Text

    return Text(_preview(text), no_wrap=True, overflow="ellipsis")


def _author(author: str | None) -> str:
    if author is not None:
        return author.strip()
    import getpass

    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name in some containers
        return "unknown"


def _text_problems(note: str | None, author: str | None) -> list[str]:
    problems = []
    if note is not None and not note.strip():
        problems.append("--note: must not be empty; say why you disagree with the judge")
    if author is not None and not author.strip():
        problems.append("--author: must not be empty")
    elif author is not None and len(author.strip()) > MAX_AUTHOR:
        problems.append(f"--author: at most {MAX_AUTHOR} characters")
    return problems


def _brief(p: PairSummary) -> dict[str, Any]:
    return {"verdict": p.judge_verdict, "confidence": p.confidence, "prompt": p.prompt, "flags": p.flags}


def _verdict(p: PairSummary) -> str:
    if p.verdict is None:
        return "[dim]unlabeled[/dim]"
    return f"[bold]{p.verdict}[/bold] (human)" if p.source == "human" else p.verdict


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _preview(text: str, width: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _print_detail(d: PairDetail, raw: bool) -> None:
    from rich.box import SIMPLE_HEAD
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    s = d.summary
    head = f"[bold]pair {s.pair_id}[/bold]  round {s.round_id}  kind {s.kind}  verdict {_verdict(s)}"
    if s.source == "human":
        head += f"  (judge: {s.judge_verdict or '-'})"
    out.print(head + (f"  [yellow]{', '.join(s.flags)}[/yellow]" if s.flags else ""), highlight=False)
    # User-controlled text goes through Text(): a response containing [red] must print as typed.
    for message in d.prompt:
        out.print(Panel(Text(str(message.get("content", ""))), title=f"prompt: {message.get('role')}"))
    out.print(Panel(Text(d.response_a), title=f"response A (#{d.response_a_id})"))
    out.print(Panel(Text(d.response_b), title=f"response B (#{d.response_b_id})"))
    table = Table(
        "#",
        "principle",
        "judge",
        "order",
        "status",
        "verdict",
        "conf",
        "latency",
        "tokens",
        title="judgments",
        box=SIMPLE_HEAD,
    )
    for j in d.judgments:
        tokens = "-" if j.prompt_tokens is None else f"{j.prompt_tokens}+{j.completion_tokens or 0}"
        table.add_row(
            str(j.id),
            Text(j.principle),
            Text(j.judge),
            j.order,
            j.status if j.status != "failed" else f"[red]failed[/red] ({j.error_kind or '?'})",
            j.verdict or "-",
            _num(j.confidence),
            "-" if j.latency_ms is None else f"{j.latency_ms:.0f} ms",
            tokens,
        )
    out.print(table)
    for j in d.judgments:
        out.print(f"[bold]#{j.id}[/bold] {j.order} ", end="", highlight=False)
        out.print(Text(f"{j.principle}: "), end="")
        out.print(Text(j.rationale or j.error or "(no rationale)"))
        if raw:
            out.print(Panel(Text(j.raw_output or "(none)"), title=f"raw output #{j.id}"))
    for label in d.labels:
        judge = label.judge or "human"
        extra = "  inconsistent" if label.inconsistent else ""
        out.print(
            f"label {label.id}: {label.verdict} from {judge}, confidence {_num(label.confidence)}{extra}, "
            f"{label.created_at:%Y-%m-%d %H:%M}",
            highlight=False,
            markup=False,
        )
    for a in d.audits:
        out.print(
            f"{a.action} {a.id} by {a.author} at {a.created_at:%Y-%m-%d %H:%M}: {a.verdict or '-'}"
            + (f" — {a.note}" if a.note else ""),
            highlight=False,
            markup=False,
        )
