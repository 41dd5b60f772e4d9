"""Secrets: where a resumed execution finds them, how they stay out of the log.

Secret *values* never reach the event log, logs, CLI output or exception text: the log
records only secret names, and the ``Redactor`` replaces any secret value found in a string
an event, log line or error would carry with ``[secret:NAME]``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from .errors import ConfigurationError, SecretNotFoundError

__all__ = ["Redactor", "SecretStore", "decrypt_secrets", "encrypt_secrets", "resolve_secrets"]

KEY_ENV = "FLOW_SECRETS_KEY"
_MIN_LEN = 3  # shorter values would redact ordinary text


class Redactor:
    """Replaces secret values by ``[secret:NAME]`` in strings and JSON trees."""

    __slots__ = ("_pairs",)

    def __init__(self, secrets: Mapping[str, str] | None = None) -> None:
        pairs = [(v, f"[secret:{k}]") for k, v in (secrets or {}).items()
                 if isinstance(v, str) and len(v) >= _MIN_LEN]
        pairs.sort(key=lambda p: len(p[0]), reverse=True)  # longest first: no partial leaks
        self._pairs = pairs

    def __bool__(self) -> bool:
        return bool(self._pairs)

    def text(self, s: str) -> str:
        for value, ref in self._pairs:
            if value in s:
                s = s.replace(value, ref)
        return s

    def tree(self, v: Any) -> Any:
        if not self._pairs:
            return v
        if isinstance(v, str):
            return self.text(v)
        if isinstance(v, list):
            return [self.tree(x) for x in v]
        if isinstance(v, dict):
            return {self.text(k) if isinstance(k, str) else k: self.tree(x) for k, x in v.items()}
        return v


class SecretStore(Mapping[str, str]):
    """``ctx.secrets``: read-only; a missing name is a ``SecretNotFoundError``."""

    __slots__ = ("_fallback", "_values")

    def __init__(
        self, values: Mapping[str, str], fallback: Callable[[str], str] | None = None
    ) -> None:
        self._values = dict(values)
        self._fallback = fallback

    def __getitem__(self, name: str) -> str:
        try:
            return self._values[name]
        except KeyError:
            if self._fallback is not None:
                return self._fallback(name)
            raise SecretNotFoundError(name) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"SecretStore({sorted(self._values)})"


def _fernet(key: str) -> Any:
    from cryptography.fernet import Fernet

    try:
        return Fernet(key.encode())
    except ValueError as exc:
        raise ConfigurationError(
            f"{KEY_ENV} is not a valid key ({exc}); generate one with python -c "
            "'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'"
        ) from None


def encrypt_secrets(secrets: Mapping[str, str]) -> bytes | None:
    """Encrypted blob for the store when ``FLOW_SECRETS_KEY`` is set, else ``None``."""
    key = os.environ.get(KEY_ENV)
    if not key or not secrets:
        return None
    token: bytes = _fernet(key).encrypt(json.dumps(dict(secrets)).encode())
    return token


def decrypt_secrets(blob: bytes | None) -> dict[str, str]:
    """The secrets in a blob from :func:`encrypt_secrets`; empty without key or blob."""
    key = os.environ.get(KEY_ENV)
    if not blob or not key:
        return {}
    from cryptography.fernet import InvalidToken

    try:
        data: dict[str, str] = json.loads(_fernet(key).decrypt(blob))
    except InvalidToken:
        raise ConfigurationError(
            f"{KEY_ENV} does not decrypt this execution's secrets (was the key rotated?)"
        ) from None
    return data


def resolve_secrets(
    names: list[str], given: Mapping[str, str] | None, blob: bytes | None
) -> dict[str, str]:
    """Secrets for a resumed execution: given > ``FLOW_SECRET_<NAME>`` > encrypted blob.

    Raises ``SecretNotFoundError`` for the first name none of them has.
    """
    given = dict(given or {})
    stored: dict[str, str] | None = None
    out: dict[str, str] = {}
    for name in names:
        if name in given:
            out[name] = given[name]
            continue
        env = os.environ.get(f"FLOW_SECRET_{name.upper()}")
        if env is not None:
            out[name] = env
            continue
        if stored is None:
            stored = decrypt_secrets(blob)
        if name in stored:
            out[name] = stored[name]
            continue
        raise SecretNotFoundError(name, "needed to resume this execution")
    return out
