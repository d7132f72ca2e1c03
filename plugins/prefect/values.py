"""Shaping task values for the record, at a bounded cost on the task's thread and without running user code.

Parameters and return values can be anything: a 150 MB ``bytes``, a 10-million-element dict, an object whose
``repr`` loads a dataset or raises. :func:`shape` keeps small JSON-like builtin values as they are (strings, numbers,
lists, tuples and dicts of those) and describes everything else in a few words, visiting at most :data:`MAX_NODES`
nodes and :data:`MAX_TOTAL_TEXT` characters of each value. It never calls a ``__repr__``, ``__str__`` or
``__iter__`` of a user class: an object is recorded by its type (``<mymod.Thing object>``); containers, their
subclasses included, are read through the builtin types' own methods. Whatever still goes wrong while shaping one
value turns into a short description and a warning, never into an exception.
Which values name files (inputs and outputs) is :mod:`.paths`'s job.
"""

from __future__ import annotations

import collections
import datetime
import enum
import itertools
import math
import os
import pathlib
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

MAX_TEXT = 2000  # characters of one string, and of a description of a whole value
MAX_TOTAL_TEXT = 16_000  # characters of strings in one value (the Recorder would shorten a larger one again)
MAX_ITEMS = 100
MAX_DEPTH = 4
MAX_NODES = 500
MAX_INT_BITS = 64  # larger integers are not read by most JSON consumers (orjson, JavaScript)
MAX_INT_TEXT_BITS = 300  # about 90 digits: larger integers are described by their size, not written out
BYTES_PREFIX = 32
DESCRIBE_ITEMS = 10  # items of a container shown in a description
DESCRIBE_STRING = 200  # characters of a string shown in a description

TOO_LARGE = "too large to record whole; shortened"
NOT_JSON = "not JSON-serialisable; stringified"
ESCAPED = "text with undecodable characters (lone surrogates); escaped as \\udcNN"
BIG_INT = "an integer beyond 64 bits; recorded as text"

# Containers are read through these builtin methods, so a subclass's own __iter__/__len__/items never runs.
_SEQUENCES: tuple[Any, ...] = (list, tuple, collections.deque)
_SETS: tuple[Any, ...] = (set, frozenset)
_CONTAINERS: tuple[Any, ...] = (*_SEQUENCES, *_SETS, dict)


class _TooBig(Exception):
    pass


class _Walk:
    """The budget of one value's shaping, and the reasons any part of it was changed."""

    def __init__(self) -> None:
        self.nodes = MAX_NODES
        self.text = MAX_TOTAL_TEXT
        self.reasons: list[str] = []

    def visit(self) -> None:
        self.nodes -= 1
        if self.nodes < 0:
            raise _TooBig

    def spend_text(self, length: int) -> None:
        self.text -= length
        if self.text < 0:
            raise _TooBig

    def changed(self, reason: str) -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)


def shape(value: Any) -> tuple[Any, str | None]:
    """``(recordable value, why it was changed or None)``: see the module docstring. Never raises."""
    kind = type(value)
    # The common arguments and return values, recorded as they are, without a walk: exactly the values the walk
    # would keep unchanged (a 64-bit int, a finite float, short ASCII text, None, a bool).
    if value is None or kind is bool or (kind is int and value.bit_length() < MAX_INT_BITS) \
            or (kind is float and math.isfinite(value)) or (kind is str and len(value) <= MAX_TEXT and value.isascii()):
        return value, None
    walk = _Walk()
    try:
        shaped = _shape(value, 0, walk)
    except _TooBig:
        return _describe_safely(value), TOO_LARGE
    except Exception as exc:  # anything a value can still throw at us: describe it, the run is still recorded
        return f"<unrecordable {_type_name(value)}: {type(exc).__name__}>", f"unrecordable ({type(exc).__name__})"
    return shaped, "; ".join(walk.reasons) or None


def safe_mapping(values: Mapping[str, Any] | None, warnings: list[str] | None = None) -> dict[str, Any]:
    """:func:`shape` applied to each value of a parameter mapping; each changed one is named in ``warnings``."""
    out: dict[str, Any] = {}
    for key, value in dict.items(dict(values or {})):
        name = _key_text(key)
        out[name], why = shape(value)
        if why is not None and warnings is not None:
            warnings.append(f"parameter {name!r} ({type(value).__name__}) is {why}")
    return out


def _key_text(key: Any) -> str:
    """A mapping key as JSON object text: strings (made storable) and numbers as they read, others described."""
    if isinstance(key, str):
        return _storable_text(key)
    if key is None or isinstance(key, bool | int | float):
        return str(_scalar(key))
    return _describe_object(key)


