"""Upstreams reached through an HTTP CONNECT proxy and a SOCKS5 proxy, over TLS whose
certificate comes from a private test CA (``trustme``): the real relay, real proxies on loopback
(:mod:`relay.testing.proxy`, each logging the connections it carried) and the simulated upstream
serving HTTPS."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
import trustme

from relay.config import ConfigError, parse_config
from relay.upstream.proxy import Proxy, environment_proxy

from .conftest import (
    ADMIN_TOKEN,
    SIM_KEY,
    Process,
    Relay,
    server_section,
    start_process,
)

USER, PASSWORD = "alice", "pr0xy-s3cret"
WRONG = "wr0ng-pa55word"


def chat(relay: Relay, model: str) -> httpx2.Response:
    return httpx2.post(
        relay.url + "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi #sim tokens=2"}]},
        headers={"authorization": f"Bearer {relay.key()}"},
        timeout=30,
    )


class Logged:
    """A proxy process and what its log says it carried."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self.url = process.url  # host:port

    def lines(self) -> list[str]:
        return self.process.log.read_text().splitlines()

    def tunnels(self) -> list[str]:
        return [line for line in self.lines() if re.match(r"proxy: tunnel \d+ to ", line)]

    def refusals(self) -> list[str]:
        return [line for line in self.lines() if line.startswith("proxy: refused")]


def start_proxy(tmp: Path, kind: str) -> Logged:
    return Logged(
        start_process(
            ["-m", "relay.testing.proxy", "--kind", kind, "--auth", f"{USER}:{PASSWORD}"],
            r"proxy listening on (\S+)",
            tmp / f"{kind}-proxy.log",
        )
    )


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path]:
    ca = trustme.CA()
    path = tmp_path_factory.mktemp("ca") / "test-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return ca, path


@pytest.fixture(scope="module")
def tls_sim(tmp_path_factory, ca) -> Iterator[str]:
    """The simulated upstream over HTTPS, its certificate (127.0.0.1, localhost) from the CA."""
    tmp = tmp_path_factory.mktemp("tls-sim")
    cert = ca[0].issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp / "server.pem"))
    process = start_process(
        [
            "-m", "relay.testing.upstream", "--port", "0", "--api-key", SIM_KEY,
            "--ttft", "0.01", "--token-delay", "0.002", "--tokens", "4",
            "--tls-cert", str(tmp / "server.pem"), "--tls-key", str(tmp / "server.pem"),
        ],
        r"listening on (\S+)",
        tmp / "sim.log",
    )
    assert process.url.startswith("https://")
    yield process.url
    process.stop()


@pytest.fixture(scope="module")
def proxies(tmp_path_factory) -> Iterator[dict[str, Logged]]:
    tmp = tmp_path_factory.mktemp("proxies")
    started = {"http": start_proxy(tmp, "http"), "socks5": start_proxy(tmp, "socks5")}
    yield started
    for proxy in started.values():
        proxy.process.stop()


def account(name: str, base_url: str, model: str, **extra: str) -> str:
    lines = "".join(f'{key} = "{value}"\n' for key, value in extra.items())
    return textwrap.dedent(
        f"""
        [[accounts]]
        name = "{name}"
        pool = "main"
        provider = "openai-chat"
        base_url = "{base_url}/v1"
        api_key_env = "SIM_UPSTREAM_KEY"
        models = ["{model}"]
        """
    ) + lines


PACKAGE = textwrap.dedent(
    """
    [pools.main]
    max_concurrency = 100

    [packages.team]
    pool = "main"
    """
)


def launch(tmp: Path, body: str, env: dict[str, str] | None = None, **server: object) -> Relay:
    database = tmp / "relay.db"
    config_path = tmp / "relay.toml"
    config_path.write_text(server_section(database, **server) + PACKAGE + body)
    process = start_process(
        ["-m", "relay", "serve", "--config", str(config_path)],
        r"relay listening on (\S+)",
        tmp / "relay.log",
        env={
            "SIM_UPSTREAM_KEY": SIM_KEY,
            "RELAY_TEST_ADMIN_TOKEN": ADMIN_TOKEN,
            "RELAY_LOG_LEVEL": "WARNING",
            **(env or {}),
        },
    )
    return Relay(process, config_path, database, process.url)


