"""The metatrail server: OpenLineage ingest, sync, queries and federation over one store (extra ``server``).

Modules, one job each:

| module | job |
|---|---|
| ``config`` | :class:`ServerConfig`: store URL, site name, limits |
| ``app`` | :func:`create_app`, the FastAPI application factory |
| ``services`` | what the routes share: store, event log, tokens, peers, writer, fan-out, scheduler |
| ``auth`` | bearer tokens (stored hashed), scopes, the per-route policy (deny by default) |
| ``limits`` | request bodies: size caps, gzip with a decompressed-size cap, strict JSON |
| ``writer`` | one writer thread that group-commits concurrent ingests |
| ``fanout`` | optional forwarding of ingested events to OpenLineage transports |
| ``federation`` | peers and their push/pull sync, on demand and on a schedule |
| ``routes/*`` | the HTTP API, one module per area |
| ``commands`` | the ``server``, ``push``, ``pull``, ``token`` and ``peer`` CLI commands |

Importing this package (or ``metatrail.server.commands``) imports neither FastAPI nor uvicorn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from metatrail.server.config import ServerConfig

__all__ = ["ServerConfig", "create_app"]


def create_app(config: ServerConfig) -> Any:
    """The FastAPI application for ``config`` (see :func:`metatrail.server.app.create_app`)."""
    from metatrail.server.app import create_app as _create_app

    return _create_app(config)


def __getattr__(name: str) -> Any:
    if name == "ServerConfig":
        from metatrail.server.config import ServerConfig

        return ServerConfig
    raise AttributeError(name)
