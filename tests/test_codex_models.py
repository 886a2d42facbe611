"""Codex's own ``/models`` answer (protocols.md §2.8): its shape, per-key filtering, reasoning
levels from the aliases, the ETag and 304; other clients keep OpenAI's (or Anthropic's) list;
and the real Codex CLI, which asks for it when its provider's key comes from ``auth.command``,
takes the relay's models and uses them."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from relay.protocol.codex_models import BASE_INSTRUCTIONS, DEFAULT_CONTEXT_WINDOW

from .conftest import Relay, Sim, running_relay
from .test_codex_cli import CODEX

BODY = """
[pools.main]

[packages.team]
pool = "main"

[packages.narrow]
pool = "main"
models = ["gpt-5", "gpt-5-high"]

[[accounts]]
name = "sim-responses"
pool = "main"
provider = "openai-responses"
base_url = "SIM_URL/v1"
api_key_env = "SIM_UPSTREAM_KEY"
models = ["gpt-5", "gpt-5.5"]

[[accounts]]
name = "sim-chat"
pool = "main"
provider = "openai-chat"
base_url = "SIM_URL/v1"
api_key_env = "SIM_UPSTREAM_KEY"
models = ["deepseek-chat"]

[models.gpt-5-low]
target = "gpt-5"
reasoning_effort = "low"

[models.gpt-5-high]
target = "gpt-5"
reasoning_effort = "high"

[models.gpt-5-max]
target = "gpt-5"
reasoning_effort = "max"

[models.fast]
target = "deepseek-chat"

