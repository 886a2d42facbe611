"""Whether a valid configuration can serve here: ``relay check-config`` and ``relay serve``.

:func:`.config.parse_config` proves a file well-formed; these go further, on the parsed
:class:`.config.Config`: :func:`check_serving` finds what would make every request of a kind
fail (no account, an alias or a package model that no account serves) and
:func:`load_servable_config` refuses such a file; :func:`check_warnings` and
:func:`check_environment` report what may be intended but costs something (prices of models
nothing serves, an unset credentials variable), without refusing.
"""

from __future__ import annotations

import os

from .config import Config, ConfigError, ConfigIssue, _join, load_config
from .model_names import AliasTable, is_pattern, matches, may_overlap

__all__ = [
    "check_environment",
    "check_serving",
    "check_warnings",
    "load_servable_config",
    "unset_key_variables",
]


def check_environment(config: Config) -> list[ConfigIssue]:
    """Accounts whose ``api_key_env`` names a variable that is unset (or empty) right now, and
    the secret key of codex-chatgpt accounts' tokens (``server.secret_key_env``) unset.

    Kept apart from :func:`parse_config` because the file can be valid where it does not run;
    ``relay serve`` reports these at start-up, and such accounts cannot authenticate upstream.
    """
    issues = [
        ConfigIssue(f"accounts[{index}].api_key_env", f"environment variable {env} {problem}")
        for index, env, problem in unset_key_variables(config)
    ]
    env = config.server.secret_key_env
    if any(a.provider == "codex-chatgpt" for a in config.accounts) and not os.environ.get(env):
        issues.append(ConfigIssue(
            "server.secret_key_env",
            f"environment variable {env} is not set: the codex-chatgpt accounts' tokens cannot "
            "be opened",
        ))
    return issues


def unset_key_variables(config: Config) -> list[tuple[int, str, str]]:
    """(account index, variable, "is not set" / "is empty") for each account without its key."""
    unset = []
    for index, account in enumerate(config.accounts):
        env = account.api_key_env
        if env is None:
            continue
        value = os.environ.get(env)
        if value is None:
            unset.append((index, env, "is not set"))
        elif not value:
            unset.append((index, env, "is empty"))
    return unset


def _served(config: Config, pool: str | None = None) -> set[str]:
    """The models the accounts serve (only those of ``pool``, if given)."""
    return {
        model
        for account in config.accounts
        if pool is None or account.pool == pool
        for model in account.models
    }


# --------------------------------------------------------------------------------------------
# Can the file serve? (``relay check-config`` and ``relay serve``)
# --------------------------------------------------------------------------------------------


def check_serving(config: Config) -> list[ConfigIssue]:
    """What makes a valid file unable to serve, each at its key path; empty when it can serve.

    :func:`parse_config` checks each value and reference on its own; this checks the file as a
    relay: it defines at least one account, every alias's target (a pattern alias's too) is
    served by some account, and every model a package lists is served (directly or through an
    alias) by an account of the package's pool; a pattern in a package's list must be able to
    match something the pool serves. A pattern alias that shadows nothing is fine. A file that
    passes serves every model it names without an error of its own making. Kept apart from
    :func:`parse_config` so a fragment (a ``[server]`` table alone) is still a valid
    configuration to parse; ``relay serve`` and ``relay check-config`` refuse what this
    reports.
    """
    issues: list[ConfigIssue] = []
    if not config.accounts:
        if not (config.pools or config.packages or config.models or config.prices):
            message = "the file defines nothing to serve: add at least one [[accounts]] entry"
        else:
            message = "no [[accounts]] entry: the relay has no upstream to serve any model"
        issues.append(ConfigIssue("accounts", message))
    served = _served(config)
    for name, alias in config.models.items():
        if alias.target not in served:
            issues.append(
                ConfigIssue(
                    f"{_join('models', name)}.target",
                    f"no account serves {alias.target!r} ({_served_list(served)})",
                )
            )
    aliases = AliasTable(config.models)
    for name, package in config.packages.items():
        if package.models is None:
            continue
        pool_served = _served(config, package.pool)
        for index, model in enumerate(package.models):
            problem = _unreachable(config, aliases, model, pool_served)
            if problem is None:
                continue
            issues.append(
                ConfigIssue(
                    f"{_join('packages', name)}.models[{index}]",
                    f"no account of pool {package.pool!r} serves {problem} "
                    f"({_served_list(pool_served)})",
                )
            )
    return issues


def _unreachable(
    config: Config, aliases: AliasTable, entry: str, pool_served: set[str]
) -> str | None:
    """What a package ``models`` entry names that its pool cannot serve, or ``None`` if it lets
    some request through.

    A plain name must resolve (as the relay resolves it) to a model the pool serves. A pattern
    entry is fine when it matches a served model or an exact alias onto one, or may match the
    same names as a pattern alias onto one (:func:`may_overlap`: refused only when it cannot).
    """
    if not is_pattern(entry):
        alias = aliases.lookup(entry, pool_served)
        target = alias.target if alias is not None else entry
        if target in pool_served:
            return None
        if alias is None:
            return repr(entry)
        kind = "a pattern alias" if is_pattern(alias.name) else "an alias"
        via = f" through {alias.name!r}" if is_pattern(alias.name) else ""
        return f"{entry!r} ({kind} of {target!r}{via})"
    if any(matches(model, entry) for model in pool_served):
        return None
    for alias in config.models.values():
        if alias.target not in pool_served:
            continue
        if is_pattern(alias.name) and may_overlap(entry, alias.name):
            return None
        if not is_pattern(alias.name) and matches(alias.name, entry):
            return None
    return f"a model matching {entry!r}"


def _served_list(served: set[str]) -> str:
    return f"served: {', '.join(sorted(served))}" if served else "no account serves any model"


def check_warnings(config: Config) -> list[ConfigIssue]:
    """What a servable file may hold but an operator should know: prices that never apply,
    packages whose pool has no account, and accounts whose key variable is unset or empty
    (:func:`check_environment`; such an account shows as "missing credentials")."""
    warnings: list[ConfigIssue] = []
    served = _served(config)
    for model in config.prices:
        if is_pattern(model):
            warnings.append(
                ConfigIssue(
                    _join("prices", model),
                    "prices are looked up by exact model id, not by pattern: this price never "
                    "applies (a pattern alias's requests pay the price of the id asked for, "
                    "else its target's)",
                )
            )
        elif model not in served and model not in config.models:
            warnings.append(
                ConfigIssue(
                    _join("prices", model),
                    f"no account serves {model!r} and no alias has that name: "
                    "this price never applies",
                )
            )
    pools_with_accounts = {account.pool for account in config.accounts}
    for name, package in config.packages.items():
        if package.pool not in pools_with_accounts:
            warnings.append(
                ConfigIssue(
                    f"{_join('packages', name)}.pool",
                    f"pool {package.pool!r} has no account: this package's keys can call no model",
                )
            )
    for index, env, problem in unset_key_variables(config):
        warnings.append(
            ConfigIssue(
                f"accounts[{index}].api_key_env",
                f"environment variable {env} {problem}: account "
                f"{config.accounts[index].name!r} has missing credentials and cannot "
                "authenticate upstream until it is set",
            )
        )
    return warnings


def load_servable_config(path: str | os.PathLike[str]) -> Config:
    """:func:`load_config`, then :func:`check_serving`: a :class:`ConfigError` unless the file
    can serve. What ``relay serve`` and ``relay check-config`` load."""
    config = load_config(path)
    issues = check_serving(config)
    if issues:
        raise ConfigError(issues, source=config.source)
    return config
