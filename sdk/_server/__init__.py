"""``flow server``: the HTTP API in front of a store, for clients elsewhere.

``create_app`` builds the ASGI app (FastAPI; needs the ``server`` extra: ``pip install
'agentainer-flow[server]'``); ``cli.register`` adds ``flow server`` and ``flow token`` to
the ``flow`` program. Tokens (``auth``) need no extra, so ``flow token`` works without it.
The client side is ``WorkflowClient(api_url=..., api_token=...)`` (``agentainer_flow._remote``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .auth import SCOPES, TOKEN_PREFIX, create_token, hash_token

if TYPE_CHECKING:
    from .app import ServerState, create_app

__all__ = ["SCOPES", "TOKEN_PREFIX", "ServerState", "create_app", "create_token",
           "hash_token"]


def __getattr__(name: str) -> Any:
    # the app needs FastAPI, an optional extra: imported when it is asked for
    if name in ("ServerState", "create_app"):
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