def _shape(value: Any, depth: int, walk: _Walk) -> Any:
    walk.visit()
    if isinstance(value, str):
        return _shape_text(value, walk)
    if value is None or isinstance(value, bool | int | float):
        scalar = _scalar(value)
        if type(scalar) is str:
            walk.changed(BIG_INT if isinstance(value, int) else NOT_JSON)
        return scalar
    if isinstance(value, pathlib.PurePath):
        return _shape_text(_path_text(value), walk)  # a path as its text: what JSON readers expect of one
    if isinstance(value, _CONTAINERS):
        if depth >= MAX_DEPTH or _length(value) > MAX_ITEMS:
            raise _TooBig
        if isinstance(value, dict):
            return {_shape_key(k, walk): _shape(v, depth + 1, walk) for k, v in dict.items(value)}
        if isinstance(value, _SETS):
            walk.changed(NOT_JSON)  # JSON has no sets: recorded as text, of bounded size like any description
            return _shape_text(_describe(value, 0, [MAX_NODES]), walk)
        return [_shape(v, depth + 1, walk) for v in iterate_builtin(value)]
    walk.changed(NOT_JSON)
    return _shape_text(_describe(value, 0, [MAX_NODES]), walk)


def _shape_text(text: str, walk: _Walk) -> str:
    text = str.__str__(text)
    if len(text) > MAX_TEXT:
        raise _TooBig
    walk.spend_text(len(text))
    storable = _storable_text(text)
    if storable is not text:
        walk.changed(ESCAPED)
    return storable


def _shape_key(key: Any, walk: _Walk) -> str:
    if not isinstance(key, str | int | float) and key is not None:
        walk.changed("keyed by objects that are not text; keys described")
    text = _key_text(key)
    walk.spend_text(len(text))
    return text


def _scalar(value: bool | int | float | None) -> Any:
    """None, a bool or a finite float as it is; an integer beyond 64 bits as text (its size only, when it is too
    long to write out); a non-finite float as its name."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        number = int.__index__(value)  # the plain integer, whatever an int subclass's own methods do
        bits = number.bit_length()
        if bits < MAX_INT_BITS:
            return number
        if bits <= MAX_INT_TEXT_BITS:  # cheap to write out, and exact
            return str(number)
        return f"<int of about {_approximate_digits(bits):,} digits>"
    real = float.__float__(value)
    return real if math.isfinite(real) else str(real)


def _approximate_digits(bits: int) -> int:
    # Exactly counting the digits of a huge integer costs time proportional to its size; this is within one digit.
    return int(bits * math.log10(2)) + 1


def _storable_text(text: str) -> str:
    """``text`` as a plain ``str`` that encodes to UTF-8: lone surrogates (undecodable file names) become
    ``\\udcNN``."""
    text = str.__str__(text)
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _length(value: Any) -> int:
    for kind in _CONTAINERS:
        if isinstance(value, kind):
            return int(kind.__len__(value))
    raise TypeError(f"not a builtin container: {type(value).__name__}")


def is_builtin_collection(value: Any) -> bool:
    """Whether ``value`` is a list, tuple, deque, set or frozenset (or a subclass), read by :func:`iterate_builtin`."""
    return isinstance(value, _SEQUENCES + _SETS)


def iterate_builtin(value: Any) -> Iterator[Any]:
    """The items of a builtin container (dicts: keys), through the builtin type's own ``__iter__``."""
    for kind in _CONTAINERS:
        if isinstance(value, kind):
            return iter(kind.__iter__(value))
    raise TypeError(f"not a builtin container: {type(value).__name__}")


# -- bounded descriptions: what is recorded instead of a value that is too large or not JSON --------------------


def _describe_safely(value: Any) -> str:
    """A description of ``value`` in at most :data:`MAX_TEXT` characters, built without running user code."""
    try:
        text = _describe(value, 0, [MAX_NODES])
    except Exception as exc:
        text = f"<unrecordable {_type_name(value)}: {type(exc).__name__}>"
    text = _storable_text(text)
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def _describe(value: Any, depth: int, budget: list[int]) -> str:
    """A ``repr``-like text of builtin values (containers abbreviated to their first items); other objects by type.
    ``budget`` counts the nodes still to visit, so the text stays short whatever the value's size."""
    budget[0] -= 1
    if budget[0] < 0:
        return "…"
    if isinstance(value, str):
        text = str.__str__(value)
        return repr(text[:DESCRIBE_STRING]) + ("…" if len(text) > DESCRIBE_STRING else "")
    if value is None or isinstance(value, bool | int | float):
        scalar = _scalar(value)
        return scalar if type(scalar) is str else repr(scalar)
    if isinstance(value, bytes | bytearray | memoryview):
        return _describe_bytes(value)
    if isinstance(value, pathlib.PurePath):
        return f"{type(value).__name__}({_path_text(value)[:DESCRIBE_STRING]!r})"
    if isinstance(value, _CONTAINERS):
        return _describe_container(value, depth, budget)
    return _describe_object(value)


