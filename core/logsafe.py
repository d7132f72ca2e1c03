"""Logging for code that runs inside someone else's process: each distinct problem is logged once, not per task."""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("metatrail")
_seen: set[str] = set()
_lock = threading.Lock()


def log_once(key: str, message: str, *args: object, level: int = logging.WARNING, exc_info: bool = False) -> bool:
    """Log ``message`` the first time ``key`` is seen in this process; return whether it was logged."""
    with _lock:
        if key in _seen:
            return False
        _seen.add(key)
    log.log(level, message, *args, exc_info=exc_info)
    return True


def reset() -> None:
    """Forget what was logged (tests, and a child process after fork)."""
    with _lock:
        _seen.clear()
