"""The configuration file: the example loads as documented; every mistake is named by its key."""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.config import (
    PROVIDERS,
    AccountConfig,
    Config,
    ConfigError,
    ConfigIssue,
    GlobalConfig,
    ModelAlias,
    PackageConfig,
    PoolConfig,
    Price,
    ServerConfig,
    load_config,
    parse_config,
)
from relay.config_checks import check_environment

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "relay.example.toml"

# A small valid file; the broken cases below each add or change one thing in it.
BASE = """
[pools.startup-pool]
tpm = 6_000_000
max_concurrency = 200

[packages.startup]
pool = "startup-pool"
max_concurrency = 4

[[accounts]]
name = "codex-1"
pool = "startup-pool"
provider = "openai-responses"
base_url = "https://upstream.example/v1"
api_key_env = "CODEX_1_KEY"
models = ["gpt-5"]

[[accounts]]
name = "deepseek-1"
pool = "startup-pool"
provider = "openai-chat"
base_url = "https://api.deepseek.com/v1"
models = ["deepseek-chat"]
"""


def parse(text: str, **kwargs) -> Config:
    return parse_config(tomllib.loads(text), **kwargs)


def issues_of(text: str) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as excinfo:
        parse(text)
    return excinfo.value.issues


# ------------------------------------------------------------------------------------------------
# The example file
# ------------------------------------------------------------------------------------------------


def test_example_config_loads_with_the_pools_packages_and_accounts_it_documents():
    config = load_config(EXAMPLE)

    assert config.source == str(EXAMPLE)
    assert config.server.listen == "127.0.0.1:8080"
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8080)
    assert config.server.database == str(EXAMPLE.parent / "relay.db")
    assert config.server.admin_token_env == "RELAY_ADMIN_TOKEN"
    assert config.server.redis_url is None
    assert config.server.max_body_bytes == 64 * 1024 * 1024
    assert config.global_ == GlobalConfig(tpm=60_000_000, tps=18_000, max_concurrency=2000)

    assert list(config.pools) == ["shared-dev-pool", "startup-pool", "enterprise-pool"]
    assert config.pools["startup-pool"] == PoolConfig(
        name="startup-pool", tpm=6_000_000, tps=3_000, max_concurrency=200, max_queue=2000, weight=2
    )

    assert set(config.packages) == {"dev", "startup", "enterprise"}
    startup = config.packages["startup"]
    assert startup == PackageConfig(
        name="startup",
        pool="startup-pool",
        tpm=200_000,
        rpm=120,
        max_concurrency=4,
        max_queue=16,
        queue_timeout_s=60.0,
        weight=1.0,
        key_prefix="cr_",
        initial_credits=500.0,
        models=None,
    )
    assert config.packages["enterprise"].key_prefix == "sk-live-"
    assert config.packages["enterprise"].pool == "enterprise-pool"
    assert config.packages["dev"].pool == "shared-dev-pool"

    accounts = {account.name: account for account in config.accounts}
    assert list(accounts) == ["codex-1", "deepseek-1", "qwen-1", "claude-1", "gemini-1"]
    codex = accounts["codex-1"]
    assert codex.provider == "openai-responses"
    assert codex.base_url == "https://api.openai.com/v1"
    assert codex.api_key_env == "CODEX_1_KEY"
    assert codex.models == ("gpt-5.5", "gpt-5.4", "gpt-5", "gpt-5-codex")
    assert accounts["deepseek-1"].provider == "openai-chat"
    assert accounts["deepseek-1"].models == ("deepseek-chat", "deepseek-reasoner")
    assert accounts["deepseek-1"].api_key_env == "DEEPSEEK_KEY"
    assert accounts["qwen-1"].base_url == "https://dashscope.aliyuncs.com/compatible-mode/v1"
    assert accounts["qwen-1"].models == ("qwen3-coder-plus",)
    assert accounts["qwen-1"].api_key_env == "QWEN_KEY"
    assert accounts["claude-1"].provider == "anthropic"
    assert accounts["gemini-1"].provider == "gemini"
    for account in config.accounts:
        assert account.pool in config.pools

    for effort in ("minimal", "low", "medium", "high"):
        assert config.models[f"gpt-5-{effort}"] == ModelAlias(f"gpt-5-{effort}", "gpt-5", effort)
    for effort in ("low", "medium", "high"):
        alias = config.models[f"gpt-5-codex-{effort}"]
        assert (alias.target, alias.reasoning_effort) == ("gpt-5-codex", effort)
    assert config.models["claude-sonnet-*"] == ModelAlias("claude-sonnet-*", "gpt-5.5", "high")
    assert config.models["claude-*haiku*"] == ModelAlias("claude-*haiku*", "gpt-5", "low")
    assert len(config.models) == 9

    assert set(config.prices) == {
        "gpt-5",
        "gpt-5-codex",
        "gpt-5.5",
        "deepseek-chat",
        "deepseek-reasoner",
        "claude-sonnet-4-5",
        "claude-opus-4-1",
    }
    assert config.prices["gpt-5"] == Price("gpt-5", input=1.25, cached_input=0.125, output=10.0)
    assert config.prices["claude-sonnet-4-5"] == Price(
        "claude-sonnet-4-5", input=3.0, cached_input=0.3, output=15.0, cache_write=3.75
    )


