"""Type-preserving encoding of user values (step results, state, inputs) to JSON trees.

Plain JSON values are stored as they are. Anything else is wrapped in a small envelope
``{"__flow__": kind, ...}`` naming its type, so that on resume a pydantic model comes back as
that model, a dataclass as that dataclass, a tuple as a tuple. Types are found again by
import path, or, within one process, from the types seen while encoding (so classes defined
inside a test function work until the process ends).

Every value :func:`dump` accepts can be stored and read back exactly; one that cannot (a
lone surrogate in a string, nesting deeper than ``MAX_DEPTH``, an encoded size above
``FLOW_MAX_VALUE_BYTES``, an unsupported type) is refused there, with a ``SerializationError``
naming where it came from and the path inside the value, instead of failing in the store.
"""

from __future__ import annotations

import base64
import binascii
import contextvars
import dataclasses
import datetime as dt
import decimal
import enum
import importlib
import json
import os
import re
import reprlib
import uuid
from collections.abc import Callable
from typing import Any

import msgspec

from .errors import SerializationError

__all__ = [
    "DEFAULT_MAX_VALUE_BYTES",
    "MAX_DEPTH",
    "Unrebuilt",
    "check_text",
    "displaying",
    "dump",
    "dumps_json",
    "load",
    "max_value_bytes",
    "safe_text",
    "to_jsonable",
]

#: Levels of user nesting (lists, dicts, tuples, sets, models...) a stored value may have.
MAX_DEPTH = 100
#: Default limit of the encoded size of one value; ``$FLOW_MAX_VALUE_BYTES`` overrides it.
DEFAULT_MAX_VALUE_BYTES = 16 * 1024 * 1024
MAX_VALUE_BYTES_ENV = "FLOW_MAX_VALUE_BYTES"

_TAG = "__flow__"
_PLAIN = (str, int, float, bool, type(None))
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # what msgspec (and most JSON readers) hold exactly
_INF = float("inf")
_UNSAFE = re.compile("[\x00\ud800-\udfff]")
_seen_types: dict[str, type] = {}
_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 40
_repr.maxlevel = 3


def _type_name(cls: type) -> str:
    name = f"{cls.__module__}:{cls.__qualname__}"
    _seen_types[name] = cls
    return name


def _find_type(name: str) -> type:
    cls = _seen_types.get(name)
    if cls is not None:
        return cls
    module_name, _, qualname = name.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise SerializationError(
            f"cannot rebuild a value of type {name}: the type is not importable in this "
            f"process ({exc}); define it at module level in an importable module"
        ) from exc
    if not isinstance(obj, type):
        raise SerializationError(f"{name} is not a type")
    _seen_types[name] = obj
    return obj


# text -------------------------------------------------------------------------------------
def _text_problem(s: str, *, nul: bool = False) -> str | None:
    """What makes ``s`` unstorable (a lone surrogate; a NUL if ``nul``), or None."""
    bad = -1
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = exc.start
    if nul:
        zero = s.find("\x00")
        if zero >= 0 and (bad < 0 or zero < bad):
            return f"a NUL character (\\x00) at index {zero}, which the store cannot hold"
    if bad >= 0:
        return (f"a lone surrogate \\u{ord(s[bad]):04x} at index {bad} (half of a UTF-16 "
                "pair, such as a cut emoji), which is not valid Unicode text")
    return None


def check_text(s: str, where: str, *, allow_nul: bool = True) -> str:
    """Return ``s`` if it can be stored as text, else raise ``SerializationError`` naming
    ``where``: lone surrogates never can, NUL characters not where ``allow_nul`` is false
    (ids, tags, env, commands)."""
    if not isinstance(s, str):
        raise SerializationError(f"{where}: must be a string, got {type(s).__name__}")
    problem = _text_problem(s, nul=not allow_nul)
    if problem is not None:
        raise SerializationError(f"{where}: contains {problem}")
    return s


def safe_text(s: str) -> str:
    """``s`` with lone surrogates and NUL characters replaced by U+FFFD: for text meant for
    people (error messages, log tails) that must never stop a history from being stored."""
    if s.isascii() and "\x00" not in s:
        return s
    return _UNSAFE.sub("\ufffd", s)


