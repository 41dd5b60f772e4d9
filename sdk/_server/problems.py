"""Errors as RFC 9457 ``application/problem+json``, with the library's stable codes.

A ``FlowError`` keeps its ``code`` (``execution_not_found``, ``workflow_not_registered``...)
and gets the HTTP status its kind of failure has; the API's own refusals have codes of
their own (``unauthorized``, ``forbidden``, ``token_in_query``, ``validation``...). A
problem never carries a request's secrets or token: details are the library's messages
(which name secrets, never their values) with any known secret value redacted.
"""

from __future__ import annotations

import http
from collections.abc import Mapping
from typing import Any

from starlette.responses import JSONResponse

from agentainer_flow.engine.secrets import Redactor, redact_known
from agentainer_flow.store import FlowError, StoreError

__all__ = [
    "PROBLEM_JSON",
    "ApiProblem",
    "declare_problems",
    "problem_from_error",
    "problem_response",
    "status_of",
]

PROBLEM_JSON = "application/problem+json"

# by code; a code missing here is looked up for the error's base classes
_STATUS = {
    "execution_not_found": 404,
    "ambiguous_execution_id": 404,
    "workflow_not_registered": 422,
    "workflow_version_not_registered": 422,
    "workflow_definition": 422,
    "step_not_found": 422,
    "serialization": 422,
    "secret_leak": 422,
    "secret_not_found": 422,
    "configuration": 422,
    "usage": 422,
    "idempotency_conflict": 409,
    "execution_blocked": 409,
    "non_determinism": 409,
    "history_corrupted": 500,
    "store_unavailable": 503,
}

# attributes of an error worth giving a client (never values of secrets: names only)
_FIELDS = ("execution_id", "workflow", "version", "available", "secret", "step", "key",
           "candidates", "steps")


class ApiProblem(Exception):
    """A refusal of the API itself (not a library error): raised, then answered as a
    problem."""

    def __init__(self, status: int, code: str, detail: str, *,
                 headers: Mapping[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = dict(headers or {})
        self.extra = extra


def status_of(exc: FlowError) -> int:
    """The HTTP status of a library error."""
    for cls in type(exc).__mro__:
        code = getattr(cls, "code", None)
        if isinstance(code, str) and code in _STATUS:
            return _STATUS[code]
    return 500 if isinstance(exc, StoreError) else 400


def problem_response(status: int, code: str, detail: str, *, instance: str | None = None,
                     headers: Mapping[str, str] | None = None,
                     redactor: Redactor | None = None, **extra: Any) -> JSONResponse:
    """A problem response; ``detail`` (and every extra) is redacted of known secrets."""
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": http.HTTPStatus(status).phrase,
        "status": status,
        "detail": redact_known(detail),
        "code": code,
    }
    if instance is not None:
        body["instance"] = instance
    body.update({k: v for k, v in extra.items() if v is not None})
    if redactor:
        body = redactor.tree(body)
    return JSONResponse(body, status_code=status, headers=dict(headers or {}),
                        media_type=PROBLEM_JSON)


def problem_from_error(exc: FlowError, *, instance: str | None = None,
                       redactor: Redactor | None = None) -> JSONResponse:
    """The problem response of a library error, with its code and useful attributes."""
    extra: dict[str, Any] = {}
    for name in _FIELDS:
        value = getattr(exc, name, None)
        if isinstance(value, str | int | float | bool) or (
                isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)):
            extra[name] = list(value) if isinstance(value, list | tuple) else value
    return problem_response(status_of(exc), exc.code, str(exc), instance=instance,
                            redactor=redactor, **extra)


def declare_problems(document: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI ``document`` with every error response (4xx, 5xx) declared as the
    ``application/problem+json`` it is sent as, with the ``Problem`` schema.

    FastAPI puts a response's model under ``application/json`` (the media type of the
    route's response class); a client validating a problem against the document would
    find no schema for the type it got.
    """
    fallback = {"$ref": "#/components/schemas/Problem"}
    for path in document.get("paths", {}).values():
        for operation in path.values():
            if not isinstance(operation, dict):
                continue
            for status, response in operation.get("responses", {}).items():
                if str(status)[:1] not in ("4", "5") or not isinstance(response, dict):
                    continue
                content = response.setdefault("content", {})
                schema = (content.pop("application/json", {}).get("schema")
                          or content.get(PROBLEM_JSON, {}).get("schema") or fallback)
                content[PROBLEM_JSON] = {"schema": schema}
    return document