[models."claude-*"]
target = "gpt-5.5"
"""

TEAM_MODELS = ["deepseek-chat", "fast", "gpt-5", "gpt-5-high", "gpt-5-low", "gpt-5-max", "gpt-5.5"]
CODEX_HEADERS = {
    "originator": "codex_cli_rs",
    "user-agent": "codex_cli_rs/0.169.0 (Debian 12.0.0; x86_64) xterm",
}
#: The keys Codex 0.169.0 refuses the whole list without (found by removing each in turn with
#: the installed CLI, docs/codex-models.md), and the two older releases require as well.
REQUIRED = {
    "slug": str, "display_name": str, "supported_reasoning_levels": list, "shell_type": str,
    "visibility": str, "supported_in_api": bool, "priority": int, "base_instructions": str,
    "support_verbosity": bool, "truncation_policy": dict, "experimental_supported_tools": list,
    "supports_reasoning_summaries": bool, "supports_parallel_tool_calls": bool,
}
#: Values Codex's enums take (protocol/src/openai_models.rs).
SHELL_TYPES = {"default", "local", "unified_exec", "disabled", "shell_command"}
VISIBILITIES = {"list", "hide", "none"}
EFFORTS = {"none", "minimal", "low", "medium", "high", "xhigh"}


@pytest.fixture(scope="module")
def relay(sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    with running_relay(tmp_path_factory.mktemp("codex-models"), sim.url, body=BODY,
                       log_level="INFO") as server:
        yield server


def codex_models(relay: Relay, package: str = "team", path: str = "/v1/models",
                 **headers: str) -> httpx2.Response:
    return httpx2.get(
        relay.url + path, params={"client_version": "0.169.0"}, timeout=10,
        headers={"authorization": f"Bearer {relay.key(package)}", **headers},
    )


def by_slug(response: httpx2.Response) -> dict[str, dict]:
    assert response.status_code == 200, response.text
    return {model["slug"]: model for model in response.json()["models"]}


@pytest.mark.parametrize("path", ["/v1/models", "/openai/models", "/codex/v1/models"])
def test_codex_gets_every_required_field_with_codexs_types_and_values(
    relay: Relay, path: str
) -> None:
    response = codex_models(relay, path=path, **CODEX_HEADERS)
    assert response.headers["content-type"] == "application/json"
    assert set(response.json()) == {"models"}
    models = response.json()["models"]
    assert [model["slug"] for model in models] == TEAM_MODELS
    assert [model["priority"] for model in models] == list(range(len(TEAM_MODELS)))
    for model in models:
        for name, kind in REQUIRED.items():
            assert isinstance(model[name], kind), (model["slug"], name, model[name])
        assert model["shell_type"] in SHELL_TYPES and model["visibility"] == "list"
        assert model["supported_in_api"] is True
        assert model["truncation_policy"]["mode"] in ("bytes", "tokens")
        assert isinstance(model["truncation_policy"]["limit"], int)
        assert model["context_window"] == DEFAULT_CONTEXT_WINDOW
        assert model["base_instructions"] == BASE_INSTRUCTIONS
        assert set(model["input_modalities"]) <= {"text", "image"}
        for level in model["supported_reasoning_levels"]:
            assert set(level) == {"effort", "description"} and level["description"]
            assert level["effort"] in EFFORTS
        if "default_reasoning_level" in model:
            offered = [level["effort"] for level in model["supported_reasoning_levels"]]
            assert model["default_reasoning_level"] in offered


def test_reasoning_levels_come_from_the_aliases(relay: Relay) -> None:
    models = by_slug(codex_models(relay))

    def levels(slug: str) -> list[str]:
        return [level["effort"] for level in models[slug]["supported_reasoning_levels"]]

    # The model the aliases map: the efforts they fix (max is no effort every Codex knows).
    assert levels("gpt-5") == ["low", "high"]
    assert models["gpt-5"]["default_reasoning_level"] == "low"
    assert models["gpt-5"]["supports_reasoning_summaries"] is True
    # An alias fixing an effort: that one, as its default (the relay applies it regardless).
    assert levels("gpt-5-high") == ["high"]
    assert models["gpt-5-high"]["default_reasoning_level"] == "high"
    assert "reasoning effort high" in models["gpt-5-high"]["description"]
    # An alias fixing max is listed without levels; so are models no alias gives an effort.
    for slug in ("gpt-5-max", "deepseek-chat", "fast", "gpt-5.5"):
        assert levels(slug) == [], slug
        assert "default_reasoning_level" not in models[slug], slug
        assert models[slug]["supports_reasoning_summaries"] is False
    assert models["fast"]["description"] == "Served by the relay as deepseek-chat"


def test_only_the_models_the_keys_package_may_use(relay: Relay) -> None:
    narrow = by_slug(codex_models(relay, "narrow"))
    assert list(narrow) == ["gpt-5", "gpt-5-high"]
    # Levels describe the model: the aliases onto it count even where the package lists none.
    efforts = [level["effort"] for level in narrow["gpt-5"]["supported_reasoning_levels"]]
    assert efforts == ["low", "high"]
    assert codex_models(relay, "narrow").headers["etag"] != codex_models(relay).headers["etag"]


def test_the_etag_is_stable_and_if_none_match_is_a_304_without_body(relay: Relay) -> None:
    first, second = codex_models(relay), codex_models(relay)
    etag = first.headers["etag"]
    assert etag.startswith('"') and etag.endswith('"') and len(etag) > 10
    assert second.headers["etag"] == etag and second.content == first.content
    for value in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        again = codex_models(relay, **{"if-none-match": value})
        assert again.status_code == 304, value
        assert again.content == b"" and again.headers["etag"] == etag
    stale = codex_models(relay, **{"if-none-match": '"not-this-one"'})
    assert stale.status_code == 200 and stale.content == first.content


def test_codexs_originator_alone_gets_codexs_shape(relay: Relay) -> None:
    response = httpx2.get(
        relay.url + "/v1/models", timeout=10,
        headers={"authorization": f"Bearer {relay.key()}", "originator": "codex_exec"},
    )
    assert [model["slug"] for model in response.json()["models"]] == TEAM_MODELS


def test_other_clients_keep_openais_and_anthropics_lists(relay: Relay) -> None:
    auth = {"authorization": f"Bearer {relay.key()}"}
    openai_list = httpx2.get(relay.url + "/v1/models", headers=auth, timeout=10)
    assert openai_list.status_code == 200 and "etag" not in openai_list.headers
    body = openai_list.json()
    assert set(body) == {"object", "data"} and body["object"] == "list"
    assert [model["id"] for model in body["data"]] == TEAM_MODELS
    assert all(model["object"] == "model" for model in body["data"])
    anthropic_list = httpx2.get(
        relay.url + "/claude/v1/models", headers={**auth, "anthropic-version": "2023-06-01"},
        timeout=10,
    ).json()
    assert [model["id"] for model in anthropic_list["data"]] == TEAM_MODELS
    assert anthropic_list["has_more"] is False


def test_a_refused_key_gets_openais_error_not_a_list(relay: Relay) -> None:
    response = httpx2.get(
        relay.url + "/v1/models", params={"client_version": "0.169.0"}, timeout=10,
        headers={"authorization": "Bearer cr_not-a-key", **CODEX_HEADERS},
    )
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


# -- the real Codex CLI ---------------------------------------------------------------------


def command_auth_home(tmp_path: Path, relay: Relay, key: str, model: str) -> dict[str, str]:
    """A Codex home whose provider takes the key from a command: the one way, besides a
    ChatGPT login, that makes Codex ask the provider for its models (protocols.md §2.8)."""
    home = tmp_path / "home"
    codex_dir = home / ".codex"
    codex_dir.mkdir(parents=True)
    (codex_dir / "config.toml").write_text(
        f"""\