@pytest.fixture(scope="module")
def relay(tmp_path_factory, tls_sim, ca, proxies, sim) -> Iterator[Relay]:
    http = proxies["http"].url
    socks = proxies["socks5"].url
    ca_file = str(ca[1])
    body = "".join(
        [
            account("via-http", tls_sim, "m-http", proxy=f"http://{USER}:{PASSWORD}@{http}",
                    ca_file=ca_file),
            account("via-socks", tls_sim, "m-socks",
                    proxy=f"socks5://{USER}:{PASSWORD}@{socks}", ca_file=ca_file),
            account("http-wrong", tls_sim, "m-http-wrong",
                    proxy=f"http://{USER}:{WRONG}@{http}", ca_file=ca_file),
            account("http-none", tls_sim, "m-http-none", proxy=f"http://{http}",
                    ca_file=ca_file),
            account("socks-wrong", tls_sim, "m-socks-wrong",
                    proxy=f"socks5://{USER}:{WRONG}@{socks}", ca_file=ca_file),
            account("proxy-down", tls_sim, "m-proxy-down",
                    proxy=f"http://{USER}:{WRONG}@127.0.0.1:9", ca_file=ca_file),
            account("no-ca", tls_sim, "m-no-ca"),
            account("plain-via-http", sim.url, "m-plain-http",
                    proxy=f"http://{USER}:{PASSWORD}@{http}"),
            account("plain-via-socks", sim.url, "m-plain-socks",
                    proxy=f"socks5://{USER}:{PASSWORD}@{socks}"),
            account("http-to-nowhere", "http://127.0.0.1:9", "m-http-nowhere",
                    proxy=f"http://{USER}:{PASSWORD}@{http}"),
            account("socks-to-nowhere", "http://127.0.0.1:9", "m-socks-nowhere",
                    proxy=f"socks5://{USER}:{PASSWORD}@{socks}"),
            account("direct-ca", tls_sim, "m-direct-ca", ca_file=ca_file),
        ]
    )
    server = launch(tmp_path_factory.mktemp("relay"), body)
    yield server
    log = server.process.stop()
    assert "Traceback" not in log, log
    assert PASSWORD not in log and WRONG not in log, log


@pytest.mark.parametrize(("kind", "model"), [("http", "m-http"), ("socks5", "m-socks")])
def test_requests_go_through_the_proxy_and_its_tunnel_is_reused(relay, proxies, kind, model):
    proxy = proxies[kind]
    before = len(proxy.tunnels())
    for _ in range(3):
        response = chat(relay, model)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"]
    tunnels = proxy.tunnels()[before:]
    # One tunnel carried all three: the pool keeps its keep-alive through a proxy.
    assert len(tunnels) == 1, proxy.lines()
    assert tunnels[0].endswith(f"to 127.0.0.1:{relay_port(relay, model)}")


@pytest.mark.parametrize(("kind", "model"), [("http", "m-plain-http"), ("socks5", "m-plain-socks")])
def test_a_plain_http_upstream_is_tunnelled_too(relay, proxies, sim, kind, model):
    proxy = proxies[kind]
    before = len(proxy.tunnels())
    response = chat(relay, model)
    assert response.status_code == 200, response.text
    sim_port = sim.url.rsplit(":", 1)[1]
    assert [t.rsplit(" ", 1)[1] for t in proxy.tunnels()[before:]] == [f"127.0.0.1:{sim_port}"]


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        ("m-http-nowhere", "the proxy refused the tunnel (502)"),
        ("m-socks-nowhere", "the SOCKS5 proxy refused the tunnel (connection refused)"),
    ],
)
def test_a_proxy_that_cannot_reach_the_upstream_is_a_502_that_says_so(relay, model, reason):
    response = chat(relay, model)
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["code"] == "upstream_unreachable"
    assert reason in error["message"], error["message"]


def relay_port(relay: Relay, model: str) -> int:
    text = relay.config_path.read_text()
    return int(re.search(r'base_url = "https://127\.0\.0\.1:(\d+)/v1"', text).group(1))


@pytest.mark.parametrize(
    ("kind", "model", "reason"),
    [
        ("http", "m-http-wrong", "refused the relay's proxy credentials (407)"),
        ("http", "m-http-none", "wants credentials the relay has none of (407)"),
        ("socks5", "m-socks-wrong", "SOCKS5 proxy refused the relay's proxy credentials"),
    ],
)
def test_a_proxy_that_refuses_the_credentials_is_a_502_that_says_so(
    relay, proxies, kind, model, reason
):
    proxy = proxies[kind]
    before = len(proxy.refusals())
    response = chat(relay, model)
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["code"] == "upstream_unreachable"
    assert "through its proxy" in error["message"] and reason in error["message"]
    assert WRONG not in response.text and PASSWORD not in response.text
    assert proxy.url not in response.text  # the proxy's address stays with the operator
    refusals = proxy.refusals()[before:]
    expected = "no credentials" if model == "m-http-none" else "bad credentials"
    assert len(refusals) == 1 and refusals[0].endswith(expected), proxy.lines()


def test_a_proxy_that_cannot_be_reached_is_a_502_without_its_credentials(relay):
    response = chat(relay, "m-proxy-down")
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["code"] == "upstream_unreachable"
    assert "through its proxy: the proxy cannot be reached" in error["message"]
    assert WRONG not in response.text and "127.0.0.1:9" not in response.text
    log = relay.process.log.read_text()
    assert "proxy http://127.0.0.1:9 cannot be reached" in log  # the operator's log names it
    assert WRONG not in log


def test_a_private_ca_is_trusted_only_through_ca_file(relay):
    assert chat(relay, "m-direct-ca").status_code == 200
    response = chat(relay, "m-no-ca")
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["code"] == "upstream_unreachable"
    assert "TLS certificate is not trusted" in error["message"]
    assert "ca_file" in error["message"]