def env_byte_limit(name: str, default: int) -> int:
    """A size limit from the environment variable ``name`` (bytes), else ``default``; a
    value that is not a positive whole number is a ``ValueError`` saying so."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if limit <= 0:
        raise ValueError(f"{name} must be a positive number of bytes, got "
                         f"{safe_text(raw[:40])!r}")
    return limit


def max_value_bytes() -> int:
    """The limit of one value's encoded size: ``$FLOW_MAX_VALUE_BYTES``, else 16 MiB."""
    try:
        return env_byte_limit(MAX_VALUE_BYTES_ENV, DEFAULT_MAX_VALUE_BYTES)
    except ValueError as exc:
        raise SerializationError(str(exc)) from None


# dump -------------------------------------------------------------------------------------
class _Refused(Exception):
    """A problem found while walking a value; ``dump`` adds where and the path."""


class _Attr:
    """A path segment naming a field of a dataclass, model or struct."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class _Key:
    """A path segment: the non-string key of a dict (``of_value``: the value under it)."""

    __slots__ = ("key", "of_value")

    def __init__(self, key: Any, of_value: bool) -> None:
        self.key = key
        self.of_value = of_value


def _quote(key: str) -> str:
    short = key if len(key) <= 40 else key[:37] + "..."
    ascii_only = _text_problem(short) is not None  # escapes the surrogates
    return json.dumps(short, ensure_ascii=ascii_only)


def _segment(seg: Any) -> str:
    if type(seg) is int:
        return f"[{seg}]"
    if type(seg) is str:
        return f"[{_quote(seg)}]"
    if isinstance(seg, _Attr):
        return "." + seg.name
    assert isinstance(seg, _Key)
    if type(seg.key) is str:  # a str key of a dict that also has other keys
        return f"[{_quote(seg.key)}]" if seg.of_value else f"[<key {_quote(seg.key)}>]"
    try:
        text = _repr.repr(seg.key)
    except Exception:
        text = type(seg.key).__name__
    return f"[{text}]" if seg.of_value else f"[<key {text}>]"


def _format_path(path: list[Any]) -> str:
    if len(path) > 24:  # deep: the first and last levels say enough
        skipped = f"...{len(path) - 16} levels..."
        return safe_text("$" + "".join(map(_segment, path[:8])) + skipped
                         + "".join(map(_segment, path[-8:])))
    return safe_text("$" + "".join(map(_segment, path)))


class _Walker:
    """Builds the tree of one value, checking it on the way.

    ``path`` holds the segments down to the part being encoded; a segment is popped only
    when its part succeeded, so when anything raises it still names where that happened.
    """

    def __init__(self) -> None:
        self.path: list[Any] = []
        self.size = 0  # an upper bound of the encoded size, in bytes
        self.wrapped = 0  # envelopes made so far

    def text(self, s: str, what: str) -> str:
        problem = _text_problem(s)
        if problem is not None:
            raise _Refused(f"{what} contains {problem}")
        self.size += 6 * len(s) + 3
        return s

    def envelope(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.wrapped += 1
        self.size += 64
        return {_TAG: kind, **fields}

    def value(self, v: Any, depth: int) -> Any:
        t = type(v)
        if t is str:
            return self.text(v, "the string")
        if t is bool or v is None:
            self.size += 6
            return v
        if t is int:
            if _INT_MIN <= v <= _INT_MAX:
                self.size += 21
                return v
            try:
                digits = {"v": str(v)}
            except ValueError:  # more digits than int() reads back by default: exact hex
                digits = {"hex": hex(v)}
            self.size += 6 * len(next(iter(digits.values())))
            return self.envelope("int", **digits)
        if t is float:
            if v != v or v == _INF or v == -_INF:
                return self.envelope("float", v=repr(v))
            self.size += 25
            return v
        if isinstance(v, enum.Enum):
            name = self.type_name(t)
            self.path.append(_Attr("value"))
            tree = self.value(v.value, depth)
            self.path.pop()
            return self.envelope("enum", type=name, v=tree)
        scalar = self.scalar(v, t)
        if scalar is not None:
            self.size += 6 * len(scalar[1])
            if getattr(v, "fold", 0):  # a repeated wall time: isoformat() does not say which
                return self.envelope(scalar[0], v=scalar[1], fold=1)
            return self.envelope(scalar[0], v=scalar[1])
        if t is dt.timedelta:
            seconds = v.total_seconds()
            if abs(seconds) < 2**52 / 1e6 and dt.timedelta(seconds=seconds) == v:
                return self.envelope("timedelta", v=seconds)
            self.size += 64  # a float cannot hold it to the microsecond: add the exact parts
            return self.envelope("timedelta", v=seconds, dsu=[v.days, v.seconds, v.microseconds])
        if depth >= MAX_DEPTH:
            raise _Refused(f"the value is nested more than {MAX_DEPTH} levels deep (or it "
                           "contains itself)")
        depth += 1
        if t is list:
            return self.items(v, depth)
        if t is dict:
            return self.mapping(v, depth)
        if t is tuple:
            return self.envelope("tuple", items=self.items(v, depth))
        if t is set or t is frozenset:
            items = self.items(v, depth)
            try:
                items.sort(key=lambda x: json.dumps(x, sort_keys=True))
            except TypeError:
                pass
            return self.envelope(t.__name__, items=items)
        if hasattr(v, "model_dump") and hasattr(t, "model_validate"):  # pydantic v2
            return self.model("pydantic", self.type_name(t), v.model_dump(mode="json"), depth)
        if isinstance(v, msgspec.Struct):
            return self.model("struct", self.type_name(t), msgspec.to_builtins(v), depth)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            name = self.type_name(t)
            data: dict[str, Any] = {}
            for f in dataclasses.fields(v):
                if f.init:
                    self.path.append(_Attr(f.name))
                    data[self.text(f.name, "the field name")] = self.value(
                        getattr(v, f.name), depth)
                    self.path.pop()
            return self.envelope("dataclass", type=name, data=data)
        if isinstance(v, list | dict | tuple | str | int | float):  # subclasses of builtins
            raise _Refused(
                f"cannot store a value of type {t.__module__}.{t.__qualname__} (a subclass "
                f"of {t.__mro__[1].__name__}); convert it to a plain {t.__mro__[1].__name__}"
            )
        raise _Refused(
            f"cannot store a value of type {t.__module__}.{t.__qualname__}; return JSON-like "
            "data (dict, list, str, int, float, bool, None), a pydantic model, a dataclass or "
            "a msgspec Struct"
        )

    @staticmethod
    def scalar(v: Any, t: type) -> tuple[str, str] | None:
        """The envelope kind and text of a value stored as one string, if it is one."""
        if t is bytes:
            return "bytes", base64.b64encode(v).decode()
        if t is dt.datetime:
            return "datetime", v.isoformat()
        if t is dt.date:
            return "date", v.isoformat()
        if t is dt.time:
            return "time", v.isoformat()
        if t is uuid.UUID:
            return "uuid", str(v)
        if t is decimal.Decimal:
            return "decimal", str(v)
        return None

    def type_name(self, t: type) -> str:
        return self.text(_type_name(t), "the type name")

    def items(self, v: Any, depth: int) -> list[Any]:
        out: list[Any] = []
        path = self.path
        for i, x in enumerate(v):
            path.append(i)
            out.append(self.value(x, depth))
            path.pop()
        self.size += 2 + len(out)
        return out

    def mapping(self, v: dict[Any, Any], depth: int) -> Any:
        path = self.path
        if all(type(k) is str for k in v) and _TAG not in v:
            out: dict[str, Any] = {}
            for k, x in v.items():
                path.append(k)
                self.text(k, "the key")
                out[k] = self.value(x, depth)
                path.pop()
            self.size += 2 + len(out)
            return out
        pairs: list[list[Any]] = []
        for k, x in v.items():
            path.append(_Key(k, False))
            key = self.value(k, depth)
            path[-1] = _Key(k, True)
            pairs.append([key, self.value(x, depth)])
            path.pop()
        self.size += 2 + 4 * len(pairs)
        return self.envelope("dict", items=pairs)

    def model(self, kind: str, name: str, data: Any, depth: int) -> dict[str, Any]:
        """A pydantic model or msgspec Struct, from the builtins it dumped to: the tree of
        those (strings checked, floats and big ints wrapped) under ``tree``, or under
        ``data`` when it needed no envelope, the format older histories hold."""
        before = self.wrapped
        if type(data) is dict and all(type(k) is str for k in data) and _TAG not in data:
            tree: Any = {}
            for k, x in data.items():
                self.path.append(_Attr(k))
                self.text(k, "the field name")
                tree[k] = self.value(x, depth)
                self.path.pop()
            self.size += 2 + len(tree)
        else:
            tree = self.value(data, depth - 1)
        key = "data" if self.wrapped == before else "tree"
        return self.envelope(kind, type=name, **{key: tree})


_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # what msgspec encodes as a JSON number


def dump(value: Any, *, where: str = "value",
         secrets: Callable[[Any, str], None] | None = None) -> Any:
    """Encode ``value`` to a JSON-compatible tree, or raise ``SerializationError`` naming
    ``where``, the path inside the value (``$["items"][3]``) and the problem.

    ``secrets`` (``Redactor.scanner``) is called with the tree and ``where``; it raises
    ``SecretLeakError`` to refuse a value that holds a secret's value."""
    t = type(value)
    if value is None or t is bool or (t is int and _INT_MIN <= value <= _INT_MAX):
        return value  # the common small results: nothing to check, nothing to scan
    walker = _Walker()
    try:
        tree = walker.value(value, 0)
        limit = max_value_bytes()
        if walker.size > limit:  # only an upper bound: measure exactly
            size = len(msgspec.json.encode(tree))
            if size > limit:
                walker.path.clear()
                raise _Refused(f"the value takes {size} bytes encoded, more than the limit of "
                               f"{limit} bytes (set {MAX_VALUE_BYTES_ENV} to change it)")
    except _Refused as exc:
        problem = str(exc)
    except SerializationError as exc:
        problem = str(exc)
    except Exception as exc:  # raised by user code (model_dump...) or a codec, deep inside
        detail = str(exc)
        detail = detail if len(detail) <= 500 else detail[:497] + "..."
        problem = f"cannot store it: {type(exc).__name__}: {detail}"
    else:
        if secrets is not None:
            secrets(tree, where)
        return tree
    raise SerializationError(safe_text(f"{where} at {_format_path(walker.path)}: {problem}"))


