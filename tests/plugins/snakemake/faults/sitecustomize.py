"""Fault injection for the Snakemake fault tests, loaded by Python at start-up when this folder is on PYTHONPATH.

``METATRAIL_TEST_FAULT`` picks the fault (nothing happens without it):

* ``slow_store``: the store the Recorder opens (``open_store`` or, for its writer, ``open_writer``) sleeps
  ``METATRAIL_TEST_STORE_DELAY`` seconds (default 3) before every ``ingest``, then stores for real: a store that
  cannot keep up.
* ``no_handler``: importing ``metatrail.plugins.snakemake.handler`` fails (a plugin with a broken dependency).
* ``no_metatrail``: importing anything under ``metatrail`` fails (a broken installation).

Patches are applied when the module is first imported (an import hook), so processes that never import metatrail
(Snakemake's job subprocesses) pay nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any

FAULT = os.environ.get("METATRAIL_TEST_FAULT", "")


class _SlowStore:
    """Delegates to the real store; every ingest first sleeps."""

    def __init__(self, inner: Any, delay: float) -> None:
        self._inner = inner
        self._delay = delay

    def ingest(self, events: Sequence[Any], **kwargs: Any) -> Any:
        time.sleep(self._delay)
        return self._inner.ingest(events, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


# module -> its function that opens the store: the Recorder's writer (thread or process) opens it with
# sqlite_writer.open_writer (an embedded store, without SQLAlchemy), which falls back to metatrail.store.open_store
_OPENERS = {"metatrail.store": "open_store", "metatrail.store.sqlite_writer": "open_writer"}


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        opener = _OPENERS[module.__name__]
        real_open = getattr(module, opener)
        delay = float(os.environ.get("METATRAIL_TEST_STORE_DELAY", "3"))

        def slow_open(url: str) -> Any:
            store = real_open(url)  # open_writer may fall back to open_store, already slowed
            return store if isinstance(store, _SlowStore) else _SlowStore(store, delay)

        setattr(module, opener, slow_open)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if FAULT == "no_handler" and name == "metatrail.plugins.snakemake.handler":
            raise ImportError(f"injected fault: {name} cannot be imported")
        if FAULT == "no_metatrail" and (name == "metatrail" or name.startswith("metatrail.")):
            raise ImportError(f"injected fault: {name} cannot be imported")
        if FAULT == "slow_store" and name in _OPENERS:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None and spec.loader is not None:
                    spec.loader = _Loader(spec.loader)
                    return spec
        return None


if FAULT:
    sys.meta_path.insert(0, _Finder())
