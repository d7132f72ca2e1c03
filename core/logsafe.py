"""Logging for code that runs inside someone else's process: each distinct problem is logged once, not per task."""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger("metatrail")
_seen: set[str] = set()
_lock = threading.Lock()


def _renew_lock_in_child() -> None:
    # Another thread of the parent may have held the lock at the fork: the child's copy would stay locked for ever,
    # and the child's first log_once (a hook of a task in a forked pool worker) would never return.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_renew_lock_in_child)


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