def test_example_file_documents_every_server_key():
    text = EXAMPLE.read_text()
    for f in dataclasses.fields(ServerConfig):
        # Either set or shown commented out (redis_url), always as `key = value`.
        assert re.search(rf"^#?\s*{f.name}\s*=", text, re.MULTILINE), f.name


@pytest.mark.parametrize(
    "cls", [GlobalConfig, PoolConfig, PackageConfig, AccountConfig, ModelAlias, Price]
)
def test_example_file_mentions_every_key_of_every_section(cls):
    text = EXAMPLE.read_text()
    for f in dataclasses.fields(cls):
        if f.name in ("name", "model"):  # these come from the table name, not a key
            continue
        assert re.search(rf"\b{f.name}\b", text), f"{cls.__name__}.{f.name}"


# ------------------------------------------------------------------------------------------------
# Valid files
# ------------------------------------------------------------------------------------------------


def test_an_empty_file_is_a_valid_relay_that_serves_no_models():
    config = parse("")
    assert config.server == dataclasses.replace(ServerConfig(), database=config.server.database)
    assert config.global_ == GlobalConfig()
    assert (dict(config.pools), dict(config.packages), config.accounts) == ({}, {}, ())


def test_base_file_parses_and_normalises_values():
    config = parse(BASE.replace("upstream.example/v1", "upstream.example/v1/"))
    assert config.accounts[0].base_url == "https://upstream.example/v1"
    assert config.accounts[1].api_key_env is None
    assert config.pools["startup-pool"].weight == 1.0
    assert isinstance(config.packages["startup"].queue_timeout_s, float)


def test_config_is_frozen_and_its_mappings_are_read_only():
    config = parse(BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server = ServerConfig()  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.pools["other"] = PoolConfig("other")  # type: ignore[index]


def test_priority_may_be_any_integer_and_floats_accept_integers():
    config = parse(BASE + "priority = -5\n[prices.gpt-5]\ninput = 1\noutput = 10\n")
    assert config.accounts[1].priority == -5
    assert config.prices["gpt-5"] == Price("gpt-5", input=1.0, cached_input=None, output=10.0)


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [
        ("127.0.0.1:8080", "127.0.0.1", 8080),
        ("0.0.0.0:0", "0.0.0.0", 0),
        ("[::1]:8080", "::1", 8080),
        ("localhost:65535", "localhost", 65535),
    ],
)
def test_listen_address_is_split_into_host_and_port(listen, host, port):
    server = parse(f'[server]\nlisten = "{listen}"\n').server
    assert (server.host, server.port) == (host, port)


def test_database_is_resolved_against_the_config_files_directory(tmp_path, monkeypatch):
    config_dir = tmp_path / "etc" / "relay"
    config_dir.mkdir(parents=True)
    path = config_dir / "relay.toml"
    path.write_text('[server]\ndatabase = "data/relay.db"\n')
    monkeypatch.chdir(tmp_path)  # the working directory must not matter

    config = load_config(path)
    assert config.server.database == str(config_dir / "data" / "relay.db")
    assert Path(config.server.database).is_absolute()


def test_memory_database_and_absolute_paths_are_kept(tmp_path):
    assert parse('[server]\ndatabase = ":memory:"\n').server.database == ":memory:"
    absolute = tmp_path / "x.db"
    config = parse(f'[server]\ndatabase = "{absolute}"\n', base_dir=Path("/elsewhere"))
    assert config.server.database == str(absolute)


# ------------------------------------------------------------------------------------------------
# Broken files: each mistake is reported at its key path
# ------------------------------------------------------------------------------------------------