# load -------------------------------------------------------------------------------------
_DISPLAYING: contextvars.ContextVar[bool] = contextvars.ContextVar("flow_displaying",
                                                                  default=False)


class Unrebuilt:
    """A stored value of a type this process cannot import (``displaying`` only): its
    type's name and its data, for showing it (``to_jsonable`` gives the data with the
    type under ``__type__``)."""

    __slots__ = ("data", "type_name")

    def __init__(self, type_name: str, data: Any) -> None:
        self.type_name = type_name
        self.data = data

    def to_dict(self) -> dict[str, Any]:
        data = self.data if isinstance(self.data, dict) else {"value": self.data}
        return {"__type__": self.type_name, **data}

    def __repr__(self) -> str:
        if isinstance(self.data, dict):
            inner = ", ".join(f"{k}={v!r}" for k, v in self.data.items())
        else:
            inner = repr(self.data)
        return f"{self.type_name}({inner})"


class displaying:
    """Within it (``with`` or ``async with``), :func:`load` rebuilds a value whose type
    this process cannot import as an :class:`Unrebuilt` instead of raising: for commands
    that show stored values (``flow status``, ``flow history``), which must work without
    the workflow's code."""

    __slots__ = ("_token",)

    def __enter__(self) -> None:
        self._token = _DISPLAYING.set(True)

    def __exit__(self, *exc: object) -> None:
        _DISPLAYING.reset(self._token)

    async def __aenter__(self) -> None:
        self.__enter__()

    async def __aexit__(self, *exc: object) -> None:
        self.__exit__()


