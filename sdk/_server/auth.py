"""API tokens of ``flow server``: made, stored hashed, checked on every request.

A token is ``afl_`` followed by 43 characters of URL-safe base64 (32 random bytes), so it is
recognisable in a leak scan and cannot be guessed. The store keeps only its SHA-256 (hex)
and its first characters (``prefix``, shown by ``flow token list``); the token itself is
shown once, when it is created. Scopes nest: ``read`` reads, ``write`` also starts, cancels,
resumes and retries executions, ``admin`` also manages tokens.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Sequence

from agentainer_flow.engine.errors import ConfigurationError
from agentainer_flow.store import EventStore
from agentainer_flow.store.base import TokenRecord

__all__ = [
    "SCOPES",
    "TOKEN_PREFIX",
    "Authenticator",
    "bearer_token",
    "create_token",
    "find_token",
    "hash_token",
    "looks_like_token",
    "scope_allows",
    "scopes_at_least",
]

#: every token starts with this, so that scanners and people recognise one
TOKEN_PREFIX = "afl_"
#: random bytes in a token
TOKEN_BYTES = 32
#: scopes, weakest first: each allows what the ones before it do
SCOPES: tuple[str, ...] = ("read", "write", "admin")
#: characters of a token kept in the clear (with the prefix) to tell tokens apart in lists
_SHOWN = 6
#: seconds between two writes of one token's ``last_used_at``
_TOUCH_EVERY = 60.0


def hash_token(token: str) -> str:
    """The SHA-256 (hex) under which a token is stored."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def looks_like_token(text: str) -> bool:
    """Whether ``text`` has the shape of one of our tokens (for refusing it where it must
    not be, e.g. in a URL's query string)."""
    return text.startswith(TOKEN_PREFIX) and len(text) > len(TOKEN_PREFIX) + 20


def scope_allows(scope: str, needed: str) -> bool:
    """Whether a token of ``scope`` may do what needs ``needed``."""
    if scope not in SCOPES or needed not in SCOPES:
        return False
    return SCOPES.index(scope) >= SCOPES.index(needed)


def _check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise ConfigurationError(
            f"unknown token scope {scope!r}: use one of {', '.join(SCOPES)} (read: read only; "
            "write: also start, cancel, resume and retry executions; admin: also manage tokens)")
    return scope


async def create_token(store: EventStore, name: str,
                       scope: str = "read") -> tuple[str, TokenRecord]:
    """Make a token, store its hash, and return ``(token, record)``: the token is not kept
    anywhere, so this is the only time it can be shown.

    Raises ``ConfigurationError`` for an empty name, an unknown scope, or a name a live
    token already has (revoke that one first, or pick another name).
    """
    name = name.strip()
    if not name:
        raise ConfigurationError("a token needs a name (--name NAME), to tell it apart later")
    _check_scope(scope)
    token = TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
    record = TokenRecord(id="tok_" + secrets.token_hex(6), name=name, scope=scope,
                         hash=hash_token(token), prefix=token[:len(TOKEN_PREFIX) + _SHOWN],
                         created_at=time.time())
    if not await store.create_token(record):
        raise ConfigurationError(
            f"a live token named {name!r} exists already: revoke it first (flow token revoke "
            f"{name}) or pick another name")
    return token, record


async def find_token(store: EventStore, id_or_name: str) -> TokenRecord:
    """The live token with this id, else the live token with this name.

    Raises ``ConfigurationError`` naming the live tokens when there is none.
    """
    tokens = await store.list_tokens()
    live = [t for t in tokens if not t.revoked]
    for found in ([t for t in live if t.id == id_or_name],
                  [t for t in live if t.name == id_or_name]):
        if found:
            return found[0]
    known = ", ".join(f"{t.id} ({t.name})" for t in live) or "none"
    raise ConfigurationError(f"no live token with id or name {id_or_name!r} (live tokens: {known})")


class Authenticator:
    """Checks bearer tokens against the store: a token is accepted while it exists and is
    not revoked (looked up on every request, so a revocation holds at once)."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self._touched: dict[str, float] = {}

    async def check(self, token: str | None) -> TokenRecord | None:
        """The live token's record, or ``None`` (missing, unknown or revoked: the caller
        says the same in every case)."""
        if not token or not token.startswith(TOKEN_PREFIX):
            return None
        record = await self.store.get_token(hash_token(token))
        if record is None or record.revoked:
            return None
        now = time.time()
        if now - self._touched.get(record.id, 0.0) >= _TOUCH_EVERY:
            self._touched[record.id] = now
            await self.store.touch_token(record.id, now)
        return record


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme in any case)."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


def scopes_at_least(needed: str) -> Sequence[str]:
    """The scopes that allow what needs ``needed`` (for messages)."""
    return SCOPES[SCOPES.index(needed):]
