"""The one exception hierarchy of metatrail's core.

    MetatrailError
     ├── ConfigError            bad or missing configuration (unknown store URL scheme, bad value)
     ├── StoreError             the store cannot be opened or written
     │    └── CorruptStoreError the store file exists but is not a metatrail store / is damaged
     ├── EventError             an event is malformed (not valid OpenLineage, wrong types)
     ├── HashError              a file could not be hashed (missing, unreadable)
     ├── RecorderTimeout        a recorder call exceeded its hard time cap
     └── MissingExtraError      an optional dependency is not installed; says which extra to install

Core code raises these; plugin boundaries (the Recorder's public methods, host plugins) catch them, log once and
never let them reach the host.
"""

from __future__ import annotations


class MetatrailError(Exception):
    """Base of every error metatrail raises on purpose."""


class ConfigError(MetatrailError):
    """Configuration is invalid; the message says which setting and how to fix it."""


class StoreError(MetatrailError):
    """The store could not be opened, read or written."""


class StoreBusy(StoreError):
    """Another connection holds the store's write lock, and the caller asked not to wait for it; nothing was
    written."""


class CorruptStoreError(StoreError):
    """The store exists but is damaged or is not a metatrail store; nothing was overwritten."""


class EventError(MetatrailError):
    """An event is not a valid OpenLineage event (or not one we can project)."""


class ForeignRunError(MetatrailError):
    """A write limited to some pipelines would add events to a run stored under another pipeline; nothing was
    stored. ``run_id`` names the run."""

    def __init__(self, run_id: str, allowed: frozenset[str]) -> None:
        super().__init__(f"run {run_id} belongs to a pipeline this token may not read; a token limited to some "
                         f"pipelines ({', '.join(sorted(allowed))}) writes only into runs of those pipelines")
        self.run_id = run_id
        self.allowed = allowed


class HashError(MetatrailError):
    """A path could not be hashed; ``reason`` is a short machine-readable cause."""

    def __init__(self, message: str, reason: str = "unreadable") -> None:
        super().__init__(message)
        self.reason = reason


class RecorderTimeout(MetatrailError):
    """A recorder call was abandoned because it exceeded its hard time cap."""


class MissingExtraError(MetatrailError):
    """An optional dependency is missing; the message names the extra to install."""

    def __init__(self, package: str, extra: str) -> None:
        super().__init__(f"this feature requires '{package}': pip install 'metatrail[{extra}]'")
        self.package = package
        self.extra = extra