def test_trust_env_takes_the_proxy_from_the_environment_and_honours_no_proxy(
    tmp_path, tls_sim, ca, proxies
):
    proxy = proxies["http"]
    port = tls_sim.rsplit(":", 1)[1]
    body = account("env-proxied", tls_sim, "m-env", ca_file=str(ca[1])) + account(
        "env-bypassed", f"https://localhost:{port}", "m-env-bypass", ca_file=str(ca[1])
    ) + account(
        "env-direct", tls_sim, "m-env-direct", ca_file=str(ca[1]), proxy="direct"
    )
    env = {
        "HTTPS_PROXY": f"http://{USER}:{PASSWORD}@{proxy.url}",
        "NO_PROXY": "localhost,example.com",
    }
    server = launch(tmp_path, body, env, trust_env=True)
    try:
        before = len(proxy.tunnels())
        assert chat(server, "m-env").status_code == 200
        assert len(proxy.tunnels()) == before + 1, proxy.lines()
        assert chat(server, "m-env-bypass").status_code == 200
        assert chat(server, "m-env-direct").status_code == 200
        assert len(proxy.tunnels()) == before + 1, proxy.lines()  # NO_PROXY, "direct"
    finally:
        log = server.process.stop()
    assert "Traceback" not in log and PASSWORD not in log, log


def test_without_trust_env_the_environment_proxy_is_ignored(tmp_path, tls_sim, ca, proxies):
    proxy = proxies["http"]
    env = {"HTTPS_PROXY": f"http://{USER}:{PASSWORD}@{proxy.url}"}
    server = launch(tmp_path, account("plain", tls_sim, "m-plain", ca_file=str(ca[1])), env)
    try:
        before = len(proxy.tunnels())
        assert chat(server, "m-plain").status_code == 200
        assert len(proxy.tunnels()) == before
    finally:
        server.process.stop()


# -------------------------------------------------------------------------------------------
# Configuration


def config_with(**keys: str) -> dict:
    return {
        "pools": {"main": {}},
        "accounts": [
            {
                "name": "a", "pool": "main", "provider": "openai-chat",
                "base_url": "https://api.example.com/v1", "models": ["m"], **keys,
            }
        ],
    }


@pytest.mark.parametrize(
    "url",
    [
        f"ftp://{USER}:{PASSWORD}@proxy:21",
        f"https://{USER}:{PASSWORD}@proxy:443",
        f"http://{USER}:{PASSWORD}@proxy",
        f"http://{USER}:{PASSWORD}@proxy:99999",
        f"http://{USER}:{PASSWORD}@proxy:port",
        f"http://{USER}:{PASSWORD}@:3128",
        f"socks5://{USER}:{PASSWORD}@proxy:1080/path",
        f"http://{USER}:{PASSWORD}@proxy:3128?x=1",
        "proxy:3128",
    ],
)
def test_a_bad_proxy_url_is_refused_without_echoing_it(url):
    with pytest.raises(ConfigError) as caught:
        parse_config(config_with(proxy=url))
    text = str(caught.value)
    assert "accounts[0].proxy" in text
    assert PASSWORD not in text


def test_a_missing_ca_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"accounts\[0\]\.ca_file.*file not found"):
        parse_config(config_with(ca_file="nope.pem"), base_dir=tmp_path)
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"accounts\[0\]\.ca_file.*not a readable PEM"):
        parse_config(config_with(ca_file="junk.pem"), base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"server\.ca_file"):
        parse_config({"server": {"ca_file": "nope.pem"}}, base_dir=tmp_path)


def test_proxy_credentials_are_percent_decoded_and_never_shown():
    proxy = Proxy.from_url("socks5h://us%40er:p%3Ass@proxy.corp:1080")
    assert (proxy.scheme, proxy.host, proxy.port) == ("socks5", "proxy.corp", 1080)
    assert (proxy.username, proxy.password) == ("us@er", "p:ss")
    assert "p:ss" not in repr(proxy) and "p%3Ass" not in proxy.shown


def test_environment_proxy_follows_curl():
    env = {"https_proxy": "proxy:3128", "HTTP_PROXY": "http://h:1", "NO_PROXY": ".internal"}
    assert environment_proxy("https://api.example.com/v1", env) == "http://proxy:3128"
    assert environment_proxy("http://api.example.com/v1", env) == "http://h:1"
    assert environment_proxy("https://llm.internal/v1", env) is None
    assert environment_proxy("https://x.example.com", {"ALL_PROXY": "socks5://s:1080"}) == (
        "socks5://s:1080"
    )
    assert environment_proxy("https://x.example.com", {}) is None


def test_a_proxy_password_stays_out_of_the_configs_repr():
    url = f"http://{USER}:{PASSWORD}@proxy.corp:3128"
    config = parse_config({**config_with(proxy=url), "server": {"proxy": url}})
    assert config.accounts[0].proxy == url and config.server.proxy == url
    assert PASSWORD not in repr(config.accounts[0]) and PASSWORD not in repr(config.server)
