"""USD prices per million tokens: given by hand (flags, environment), else the default from the
price table of `genai-prices` (bundled with the package: no network), and what a run spends
against its budget. Only models served over an API are looked up in the table: a model that
runs in-process costs compute, not a per-token price."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

PRICE_TABLE = "genai-prices"
PROBE_TOKENS = 1000
"""Tokens priced to read a per-token price off the table: few enough to stay below the long-
context tiers some models have, many enough that the table's decimals survive."""


@dataclass(frozen=True)
class Prices:
    input_per_mtok: float
    output_per_mtok: float
    source: str
    """Where the prices come from, for the user: the flags, or the table's provider and model."""

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        return cost_usd(prompt_tokens, completion_tokens, self.input_per_mtok, self.output_per_mtok)

    def describe(self) -> str:
        return (
            f"${self.input_per_mtok:g} in, ${self.output_per_mtok:g} out per million tokens ({self.source})"
        )


def cost_usd(
    prompt_tokens: float, completion_tokens: float, input_per_mtok: float, output_per_mtok: float
) -> float:
    return (prompt_tokens * input_per_mtok + completion_tokens * output_per_mtok) / 1e6


@functools.cache
def table_prices(model: str, base_url: str | None = None) -> Prices | None:
    """The price table's prices for `model`, or None when it does not know the model. The
    provider is the one whose API `base_url` is, when it is one the table knows (a self-hosted
    server is not), else the one whose models match the name."""
    import genai_prices

    def priced(**provider: str) -> Prices:
        given_in = genai_prices.Usage(input_tokens=PROBE_TOKENS, output_tokens=0)
        given_out = genai_prices.Usage(input_tokens=0, output_tokens=PROBE_TOKENS)
        reading_in = genai_prices.calc_price(given_in, model, **provider)  # type: ignore[call-overload]
        reading_out = genai_prices.calc_price(given_out, model, **provider)  # type: ignore[call-overload]
        per_mtok = 1e6 / PROBE_TOKENS
        return Prices(
            float(reading_in.input_price) * per_mtok,
            float(reading_out.output_price) * per_mtok,
            f"{PRICE_TABLE} {genai_prices.__version__}: {reading_in.provider.id} {reading_in.model.id}",
        )

    for provider in ({"provider_api_url": base_url}, {}) if base_url else ({},):
        try:
            return priced(**provider)
        except LookupError:
            continue
    return None


def resolve_prices(
    price_in: float | None, price_out: float | None, model: str, base_url: str | None, served: bool
) -> Prices | None:
    """The prices a run is costed at: each one given overrides its side; the other side comes
    from the table when `served` (the model is asked over an API) and the table knows the model,
    else it is 0 (as it always was for a price left out). None when nothing is known."""
    table = table_prices(model, base_url) if served else None
    if price_in is None and price_out is None:
        return table
    both = price_in is not None and price_out is not None
    source = "--price-in/--price-out" if both or table is None else f"given, the rest from {table.source}"
    return Prices(
        price_in if price_in is not None else (table.input_per_mtok if table else 0.0),
        price_out if price_out is not None else (table.output_per_mtok if table else 0.0),
        source,
    )


def needs_prices_message(model: str, served: bool, flag: Callable[[str], str] = str) -> str:
    """Why a budget cannot be used, naming the fields through `flag` (a settings error names them
    as `field`, which the CLI turns into its flags)."""
    why = (
        f"the price table ({PRICE_TABLE}) has no price for {model!r}"
        if served
        else f"{model!r} runs in-process, where no price table applies"
    )
    return (
        f"{flag('budget')} needs prices: {why}; give {flag('price_in')}/{flag('price_out')} "
        "(USD per million tokens)"
    )


@dataclass
class Spending:
    """What one run has spent, against its budget; `exhausted` once the budget is reached."""

    prices: Prices
    budget_usd: float | None = None
    spent_usd: float = 0.0

    def add(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.spent_usd += self.prices.cost(prompt_tokens, completion_tokens)

    @property
    def exhausted(self) -> bool:
        return self.budget_usd is not None and self.spent_usd >= self.budget_usd

    def affordable(self, cost_each: float, most: int) -> int:
        """How many more items of `cost_each` fit in what is left (at least 1, at most `most`),
        so that a run stops near its budget rather than a whole batch past it."""
        if self.budget_usd is None or cost_each <= 0:
            return most
        return max(1, min(most, int((self.budget_usd - self.spent_usd) / cost_each)))