def _unrebuilt(tree: dict[str, Any], kind: str) -> Unrebuilt | None:
    """An :class:`Unrebuilt` for an envelope whose type cannot be imported, while
    ``displaying``; ``None`` otherwise (the caller rebuilds it, or raises)."""
    if not _DISPLAYING.get() or "type" not in tree:
        return None
    try:
        _find_type(tree["type"])
        return None
    except SerializationError:
        pass
    if kind == "enum":
        data: Any = load(tree["v"])
    elif kind in ("pydantic", "struct"):
        data = load(tree["tree"]) if "tree" in tree else tree.get("data")
    else:
        data = {k: load(v) for k, v in tree.get("data", {}).items()}
    return Unrebuilt(str(tree["type"]), data)


def load(tree: Any) -> Any:
    """Rebuild the value :func:`dump` encoded (one Python frame per level of the tree)."""
    t = type(tree)
    if t is list:
        return list(map(load, tree))
    if t is not dict:
        return tree
    kind = tree.get(_TAG)
    if kind is None:
        return dict(zip(tree, map(load, tree.values()), strict=True))
    try:
        return _load_envelope(tree, kind)
    except SerializationError:
        if _DISPLAYING.get():
            return Unrebuilt(f"<unreadable {kind}>", tree)
        raise
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError,
            msgspec.ValidationError, binascii.Error) as exc:
        if _DISPLAYING.get():
            return Unrebuilt(f"<unreadable {kind}>", tree)
        raise SerializationError(
            f"a stored {kind!r} value cannot be read back ({type(exc).__name__}: {exc}): "
            "the history was written by other code or damaged") from exc


