"""``relay accounts import-codex-auth`` and what ``relay accounts list`` shows of ChatGPT-plan
accounts (kept apart from :mod:`relay.cli`, which registers the commands).

The import reads a Codex ``auth.json`` (written by ``codex login``), checks it holds a ChatGPT
login, and stores its tokens sealed in the ledger (relay/ledger/vault.py); they never go into
the configuration file. An access token that has already expired is renewed at once: a login
whose refresh token is dead is refused here, not found out by the first request. No token is
ever printed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx2

from .config import Config
from .ledger.expiry import format_moment
from .ledger.store import Store
from .ledger.vault import Vault, VaultError, secret_from_env
from .protocol.chatgpt import OAuthTokens, read_codex_auth, refresh_failure


class ImportRefused(Exception):
    """The auth.json cannot be imported; the message says why and what to do."""


def import_codex_auth(config: Config, name: str, path: str, store: Store) -> OAuthTokens:
    """Check ``path`` and store its tokens as account ``name``'s; returns what was stored."""
    account = next((a for a in config.accounts if a.name == name), None)
    if account is None:
        known = ", ".join(a.name for a in config.accounts) or "none"
        raise ImportRefused(f"no account named {name!r} in the configuration (accounts: {known})")
    if account.provider != "codex-chatgpt":
        raise ImportRefused(
            f"account {name!r} is a {account.provider} account; a Codex auth.json is imported "
            "into a provider = \"codex-chatgpt\" account"
        )
    env = config.server.secret_key_env
    try:
        vault = Vault(store, secret_from_env(env), env)
    except VaultError as error:
        raise ImportRefused(str(error)) from None
    file = Path(path).expanduser()
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ImportRefused(f"{file}: file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ImportRefused(f"{file}: cannot be read ({error})") from None
    except ValueError as error:
        raise ImportRefused(f"{file} is not JSON ({error}); a Codex auth.json is") from None
    try:
        tokens = read_codex_auth(data)
    except ValueError as error:
        raise ImportRefused(f"{file} cannot be imported: {error}") from None
    if (tokens.expires_at or 0) <= time.time():
        tokens = _renew(account.token_url or "", account.client_id or "", tokens, file)
    vault.save(name, tokens)
    return tokens


def _renew(token_url: str, client_id: str, tokens: OAuthTokens, file: Path) -> OAuthTokens:
    """The expired login of ``file`` renewed at the token endpoint, or :class:`ImportRefused`."""
    try:
        response = httpx2.post(
            token_url,
            json={"client_id": client_id, "grant_type": "refresh_token",
                  "refresh_token": tokens.refresh_token},
            timeout=30,
        )
    except httpx2.HTTPError as error:
        raise ImportRefused(
            f"the access token of {file} has expired and the token endpoint could not be reached "
            f"to renew it ({type(error).__name__}); try again when it can"
        ) from None
    if response.status_code >= 300:
        permanent, code = refresh_failure(response.status_code, response.content)
        if permanent:
            raise ImportRefused(
                f"the login in {file} has expired beyond refresh ({code}); run `codex login` "
                "again and import the new auth.json"
            )
        raise ImportRefused(
            f"the access token of {file} has expired and the token endpoint answered {code}; "
            "try again later"
        )
    try:
        payload = response.json()
    except ValueError:
        payload = None
    access = payload.get("access_token") if isinstance(payload, dict) else None
    if not isinstance(access, str) or not access:
        raise ImportRefused("the token endpoint answered without an access_token; try again")
    return OAuthTokens(
        access_token=access,
        refresh_token=payload.get("refresh_token") or tokens.refresh_token,
        id_token=payload.get("id_token") or tokens.id_token,
        account_id=tokens.account_id,
        last_refresh=time.time(),
    )


def describe_import(name: str, tokens: OAuthTokens) -> str:
    """What the import prints: the account, its plan and the token's end, no token."""
    expires = tokens.expires_at
    plan = f", plan {tokens.plan_type}" if tokens.plan_type else ""
    return (
        f"{name}: tokens of ChatGPT account {tokens.account_id[:8]}…{plan} stored, encrypted; "
        f"access token valid until {format_moment(expires) if expires else 'unknown'}. "
        "A running relay takes them within seconds (`relay accounts enable "
        f"{name}` if it is out of service). Do not use this login elsewhere any more: the "
        "relay rotates its refresh token, and the other copy would be locked out."
    )


def oauth_lines(account: dict) -> list[str]:
    """The extra lines ``relay accounts list`` prints under a codex-chatgpt account."""
    oauth = account.get("oauth")
    if not oauth:
        return []
    lines = []
    if not oauth.get("has_tokens"):
        lines.append("no tokens: relay accounts import-codex-auth")
    else:
        expires = oauth.get("access_expires_at")
        refreshed = oauth.get("last_refresh")
        lines.append(
            f"chatgpt {oauth.get('chatgpt_account') or '?'}"
            + (f" ({oauth['plan_type']})" if oauth.get("plan_type") else "")
            + f", token until {format_moment(expires) if expires else '?'}"
            + f", last refresh {format_moment(refreshed) if refreshed else 'never'}"
            + f", {oauth.get('refreshes', 0)} refreshes"
            + (f", last failure: {oauth['last_refresh_error']}"
               if oauth.get("last_refresh_error") else "")
        )
    windows = oauth.get("usage_windows") or {}
    if windows:
        lines.append("usage " + ", ".join(
            f"{name} {window['used_percent']:g}%"
            + (f" of {window['window_minutes']}min" if window.get("window_minutes") else "")
            + (f" (resets {format_moment(window['resets_at'])})"
               if window.get("resets_at") else "")
            for name, window in windows.items()
        ))
    if account.get("cooling_until"):
        lines.append(f"cooling until {format_moment(account['cooling_until'])}")
    if oauth.get("out_of_service_reason"):
        lines.append(f"out of service: {oauth['out_of_service_reason']}")
    return lines
