"""Billing arithmetic, as properties: exact to half a nanocredit, reasoning billed as output,
cached input and cache writes at their own prices, monotonic, and a ledger that adds up
exactly."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.config import Price
from relay.ledger.prices import (
    NANO,
    PriceTable,
    Rate,
    cost,
    exact_cost,
    format_credits,
    parse_credits,
    to_credits,
)

# Prices as an operator writes them: up to 4 decimals, from free to very expensive.
prices = st.decimals(min_value=0, max_value=100_000, places=4, allow_nan=False).map(float)
tokens = st.integers(min_value=0, max_value=2_000_000)


@st.composite
def rates(draw) -> Rate:
    cached = draw(st.one_of(st.none(), prices))
    written = draw(st.one_of(st.none(), prices))
    return Rate.of(
        Price("m", input=draw(prices), cached_input=cached, output=draw(prices),
              cache_write=written)
    )


@given(rates(), tokens, tokens, tokens, tokens, tokens)
def test_cost_is_the_exact_price_rounded_to_half_a_nanocredit(
    rate, inp, cached, written, out, reasoning
):
    exact = exact_cost(
        rate, input_tokens=inp, cached_tokens=cached, output_tokens=out,
        reasoning_tokens=reasoning, cache_write_tokens=written,
    )
    billed = cost(
        rate, input_tokens=inp, cached_tokens=cached, output_tokens=out,
        reasoning_tokens=reasoning, cache_write_tokens=written,
    )
    assert isinstance(billed, int)
    assert abs(billed - exact) <= Fraction(1, 2)


@given(prices, st.one_of(st.none(), prices), prices, tokens, tokens, tokens)
def test_cost_follows_the_price_per_million(p_in, p_cached, p_out, inp, cached, out):
    """Uncached input at `input`, cached at `cached_input` (or `input`), output at `output`,
    each in credits per million tokens, read as the decimal written."""
    rate = Rate.of(Price("m", input=p_in, cached_input=p_cached, output=p_out))
    cached = min(cached, inp)
    cached_price = p_in if p_cached is None else p_cached
    expected_credits = (
        Fraction(str(p_in)) * (inp - cached)
        + Fraction(str(cached_price)) * cached
        + Fraction(str(p_out)) * out
    ) / 1_000_000
    assert exact_cost(rate, input_tokens=inp, cached_tokens=cached, output_tokens=out) == (
        expected_credits * NANO
    )


@given(rates(), tokens, tokens, st.integers(min_value=0, max_value=1_000_000))
def test_reasoning_is_billed_as_output(rate, inp, out, reasoning):
    """Output counts include reasoning, so reasoning adds nothing on top; a reported reasoning
    count above the output is billed as that much output."""
    with_reasoning = cost(
        rate, input_tokens=inp, output_tokens=out, reasoning_tokens=min(reasoning, out)
    )
    assert with_reasoning == cost(rate, input_tokens=inp, output_tokens=out)
    assert cost(rate, input_tokens=inp, output_tokens=out, reasoning_tokens=out + reasoning) == (
        cost(rate, input_tokens=inp, output_tokens=out + reasoning)
    )


@given(rates(), tokens, tokens, tokens, tokens, st.integers(min_value=1, max_value=10_000))
def test_more_tokens_never_cost_less(rate, inp, cached, written, out, extra):
    def billed(inp=inp, out=out) -> int:
        return cost(rate, input_tokens=inp, cached_tokens=cached, cache_write_tokens=written,
                    output_tokens=out)

    base = billed()
    assert billed(out=out + extra) >= base
    assert billed(inp=inp + extra) >= base


@given(prices, prices, tokens, tokens)
def test_cached_input_without_its_own_price_costs_as_input(p_in, p_out, inp, cached):
    rate = Rate.of(Price("m", input=p_in, output=p_out))
    assert cost(rate, input_tokens=inp, cached_tokens=cached) == cost(rate, input_tokens=inp)


@given(prices, st.one_of(st.none(), prices), st.one_of(st.none(), prices), prices,
       tokens, tokens, tokens, tokens)
def test_cache_writes_follow_their_price_per_million(
    p_in, p_cached, p_write, p_out, inp, cached, written, out
):
    """Input counts cache reads and writes: uncached input (input − cached − writes) at
    `input`, cached at `cached_input`, writes at `cache_write` (each `input` when unset)."""
    rate = Rate.of(
        Price("m", input=p_in, cached_input=p_cached, output=p_out, cache_write=p_write)
    )
    inp = inp + cached + written  # a report that adds up, as Anthropic's always does
    cached_price = p_in if p_cached is None else p_cached
    write_price = p_in if p_write is None else p_write
    expected_credits = (
        Fraction(str(p_in)) * (inp - cached - written)
        + Fraction(str(cached_price)) * cached
        + Fraction(str(write_price)) * written
        + Fraction(str(p_out)) * out
    ) / 1_000_000
    assert exact_cost(
        rate, input_tokens=inp, cached_tokens=cached, cache_write_tokens=written,
        output_tokens=out,
    ) == expected_credits * NANO


@given(prices, prices, prices, tokens, tokens, tokens)
def test_cache_writes_without_their_own_price_cost_as_input(
    p_in, p_cached, p_out, inp, cached, written
):
    rate = Rate.of(Price("m", input=p_in, cached_input=p_cached, output=p_out))
    assert cost(rate, input_tokens=inp, cached_tokens=cached, cache_write_tokens=written) == (
        cost(rate, input_tokens=inp, cached_tokens=cached)
    )


@given(rates(), tokens, tokens, st.integers(min_value=0, max_value=4_000_000))
def test_cache_writes_count_at_most_the_input_left_uncached(rate, inp, cached, written):
    """A report of more reads and writes than input bills the input once: reads first, then
    writes up to what is left, never a negative count of uncached input."""
    cached = min(cached, inp)
    fitted = min(written, inp - cached)
    assert exact_cost(
        rate, input_tokens=inp, cached_tokens=cached, cache_write_tokens=written
    ) == exact_cost(rate, input_tokens=inp, cached_tokens=cached, cache_write_tokens=fitted)
    everything_written = exact_cost(
        rate, input_tokens=inp, cached_tokens=0, cache_write_tokens=written + inp
    )
    assert everything_written == inp * rate.cache_write


@given(rates(), st.lists(st.tuples(tokens, tokens, tokens), max_size=50))
def test_a_ledger_of_integer_costs_adds_up_exactly(rate, requests):
    """Whatever the requests, granted − Σ costs is exact: integers, no float drift."""
    granted = parse_credits("1000.000000001")
    costs = [cost(rate, input_tokens=i, cached_tokens=c, output_tokens=o) for i, c, o in requests]
    balance = granted
    for charge in costs:
        balance -= charge
    assert balance == granted - sum(costs)
    assert to_credits(balance) == (granted - sum(costs)) / NANO


def test_free_model_and_price_lookup() -> None:
    table = PriceTable(
        {
            "gpt-5": Price("gpt-5", input=1.25, cached_input=0.125, output=10.0),
            "gpt-5-high": Price("gpt-5-high", input=3, output=30),
        }
    )
    assert table.rate_for("gpt-5-low", "gpt-5").model == "gpt-5"  # alias at its target's price
    assert table.rate_for("gpt-5-high", "gpt-5").model == "gpt-5-high"  # its own price wins
    assert table.rate_for("free-model", "free-model") is None
    assert cost(None, input_tokens=10**6, output_tokens=10**6) == 0
    # 1,000 input tokens at 1.25/M + 100 cached at 0.125/M + 500 output at 10/M
    rate = table.rate_for("gpt-5")
    assert cost(rate, input_tokens=1100, cached_tokens=100, output_tokens=500) == (
        1000 * 1250 + 100 * 125 + 500 * 10_000
    )
    # Anthropic's Sonnet 4.5: 1,000 uncached input tokens at 3/M, 2,000 cache reads at 0.30/M,
    # 4,000 cache writes at 3.75/M, 100 output at 15/M (input counts all 7,000)
    claude = Rate.of(
        Price("claude", input=3, cached_input=0.3, cache_write=3.75, output=15)
    )
    assert cost(
        claude, input_tokens=7000, cached_tokens=2000, cache_write_tokens=4000,
        output_tokens=100,
    ) == 1000 * 3000 + 2000 * 300 + 4000 * 3750 + 100 * 15_000
    # without a cache_write price the writes are billed as plain input
    assert cost(
        Rate.of(Price("claude", input=3, cached_input=0.3, output=15)),
        input_tokens=7000, cached_tokens=2000, cache_write_tokens=4000, output_tokens=100,
    ) == 5000 * 3000 + 2000 * 300 + 100 * 15_000
    # the estimate prices all input as uncached
    assert table.estimate("gpt-5", "gpt-5", input_tokens=1000, output_tokens=10) == (
        1000 * 1250 + 10 * 10_000
    )


@pytest.mark.parametrize(
    ("text", "nano"),
    [("12.5", 12_500_000_000), ("0.1", 100_000_000), (5, 5 * NANO), ("-2", -2 * NANO),
     ("1_000", 1000 * NANO), (0.000000001, 1)],
)
def test_parse_credits_reads_decimals_exactly(text, nano) -> None:
    assert parse_credits(text) == nano


@pytest.mark.parametrize("text", ["", "ten", "nan", "inf", "1e"])
def test_parse_credits_refuses_what_is_not_a_number(text) -> None:
    with pytest.raises(ValueError):
        parse_credits(text)


@given(st.integers(min_value=-(10**18), max_value=10**18))
def test_format_credits_round_trips(nano) -> None:
    assert parse_credits(format_credits(nano)) == nano
