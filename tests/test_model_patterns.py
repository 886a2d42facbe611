"""Pattern aliases (``[models."claude-sonnet-*"]``): what a requested id resolves to, in which
order, what a package's allow-list lets in, and what the configuration refuses."""

from __future__ import annotations

import fnmatch
import json
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.config import ConfigError, load_config, parse_config
from relay.config_checks import check_serving, check_warnings
from relay.errors import ModelNotFound
from relay.ledger.prices import PriceTable, cost, unpriced_models
from relay.model_names import literal_length, may_overlap, pattern_problem
from relay.upstream.routing import Catalog

from .conftest import Relay, Sim, running_relay

ACCOUNTS = """
[pools.main]

[pools.claude]

[packages.team]
pool = "main"

[packages.direct]
pool = "claude"

[[accounts]]
name = "gpt"
pool = "main"
provider = "openai-chat"
base_url = "https://api.example.com/v1"
models = ["gpt-5.5", "gpt-5-mini", "deepseek-chat", "claude-sonnet-4-5-served"]

[[accounts]]
name = "anthropic"
pool = "claude"
provider = "anthropic"
base_url = "https://api.anthropic.com/v1"
models = ["claude-sonnet-4-5-20250929", "gpt-5.5"]
"""

PATTERNS = """
[models."claude-*"]
target = "deepseek-chat"

[models."claude-sonnet-*"]
target = "gpt-5.5"
reasoning_effort = "high"

[models."claude-*-4-5-*"]
target = "gpt-5-mini"

[models."claude-opus-*"]
target = "gpt-5.5"

[models."claude-opus-4-?-*"]
target = "gpt-5-mini"

[models.claude-sonnet-4-5-exact]
target = "gpt-5-mini"
reasoning_effort = "low"
"""


def config(extra: str = "", accounts: str = ACCOUNTS):
    return parse_config(tomllib.loads(accounts + PATTERNS + extra))


def route(catalog: Catalog, cfg, package: str, model: str) -> tuple[str, str | None]:
    resolved = catalog.resolve(cfg.packages[package], model)
    assert resolved.requested == model  # usage records keep the client's name
    return resolved.target, resolved.reasoning_effort


def test_a_pattern_maps_the_dated_ids_claude_code_sends() -> None:
    cfg = config()
    catalog = Catalog(cfg)
    assert route(catalog, cfg, "team", "claude-sonnet-4-20250514") == ("gpt-5.5", "high")
    assert route(catalog, cfg, "team", "claude-opus-4-1-20250805") == ("gpt-5-mini", None)
    assert route(catalog, cfg, "team", "claude-3-5-haiku-20241022") == ("deepseek-chat", None)


def test_the_most_literal_characters_win_then_the_order_in_the_file() -> None:
    cfg = config()
    catalog = Catalog(cfg)
    # "claude-sonnet-*" (14 literal characters) beats "claude-*-4-5-*" (12) and "claude-*" (7).
    assert route(catalog, cfg, "team", "claude-sonnet-4-5-20250929") == ("gpt-5.5", "high")
    # Only "claude-*-4-5-*" and "claude-*" match: the longer one wins.
    assert route(catalog, cfg, "team", "claude-haiku-4-5-20251001") == ("gpt-5-mini", None)
    # "claude-opus-4-?-*" (15) beats "claude-opus-*" (12); "?" counts as a wildcard.
    assert route(catalog, cfg, "team", "claude-opus-4-1-20250805") == ("gpt-5-mini", None)
    assert route(catalog, cfg, "team", "claude-opus-4-20250514") == ("gpt-5.5", None)
    # A tie (both 7 literal characters): the first in the file wins, whichever it is.
    for first, second in (("deepseek-chat", "gpt-5.5"), ("gpt-5.5", "deepseek-chat")):
        text = ACCOUNTS + (
            f'[models."x-*-a"]\ntarget = "{first}"\n[models."x-?-a*"]\ntarget = "{second}"\n'
        )
        tied = parse_config(tomllib.loads(text))
        assert route(Catalog(tied), tied, "team", "x-1-a") == (first, None)


def test_exact_names_win_over_patterns() -> None:
    cfg = config()
    catalog = Catalog(cfg)
    # An exact alias, though three patterns match it.
    assert route(catalog, cfg, "team", "claude-sonnet-4-5-exact") == ("gpt-5-mini", "low")
    # A model the pool serves directly, though "claude-sonnet-*" matches it.
    assert route(catalog, cfg, "team", "claude-sonnet-4-5-served") == (
        "claude-sonnet-4-5-served", None,
    )
    # Served directly is per pool: the claude pool serves the dated id itself ...
    assert route(catalog, cfg, "direct", "claude-sonnet-4-5-20250929") == (
        "claude-sonnet-4-5-20250929", None,
    )
    # ... and its pattern-mapped ids reach what that pool serves, or nothing.
    assert route(catalog, cfg, "direct", "claude-opus-4-20250514") == ("gpt-5.5", None)
    with pytest.raises(ModelNotFound):
        catalog.resolve(cfg.packages["direct"], "claude-3-5-haiku-20241022")  # deepseek-chat


