"""The round report: PNG plots (matplotlib, drawn off-screen) and one HTML page that links them.
`render_plots` gives the PNG bytes without touching the disk, so the web dashboard can serve the
same plots; `write_report` is what `cai report` adds on top. matplotlib is imported inside the
functions that draw, so importing this module stays cheap."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cai.errors import BadInput
from cai.store.reporting import ReportData, RoundReport

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

TEMPLATES = Path(__file__).resolve().parent / "report_templates"
PLOTS: dict[str, tuple[str, str]] = {
    # file name: (title, what the page says when the plot has nothing to show)
    "win_rate.png": ("Win rate against the previous policy", "No evaluation yet."),
    "training.png": ("DPO reward accuracy and margin during training", "No training yet."),
    "principles.png": ("Flip rate and tie rate per principle", "No judge labels yet."),
    "response_length.png": ("Mean response length by round", "No samples yet."),
    "rule_pass_rates.png": ("Rule pass rates by round", "No rule checks yet."),
}
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def render_plots(data: ReportData) -> dict[str, bytes]:
    """PNG bytes per plot file name (keys of PLOTS); a plot with no data is left out."""
    drawers: dict[str, Callable[[ReportData], Figure | None]] = {
        "win_rate.png": _win_rate,
        "training.png": _training,
        "principles.png": _principles,
        "response_length.png": _response_length,
        "rule_pass_rates.png": _rule_pass_rates,
    }
    plots = {}
    for name, draw in drawers.items():
        figure = draw(data)
        if figure is not None:
            plots[name] = _png(figure)
    return plots


def render_html(data: ReportData, plots: list[str]) -> str:
    """The report page; `plots` are the PNG file names present next to it."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    # Autoescape everything: responses, policy and principle names are user-controlled text.
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["pct"] = lambda v: "—" if v is None else f"{v:.1%}"
    env.filters["num"] = lambda v, digits=1: "—" if v is None else f"{v:.{digits}f}"
    return env.get_template("report.html").render(
        data=data,
        shown=data.shown,
        plots=[(name, *PLOTS[name], name in plots) for name in PLOTS],
        notes={r.id: round_notes(r) for r in data.shown},
        span=_span(data),
        generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )


def write_report(data: ReportData, out_dir: Path) -> list[Path]:
    """Write index.html and the plots into `out_dir`; returns the files written."""
    if out_dir.exists() and not out_dir.is_dir():
        raise BadInput(f"{out_dir} exists and is not a directory")
    plots = render_plots(data)
    page = render_html(data, list(plots))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in PLOTS:
        path = out_dir / name
        if name in plots:
            path.write_bytes(plots[name])
            written.append(path)
        else:
            path.unlink(missing_ok=True)  # a plot from an earlier report would now be stale
    index = out_dir / "index.html"
    index.write_text(page, encoding="utf-8")
    return [index, *written]


def round_notes(r: RoundReport) -> list[str]:
    """What a round is still missing, in the order the loop produces it."""
    notes = []
    if r.samples == 0:
        notes.append("No samples yet.")
    if r.labeled == 0:
        notes.append("No judge labels yet.")
    if r.training is None:
        notes.append("No training yet.")
    else:
        if r.training.status != "done":
            notes.append(f"Training run {r.training.run_id} is {r.training.status}, not done.")
        if not r.training.accuracy and not r.training.margin:
            notes.append("Training logged no reward accuracy or margin.")
    if r.evaluation is None:
        notes.append("No evaluation yet.")
    elif r.evaluation.prompts == 0:
        notes.append("The evaluation covers no prompts.")
    return notes


def _span(data: ReportData) -> str:
    ids = [r.id for r in data.shown]
    if not ids:
        return "no rounds"
    return f"round {ids[0]}" if len(ids) == 1 else f"rounds {ids[0]} to {ids[-1]}"


# --- plots -------------------------------------------------------------------------------------


def _figure(rows: int = 1, height: float = 3.2) -> Figure:
    from matplotlib.figure import Figure

    # A bare Figure (no pyplot): no global state and no GUI backend, safe inside a web server.
    return Figure(figsize=(7.5, height * rows), dpi=100, layout="constrained")


