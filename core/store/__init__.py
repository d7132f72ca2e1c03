"""Stores, chosen by URL scheme: ``sqlite:///path`` (embedded default), ``postgresql://…`` (servers),
``http(s)://…`` (a remote metatrail server, with the ``server`` extra), ``drop:///path/to/metatrail.db`` (write only:
segment files beside an embedded store on a shared filesystem, for its owner to ingest; :mod:`metatrail.store.drop`)."""

from __future__ import annotations

from metatrail.errors import ConfigError
from metatrail.store.base import EventStore, IngestResult, StoredEvent

SCHEMES = ("sqlite", "postgresql", "http", "https", "drop")

__all__ = ["SCHEMES", "EventStore", "IngestResult", "StoredEvent", "open_store"]


def open_store(url: str) -> EventStore:
    """Open the store at ``url``; an unknown scheme is an error listing the valid ones."""
    scheme = url.split("://", 1)[0].split("+", 1)[0].lower() if "://" in url else ""
    if scheme == "postgres":
        scheme = "postgresql"
    if scheme in ("sqlite", "postgresql"):
        from metatrail.store.sql import SqlStore

        return SqlStore(url)
    if scheme in ("http", "https"):
        from metatrail.store.remote import RemoteStore  # type: ignore[import-not-found,unused-ignore]

        store: EventStore = RemoteStore(url)
        return store
    if scheme == "drop":
        from metatrail.store.drop import DropStore

        return DropStore(url)  # type: ignore[return-value]  # the write side only: ingest and close
    raise ConfigError(f"unknown store URL {url!r}; valid schemes: {', '.join(SCHEMES)}")
