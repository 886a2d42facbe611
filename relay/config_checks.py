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

__all__ = [
    "check_environment",
    "check_serving",
    "check_warnings",
    "load_servable_config",
    "unset_key_variables",
]


def check_environment(config: Config) -> list[ConfigIssue]:
    """Accounts whose ``api_key_env`` names a variable that is unset (or empty) right now.

    Kept apart from :func:`parse_config` because the file can be valid where it does not run;
    ``relay serve`` reports these at start-up, and such accounts cannot authenticate upstream.
    """
    return [
        ConfigIssue(f"accounts[{index}].api_key_env", f"environment variable {env} {problem}")
        for index, env, problem in unset_key_variables(config)
    ]


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
    relay: it defines at least one account, every alias's target is served by some account, and
    every model a package lists is served (directly or through an alias) by an account of the
    package's pool. A file that passes serves every model it names without an error of its own
    making. Kept apart from :func:`parse_config` so a fragment (a ``[server]`` table alone) is
    still a valid configuration to parse; ``relay serve`` and ``relay check-config`` refuse what
    this reports.
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
    for name, package in config.packages.items():
        if package.models is None:
            continue
        pool_served = _served(config, package.pool)
        for index, model in enumerate(package.models):
            alias = config.models.get(model)
            target = alias.target if alias is not None else model
            if target in pool_served:
                continue
            what = f"{model!r} (an alias of {target!r})" if alias is not None else repr(model)
            issues.append(
                ConfigIssue(
                    f"{_join('packages', name)}.models[{index}]",
                    f"no account of pool {package.pool!r} serves {what} "
                    f"({_served_list(pool_served)})",
                )
            )
    return issues


def _served_list(served: set[str]) -> str:
    return f"served: {', '.join(sorted(served))}" if served else "no account serves any model"


def check_warnings(config: Config) -> list[ConfigIssue]:
    """What a servable file may hold but an operator should know: prices that never apply,
    packages whose pool has no account, and accounts whose key variable is unset or empty
    (:func:`check_environment`; such an account shows as "missing credentials")."""
    warnings: list[ConfigIssue] = []
    served = _served(config)
    for model in config.prices:
        if model not in served and model not in config.models:
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