def test_matching_is_case_sensitive_and_whole_name() -> None:
    cfg = config()
    catalog = Catalog(cfg)
    for model in ("Claude-sonnet-4-5", "CLAUDE-SONNET-4-5", "my-claude-sonnet-4-5", "claude"):
        with pytest.raises(ModelNotFound) as caught:
            catalog.resolve(cfg.packages["team"], model)
        assert f"'{model}'" in str(caught.value)


def test_an_allow_list_names_what_the_client_sends_and_may_hold_patterns() -> None:
    extra = """
    [packages.sonnet-only]
    pool = "main"
    models = ["claude-sonnet-*", "gpt-5.5"]

    [packages.one-date]
    pool = "main"
    models = ["claude-sonnet-4-5-20250929"]

    [packages.targets-only]
    pool = "main"
    models = ["gpt-5.5", "deepseek-chat"]
    """
    cfg = config(extra.replace("\n    ", "\n"))
    catalog = Catalog(cfg)
    assert route(catalog, cfg, "sonnet-only", "claude-sonnet-4-5-20250929") == (
        "gpt-5.5", "high",
    )
    assert route(catalog, cfg, "one-date", "claude-sonnet-4-5-20250929") == ("gpt-5.5", "high")
    refused = [
        ("sonnet-only", "claude-opus-4-1-20250805"),  # matches no allow-list entry
        ("sonnet-only", "deepseek-chat"),
        ("one-date", "claude-sonnet-4-20250514"),
        # The target being allowed does not let the requested name in.
        ("targets-only", "claude-sonnet-4-5-20250929"),
        ("targets-only", "claude-3-5-haiku-20241022"),
    ]
    for package, model in refused:
        with pytest.raises(ModelNotFound):
            catalog.resolve(cfg.packages[package], model)
        assert not catalog.can_call(cfg.packages[package], model)


def test_the_model_list_holds_ids_never_patterns() -> None:
    extra = """
    [packages.one-date]
    pool = "main"
    models = ["claude-sonnet-4-5-20250929", "claude-opus-*", "gpt-5.5"]
    """
    cfg = config(extra.replace("\n    ", "\n"))
    catalog = Catalog(cfg)
    listed = catalog.models_for(cfg.packages["team"])
    assert listed == sorted(
        ["gpt-5.5", "gpt-5-mini", "deepseek-chat", "claude-sonnet-4-5-served",
         "claude-sonnet-4-5-exact"]
    )
    assert not any("*" in name or "?" in name for name in listed)
    # A plain id an allow-list names is listed when it resolves (here through a pattern); the
    # allow-list's own pattern is not.
    assert catalog.models_for(cfg.packages["one-date"]) == [
        "claude-sonnet-4-5-20250929", "gpt-5.5",
    ]
    assert catalog.can_call(cfg.packages["team"], "claude-opus-4-1-20250805")


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("claude-[sonnet-*", "the '[' at position 8 is never closed"),
        ("claude-sonnet-4-5-[", "the '[' at position 19 is never closed"),
        ("claude-[]-*", "the '[' at position 8 is never closed"),
        ("claude-[9-0]-*", "[9-0] matches no character"),
    ],
)
def test_a_glob_fnmatch_would_misread_is_refused_where_it_is_written(
    pattern: str, problem: str
) -> None:
    text = ACCOUNTS + f'[models."{pattern}"]\ntarget = "gpt-5.5"\n'
    with pytest.raises(ConfigError) as caught:
        parse_config(tomllib.loads(text))
    assert [issue.path for issue in caught.value.issues] == [f'models."{pattern}"']
    assert problem in caught.value.issues[0].message
    text = ACCOUNTS + f'[packages.p]\npool = "main"\nmodels = ["gpt-5.5", "{pattern}"]\n'
    with pytest.raises(ConfigError) as caught:
        parse_config(tomllib.loads(text))
    assert [issue.path for issue in caught.value.issues] == ["packages.p.models[1]"]
    assert problem in caught.value.issues[0].message


@pytest.mark.parametrize(
    "pattern", ["claude-*", "claude-[[]x]", "claude-[]]-*", "claude-[!a-c]?", "[a-cz-a]*"]
)
def test_globs_fnmatch_reads_as_written_are_accepted(pattern: str) -> None:
    assert pattern_problem(pattern) is None
    parse_config(tomllib.loads(ACCOUNTS + f'[models."{pattern}"]\ntarget = "gpt-5.5"\n'))


