"""Run a cleanup step when the process ends, while it can still do work.

CPython runs hooks registered with ``threading._register_atexit`` when the main thread ends, in
``threading._shutdown``: other threads are still running and imports still work (``concurrent.futures`` refuses new
pools after it). Plain ``atexit`` runs later, and is the fallback where that hook does not exist (or registration is
closed because shutdown has begun). Both run the last-registered hook first.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Callable


def at_exit(hook: Callable[[], None]) -> None:
    """Run ``hook`` when the main thread ends (see module docstring)."""
    register = getattr(threading, "_register_atexit", None)
    try:
        if register is None:
            raise AttributeError
        register(hook)
    except (AttributeError, RuntimeError):
        atexit.register(hook)
