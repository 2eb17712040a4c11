"""`--estimate` on `cai generate` and `cai judge`: what the run would send and cost, printed
without sending a request or writing to the database (cai.estimate)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from cai.cli.app import out, print_json

if TYPE_CHECKING:
    from cai.estimate import Estimate

ESTIMATE_OPTION = typer.Option(
    False,
    "--estimate",
    help="Print the requests, input tokens, expected output tokens and cost of this run, and stop: "
    "nothing is sent and nothing is written.",
)


def print_estimate(round_id: int, estimate: Estimate, as_json: bool) -> None:
    if as_json:
        print_json({"round": round_id, "estimate": estimate.as_dict()})
        return
    from rich.box import SIMPLE
    from rich.table import Table

    cost = "unknown" if estimate.cost_usd is None else f"${estimate.cost_usd:.4f}"
    price = (
        estimate.prices.describe()
        if estimate.prices
        else f"no price known for {estimate.model!r}: give --price-in/--price-out"
    )
    table = Table(f"estimate: round {round_id}, {estimate.stage}, {estimate.model}", "", "", box=SIMPLE)
    table.add_row("requests", f"{estimate.requests:,}", "")
    table.add_row("input tokens", f"{estimate.input_tokens:,}", estimate.tokenizer)
    table.add_row("output tokens (expected)", f"{estimate.output_tokens:,}", estimate.output_source)
    table.add_row("cost", cost, price)
    if estimate.budget_usd is not None:
        table.add_row("budget", f"${estimate.budget_usd:g}", "")
    out.print(table)
    for note in estimate.notes:
        out.print(f"note: {note}", highlight=False)
    out.print("nothing was sent and nothing was written", highlight=False)