def test_literal_length_counts_what_a_match_pins() -> None:
    assert literal_length("claude-sonnet-*") == 14
    assert literal_length("claude-opus-4-?-*") == 15
    assert literal_length("claude-[0-9]-*") == 8
    assert literal_length("*") == 0


@given(st.text("ab-*?[]", max_size=6), st.text("ab-*?[]", max_size=6), st.text("ab-", max_size=8))
def test_may_overlap_is_false_only_when_no_name_matches_both(
    first: str, second: str, name: str
) -> None:
    if fnmatch.fnmatchcase(name, first) and fnmatch.fnmatchcase(name, second):
        assert may_overlap(first, second)


def test_check_serving_refuses_a_pattern_whose_target_no_account_serves() -> None:
    text = ACCOUNTS + '[models."claude-opus-*"]\ntarget = "gpt-9"\n'
    issues = check_serving(parse_config(tomllib.loads(text)))
    assert [str(issue) for issue in issues] == [
        "models.\"claude-opus-*\".target: no account serves 'gpt-9' (served: "
        "claude-sonnet-4-5-20250929, claude-sonnet-4-5-served, deepseek-chat, gpt-5-mini, "
        "gpt-5.5)"
    ]


def test_check_serving_accepts_patterns_that_shadow_nothing() -> None:
    text = ACCOUNTS + '[models."mistral-*"]\ntarget = "gpt-5.5"\n'
    assert check_serving(parse_config(tomllib.loads(text))) == []
    assert check_serving(config()) == []


def test_check_serving_follows_patterns_in_package_lists() -> None:
    extra = """
    [packages.mapped]
    pool = "main"
    models = ["claude-sonnet-4-5-20250929", "claude-opus-*", "gpt-5-*", "mistral-*", "qwen-x"]

    [packages.wrong-pool]
    pool = "claude"
    models = ["claude-3-5-haiku-20241022"]
    """
    issues = check_serving(config(extra.replace("\n    ", "\n")))
    assert [(issue.path, issue.message.split(" (served")[0]) for issue in issues] == [
        ("packages.mapped.models[3]", "no account of pool 'main' serves a model matching "
         "'mistral-*'"),
        ("packages.mapped.models[4]", "no account of pool 'main' serves 'qwen-x'"),
        ("packages.wrong-pool.models[0]", "no account of pool 'claude' serves "
         "'claude-3-5-haiku-20241022' (a pattern alias of 'deepseek-chat' through 'claude-*')"),
    ]


def test_prices_are_not_patterns() -> None:
    extra = """
    [prices."claude-opus-*"]
    input = 15
    output = 75

    [prices."gpt-5.5"]
    input = 1
    output = 2
    """
    cfg = config(extra.replace("\n    ", "\n"))
    warnings = [str(issue) for issue in check_warnings(cfg)]
    assert any(
        w.startswith('prices."claude-opus-*": prices are looked up by exact model id')
        for w in warnings
    ), warnings
    # The pattern aliases are not listed as unpriced models; their targets are, when unpriced.
    assert unpriced_models(cfg) == [
        "claude-sonnet-4-5-20250929", "claude-sonnet-4-5-exact", "claude-sonnet-4-5-served",
        "deepseek-chat", "gpt-5-mini",
    ]


# --------------------------------------------------------------------------------------------
# Through the real relay: Claude Code's ids on an OpenAI-compatible account
# --------------------------------------------------------------------------------------------

CLAUDE_CODE_BODY = """
[pools.main]

[packages.team]
pool = "main"
initial_credits = 100

[[accounts]]
name = "gpt-chat"
pool = "main"
provider = "openai-chat"
base_url = "SIM_URL/v1"
api_key_env = "SIM_UPSTREAM_KEY"
models = ["gpt-5.5", "gpt-5-mini"]

[models."claude-sonnet-*"]
target = "gpt-5.5"
reasoning_effort = "high"

[models."claude-opus-*"]
target = "gpt-5.5"

[models."claude-*haiku*"]
target = "gpt-5-mini"

[prices."gpt-5.5"]
input = 1000
output = 2000

[prices.claude-opus-4-1-20250805]
input = 5000
output = 9000
"""