BROKEN = [
    pytest.param(
        BASE.replace("max_concurrency = 4", "max_concurrency = -3"),
        "packages.startup.max_concurrency",
        "must be a positive integer, got -3",
        id="negative-package-limit",
    ),
    pytest.param(
        BASE.replace('provider = "openai-chat"', 'provider = "foo"'),
        "accounts[1].provider",
        "must be one of openai-chat, openai-responses, anthropic, gemini, codex-chatgpt, got 'foo'",
        id="unknown-provider",
    ),
    pytest.param(
        BASE.replace('pool = "startup-pool"\nmax_concurrency = 4', 'pool = "nope"'),
        "packages.startup.pool",
        "unknown pool 'nope' (defined pools: startup-pool)",
        id="package-unknown-pool",
    ),
    pytest.param(
        BASE + '[server]\nlisen = "0.0.0.0:80"\n',
        "server.lisen",
        "unknown key 'server.lisen' (did you mean 'listen'?)",
        id="unknown-server-key",
    ),
    pytest.param(
        BASE.replace("max_concurrency = 200", "max_concurrency = true"),
        "pools.startup-pool.max_concurrency",
        "must be a positive integer, got true",
        id="bool-is-not-an-int",
    ),
    pytest.param(
        BASE.replace("tpm = 6_000_000", "tpm = 1.5"),
        "pools.startup-pool.tpm",
        "must be a positive integer, got 1.5",
        id="float-where-int",
    ),
    pytest.param(
        '[server]\nlisten = "localhost"\n',
        "server.listen",
        "must be 'host:port', e.g. '127.0.0.1:8080', got 'localhost'",
        id="listen-without-port",
    ),
    pytest.param(
        '[server]\nlisten = "127.0.0.1:70000"\n',
        "server.listen",
        "must be 'host:port' with a port in 0..65535, got '127.0.0.1:70000'",
        id="listen-port-out-of-range",
    ),
    pytest.param(
        '[server]\nlisten = ":8080"\n',
        "server.listen",
        "must be 'host:port' with a non-empty host, got ':8080'",
        id="listen-empty-host",
    ),
    pytest.param(
        '[server]\nstall_timeout_s = "60"\n',
        "server.stall_timeout_s",
        "must be a positive number, got '60'",
        id="string-where-number",
    ),
    pytest.param(
        '[server]\nredis_url = "http://127.0.0.1:6379"\n',
        "server.redis_url",
        "must start with redis://, rediss://, unix://, got 'http://127.0.0.1:6379'",
        id="redis-url-scheme",
    ),
    pytest.param(
        "[global]\ntpm = 0\n",
        "global.tpm",
        "must be a positive integer, got 0",
        id="zero-global-limit",
    ),
    pytest.param(
        BASE.replace('base_url = "https://api.deepseek.com/v1"', 'base_url = "ftp://x.example"'),
        "accounts[1].base_url",
        "must be an http:// or https:// URL, got 'ftp://x.example'",
        id="base-url-scheme",
    ),
    pytest.param(
        BASE.replace('models = ["deepseek-chat"]', "models = []"),
        "accounts[1].models",
        "must be a non-empty array of strings, got an array",
        id="account-without-models",
    ),
    pytest.param(
        BASE.replace('models = ["deepseek-chat"]', 'models = ["deepseek-chat", ""]'),
        "accounts[1].models[1]",
        "must be a non-empty string, got ''",
        id="empty-model-id",
    ),
    pytest.param(
        BASE.replace('name = "deepseek-1"', 'name = "codex-1"'),
        "accounts[1].name",
        "duplicate account name 'codex-1' (also accounts[0])",
        id="duplicate-account-name",
    ),
    pytest.param(
        BASE.replace('name = "deepseek-1"\npool = "startup-pool"\n', 'name = "deepseek-1"\n'),
        "accounts[1].pool",
        "is required",
        id="account-without-pool",
    ),
    pytest.param(
        BASE.replace('[packages.startup]\npool = "startup-pool"\n', "[packages.startup]\n"),
        "packages.startup.pool",
        "is required",
        id="package-without-pool",
    ),
    pytest.param(
        BASE + '[packages.other]\npool = "startup-pool"\nkey_prefix = "a-very-long-prefix-"\n',
        "packages.other.key_prefix",
        "must be 1-16 characters of [A-Za-z0-9_-], got 'a-very-long-prefix-'",
        id="key-prefix-too-long",
    ),
    pytest.param(
        BASE + '[packages.other]\npool = "startup-pool"\nmodels = ["gpt-5", 3]\n',
        "packages.other.models[1]",
        "must be a non-empty string, got 3",
        id="package-model-not-a-string",
    ),
    pytest.param(
        '[pools."bad name"]\n',
        'pools."bad name"',
        "name must match [A-Za-z0-9_.-]+, got 'bad name'",
        id="bad-pool-name",
    ),
    pytest.param(
        "[pools.p]\nweight = 0\n",
        "pools.p.weight",
        "must be a positive number, got 0",
        id="zero-weight",
    ),
    pytest.param(
        '[models.gpt-5-ultra]\ntarget = "gpt-5"\nreasoning_effort = "extreme"\n',
        "models.gpt-5-ultra.reasoning_effort",
        "must be one of none, minimal, low, medium, high, xhigh, max, got 'extreme'",
        id="unknown-reasoning-effort",
    ),
    pytest.param(
        '[models.gpt-5-high]\nreasoning_effort = "high"\n',
        "models.gpt-5-high.target",
        "is required",
        id="alias-without-target",
    ),
    pytest.param(
        '[models.a]\ntarget = "b"\n[models.b]\ntarget = "gpt-5"\n',
        "models.a.target",
        "'b' is itself an alias; aliases do not chain, name the model directly",
        id="alias-chain",
    ),
    pytest.param(
        '[prices."gpt-5.5"]\ninput = 1.75\noutput = -1\n',
        'prices."gpt-5.5".output',
        "must be a non-negative number, got -1",
        id="negative-price-quoted-key",
    ),
    pytest.param(
        "[prices.gpt-5]\noutput = 10\n",
        "prices.gpt-5.input",
        "is required",
        id="price-without-input",
    ),
    pytest.param(
        "[prices.gpt-5]\ninput = 1\noutput = 10\ncached_input = nan\n",
        "prices.gpt-5.cached_input",
        "must be a non-negative number, got nan",
        id="nan-price",
    ),
    pytest.param(
        "[prices.claude]\ninput = 3\noutput = 15\ncache_write = -3.75\n",
        "prices.claude.cache_write",
        "must be a non-negative number, got -3.75",
        id="negative-cache-write-price",
    ),
    pytest.param(
        BASE.replace('api_key_env = "CODEX_1_KEY"', 'api_key_env = "codex key"'),
        "accounts[0].api_key_env",
        "must be the name of an environment variable ([A-Za-z_][A-Za-z0-9_]*), got 'codex key'",
        id="bad-env-name",
    ),
    pytest.param(
        'server = "localhost"\n',
        "server",
        "must be a table, got 'localhost'",
        id="section-not-a-table",
    ),
    pytest.param(
        '[servers]\nlisten = "127.0.0.1:8080"\n',
        "servers",
        "unknown key 'servers' (did you mean 'server'?)",
        id="unknown-section",
    ),
    pytest.param(
        '[accounts]\nname = "x"\n',
        "accounts",
        "must be an array of tables ([[accounts]]), got a table",
        id="accounts-not-an-array",
    ),
]


