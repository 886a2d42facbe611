"""A hostile upstream, through the real relay (issue 12, finding 3): whatever an upstream
answers, the client sees no credential and no upstream address, an OpenAI error JSON with the
upstream's status and code (never its HTML), an account rests at most
``server.max_retry_after_s`` however long the upstream asks, and a key is billed for bounded
usage however many tokens the upstream claims.

Each hostile fault of the simulated upstream (:mod:`relay.testing.sim_protocol`) is asked for
with a ``#sim fault=…`` directive, for Chat and Responses clients, streamed and not, on an
account that speaks the client's protocol (bytes relayed) and on one that does not (translated).
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx2
import pytest

from relay.testing import sim_protocol as sp

from .conftest import SIM_KEY, Relay, Sim, running_relay

#: What ``server.max_retry_after_s`` is by default: the longest an upstream can rest an account.
DEFAULT_MAX_REST_S = 300
#: Sane bounds for one request's billed usage: no context window is larger than 2**21 tokens,
#: and the few tokens the sim streams cannot be thousands.
MAX_INPUT = 2**21
MAX_OUTPUT = 10_000

BODY = textwrap.dedent(
    """
    [pools.main]
    max_concurrency = 50

    [packages.paid]
    pool = "main"
    initial_credits = 1000

    [[accounts]]
    name = "chat-up"
    pool = "main"
    provider = "openai-chat"
    base_url = "SIM_URL/v1"
    api_key_env = "SIM_UPSTREAM_KEY"
    models = ["m-chat"]

    [[accounts]]
    name = "resp-up"
    pool = "main"
    provider = "openai-responses"
    base_url = "SIM_URL/v1"
    api_key_env = "SIM_UPSTREAM_KEY"
    models = ["m-resp"]

    [[accounts]]
    name = "nowhere"
    pool = "main"
    provider = "openai-chat"
    base_url = "http://127.0.0.1:9/v1"
    api_key_env = "SIM_UPSTREAM_KEY"
    models = ["m-nowhere"]

    [prices.m-chat]
    input = 1
    output = 1

    [prices.m-resp]
    input = 1
    output = 1
    """
)

#: (client endpoint, streamed, model): every client protocol, relayed and translated.
CASES = [
    (endpoint, stream, model)
    for endpoint in ("chat", "responses")
    for stream in (False, True)
    for model in ("m-chat", "m-resp")
]
CASE_IDS = [f"{e}-{'stream' if s else 'plain'}-{m}" for e, s, m in CASES]


@pytest.fixture(scope="module")
def hostile(sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    with running_relay(tmp_path_factory.mktemp("hostile"), sim.url, body=BODY) as server:
        yield server


@pytest.fixture(autouse=True)
def accounts_back_in_service(hostile: Relay) -> Iterator[None]:
    yield
    hostile.enable_accounts()  # a 429 rests an account: the next test starts with all of them


@dataclass
class Answer:
    status: int
    headers: httpx2.Headers
    text: str

    @property
    def error(self) -> dict:
        """The OpenAI error object of a JSON error answer (asserting its shape)."""
        assert self.headers["content-type"].startswith("application/json"), self.headers
        body = json.loads(self.text)
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
        return body["error"]


def ask(relay: Relay, key: str, endpoint: str, stream: bool, model: str, directive: str) -> Answer:
    prompt = f"hello\n#sim {directive}"
    if endpoint == "chat":
        path = "/v1/chat/completions"
        body: dict = {"model": model, "messages": [{"role": "user", "content": prompt}]}
        if stream:
            body["stream_options"] = {"include_usage": True}
    else:
        path = "/v1/responses"
        body = {"model": model, "input": prompt}
    body["stream"] = stream
    with httpx2.Client(base_url=relay.url, timeout=30) as client:
        with client.stream(
            "POST", path, json=body, headers={"authorization": f"Bearer {key}"}
        ) as response:
            text = response.read().decode()
            return Answer(response.status_code, response.headers, text)


def assert_no_secret(answer: Answer, sim: Sim) -> None:
    everything = answer.text + "".join(f"{k}: {v}\n" for k, v in answer.headers.items())
    netloc = urlsplit(sim.url).netloc
    for secret in (SIM_KEY, netloc, netloc.partition(":")[0], sp.LEAKED_KEY, sim.url):
        assert secret not in everything, f"{secret!r} reached the client: {everything}"
    assert "Bearer" not in everything and "Traceback" not in everything


@pytest.fixture(scope="module")
def paid(hostile: Relay) -> tuple[str, str]:
    """A key of the priced package, and its id."""
    return hostile.create_paid_key("paid")


@pytest.fixture(scope="module")
def key(paid: tuple[str, str]) -> str:
    return paid[0]


def credits_of(relay: Relay, key_id: str) -> dict:
    views = relay.admin("GET", "/admin/keys").json()["data"]
    return next(view for view in views if view["id"] == key_id)["credits"]


@pytest.mark.parametrize(("endpoint", "stream", "model"), CASES, ids=CASE_IDS)
def test_an_error_quoting_the_credential_and_host_is_redacted_status_and_code_kept(
    hostile: Relay, sim: Sim, key: str, endpoint: str, stream: bool, model: str
) -> None:
    answer = ask(hostile, key, endpoint, stream, model, "fault=leak_secret")
    assert answer.status == 500
    error = answer.error
    assert (error["type"], error["code"]) == ("server_error", "upstream_gateway_error")
    assert_no_secret(answer, sim)
    assert "[redacted]" in error["message"]  # the rest of the upstream's words are kept
    row = hostile.usage_row(answer.headers["x-request-id"])
    assert row["status"] == 500 and row["error_code"] == "upstream_gateway_error"


@pytest.mark.parametrize(("endpoint", "stream", "model"), CASES, ids=CASE_IDS)
def test_an_html_error_page_becomes_the_relays_own_json_error(
    hostile: Relay, sim: Sim, key: str, endpoint: str, stream: bool, model: str
) -> None:
    answer = ask(hostile, key, endpoint, stream, model, "fault=html")
    assert answer.status == 502
    error = answer.error  # application/json, OpenAI's shape
    assert error["code"] == "upstream_invalid_response" and error["type"] == "server_error"
    assert "<" not in error["message"] and "nginx" not in answer.text
    assert_no_secret(answer, sim)


@pytest.mark.parametrize(("endpoint", "stream", "model"), CASES, ids=CASE_IDS)
def test_an_absurd_retry_after_rests_the_account_at_most_the_cap(
    hostile: Relay, sim: Sim, key: str, endpoint: str, stream: bool, model: str
) -> None:
    answer = ask(hostile, key, endpoint, stream, model, "fault=retry_forever")
    assert answer.status == 429
    assert answer.error["code"] == "rate_limit_exceeded"
    assert 1 <= int(answer.headers["retry-after"]) <= DEFAULT_MAX_REST_S
    assert int(answer.headers["retry-after-ms"]) <= DEFAULT_MAX_REST_S * 1000
    account = "chat-up" if model == "m-chat" else "resp-up"
    resting = hostile.state()["accounts"][account]
    assert 0 < resting["cooling_down_s"] <= DEFAULT_MAX_REST_S
    assert_no_secret(answer, sim)


@pytest.mark.parametrize(("endpoint", "stream", "model"), CASES, ids=CASE_IDS)
def test_claimed_usage_of_1e15_tokens_is_billed_within_bounds(
    hostile: Relay, sim: Sim, paid: tuple[str, str], endpoint: str, stream: bool, model: str
) -> None:
    key, key_id = paid
    used_before = credits_of(hostile, key_id)["used"]
    answer = ask(hostile, key, endpoint, stream, model, "fault=huge_usage tokens=5")
    assert answer.status == 200
    assert_no_secret(answer, sim)
    row = hostile.usage_row(answer.headers["x-request-id"])
    assert 0 <= row["input_tokens"] <= MAX_INPUT
    assert 0 <= row["output_tokens"] <= MAX_OUTPUT
    assert 0 <= row["cached_tokens"] <= row["input_tokens"]
    assert 0 <= row["reasoning_tokens"] <= row["output_tokens"]
    # 1 credit per million tokens: bounded usage costs a few credits, not 2×10⁹.
    credits = credits_of(hostile, key_id)
    assert 0 <= credits["used"] - used_before <= (MAX_INPUT + MAX_OUTPUT) / 1e6
    assert credits["used"] < credits["granted"]
    log = hostile.process.log.read_text()
    # The warning names the request (the access log names every request: not enough).
    assert any(
        answer.headers["x-request-id"] in line and "implausible usage" in line
        for line in log.splitlines()
    )


@pytest.mark.parametrize("endpoint", ["chat", "responses"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_connect_failure_does_not_name_the_upstream_address(
    hostile: Relay, key: str, endpoint: str, stream: bool
) -> None:
    answer = ask(hostile, key, endpoint, stream, "m-nowhere", "")
    assert answer.status == 502
    error = answer.error
    assert error["code"] == "upstream_unreachable" and "nowhere" in error["message"]
    assert "127.0.0.1" not in answer.text and ":9" not in answer.text
    assert "127.0.0.1:9" in hostile.process.log.read_text()  # the operator's log has it
