"""The price table and the billing arithmetic, without I/O.

Credits are kept as integers of :data:`NANO` per credit ("nanocredits") everywhere they are
stored or added up, so a key's balance is exactly its grants minus the sum of its requests'
costs, however many requests there were: no floating-point drift. Prices come from
``[prices.MODEL]`` in credits per million tokens and are read exactly as written (``0.125`` is
1/8, not the nearest binary float), so one token costs ``price × 1000`` nanocredits.

A request's cost (:func:`cost`):

* input is all the input tokens, of which cached ones (read from the upstream's prompt cache)
  and cache writes (written to it; only Anthropic reports them, and bills them at about 1.25×
  its input price) are parts: uncached input (input − cached − cache writes) at ``input``,
  cached input at ``cached_input`` and cache writes at ``cache_write`` (each ``input`` when the
  price sets none, so without a ``cache_write`` price a cache write costs as plain input);
  cached input counts at most the input, cache writes at most the input left uncached;
* output tokens at ``output``; reasoning tokens are output tokens (every upstream's usage is
  normalised so that output includes reasoning, ``relay/protocol``), and a count of reasoning
  larger than the output is billed as output too;
* the exact rational sum, rounded half up to a whole nanocredit: each request is off by less than
  half a nanocredit (5·10⁻¹⁰ credit), never more.

Which price applies (:meth:`PriceTable.rate_for`): the model the client asked for if it has its
own ``[prices]`` entry (so an alias such as ``gpt-5-high`` may be priced apart), else the upstream
model it resolved to. Entries are exact ids, never patterns: a request a pattern alias maps
(``claude-sonnet-4-5-20250929`` through ``claude-sonnet-*``) pays the price of the id it asked
for if there is one, else its target's. A model with no price is free: it is neither charged
nor refused for credits (``relay check-config`` lists such models when the file prices any
model at all).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from ..config import Config, Price
from ..model_names import is_pattern

#: Nanocredits per credit: the integer unit of every stored amount.
NANO = 1_000_000_000

#: Nanocredits per token for a price of one credit per million tokens.
_PER_TOKEN = Fraction(NANO, 1_000_000)


@dataclass(frozen=True)
class Rate:
    """One model's price in nanocredits per token (exact fractions)."""

    model: str
    input: Fraction
    cached_input: Fraction
    output: Fraction
    cache_write: Fraction

    @classmethod
    def of(cls, price: Price) -> Rate:
        cached = price.input if price.cached_input is None else price.cached_input
        written = price.input if price.cache_write is None else price.cache_write
        return cls(
            model=price.model,
            input=_exact(price.input) * _PER_TOKEN,
            cached_input=_exact(cached) * _PER_TOKEN,
            output=_exact(price.output) * _PER_TOKEN,
            cache_write=_exact(written) * _PER_TOKEN,
        )


def _exact(value: float) -> Fraction:
    """The decimal the operator wrote (TOML's ``0.125`` → 1/8, ``2.19`` → 219/100)."""
    return Fraction(str(value))


def exact_cost(
    rate: Rate,
    *,
    input_tokens: int,
    cached_tokens: int = 0,
    output_tokens: int = 0,
    reasoning_tokens: int = 0,
    cache_write_tokens: int = 0,
) -> Fraction:
    """The unrounded cost in nanocredits (see the module docstring for the rules)."""
    input_tokens = max(0, input_tokens)
    cached = min(max(0, cached_tokens), input_tokens)
    written = min(max(0, cache_write_tokens), input_tokens - cached)
    output = max(0, output_tokens, reasoning_tokens)
    return (
        (input_tokens - cached - written) * rate.input
        + cached * rate.cached_input
        + written * rate.cache_write
        + output * rate.output
    )


def cost(
    rate: Rate | None,
    *,
    input_tokens: int,
    cached_tokens: int = 0,
    output_tokens: int = 0,
    reasoning_tokens: int = 0,
    cache_write_tokens: int = 0,
) -> int:
    """A request's cost in whole nanocredits: the exact cost rounded half up; 0 without a rate."""
    if rate is None:
        return 0
    exact = exact_cost(
        rate,
        input_tokens=input_tokens,
        cached_tokens=cached_tokens,
        output_tokens=output_tokens,
        reasoning_tokens=reasoning_tokens,
        cache_write_tokens=cache_write_tokens,
    )
    return math.floor(exact + Fraction(1, 2))


class PriceTable:
    """``[prices.*]`` as exact per-token rates, looked up by requested or upstream model."""

    def __init__(self, prices: Mapping[str, Price]) -> None:
        self._rates = {model: Rate.of(price) for model, price in prices.items()}

    def __bool__(self) -> bool:
        return bool(self._rates)

    def rate_for(self, model: str, upstream_model: str = "") -> Rate | None:
        """The requested model's own price, else its upstream model's, else None (free)."""
        return self._rates.get(model) or self._rates.get(upstream_model)

    def estimate(
        self, model: str, upstream_model: str, *, input_tokens: int, output_tokens: int
    ) -> int:
        """What a request is expected to cost before it runs, in nanocredits.

        Input is priced as uncached (neither cache reads nor cache writes are known in
        advance): the estimate errs on the high side for input, unless the request writes to
        the cache at a ``cache_write`` price above ``input``, and its output side is the
        request's own output cap or the relay's expected output (``relay/protocol/requests.py``).
        """
        return cost(
            self.rate_for(model, upstream_model),
            input_tokens=input_tokens,
            output_tokens=output_tokens,
        )


def to_credits(nanocredits: int) -> float:
    """Nanocredits as credits, for JSON and display."""
    return nanocredits / NANO


def parse_credits(text: str | float | int) -> int:
    """Credits written by a person (``"12.5"``, ``5``) as nanocredits; ValueError if not a
    finite number. Read as a decimal, so ``0.1`` is exactly 100,000,000 nanocredits."""
    try:
        value = Decimal(str(text).strip().replace("_", ""))
    except InvalidOperation:
        raise ValueError(f"not a number of credits: {text!r}") from None
    if not value.is_finite():
        raise ValueError(f"not a finite number of credits: {text!r}")
    nano = value * NANO
    return int(nano.to_integral_value())


def format_credits(nanocredits: int) -> str:
    """Credits with as many decimals as they need (up to 9): ``12.5``, ``0.000015``."""
    sign = "-" if nanocredits < 0 else ""
    whole, fraction = divmod(abs(nanocredits), NANO)
    digits = f"{fraction:09d}".rstrip("0")
    return f"{sign}{whole}.{digits}" if digits else f"{sign}{whole}"


def unpriced_models(config: Config) -> list[str]:
    """Models the relay serves (upstream models and aliases) that no price applies to, when the
    configuration prices some model: such models are free, which is likely an oversight."""
    if not config.prices:
        return []
    table = PriceTable(config.prices)
    served = {model for account in config.accounts for model in account.models}
    missing = {model for model in served if table.rate_for(model) is None}
    missing.update(
        alias.name
        for alias in config.models.values()
        if not is_pattern(alias.name)  # not a model id: its requests pay its target's price
        and alias.target in served
        and table.rate_for(alias.name, alias.target) is None
    )
    return sorted(missing)
