"""Shaping task values for the record, at a bounded cost on the task's thread.

Parameters and return values can be anything: a 10-million-element list, a DataFrame, an object whose ``repr``
raises. :func:`safe_value` keeps small JSON-like values as they are and turns everything else into a short text,
visiting at most :data:`MAX_NODES` nodes, so recording never costs time proportional to the data.
:func:`local_paths` picks out the values that name existing local files or directories (inputs and outputs).
"""

from __future__ import annotations

import itertools
import math
import os
import reprlib
from collections.abc import Iterable, Mapping
from typing import Any

MAX_TEXT = 2000
MAX_ITEMS = 100
MAX_DEPTH = 4
MAX_NODES = 500
MAX_PATHS = 64



class _BoundedRepr(reprlib.Repr):
    def repr_instance(self, obj: Any, level: int) -> str:
        # reprlib would answer a failing __repr__ with the object's address; say what failed instead.
        try:
            text = repr(obj)
        except Exception as exc:
            return f"<unrepresentable {type(obj).__name__}: {type(exc).__name__}>"
        return text if len(text) <= self.maxother else text[: self.maxother - 1] + "…"


_repr = _BoundedRepr()
_repr.maxlevel = 3
_repr.maxlist = _repr.maxtuple = _repr.maxset = _repr.maxfrozenset = _repr.maxdeque = 10
_repr.maxdict = 10
_repr.maxstring = 200
_repr.maxother = MAX_TEXT


class _TooBig(Exception):
    pass


class _NotJson(Exception):
    pass


def short_repr(value: Any) -> str:
    """A bounded ``repr`` (builtins containers abbreviated); a failing ``__repr__`` is described, not raised."""
    try:
        text = _repr.repr(value)
    except Exception as exc:
        text = f"<unrepresentable {type(value).__name__}: {type(exc).__name__}>"
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def safe_value(value: Any) -> Any:
    """``value`` as JSON data when it is small and JSON-like, else its bounded ``repr``."""
    return shape(value)[0]


def shape(value: Any) -> tuple[Any, str | None]:
    """``(recordable value, why it was changed or None)``: see :func:`safe_value`."""
    budget = [MAX_NODES]
    try:
        return _shape(value, 0, budget), None
    except _TooBig:
        return short_repr(value), "too large to record whole; shortened"
    except _NotJson:
        return short_repr(value), "not JSON-serialisable; stringified"


def safe_mapping(values: Mapping[str, Any] | None, warnings: list[str] | None = None) -> dict[str, Any]:
    """:func:`safe_value` applied to each value of a parameter mapping; each changed one is named in
    ``warnings``."""
    out: dict[str, Any] = {}
    for key, value in (values or {}).items():
        out[str(key)], why = shape(value)
        if why is not None and warnings is not None:
            warnings.append(f"parameter {str(key)!r} ({type(value).__name__}) is {why}")
    return out


def _shape(value: Any, depth: int, budget: list[int]) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooBig
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, str):
        if len(value) > MAX_TEXT:
            raise _TooBig
        return value
    if isinstance(value, os.PathLike):
        return _shape(os.fspath(value), depth, budget)
    if depth >= MAX_DEPTH:
        raise _TooBig
    if isinstance(value, list | tuple):
        if len(value) > MAX_ITEMS:
            raise _TooBig
        return [_shape(v, depth + 1, budget) for v in value]
    if isinstance(value, dict):
        if len(value) > MAX_ITEMS:
            raise _TooBig
        return {str(k): _shape(v, depth + 1, budget) for k, v in value.items()}
    raise _NotJson


def local_paths(values: Iterable[Any]) -> list[str]:
    """Absolute paths of the values (and of the items of list/tuple/set/dict values, one level down) that name
    existing local files or directories: ``os.PathLike``, ``file://`` URIs and plain strings. The working directory,
    the file-system root and the home directory are never taken (a parameter ``"."`` is not an input)."""
    found: list[str] = []
    seen: set[str] = set()
    for value in values:
        for candidate in _candidates(value):
            path = _as_existing_path(candidate)
            if path is not None and path not in seen:
                seen.add(path)
                found.append(path)
                if len(found) >= MAX_PATHS:
                    return found
    return found


def _candidates(value: Any) -> Iterable[Any]:
    if isinstance(value, str | os.PathLike):
        return (value,)
    if isinstance(value, list | tuple | set | frozenset):
        return itertools.islice(value, MAX_PATHS)
    if isinstance(value, dict):
        return itertools.islice(value.values(), MAX_PATHS)
    return ()


def _as_existing_path(value: Any) -> str | None:
    try:
        text = os.fspath(value)
    except TypeError:
        return None
    if not isinstance(text, str) or not text or len(text) > 4096 or "\x00" in text:
        return None
    if text.startswith("file://"):
        from urllib.parse import unquote, urlsplit

        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            return None
        text = unquote(parts.path)
    elif "://" in text:
        return None
    path = os.path.abspath(text)
    if path in (os.sep, os.getcwd(), os.path.expanduser("~")):
        return None
    try:
        os.stat(path)
    except (OSError, ValueError):
        return None
    return path