def _png(figure: Figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _plain(text: str) -> str:
    """Text shown literally: matplotlib would read `$...$` as math."""
    return text.replace("$", r"\$")


def _rounds_axis(ax: Axes, rounds: list[RoundReport]) -> list[int]:
    positions = list(range(len(rounds)))
    ax.set_xticks(positions, [f"round {r.id}" for r in rounds])
    ax.set_xlim(-0.6, len(rounds) - 0.4)
    return positions


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def _win_rate(data: ReportData) -> Figure | None:
    rounds = data.rounds
    evals = [r.evaluation if r.evaluation and r.evaluation.prompts else None for r in rounds]
    if not any(evals):
        return None
    figure = _figure()
    ax = figure.subplots()
    x = _rounds_axis(ax, rounds)
    bottom = [0.0] * len(rounds)
    parts = (
        ("win_rate", "wins", "#2ca02c"),
        ("tie_rate", "ties", "#bbbbbb"),
        ("loss_rate", "losses", "#d62728"),
    )
    for part, label, color in parts:
        heights = [_nan(getattr(e, part)) if e else math.nan for e in evals]
        ax.bar(x, heights, 0.6, bottom=bottom, color=color, label=label)
        bottom = [b + (0 if math.isnan(h) else h) for b, h in zip(bottom, heights, strict=True)]
    for position, e in zip(x, evals, strict=True):
        if e and e.win_rate is not None:
            ax.text(position, e.win_rate / 2, f"{e.win_rate:.1%}", ha="center", va="center", color="white")
    ax.axhline(0.5, color="black", linewidth=0.8, linestyle="--")
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of eval prompts")
    ax.set_title("Candidate vs previous policy")
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1))
    return figure


def _training(data: ReportData) -> Figure | None:
    curves = [
        (r.id, r.training) for r in data.rounds if r.training and (r.training.accuracy or r.training.margin)
    ]
    if not curves:
        return None
    from matplotlib.ticker import MaxNLocator

    figure = _figure(rows=2, height=2.8)
    accuracy_ax, margin_ax = figure.subplots(2, 1, sharex=True)
    for i, (round_id, curve) in enumerate(curves):
        color = COLORS[i % len(COLORS)]
        for ax, points in ((accuracy_ax, curve.accuracy), (margin_ax, curve.margin)):
            if points:
                ax.plot(*zip(*points, strict=True), color=color, marker=".", label=f"round {round_id}")
    accuracy_ax.set_ylabel("reward accuracy")
    accuracy_ax.set_ylim(0, 1.05)
    margin_ax.set_ylabel("reward margin")
    margin_ax.set_xlabel("training step")
    margin_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    accuracy_ax.legend(loc="upper left", bbox_to_anchor=(1, 1))
    return figure


def _principles(data: ReportData) -> Figure | None:
    stats = [s for s in data.principle_totals if s.labeled]
    if not stats:
        return None
    figure = _figure(height=max(2.4, 0.45 * len(stats) + 1.2))
    ax = figure.subplots()
    y = list(range(len(stats)))
    ax.barh([i - 0.2 for i in y], [_nan(s.flip_rate) for s in stats], 0.4, color="#d62728", label="flip rate")
    ax.barh([i + 0.2 for i in y], [_nan(s.tie_rate) for s in stats], 0.4, color="#bbbbbb", label="tie rate")
    ax.set_yticks(y, [_plain(f"{s.principle} (n={s.labeled})") for s in stats])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of labelled pairs")
    ax.set_title(_span(data))
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1))
    return figure


def _response_length(data: ReportData) -> Figure | None:
    rounds = data.rounds
    samples = [_nan(r.mean_words) for r in rounds]
    evals = [_nan(r.evaluation.candidate.mean_words if r.evaluation else None) for r in rounds]
    if all(math.isnan(v) for v in samples + evals):
        return None
    figure = _figure()
    ax = figure.subplots()
    x = _rounds_axis(ax, rounds)
    ax.plot(x, samples, marker="o", label="round samples (its policy)")
    ax.plot(x, evals, marker="s", linestyle="--", label="eval candidate (trained policy)")
    ax.set_ylabel("mean words")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1))
    return figure


def _rule_pass_rates(data: ReportData) -> Figure | None:
    rounds = data.rounds
    keys = sorted(
        {k for r in rounds for k in r.sample_rule_pass_rate}
        | {k for r in rounds if r.evaluation for k in r.evaluation.candidate.rule_pass_rate}
    )
    if not keys:
        return None
    figure = _figure(height=3.6)
    ax = figure.subplots()
    x = _rounds_axis(ax, rounds)
    for i, key in enumerate(keys):
        style: dict[str, Any] = {"color": COLORS[i % len(COLORS)]}
        samples = [_nan(r.sample_rule_pass_rate.get(key)) for r in rounds]
        evals = [
            _nan(r.evaluation.candidate.rule_pass_rate.get(key) if r.evaluation else None) for r in rounds
        ]
        if not all(math.isnan(v) for v in samples):
            ax.plot(x, samples, marker="o", label=_plain(f"{key} · samples"), **style)
        if not all(math.isnan(v) for v in evals):
            ax.plot(x, evals, marker="s", linestyle="--", label=_plain(f"{key} · eval"), **style)
    every = [_nan(r.evaluation.candidate.all_rules_pass_rate if r.evaluation else None) for r in rounds]
    if not all(math.isnan(v) for v in every):
        ax.plot(x, every, color="black", marker="s", linestyle="--", label="all rules · eval")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of responses passing")
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1), fontsize="small")
    return figure
