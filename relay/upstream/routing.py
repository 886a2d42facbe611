"""Which models a key may use, and which upstream account serves a request.

:class:`Catalog` answers "what can this package call, and what does this model name mean"
(aliases resolved to a target model and a reasoning effort). :class:`Scheduler` picks the account
and holds the account's own concurrency slot while the upstream call runs. Today it picks the
first healthy account of the best priority that serves the model in the client's protocol;
sticky sessions, health and failover plug in behind ``checkout``.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from ..config import AccountConfig, Config, PackageConfig
from ..errors import ModelNotFound


@dataclass(frozen=True)
class ModelRoute:
    """What a requested model name resolves to for one package."""

    requested: str
    target: str
    reasoning_effort: str | None
    pool: str


class Catalog:
    def __init__(self, config: Config) -> None:
        self._config = config
        self._served: dict[str, set[str]] = {}
        for account in config.accounts:
            self._served.setdefault(account.pool, set()).update(account.models)

    def models_for(self, package: PackageConfig) -> list[str]:
        """Model ids the package may call: served targets plus aliases onto them, sorted."""
        served = self._served.get(package.pool, set())
        names = set(served)
        names.update(
            alias for alias, spec in self._config.models.items() if spec.target in served
        )
        if package.models is not None:
            names &= set(package.models)
        return sorted(names)

    def resolve(self, package: PackageConfig, model: str) -> ModelRoute:
        served = self._served.get(package.pool, set())
        alias = self._config.models.get(model)
        target, effort = (alias.target, alias.reasoning_effort) if alias else (model, None)
        allowed = package.models is None or model in package.models
        if target not in served or not allowed:
            raise ModelNotFound(
                f"The model '{model}' does not exist or you do not have access to it. "
                "GET /v1/models lists the models your key can use.",
                param="model",
            )
        return ModelRoute(
            requested=model, target=target, reasoning_effort=effort, pool=package.pool
        )


class Account:
    """An upstream account and its live state in this process."""

    def __init__(self, config: AccountConfig) -> None:
        self.config = config
        self.limiter = trio.CapacityLimiter(
            config.max_concurrency if config.max_concurrency is not None else math.inf
        )

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def in_flight(self) -> int:
        return self.limiter.borrowed_tokens


class Scheduler:
    def __init__(self, config: Config) -> None:
        self.accounts = [Account(account) for account in config.accounts]

    def candidates(self, route: ModelRoute, provider: str) -> list[Account]:
        """Accounts of the route's pool that serve its model in ``provider``'s protocol."""
        found = [
            account
            for account in self.accounts
            if account.config.pool == route.pool
            and account.config.provider == provider
            and route.target in account.config.models
        ]
        return sorted(found, key=lambda account: -account.config.priority)

    @asynccontextmanager
    async def checkout(self, route: ModelRoute, provider: str) -> AsyncIterator[Account]:
        """Hold a slot on an account that can serve ``route``; released when the block exits."""
        accounts = self.candidates(route, provider)
        if not accounts:
            endpoint = "/v1/chat/completions" if provider == "openai-chat" else "/v1/responses"
            raise ModelNotFound(
                f"The model '{route.requested}' is not available through {endpoint} on this "
                "relay: no upstream account serves it in that protocol.",
                param="model",
            )
        account = accounts[0]
        borrower = object()
        await account.limiter.acquire_on_behalf_of(borrower)
        try:
            yield account
        finally:
            account.limiter.release_on_behalf_of(borrower)

    def in_flight(self) -> dict[str, int]:
        return {account.name: account.in_flight for account in self.accounts}