@pytest.fixture(scope="module")
def mapped(sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    tmp = tmp_path_factory.mktemp("patterns")
    with running_relay(tmp, sim.url, body=CLAUDE_CODE_BODY) as server:
        yield server


@pytest.fixture
def client(mapped: Relay) -> openai.OpenAI:
    return openai.OpenAI(base_url=mapped.url + "/v1", api_key=mapped.key(), max_retries=0)


def upstream_chat(sim: Sim, marker: str) -> dict:
    found = [
        r for r in sim.requests()
        if r["path"].endswith("/chat/completions") and marker in json.dumps(r["body"])
    ]
    assert len(found) == 1, found
    return found[0]


def test_a_dated_sonnet_id_reaches_the_openai_account_as_its_target(
    client: openai.OpenAI, mapped: Relay, sim: Sim
) -> None:
    marker = f"sonnet-{time.monotonic_ns()}"
    raw = client.chat.completions.with_raw_response.create(
        model="claude-sonnet-4-5-20250929",
        messages=[{"role": "user", "content": f"{marker} #sim tokens=4"}],
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "tok tok tok tok"
    upstream = upstream_chat(sim, marker)
    assert upstream["body"]["model"] == "gpt-5.5"
    assert upstream["body"]["reasoning_effort"] == "high"
    row = mapped.usage_row(raw.headers["x-request-id"])
    assert (row["model"], row["upstream_model"], row["account"], row["status"]) == (
        "claude-sonnet-4-5-20250929", "gpt-5.5", "gpt-chat", 200,
    )
    # Priced as its target: the requested id has no price of its own.
    rate = PriceTable(load_config(mapped.config_path).prices).rate_for("gpt-5.5")
    assert row["cost_nano"] == cost(
        rate, input_tokens=row["input_tokens"], output_tokens=row["output_tokens"]
    ) > 0


def test_the_small_model_streams_through_its_pattern_and_an_exact_price_applies_first(
    client: openai.OpenAI, mapped: Relay, sim: Sim
) -> None:
    marker = f"haiku-{time.monotonic_ns()}"
    with client.chat.completions.with_streaming_response.create(
        model="claude-3-5-haiku-20241022",
        messages=[{"role": "user", "content": f"{marker} #sim tokens=3"}],
        stream=True,
    ) as response:
        text = "".join(
            choice.delta.content or "" for chunk in response.parse() for choice in chunk.choices
        )
        request_id = response.headers["x-request-id"]
    assert text == "tok tok tok"
    assert upstream_chat(sim, marker)["body"]["model"] == "gpt-5-mini"
    row = mapped.usage_row(request_id)
    assert (row["model"], row["upstream_model"]) == ("claude-3-5-haiku-20241022", "gpt-5-mini")

    raw = client.chat.completions.with_raw_response.create(
        model="claude-opus-4-1-20250805",
        messages=[{"role": "user", "content": "#sim tokens=2"}],
    )
    row = mapped.usage_row(raw.headers["x-request-id"])
    assert row["upstream_model"] == "gpt-5.5"
    prices = PriceTable(load_config(mapped.config_path).prices)
    own = prices.rate_for("claude-opus-4-1-20250805")
    assert own is not None and own.model == "claude-opus-4-1-20250805"
    assert row["cost_nano"] == cost(
        own, input_tokens=row["input_tokens"], output_tokens=row["output_tokens"]
    ) > 0


@pytest.mark.parametrize(
    "model", ["claude-3-opus-20240229", "claude-instant-1.2", "Claude-sonnet-4-5-20250929"]
)
def test_an_unmatched_claude_id_is_404_model_not_found(
    client: openai.OpenAI, sim: Sim, model: str
) -> None:
    before = len(sim.requests())
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "model_not_found"
    assert caught.value.body["param"] == "model"
    assert f"'{model}'" in caught.value.message
    assert len(sim.requests()) == before  # nothing went upstream


def test_the_model_list_has_no_patterns_and_a_mapped_id_can_be_retrieved(
    client: openai.OpenAI,
) -> None:
    assert [model.id for model in client.models.list()] == ["gpt-5-mini", "gpt-5.5"]
    assert client.models.retrieve("claude-opus-4-1-20250805").id == "claude-opus-4-1-20250805"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("claude-3-opus-20240229")


def test_the_readme_example_maps_claude_codes_ids_as_it_says() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### Model aliases and patterns", 1)[1]
    snippet = section.split("```toml\n", 1)[1].split("```", 1)[0]
    accounts = """
    [pools.main]

    [packages.team]
    pool = "main"

    [[accounts]]
    name = "gpt"
    pool = "main"
    provider = "openai-chat"
    base_url = "https://api.example.com/v1"
    models = ["gpt-5.5", "deepseek-chat"]
    """
    cfg = parse_config(tomllib.loads(accounts.replace("\n    ", "\n") + snippet))
    assert check_serving(cfg) == []
    catalog = Catalog(cfg)
    expected = {
        "claude-sonnet-4-5-20250929": ("gpt-5.5", "high"),
        "claude-opus-4-1-20250805": ("gpt-5.5", None),
        "claude-3-5-haiku-20241022": ("deepseek-chat", None),
        "claude-haiku-4-5-20251001": ("deepseek-chat", None),
    }
    for model, target in expected.items():
        assert route(catalog, cfg, "team", model) == target
    assert not catalog.can_call(cfg.packages["team"], "claude-3-opus-20240229")