_BRACKETS: dict[Any, tuple[str, str]] = {list: ("[", "]"), tuple: ("(", ")"), collections.deque: ("deque([", "])"),
                                         set: ("{", "}"), frozenset: ("frozenset({", "})")}


def _describe_container(value: Any, depth: int, budget: list[int]) -> str:
    if isinstance(value, dict):
        open_, close = "{", "}"
        items: Iterable[Any] = dict.items(value)
    else:
        open_, close = _BRACKETS[_builtin_kind(value)]
        items = iterate_builtin(value)
    count = _length(value)
    if count == 0 and isinstance(value, _SETS):
        return f"{_builtin_kind(value).__name__}()"
    if depth >= 3:
        return open_ + "…" + close
    parts = []
    for item in itertools.islice(items, DESCRIBE_ITEMS):
        if isinstance(value, dict):
            key, val = item
            parts.append(f"{_describe(key, depth + 1, budget)}: {_describe(val, depth + 1, budget)}")
        else:
            parts.append(_describe(item, depth + 1, budget))
    if count > DESCRIBE_ITEMS:
        parts.append(f"… ({count:,} items)")
    text = open_ + ", ".join(parts) + ("," if isinstance(value, tuple) and count == 1 else "") + close
    builtin = type(value) in (dict, list, tuple, set, frozenset, collections.deque)
    return text if builtin else f"{_type_name(value)}({text})"  # a subclass (defaultdict, a named tuple) says so


def _builtin_kind(value: Any) -> Any:
    for kind in (*_SEQUENCES, frozenset, set):
        if isinstance(value, kind):
            return kind
    raise TypeError(f"not a builtin container: {type(value).__name__}")


def _describe_bytes(value: bytes | bytearray | memoryview) -> str:
    """Type, size and the first :data:`BYTES_PREFIX` bytes: never a copy or ``repr`` of the whole buffer."""
    view = memoryview(value)  # the buffer itself: a subclass's own __len__/__getitem__ never run
    size = view.nbytes
    if not view.c_contiguous:
        return f"<{_type_name(value)} of {size:,} bytes>"
    head = bytes(view.cast("B")[:BYTES_PREFIX])
    return f"<{_type_name(value)} of {size:,} bytes: {head!r}{'…' if size > BYTES_PREFIX else ''}>"


_EXACT_REPR: tuple[type, ...] = (datetime.datetime, datetime.date, datetime.time, datetime.timedelta,
                                 datetime.timezone, uuid.UUID)


def _describe_object(value: Any) -> str:
    """An object by its type's qualified name; a few standard-library values (dates, UUIDs, enum members) exactly,
    as their own ``repr`` costs little and says more. A user class's ``repr`` is never called: it may load a
    dataset, take seconds or raise."""
    try:
        if type(value) in _EXACT_REPR and _plain_tzinfo(value):
            return repr(value)
        if isinstance(value, enum.Enum):
            return f"<{_type_name(value)}.{str.__str__(value._name_)}>"
    except Exception:  # an odd subclass: its type says enough
        pass
    return f"<{_type_name(value)} object>"


def _plain_tzinfo(value: Any) -> bool:
    # A datetime's repr includes its tzinfo's repr: only the standard library's own time zones are taken.
    tzinfo = getattr(value, "tzinfo", None) if isinstance(value, datetime.datetime | datetime.time) else None
    return tzinfo is None or type(tzinfo) is datetime.timezone or type(tzinfo).__module__ == "zoneinfo"


def _type_name(value: Any) -> str:
    """``module.QualName`` of the value's type (bare for builtins); never raises, runs no metaclass code."""
    kind = type(value)
    try:
        module, name = type.__getattribute__(kind, "__module__"), type.__getattribute__(kind, "__qualname__")
        text = name if module in ("builtins", None) else f"{module}.{name}"
        return _storable_text(str.__str__(text))[:DESCRIBE_STRING]
    except Exception:
        return "object"


def _path_text(path: pathlib.PurePath) -> str:
    """A ``pathlib`` path as text; a subclass whose own conversion fails or is not text is described by type."""
    try:
        text = os.fspath(path)
    except Exception:
        return _describe_object(path)
    return str.__str__(text) if isinstance(text, str) else _describe_object(path)