@pytest.mark.parametrize(("text", "path", "message"), BROKEN)
def test_broken_config_is_reported_at_its_key_path(text, path, message):
    issues = issues_of(text)
    assert issues == [ConfigIssue(path, message)]


def test_every_error_is_reported_at_once():
    text = (
        BASE.replace("max_concurrency = 4", "max_concurrency = -3")
        .replace('provider = "openai-chat"', 'provider = "foo"')
        .replace('[packages.startup]\npool = "startup-pool"', '[packages.startup]\npool = "nope"')
        + '[server]\nlisen = "0.0.0.0:80"\n'
    )
    with pytest.raises(ConfigError) as excinfo:
        parse(text)
    err = excinfo.value
    assert {issue.path for issue in err.issues} == {
        "packages.startup.max_concurrency",
        "accounts[1].provider",
        "packages.startup.pool",
        "server.lisen",
    }
    lines = str(err).splitlines()
    assert len(lines) == 4
    assert (
        "accounts[1].provider: must be one of openai-chat, openai-responses, anthropic, "
        "gemini, codex-chatgpt, got 'foo'" in lines
    )
    assert "packages.startup.max_concurrency: must be a positive integer, got -3" in lines
    assert "packages.startup.pool: unknown pool 'nope' (defined pools: startup-pool)" in lines


def test_unknown_key_in_an_account_is_reported():
    issues = issues_of(BASE + "max_concurency = 3\n")
    assert issues == [
        ConfigIssue(
            "accounts[1].max_concurency",
            "unknown key 'accounts[1].max_concurency' (did you mean 'max_concurrency'?)",
        )
    ]


def test_api_key_in_an_account_is_refused_with_the_secrets_message():
    issues = issues_of(BASE + 'api_key = "sk-should-not-be-here"\n')
    assert issues == [
        ConfigIssue(
            "accounts[1].api_key",
            "secrets are not written in the file: put the key in an environment variable and "
            "name it with api_key_env",
        )
    ]
    # The secret itself is never echoed back.
    assert "sk-should-not-be-here" not in str(ConfigError(issues))


