"""What the relay believes of an upstream (:mod:`relay.protocol.trust`): error text redacted,
usage bounded. Through the real relay: ``tests/test_hostile_upstream.py``."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.config import load_config
from relay.protocol.sse import Usage
from relay.protocol.trust import (
    MAX_INPUT_TOKENS,
    MAX_OUTPUT_TOKENS,
    Confidential,
    bound_usage,
    redact,
)

CALL = Confidential.of_call(
    "https://gw.internal.example:8443/tenant-7/v1/chat/completions",
    {"authorization": "Bearer abc-account-key-123", "anthropic-version": "2023-06-01"},
)


@pytest.mark.parametrize(
    "text",
    [
        "rejected 'Authorization: Bearer abc-account-key-123'",
        "key abc-account-key-123 is over quota",
        "Authorization: Basic dXNlcjpwYXNzd29yZA==",
        '{"x-api-key": "whatever-key-value"}',
        "upstream https://gw.internal.example:8443/tenant-7/v1 said no",
        "backend GW.INTERNAL.EXAMPLE:8443 refused",
        "fallback key sk-proj-AbCdEf0123456789XYZ",
        "anthropic sk-ant-api03-AbCdEf0123456789XYZ",
        "google AIzaSyA1234567890abcdefghijklmnopqrs",
        "token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.sig",
        "GET https://x.example/v1?key=secretvalue&alt=sse",
        "connect to 10.2.3.4:8000 failed, then 192.168.1.20",
    ],
)
def test_credentials_and_addresses_are_redacted(text: str) -> None:
    redacted = redact(text, CALL)
    for secret in (
        "abc-account-key-123", "dXNlcjpwYXNzd29yZA", "whatever-key-value", "gw.internal",
        "GW.INTERNAL", "tenant-7", "sk-proj-", "sk-ant-", "AIzaSy", "eyJhbGci", "secretvalue",
        "10.2.3.4", "192.168",
    ):
        assert secret not in redacted, redacted
    assert "[redacted]" in redacted or "[upstream]" in redacted


@pytest.mark.parametrize(
    "text",
    [
        "Rate limit reached for gpt-5 in organization org-abc on requests per min (RPM): "
        "Limit 3, Used 3. Please try again in 2s. Visit "
        "https://platform.openai.com/account/rate-limits to learn more.",
        "This model's maximum context length is 128000 tokens. However, your messages "
        "resulted in 130000 tokens. Please reduce the length of the messages.",
        "Incorrect API key provided: sk-abc***xyz.",
        "anthropic-version 2023-06-01 does not support this feature",
        "temperature 10.5 is above the maximum of 2; top_k 127.0 is not an integer",
    ],
)
def test_ordinary_error_text_is_kept(text: str) -> None:
    assert redact(text, CALL) == text


def test_a_long_message_is_cut() -> None:
    assert len(redact("x" * 100_000)) == 2000


def test_honest_usage_is_kept() -> None:
    usage = Usage(input_tokens=1200, cached_tokens=1000, output_tokens=900, reasoning_tokens=800)
    assert bound_usage(usage, carried_bytes=5_000, max_output_tokens=1000) == (usage, None)
    written = Usage(input_tokens=1200, cached_tokens=300, output_tokens=9, cache_write_tokens=800)
    assert bound_usage(written, carried_bytes=100) == (written, None)


def test_cache_writes_fit_in_the_input_left_uncached() -> None:
    usage = Usage(input_tokens=1000, cached_tokens=700, cache_write_tokens=500)
    assert bound_usage(usage, carried_bytes=0)[0].cache_write_tokens == 300
    negative = Usage(input_tokens=10, cache_write_tokens=-4)
    assert bound_usage(negative, carried_bytes=0)[0].cache_write_tokens == 0


def test_hidden_reasoning_is_not_bounded_by_the_bytes() -> None:
    """OpenAI reasoning models stream no reasoning: thousands of tokens in a short answer."""
    usage = Usage(input_tokens=10, output_tokens=20_010, reasoning_tokens=20_000)
    assert bound_usage(usage, carried_bytes=300)[1] is None


def test_negative_counts_are_zero() -> None:
    usage = Usage(input_tokens=-5, cached_tokens=-1, output_tokens=-7, reasoning_tokens=-2)
    bounded, problem = bound_usage(usage, carried_bytes=100)
    assert bounded == Usage(0, 0, 0, 0)
    assert problem is not None and "negative" in problem


def test_absurd_counts_are_capped() -> None:
    usage = Usage(input_tokens=10**15, cached_tokens=10**16, output_tokens=10**15)
    bounded, problem = bound_usage(usage, carried_bytes=2_000)
    assert bounded.input_tokens == MAX_INPUT_TOKENS == bounded.cached_tokens
    assert bounded.output_tokens == 2_000 + 64  # no more than the answer's bytes could carry
    assert problem is not None and "input" in problem and "visible output" in problem
    hidden = Usage(output_tokens=10**15, reasoning_tokens=10**15)
    assert bound_usage(hidden, carried_bytes=0)[0].output_tokens == MAX_OUTPUT_TOKENS
    assert bound_usage(hidden, carried_bytes=0, max_output_tokens=50, choices=2)[0] == Usage(
        output_tokens=100, reasoning_tokens=100
    )


@given(
    st.integers(-(10**18), 10**18), st.integers(-(10**18), 10**18),
    st.integers(-(10**18), 10**18), st.integers(-(10**18), 10**18),
    st.integers(-(10**18), 10**18), st.integers(0, 10**7), st.none() | st.integers(1, 10**6),
)
def test_bounded_usage_is_always_within_the_bounds(
    input_tokens, cached, output, reasoning, written, carried, cap
) -> None:
    bounded, _ = bound_usage(
        Usage(input_tokens, cached, output, reasoning, written), carried_bytes=carried,
        max_output_tokens=cap,
    )
    assert 0 <= bounded.cached_tokens <= bounded.input_tokens <= MAX_INPUT_TOKENS
    assert 0 <= bounded.cache_write_tokens <= bounded.input_tokens - bounded.cached_tokens
    assert 0 <= bounded.reasoning_tokens <= bounded.output_tokens
    assert bounded.output_tokens <= (cap or MAX_OUTPUT_TOKENS)
    assert bounded.output_tokens - bounded.reasoning_tokens <= carried + 64


def test_max_retry_after_is_a_server_key_with_a_default(tmp_path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text("[server]\nmax_retry_after_s = 120\n")
    assert load_config(path).server.max_retry_after_s == 120
    path.write_text("[server]\n")
    assert load_config(path).server.max_retry_after_s == 300
