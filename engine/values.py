"""Type-preserving encoding of user values (step results, state, inputs) to JSON trees.

Plain JSON values are stored as they are. Anything else is wrapped in a small envelope
``{"__flow__": kind, ...}`` naming its type, so that on resume a pydantic model comes back as
that model, a dataclass as that dataclass, a tuple as a tuple. Types are found again by
import path, or, within one process, from the types seen while encoding (so classes defined
inside a test function work until the process ends).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import decimal
import enum
import importlib
import json
import uuid
from typing import Any

import msgspec

from .errors import SerializationError

__all__ = ["dump", "dumps_json", "load", "to_jsonable"]

_TAG = "__flow__"
_PLAIN = (str, int, float, bool, type(None))
_seen_types: dict[str, type] = {}


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


def dump(value: Any, *, where: str = "value") -> Any:
    """Encode ``value`` to a JSON-compatible tree, or raise ``SerializationError`` naming
    ``where`` and the offending type."""
    try:
        return _dump(value)
    except SerializationError as exc:
        raise SerializationError(f"{where}: {exc}") from None
    except RecursionError:
        raise SerializationError(f"{where}: value is nested too deeply or recursive") from None


def _dump(v: Any) -> Any:
    if isinstance(v, _PLAIN):
        if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
            return {_TAG: "float", "v": repr(v)}
        if type(v) in (str, int, float, bool) or v is None:
            return v
    if isinstance(v, enum.Enum):
        return {_TAG: "enum", "type": _type_name(type(v)), "v": _dump(v.value)}
    t = type(v)
    if t is list:
        return [_dump(x) for x in v]
    if t is dict:
        if all(type(k) is str for k in v) and _TAG not in v:
            return {k: _dump(x) for k, x in v.items()}
        return {_TAG: "dict", "items": [[_dump(k), _dump(x)] for k, x in v.items()]}
    if t is tuple:
        return {_TAG: "tuple", "items": [_dump(x) for x in v]}
    if t is set or t is frozenset:
        items = [_dump(x) for x in v]
        try:
            items.sort(key=lambda x: json.dumps(x, sort_keys=True))
        except TypeError:
            pass
        return {_TAG: t.__name__, "items": items}
    if t is bytes:
        return {_TAG: "bytes", "v": base64.b64encode(v).decode()}
    if t is dt.datetime:
        return {_TAG: "datetime", "v": v.isoformat()}
    if t is dt.date:
        return {_TAG: "date", "v": v.isoformat()}
    if t is dt.time:
        return {_TAG: "time", "v": v.isoformat()}
    if t is dt.timedelta:
        return {_TAG: "timedelta", "v": v.total_seconds()}
    if t is uuid.UUID:
        return {_TAG: "uuid", "v": str(v)}
    if t is decimal.Decimal:
        return {_TAG: "decimal", "v": str(v)}
    if hasattr(v, "model_dump") and hasattr(t, "model_validate"):  # pydantic v2
        return {_TAG: "pydantic", "type": _type_name(t), "data": v.model_dump(mode="json")}
    if isinstance(v, msgspec.Struct):
        return {_TAG: "struct", "type": _type_name(t), "data": msgspec.to_builtins(v)}
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        data = {f.name: _dump(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}
        return {_TAG: "dataclass", "type": _type_name(t), "data": data}
    if isinstance(v, list | dict | tuple | str | int | float):  # subclasses of builtins
        raise SerializationError(
            f"cannot store a value of type {t.__module__}.{t.__qualname__} (a subclass of "
            f"{t.__mro__[1].__name__}); convert it to a plain {t.__mro__[1].__name__}"
        )
    raise SerializationError(
        f"cannot store a value of type {t.__module__}.{t.__qualname__}; return JSON-like "
        "data (dict, list, str, int, float, bool, None), a pydantic model, a dataclass or a "
        "msgspec Struct"
    )


def load(tree: Any) -> Any:
    """Rebuild the value :func:`dump` encoded."""
    t = type(tree)
    if t is list:
        return [load(x) for x in tree]
    if t is not dict:
        return tree
    kind = tree.get(_TAG)
    if kind is None:
        return {k: load(x) for k, x in tree.items()}
    if kind == "tuple":
        return tuple(load(x) for x in tree["items"])
    if kind == "dict":
        return {load(k): load(x) for k, x in tree["items"]}
    if kind == "set":
        return {load(x) for x in tree["items"]}
    if kind == "frozenset":
        return frozenset(load(x) for x in tree["items"])
    if kind == "float":
        return float(tree["v"])
    if kind == "bytes":
        return base64.b64decode(tree["v"])
    if kind == "datetime":
        return dt.datetime.fromisoformat(tree["v"])
    if kind == "date":
        return dt.date.fromisoformat(tree["v"])
    if kind == "time":
        return dt.time.fromisoformat(tree["v"])
    if kind == "timedelta":
        return dt.timedelta(seconds=tree["v"])
    if kind == "uuid":
        return uuid.UUID(tree["v"])
    if kind == "decimal":
        return decimal.Decimal(tree["v"])
    if kind == "enum":
        return _find_type(tree["type"])(load(tree["v"]))
    cls: Any = _find_type(tree["type"]) if "type" in tree else None
    if kind == "pydantic":
        return cls.model_validate(tree["data"])
    if kind == "struct":
        return msgspec.convert(tree["data"], cls)
    if kind == "dataclass":
        return cls(**{k: load(x) for k, x in tree["data"].items()})
    raise SerializationError(f"unknown value envelope {kind!r} in the history")


def to_jsonable(value: Any) -> Any:
    """Plain JSON data for ``value`` (models and dataclasses become dicts), for ``ctx.json``."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, dict):
        return {str(k): to_jsonable(x) for k, x in value.items()}
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


def dumps_json(value: Any, **kwargs: Any) -> str:
    """JSON text of ``value`` via :func:`to_jsonable`."""
    return json.dumps(to_jsonable(value), **kwargs)