model = "{model}"
model_provider = "relay"

[model_providers.relay]
name = "relay"
base_url = "{relay.url}/openai"
wire_api = "responses"
auth = {{ command = "printf", args = ["%s", "{key}"] }}
request_max_retries = 0
stream_max_retries = 0
"""
    )
    return {
        **os.environ, "HOME": str(home), "CODEX_HOME": str(codex_dir), "NO_COLOR": "1",
        "RUST_LOG": "error",
    }


def codex(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    if not CODEX.exists():
        pytest.fail(f"the Codex CLI is not installed at {CODEX}: run scripts/test")
    done = subprocess.run(
        [str(CODEX), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=180,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def models_lines(relay: Relay, after: int) -> list[str]:
    """Access lines of ``GET /openai/models`` written after the log's first ``after`` bytes."""
    deadline = time.monotonic() + 5
    while True:
        text = relay.process.log.read_text()[after:]
        lines = [line for line in text.splitlines()
                 if "relay.access" in line and "path=/openai/models" in line]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_codex_takes_the_relays_models_and_uses_their_metadata(
    tmp_path: Path, relay: Relay, sim: Sim
) -> None:
    key, key_id = relay.create_paid_key("team")
    env = command_auth_home(tmp_path, relay, key, "gpt-5")
    work = tmp_path / "work"
    work.mkdir()
    log_start = len(relay.process.log.read_text())
    expected = by_slug(codex_models(relay))

    # Codex's catalog, as it decoded it: the relay's models with the relay's metadata.
    catalog = json.loads(codex(env, work, "debug", "models").stdout)
    listed = {model["slug"]: model for model in catalog["models"]}
    assert set(TEAM_MODELS) <= set(listed), sorted(listed)
    gpt5 = listed["gpt-5"]
    assert [level["effort"] for level in gpt5["supported_reasoning_levels"]] == ["low", "high"]
    assert gpt5["default_reasoning_level"] == "low"
    assert gpt5["context_window"] == DEFAULT_CONTEXT_WINDOW
    assert listed["gpt-5-high"]["description"] == expected["gpt-5-high"]["description"]
    # Relay side: Codex asked, with its key, and got the list (200).
    lines = models_lines(relay, log_start)
    assert lines and "status=200" in lines[0], lines
    assert f"key_id={key_id}" in lines[0], lines[0]
    # Codex keeps the answer with the relay's ETag and the version it asked with.
    cache = json.loads((Path(env["CODEX_HOME"]) / "models_cache.json").read_text())
    assert [model["slug"] for model in cache["models"]] == TEAM_MODELS
    assert cache["client_version"] in subprocess.run(
        [str(CODEX), "--version"], capture_output=True, text=True, timeout=30
    ).stdout
    assert cache.get("etag") in (None, codex_models(relay).headers["etag"])

    # A turn on gpt-5: Codex sends the relay's default effort (low) and the relay's base
    # instructions as its first developer message; neither comes from Codex itself.
    before = len(sim.requests())
    done = codex(env, work, "exec", "--skip-git-repo-check", "Reply. #sim tokens=2 text=pong")
    assert "pong pong" in done.stdout, done.stdout + done.stderr
    upstream = [r for r in sim.requests()[before:] if r["path"].endswith("/responses")]
    assert upstream, "the relay sent nothing upstream"
    body = upstream[-1]["body"]
    assert body["model"] == "gpt-5"
    assert body["reasoning"]["effort"] == "low"
    first = body["input"][0]
    assert first["role"] == "developer"
    assert first["content"][0]["text"] == BASE_INSTRUCTIONS

