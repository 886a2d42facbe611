"""OAuth tokens of upstream accounts, encrypted at rest in the ledger.

Tokens are sealed with Fernet (``cryptography``: AES-128-CBC with an HMAC-SHA256, a timestamp
and a random IV per message) before they reach :class:`~relay.ledger.store.Store`, so the SQLite
file, its backups and its WAL never hold a usable token. The key comes from the environment
variable ``server.secret_key_env`` names (default ``RELAY_SECRET_KEY``), never from the file:

* a Fernet key (``python -c "from cryptography.fernet import Fernet;
  print(Fernet.generate_key().decode())"``) is used as it is;
* any other secret of at least :data:`MIN_SECRET_CHARS` characters is stretched to one with
  HKDF-SHA256 (so ``openssl rand -hex 32`` works too).

A wrong key (another machine's, a rotated one) opens nothing: :meth:`Vault.load` raises
:class:`VaultError` saying so, and the account must be imported again.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..protocol.chatgpt import OAuthTokens
from .store import Store

#: The shortest secret accepted when it is not a Fernet key (32 characters: 128 bits or more
#: from any hex or base64 generator).
MIN_SECRET_CHARS = 32

_HKDF_INFO = b"relay account tokens v1"

GENERATE_HINT = (
    "generate one with: python -c \"from cryptography.fernet import Fernet; "
    "print(Fernet.generate_key().decode())\""
)


class VaultError(Exception):
    """The tokens cannot be sealed or opened; the message says what the operator can do."""


def fernet_for(secret: str) -> Fernet:
    """The Fernet of a secret (a Fernet key, or a long secret stretched with HKDF)."""
    try:
        if len(base64.urlsafe_b64decode(secret.encode())) == 32:
            return Fernet(secret.encode())
    except (ValueError, binascii.Error):
        pass
    if len(secret) < MIN_SECRET_CHARS:
        raise VaultError(
            f"the secret key is too short (it must be a Fernet key or at least "
            f"{MIN_SECRET_CHARS} characters); {GENERATE_HINT}"
        )
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(
        secret.encode()
    )
    return Fernet(base64.urlsafe_b64encode(key))


def secret_from_env(env_name: str) -> str:
    """The secret key from the environment, or :class:`VaultError` naming the variable."""
    secret = os.environ.get(env_name)
    if not secret:
        raise VaultError(
            f"set {env_name} (server.secret_key_env) to the key that encrypts account tokens "
            f"in the ledger; {GENERATE_HINT}"
        )
    return secret


class Vault:
    """Sealed tokens per account name, in the store. Methods are blocking (SQLite): call them
    through ``trio.to_thread.run_sync`` from the relay."""

    def __init__(self, store: Store, secret: str, env_name: str = "RELAY_SECRET_KEY") -> None:
        self._store = store
        self._fernet = fernet_for(secret)
        self._env_name = env_name

    def load(self, account: str) -> OAuthTokens | None:
        """The account's tokens as last saved by any process; None if it has none."""
        sealed = self._store.sealed_tokens(account)
        if sealed is None:
            return None
        try:
            return OAuthTokens.from_json(self._fernet.decrypt(sealed.encode()).decode())
        except InvalidToken:
            raise VaultError(
                f"the stored tokens of account {account} do not open with the key in "
                f"{self._env_name}: it is not the key they were imported with; set that key, "
                "or import the account's auth.json again"
            ) from None

    def take_lock(self, name: str, owner: str, ttl_s: float) -> bool:
        """The ledger's lock (:meth:`~relay.ledger.store.Store.take_lock`)."""
        return self._store.take_lock(name, owner, ttl_s)

    def release_lock(self, name: str, owner: str) -> None:
        self._store.release_lock(name, owner)

    def save(self, account: str, tokens: OAuthTokens) -> None:
        """Seal and store the tokens (committed when this returns)."""
        self._store.put_sealed_tokens(
            account, self._fernet.encrypt(tokens.to_json().encode()).decode()
        )
