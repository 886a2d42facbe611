"""Which models a key may use, and which upstream accounts may serve a request.

:class:`Catalog` answers "what can this package call, and what does this model name mean"
(aliases, exact or patterns, resolved to a target model and a reasoning effort: the order is
:mod:`relay.model_names`'s). :class:`Scheduler` lists the
accounts that serve the model, in any protocol, best priority first; admission then takes the
least-loaded one that has room (its concurrency, TPM and RPM are guards like any other). Sticky
sessions (:mod:`.sessions`) and health (:mod:`.health`) plug in here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import trio

from ..config import AccountConfig, Config, PackageConfig
from ..errors import ModelNotFound
from ..guards.admission import Guard
from ..model_names import AliasTable, allowed, is_pattern
from .chatgpt import OAuthState
from .sessions import SessionBindings


@dataclass(frozen=True)
class ModelRoute:
    """What a requested model name resolves to for one package."""

    requested: str
    target: str
    reasoning_effort: str | None
    pool: str


class Catalog:
    """The model names each package may call and what they resolve to.

    A package's ``models`` allow-list is matched against the name the client sent (its entries
    may be patterns); the alias it resolves through does not need to be listed.
    """

    def __init__(self, config: Config) -> None:
        self._config = config
        self._aliases = AliasTable(config.models)
        self._served: dict[str, set[str]] = {}
        for account in config.accounts:
            self._served.setdefault(account.pool, set()).update(account.models)

    def models_for(self, package: PackageConfig) -> list[str]:
        """Model ids the package may call, sorted: served models and exact aliases onto them,
        and the plain names of its allow-list that resolve (through a pattern, say).

        Pattern aliases are not model ids and are not listed; the ids they map still resolve
        (:meth:`resolve`, :meth:`can_call`)."""
        served = self._served.get(package.pool, set())
        names = set(served)
        names.update(
            name for name, spec in self._aliases.exact.items() if spec.target in served
        )
        listed = sorted(name for name in names if allowed(package.models, name))
        extra = [
            name
            for name in package.models or ()
            if not is_pattern(name) and name not in names and self.can_call(package, name)
        ]
        return sorted([*listed, *extra])

    def resolve(self, package: PackageConfig, model: str) -> ModelRoute:
        """The route of ``model`` for ``package``: exact alias, else the model served directly
        by the package's pool, else the most specific pattern alias; 404 ``model_not_found``
        when the result is not served by the pool or the allow-list does not let the name in.
        ``requested`` is always the client's name."""
        served = self._served.get(package.pool, set())
        alias = self._aliases.lookup(model, served)
        target, effort = (alias.target, alias.reasoning_effort) if alias else (model, None)
        if target not in served or not allowed(package.models, model):
            raise ModelNotFound(
                f"The model '{model}' does not exist or you do not have access to it. "
                "GET /v1/models lists the models your key can use.",
                param="model",
            )
        return ModelRoute(
            requested=model, target=target, reasoning_effort=effort, pool=package.pool
        )

    def can_call(self, package: PackageConfig, model: str) -> bool:
        """Whether :meth:`resolve` would route ``model`` for ``package``."""
        try:
            self.resolve(package, model)
        except ModelNotFound:
            return False
        return True


class Account:
    """An upstream account and its guard (concurrency, TPM, RPM) in this process."""

    def __init__(self, config: AccountConfig) -> None:
        self.config = config
        self.guard = Guard(
            config.name,
            max_concurrency=config.max_concurrency,
            tpm=config.tpm,
            rpm=config.rpm,
            priority=config.priority,
        )
        self.consecutive_failures = 0
        self.rate_limited = 0
        self.last_error = ""
        self.last_error_at: float | None = None
        #: A ChatGPT-plan account's tokens and usage windows (relay/upstream/chatgpt.py).
        self.oauth = OAuthState() if config.provider == "codex-chatgpt" else None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def missing_credentials(self) -> bool:
        """The account names a key variable (``api_key_env``) that is unset or empty now, or
        is a ChatGPT-plan account with no tokens: it can only earn a 401 upstream, so it is
        shown unhealthy and tried after the others."""
        if self.oauth is not None:
            return self.oauth.tokens is None
        return self.config.api_key_env is not None and self.config.api_key() is None

    def no_room(self, now: float) -> bool:
        """A ChatGPT-plan account whose usage window is used up (it is tried last)."""
        return self.oauth is not None and self.oauth.no_room(now)


class Scheduler:
    """Which accounts may serve a request, best first; admission picks among them."""

    def __init__(self, config: Config) -> None:
        self.accounts = [Account(account) for account in config.accounts]
        self.by_name = {account.name: account for account in self.accounts}
        self.sessions = SessionBindings(config.server.session_ttl_s)

    def candidates(self, route: ModelRoute, native_kind: str) -> list[Account]:
        """Accounts of the route's pool that serve its model, whatever protocol they speak
        (the answer is translated), highest priority first; 404 if there are none.

        Accounts whose usage window is known to be used up (ChatGPT-plan accounts) come after
        those with room, as do accounts without credentials. Within a priority, accounts that
        speak the client's protocol (``native_kind``) come first: admission takes the
        least-loaded account and keeps the first on a tie, so an
        idle relayed path (bytes passed through) is preferred to an idle translated one.
        """
        found = [
            account
            for account in self.accounts
            if account.config.pool == route.pool and route.target in account.config.models
        ]
        if not found:
            raise ModelNotFound(
                f"The model '{route.requested}' is not served by any upstream account of this "
                "relay. GET /v1/models lists the models your key can use.",
                param="model",
            )
        now = time.time()
        return sorted(
            found,
            key=lambda account: (
                account.missing_credentials,
                account.no_room(now),
                -account.config.priority,
                account.config.wire != native_kind,
            ),
        )

    def status(self) -> dict[str, dict]:
        now = trio.current_time()
        bound = self.sessions.per_account()
        return {
            account.name: {
                "provider": account.config.provider,
                **account.guard.status(now),
                "healthy": not account.guard.disabled
                and account.guard.unavailable_until <= now
                and not account.missing_credentials,
                "missing_credentials": account.missing_credentials,
                "rate_limited": account.rate_limited,
                "last_error": account.last_error or None,
                "sessions": bound.get(account.name, 0),
                **({"oauth": account.oauth.public()} if account.oauth is not None else {}),
            }
            for account in self.accounts
        }