def _load_envelope(tree: dict[str, Any], kind: Any) -> Any:
    """:func:`load` of one ``__flow__`` envelope."""
    if kind == "tuple":
        return tuple(map(load, tree["items"]))
    if kind == "dict":
        out = {}
        for k, x in tree["items"]:
            out[load(k)] = load(x)
        return out
    if kind == "set":
        return set(map(load, tree["items"]))
    if kind == "frozenset":
        return frozenset(map(load, tree["items"]))
    if kind == "int":
        return int(tree["v"]) if "v" in tree else int(tree["hex"], 16)
    if kind == "float":
        return float(tree["v"])
    if kind == "bytes":
        return base64.b64decode(tree["v"])
    if kind == "datetime":
        return dt.datetime.fromisoformat(tree["v"]).replace(fold=tree.get("fold", 0))
    if kind == "date":
        return dt.date.fromisoformat(tree["v"])
    if kind == "time":
        return dt.time.fromisoformat(tree["v"]).replace(fold=tree.get("fold", 0))
    if kind == "timedelta":
        if "dsu" in tree:
            days, seconds, micro = tree["dsu"]
            return dt.timedelta(days=days, seconds=seconds, microseconds=micro)
        return dt.timedelta(seconds=tree["v"])
    if kind == "uuid":
        return uuid.UUID(tree["v"])
    if kind == "decimal":
        return decimal.Decimal(tree["v"])
    if kind in ("enum", "pydantic", "struct", "dataclass") and _DISPLAYING.get():
        shown = _unrebuilt(tree, kind)
        if shown is not None:
            return shown
    if kind == "enum":
        return _find_type(tree["type"])(load(tree["v"]))
    cls: Any = _find_type(tree["type"]) if "type" in tree else None
    if kind in ("pydantic", "struct"):
        data = load(tree["tree"]) if "tree" in tree else tree["data"]
        return cls.model_validate(data) if kind == "pydantic" else msgspec.convert(data, cls)
    if kind == "dataclass":
        fields = tree["data"]
        return cls(**dict(zip(fields, map(load, fields.values()), strict=True)))
    raise SerializationError(f"unknown value envelope {kind!r} in the history")


def to_jsonable(value: Any) -> Any:
    """Plain JSON data for ``value`` (models and dataclasses become dicts), for ``ctx.json``."""
    if isinstance(value, _PLAIN):
        return _huge_int_text(value) if type(value) is int else value
    if isinstance(value, dict):
        return {_key_text(k): to_jsonable(x) for k, x in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(x) for x in value]
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return to_jsonable(to_dict())
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, msgspec.Struct):
        return msgspec.to_builtins(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value)
    if isinstance(value, uuid.UUID | decimal.Decimal):
        return str(value)
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    raise SerializationError(f"cannot convert a {type(value).__qualname__} to JSON")


def _huge_int_text(value: int) -> int | str:
    """``value``, or its hex text if it has more digits than ``str()`` and ``json`` print."""
    if value.bit_length() < 14000:  # about 4200 digits: under the default limit of 4300
        return value
    try:
        str(value)
    except ValueError:
        return hex(value)
    return value


def _key_text(key: Any) -> str:
    """A dict key as JSON text: ``str(key)``, unless it holds an int too long for that."""
    if type(key) is int:
        return str(_huge_int_text(key))
    try:
        return str(key)
    except ValueError:
        return json.dumps(to_jsonable(key))


def dumps_json(value: Any, **kwargs: Any) -> str:
    """JSON text of ``value`` via :func:`to_jsonable`."""
    return json.dumps(to_jsonable(value), **kwargs)
