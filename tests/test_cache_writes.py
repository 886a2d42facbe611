"""Cache writes through the real relay: a Chat client's request to an Anthropic upstream that
reports ``cache_creation_input_tokens`` (``#sim cache_write=N``) leaves a usage record with the
writes apart, is billed at the model's ``cache_write`` price (at ``input`` when it has none),
and the writes show wherever cached tokens do: self-service usage and calls, the admin's key,
``relay keys list --json`` and ``/metrics``."""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Iterator

import httpx2
import openai
import pytest

from relay.ledger.prices import NANO

from .conftest import BILLING_BODY, Relay, Sim, running_relay
from .test_credits import balance, chat, stored_key
from .test_metrics import scrape, value

#: The billing relay with an Anthropic account: claude-cache prices cache writes at 1.25× input
#: (Anthropic's 5-minute rate), claude-plain sets no cache_write price.
CACHE_BODY = BILLING_BODY + textwrap.dedent(
    """
    [[accounts]]
    name = "sim-anthropic"
    pool = "main"
    provider = "anthropic"
    base_url = "SIM_URL/v1"
    api_key_env = "SIM_UPSTREAM_KEY"
    models = ["claude-cache", "claude-plain"]

    [prices.claude-cache]
    input = 300
    cached_input = 30
    cache_write = 375
    output = 1500

    [prices.claude-plain]
    input = 300
    cached_input = 30
    output = 1500
    """
)

#: Nanocredits per token at 300, 30, 375 and 1500 credits per million tokens.
INPUT, CACHED, WRITE, OUTPUT = 300_000, 30_000, 375_000, 1_500_000

PROMPT = "a long system prompt worth caching " * 40


@pytest.fixture(scope="module")
def cached(sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    with running_relay(tmp_path_factory.mktemp("cache"), sim.url, body=CACHE_BODY) as server:
        yield server


def upstream_input(sim: Sim, marker: str) -> int:
    """All the input tokens the simulated upstream reported for the request with ``marker``."""
    upstream = next(r for r in reversed(sim.requests()) if marker in json.dumps(r["body"]))
    assert upstream["path"].endswith("/messages"), upstream["path"]  # the Anthropic account
    return upstream["usage"]["input_tokens"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_cache_writes_are_recorded_apart_and_billed_at_their_price(
    cached: Relay, sim: Sim, stream: bool
) -> None:
    key, key_id = cached.create_paid_key()
    marker = f"cache-{stream}-{time.monotonic_ns()}"
    content = f"{PROMPT} {marker} #sim tokens=9 cached=100 cache_write=250"
    extra = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
    done = chat(cached, key, content, model="claude-cache", **extra)
    assert done.status_code == 200, done.text
    if stream:
        chunks = [
            json.loads(line[6:]) for line in done.text.splitlines()
            if line.startswith("data: {")
        ]
        answered = next(chunk["usage"] for chunk in chunks if chunk.get("usage"))
    else:
        answered = done.json()["usage"]

    row = cached.usage_row(done.headers["x-request-id"])
    total = upstream_input(sim, marker)
    assert total > 350  # the prompt holds the reads and writes asked for
    assert (row["input_tokens"], row["cached_tokens"], row["cache_write_tokens"],
            row["output_tokens"], row["account"]) == (total, 100, 250, 9, "sim-anthropic")
    # the client sees all its input as prompt tokens, cache reads as cached (OpenAI's sense)
    assert answered["prompt_tokens"] == total
    assert answered["prompt_tokens_details"]["cached_tokens"] == 100

    expected = (total - 100 - 250) * INPUT + 100 * CACHED + 250 * WRITE + 9 * OUTPUT
    assert row["cost_nano"] == expected
    left = balance(cached, key)
    assert left["used"] == expected / NANO
    assert left["balance"] == (10 * NANO - expected) / NANO
    assert stored_key(cached, key_id)["credits_used_nano"] == expected


def test_cache_writes_without_a_cache_write_price_are_billed_as_input(
    cached: Relay, sim: Sim
) -> None:
    key, key_id = cached.create_paid_key()
    marker = f"plain-{time.monotonic_ns()}"
    done = chat(cached, key, f"{PROMPT} {marker} #sim tokens=4 cached=60 cache_write=200",
                model="claude-plain")
    assert done.status_code == 200, done.text
    row = cached.usage_row(done.headers["x-request-id"])
    total = upstream_input(sim, marker)
    assert (row["cached_tokens"], row["cache_write_tokens"]) == (60, 200)
    expected = (total - 60) * INPUT + 60 * CACHED + 4 * OUTPUT
    assert row["cost_nano"] == expected
    assert stored_key(cached, key_id)["credits_used_nano"] == expected


def test_cache_writes_show_where_cached_tokens_do(cached: Relay) -> None:
    key, key_id = cached.create_paid_key()
    before = scrape(cached)
    client = openai.OpenAI(base_url=cached.url + "/v1", api_key=key, max_retries=0)
    ids = []
    for written in (120, 30):
        response = client.chat.completions.with_raw_response.create(
            model="claude-cache",
            messages=[{"role": "user", "content": f"{PROMPT} #sim tokens=3 cache_write={written}"}],
        )
        ids.append(response.headers["x-request-id"])
    rows = [cached.usage_row(request_id) for request_id in ids]
    assert [row["cache_write_tokens"] for row in rows] == [120, 30]
    headers = {"authorization": f"Bearer {key}"}

    usage = httpx2.get(cached.url + "/v1/usage?group_by=model", headers=headers).json()
    assert usage["totals"]["cache_write_tokens"] == 150
    assert usage["totals"]["cached_tokens"] == 0
    [group] = usage["data"]
    assert group["model"] == "claude-cache" and group["cache_write_tokens"] == 150

    calls = httpx2.get(cached.url + "/v1/calls", headers=headers).json()["data"]
    assert {call["request_id"]: call["cache_write_tokens"] for call in calls} == {
        ids[0]: 120, ids[1]: 30
    }

    admin = cached.admin("GET", f"/admin/keys/{key_id}")
    assert admin.status_code == 200, admin.text
    assert admin.json()["usage"]["cache_write_tokens"] == 150

    listed = cached.cli("keys", "list", "--config", str(cached.config_path), "--json")
    assert listed.returncode == 0, listed.stderr
    entry = next(entry for entry in json.loads(listed.stdout) if entry["id"] == key_id)
    assert entry["usage"]["cache_write_tokens"] == 150

    labels = {"model": "claude-cache", "package": "paid", "kind": "cache_write"}
    deadline = time.monotonic() + 5
    while value(after := scrape(cached), "relay_tokens_total", **labels) - value(
        before, "relay_tokens_total", **labels
    ) < 150:
        assert time.monotonic() < deadline, "relay_tokens_total{kind=cache_write} did not move"
        time.sleep(0.02)
    assert value(after, "relay_tokens_total", **labels) - value(
        before, "relay_tokens_total", **labels
    ) == 150

