"""Secrets: where a resumed execution finds them, and how their values stay out of the log.

User data (step results, state, agent outputs, inputs, tags, log fields, metric tags) is never
rewritten: a value that contains a secret's value is refused with ``SecretLeakError``
(``Redactor.check``). Text for people that the engine writes (error messages, log messages,
agents' log tails, agent env values and command args) is redacted by replacement with
``[secret:NAME]`` (``Redactor.text``, ``Redactor.event``). Both use one matching rule
(``Redactor.find``): a value of 8 characters or more is found anywhere in a string; a shorter
one only as a whole token, so that ``"prod"`` is found in ``"env=prod"`` but not in
``"production-db"``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import reprlib
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import msgspec

from agentainer_flow.store.events import (
    AgentDeployRequested,
    AgentFailed,
    AgentOutput,
    CancelRequested,
    ChildWorkflowCompleted,
    Event,
    ExecutionCancelled,
    ExecutionFailed,
    LogRecorded,
    StepFailed,
    StepSkipped,
)

from .errors import ConfigurationError, SecretLeakError, SecretNotFoundError, SerializationError

__all__ = [
    "Redactor",
    "SecretStore",
    "decrypt_secrets",
    "encrypt_secrets",
    "redact_known",
    "resolve_secrets",
]

KEY_ENV = "FLOW_SECRETS_KEY"
#: values at least this long match anywhere; shorter ones only as a whole token
ANYWHERE_LEN = 8
_TAG = "__flow__"  # the envelope tag of ``values.dump``
_SCALAR_KINDS = frozenset({"int", "float", "datetime", "date", "time", "timedelta", "uuid",
                           "decimal"})
_B64 = re.compile(r"[A-Za-z0-9+/_-]{8,}={0,2}")
_URLSAFE = str.maketrans("-_", "+/")
_KEY = object()  # path marker: the secret is in the dict key the path ends with
_E = TypeVar("_E", bound=Event)

#: the text-for-people fields of each event type, redacted when an event is emitted
_TEXT_FIELDS: dict[type[Event], tuple[str, ...]] = {
    StepFailed: ("error",),
    ExecutionFailed: ("error",),
    LogRecorded: ("message",),
    AgentOutput: ("text",),
    AgentFailed: ("error", "log_tail"),
    AgentDeployRequested: ("env", "command"),
    ChildWorkflowCompleted: ("error",),
    StepSkipped: ("reason",),
    CancelRequested: ("reason",),
    ExecutionCancelled: ("reason",),
}

_live: weakref.WeakSet[Redactor] = weakref.WeakSet()


def _pattern(value: str) -> re.Pattern[str] | None:
    """``None`` when ``value`` matches anywhere, else a regex matching it as a whole token."""
    if len(value) >= ANYWHERE_LEN:
        return None
    left = r"(?<![^\W_])" if value[0].isalnum() else ""  # not after a letter/digit
    right = r"(?![^\W_])" if value[-1].isalnum() else ""  # not before a letter/digit
    return re.compile(left + re.escape(value) + right)


class Redactor:
    """Finds the values of an execution's secrets: refuses user data that holds one, and
    replaces them by ``[secret:NAME]`` in text for people."""

    __slots__ = ("__weakref__", "_latin", "_pairs")

    def __init__(self, secrets: Mapping[str, str] | None = None) -> None:
        pairs: list[tuple[str, str, re.Pattern[str] | None, str]] = []
        for name, raw in (secrets or {}).items():
            value = str(raw)
            if not value:
                raise ConfigurationError(
                    f"secret {name!r} is empty: an empty value cannot be kept out of the "
                    "event log; pass its real value, or do not pass it")
            pairs.append((name, value, _pattern(value), f"[secret:{name}]"))
        pairs.sort(key=lambda p: len(p[1]), reverse=True)  # longest first: no partial leaks
        self._pairs = pairs
        self._latin = any(not v.isascii() for _, v, _, _ in pairs)
        if pairs:
            _live.add(self)

    def __bool__(self) -> bool:
        return bool(self._pairs)

    # matching -------------------------------------------------------------------------
    def find(self, text: str) -> str | None:
        """The name of a secret whose value occurs in ``text``, else ``None``."""
        for name, value, pattern, _ in self._pairs:
            if value in text and (pattern is None or pattern.search(text) is not None):
                return name
        return None

    def find_bytes(self, data: bytes) -> str | None:
        """:meth:`find` in the UTF-8 (and, if need be, latin-1) decoding of ``data``."""
        name = self.find(data.decode("utf-8", "surrogateescape"))
        if name is None and self._latin and not data.isascii():
            name = self.find(data.decode("latin-1"))
        return name

    # text for people: replaced --------------------------------------------------------
    def text(self, s: str) -> str:
        """``s`` with every secret value replaced by ``[secret:NAME]``."""
        for _, value, pattern, ref in self._pairs:
            if value in s:
                # backslashes are the only special characters of a replacement template
                s = s.replace(value, ref) if pattern is None else pattern.sub(
                    ref.replace("\\", "\\\\"), s)
        return s

    def tail(self, s: str, chars: int) -> str:
        """The last ``chars`` characters of ``s`` (the end of a log, which its producer may
        have cut anywhere) redacted: whole secrets as :meth:`text` does, and a secret's
        last part (4 characters or more) that the cut left at its start."""
        s = self.text(s)
        for _, value, _, ref in self._pairs:
            for k in range(len(value) - 1, 3, -1):
                if s.startswith(value[-k:]):
                    s = ref + s[k:]
                    break
        return s[-chars:] if len(s) > chars else s

    def tree(self, v: Any) -> Any:
        """:meth:`text` applied to the strings (and keys) of a JSON-like tree."""
        if not self._pairs:
            return v
        if isinstance(v, str):
            return self.text(v)
        if isinstance(v, list | tuple):
            return [self.tree(x) for x in v]
        if isinstance(v, dict):
            return {self.text(k) if isinstance(k, str) else k: self.tree(x) for k, x in v.items()}
        return v

    def event(self, ev: _E) -> _E:
        """``ev`` with its text-for-people fields redacted (user data is checked, not here)."""
        names = _TEXT_FIELDS.get(type(ev))
        if not names or not self._pairs:
            return ev
        changes: dict[str, Any] = {}
        for field in names:
            old = getattr(ev, field)
            new = self.tree(old)
            if new != old:
                changes[field] = new
        return msgspec.structs.replace(ev, **changes) if changes else ev

    # user data: refused ---------------------------------------------------------------
    @property
    def scanner(self) -> Callable[[Any, str], None] | None:
        """:meth:`check` for ``values.dump(..., secrets=)``; ``None`` without secrets."""
        return self.check if self._pairs else None

    def check(self, value: Any, where: str) -> None:
        """Raise ``SecretLeakError`` if ``value`` (a ``values.dump`` tree, a string, a dict
        of strings) holds a secret's value; it names the secret and the path, never the value.
        """
        if not self._pairs:
            return
        path: list[Any] = []
        try:
            name = self._scan(value, path, False)
        except RecursionError:
            raise SerializationError(f"{self.text(where)}: value is nested too deeply") from None
        if name is not None:
            raise SecretLeakError(name, self.text(where), self.text(_render(path)))

    def _scan(self, v: Any, path: list[Any], b64: bool) -> str | None:
        """The first secret found in the tree ``v``, ``path`` left pointing at it. ``b64``:
        inside a pydantic model or msgspec Struct, whose bytes became base64 text."""
        t = type(v)
        if t is str:
            return self.find(v) or (self._find_b64(v) if b64 else None)
        if t is list:
            for i, x in enumerate(v):
                path.append(i)
                if (name := self._scan(x, path, b64)) is not None:
                    return name
                path.pop()
            return None
        if t is not dict:
            return None
        kind = v.get(_TAG)
        if type(kind) is not str:
            return self._scan_items(v.items(), path, b64)
        if kind == "bytes":
            try:
                data = base64.b64decode(v.get("v", ""), validate=True)
            except (binascii.Error, ValueError, TypeError):
                return None
            return self.find_bytes(data)
        if kind in ("tuple", "set", "frozenset"):
            return self._scan(v.get("items"), path, b64)
        if kind == "dict":
            for item in v.get("items") or ():
                k, x = item if type(item) is list and len(item) == 2 else (None, item)
                path.append(("[]", k))
                if (name := self._scan(k, path, b64)) is not None:
                    path.append(_KEY)
                    return name
                if (name := self._scan(x, path, b64)) is not None:
                    return name
                path.pop()
            return None
        if kind == "enum":
            return self._scan(v.get("v"), path, b64)
        if kind in ("pydantic", "struct", "dataclass"):
            b64 = b64 or kind != "dataclass"
            data = v["tree"] if "tree" in v else v.get("data")
            if type(data) is dict and _TAG not in data:
                return self._scan_items((((".", k), x) for k, x in data.items()), path, b64)
            return self._scan(data, path, b64)
        if kind in _SCALAR_KINDS:
            return None
        return self._scan_items(v.items(), path, b64)

    def _scan_items(self, items: Any, path: list[Any], b64: bool) -> str | None:
        for k, x in items:
            path.append(k)
            key = k[1] if type(k) is tuple else k
            if type(key) is str and (name := self.find(key)) is not None:
                path.append(_KEY)
                return name
            if (name := self._scan(x, path, b64)) is not None:
                return name
            path.pop()
        return None

    def _find_b64(self, s: str) -> str | None:
        if len(s) % 4 or not _B64.fullmatch(s):
            return None
        try:
            data = base64.b64decode(s.translate(_URLSAFE), validate=True)
        except (binascii.Error, ValueError):
            return None
        return self.find_bytes(data)


def _key_text(key: Any) -> str:
    """A dict key of a path, from its tree (a non-string key, e.g. a tuple)."""
    if type(key) in (str, int, float, bool) or key is None:
        return json.dumps(key, ensure_ascii=False)
    try:
        from .values import load

        return reprlib.repr(load(key))
    except Exception:
        return "<key>"


def _render(path: list[Any]) -> str:
    """``$["a"][2].field`` for a path of keys, indexes and attribute names."""
    out = ["$"]
    for seg in path:
        if seg is _KEY:
            out.append(" (in the key)")
        elif type(seg) is int:
            out.append(f"[{seg}]")
        elif type(seg) is tuple:
            out.append(f".{seg[1]}" if seg[0] == "." else f"[{_key_text(seg[1])}]")
        else:
            out.append(f"[{json.dumps(seg, ensure_ascii=False)}]")
    return "".join(out)


def redact_known(text: str) -> str:
    """``text`` with the values of every secret this process currently holds redacted
    (for records the engine does not own, e.g. the process runtime's ``spec.json``)."""
    for redactor in list(_live):
        text = redactor.text(text)
    return text


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

    Raises ``SecretNotFoundError`` for the first name none of them has, and
    ``ConfigurationError`` for an empty value.
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
    for name, value in out.items():
        if not str(value):
            raise ConfigurationError(
                f"secret {name!r} is empty (given, or in $FLOW_SECRET_{name.upper()}): an empty "
                "value cannot be kept out of the event log; give its real value")
    return out
