"""The code version of the working directory, when cheaply known: the git commit, read from ``.git`` files.

No subprocess, no lock files, nothing written: recording must never change or slow down a user's repository.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def _git_dir(start: Path) -> Path | None:
    for d in (start, *start.parents):
        dot = d / ".git"
        if dot.is_dir():
            return dot
        if dot.is_file():  # worktree or submodule: "gitdir: <path>"
            text = dot.read_text("utf-8", "replace").strip()
            if text.startswith("gitdir:"):
                target = Path(text[7:].strip())
                return target if target.is_absolute() else (d / target).resolve()
    return None


def git_commit(start: str | os.PathLike[str] | None = None) -> dict[str, Any] | None:
    """``{"gitCommit": sha, "repoPath": top}`` for the repository containing ``start`` (default: cwd), or None."""
    try:
        git_dir = _git_dir(Path(start or os.getcwd()).resolve())
        if git_dir is None:
            return None
        head = (git_dir / "HEAD").read_text("utf-8").strip()
        if not head.startswith("ref:"):
            sha = head
        else:
            ref = head[4:].strip()
            common = git_dir
            commondir = git_dir / "commondir"
            if commondir.is_file():
                common = (git_dir / commondir.read_text("utf-8").strip()).resolve()
            ref_file = common / ref
            if ref_file.is_file():
                sha = ref_file.read_text("utf-8").strip()
            else:
                sha = ""
                packed = common / "packed-refs"
                if packed.is_file():
                    for line in packed.read_text("utf-8").splitlines():
                        parts = line.split(" ", 1)
                        if len(parts) == 2 and parts[1] == ref:
                            sha = parts[0]
                            break
        if len(sha) < 40:
            return None  # a fresh repository without commits
        return {"gitCommit": sha, "repoPath": str(git_dir.parent)}
    except OSError:
        return None


class CommitCache:
    """:func:`git_commit` per working directory, read again once ``ttl_s`` has passed: a long-lived process (a
    scheduler, a notebook) records the commit checked out when each event is built, give or take ``ttl_s``, without
    reading ``.git`` for every event."""

    def __init__(self, ttl_s: float = 1.0) -> None:
        self.ttl_s = ttl_s
        self._known: dict[str, tuple[float, dict[str, Any] | None]] = {}

    def get(self, cwd: str | None = None) -> dict[str, Any] | None:
        """The commit of the repository containing ``cwd`` (default: the current directory), or None."""
        try:
            where = cwd or os.getcwd()
        except OSError:
            return None
        now = time.monotonic()
        known = self._known.get(where)
        if known is not None and now - known[0] < self.ttl_s:
            return known[1]
        commit = git_commit(where)
        if len(self._known) > 64:
            self._known.clear()
        self._known[where] = (now, commit)
        return commit