def test_package_pool_error_when_no_pools_are_defined():
    issues = issues_of('[packages.solo]\npool = "ghost"\n')
    assert issues == [
        ConfigIssue("packages.solo.pool", "unknown pool 'ghost' (defined pools: none)")
    ]


def test_provider_list_in_the_message_matches_providers():
    (issue,) = issues_of(BASE.replace('provider = "openai-chat"', "provider = 1"))
    assert ", ".join(PROVIDERS) in issue.message


# Any TOML value in any place: the parser answers with a Config or a ConfigError, never a crash.
_SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(["startup-pool", "gpt-5", "openai-chat", "https://x.example", "high"]),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
_BASE_DATA = tomllib.loads(BASE)


@settings(max_examples=300, deadline=None)
@given(
    section=st.sampled_from(["server", "global", "pools", "packages", "models", "prices"]),
    key=st.sampled_from(
        ["listen", "database", "tpm", "pool", "weight", "models", "target", "input", "x"]
    ),
    value=_VALUES,
    account_key=st.sampled_from(["name", "pool", "provider", "base_url", "models", "priority"]),
    account_value=_VALUES,
)
def test_any_value_anywhere_gives_a_config_or_a_config_error(
    section, key, value, account_key, account_value
):
    data = {**_BASE_DATA, "accounts": [dict(a) for a in _BASE_DATA["accounts"]]}
    data["accounts"][0][account_key] = account_value
    if section in ("server", "global"):
        data[section] = {key: value}
    else:
        data[section] = {"startup-pool" if section == "pools" else "x": {key: value}}
    try:
        parse_config(data)
    except ConfigError as err:
        assert err.issues
        assert all(issue.path and issue.message for issue in err.issues)


# ------------------------------------------------------------------------------------------------
# Files that cannot be read or parsed
# ------------------------------------------------------------------------------------------------


def test_toml_syntax_error_is_reported_with_its_line(tmp_path):
    path = tmp_path / "relay.toml"
    path.write_text('[server]\nlisten = "127.0.0.1:8080"\ndatabase = relay.db\n')
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    (issue,) = excinfo.value.issues
    assert issue.path == str(path)
    assert issue.message.startswith("invalid TOML: ")
    assert "line 3" in issue.message


def test_missing_file_is_a_config_error(tmp_path):
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert excinfo.value.issues == [ConfigIssue(str(path), "file not found")]


def test_semantic_errors_from_a_file_carry_its_source(tmp_path):
    path = tmp_path / "relay.toml"
    path.write_text("[global]\ntpm = -1\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert excinfo.value.source == str(path)
    assert excinfo.value.issues == [ConfigIssue("global.tpm", "must be a positive integer, got -1")]


# ------------------------------------------------------------------------------------------------
# The environment
# ------------------------------------------------------------------------------------------------


def test_check_environment_reports_a_missing_key_variable(monkeypatch):
    monkeypatch.delenv("CODEX_1_KEY", raising=False)
    config = parse(BASE)
    assert check_environment(config) == [
        ConfigIssue("accounts[0].api_key_env", "environment variable CODEX_1_KEY is not set")
    ]
    assert config.accounts[0].api_key() is None


def test_check_environment_is_quiet_when_the_variable_is_set(monkeypatch):
    monkeypatch.setenv("CODEX_1_KEY", "sk-test")
    config = parse(BASE)
    assert check_environment(config) == []
    assert config.accounts[0].api_key() == "sk-test"
    # Read at call time, so a rotated key is picked up without reloading the file.
    monkeypatch.setenv("CODEX_1_KEY", "sk-rotated")
    assert config.accounts[0].api_key() == "sk-rotated"
    # An account without api_key_env has no key and nothing to check.
    assert config.accounts[1].api_key() is None


def test_check_environment_reports_an_empty_variable(monkeypatch):
    monkeypatch.setenv("CODEX_1_KEY", "")
    assert check_environment(parse(BASE)) == [
        ConfigIssue("accounts[0].api_key_env", "environment variable CODEX_1_KEY is empty")
    ]


def test_example_config_needs_one_variable_per_account(monkeypatch):
    config = load_config(EXAMPLE)
    for account in config.accounts:
        monkeypatch.delenv(account.api_key_env, raising=False)
    assert [issue.path for issue in check_environment(config)] == [
        f"accounts[{i}].api_key_env" for i in range(len(config.accounts))
    ]
    for account in config.accounts:
        monkeypatch.setenv(account.api_key_env, "x")
    assert check_environment(config) == []
    assert os.environ["CODEX_1_KEY"] == "x"
