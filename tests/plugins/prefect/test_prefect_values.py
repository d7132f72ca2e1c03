"""Values that are slow, huge, broken or merely unusual, passed to and returned by real Prefect tasks: the task runs
as fast as without metatrail, its run is recorded, and what is recorded says what the value was without running the
value's own code (a ``repr`` that loads a dataset, a key whose ``str`` raises)."""

from __future__ import annotations

import collections
import os
import pathlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prefect import flow, task

from metatrail.plugins.prefect import values

Events = Callable[[], list[dict[str, Any]]]
SLOW_S = 3.0


class Lazy:
    """A dataset handle that loads on ``repr``/``str`` (Prefect itself never calls them)."""

    calls = 0

    def __repr__(self) -> str:
        Lazy.calls += 1
        time.sleep(SLOW_S)
        return "Lazy()"

    __str__ = __repr__


class Registry(dict[str, int]):
    """A dict subclass whose ``repr`` is slow."""

    def __repr__(self) -> str:
        time.sleep(SLOW_S)
        return "Registry()"


class BadKey:
    """A dictionary key whose ``str`` and ``repr`` raise."""

    def __str__(self) -> str:
        raise RuntimeError("no str")

    __repr__ = __str__


class BadPath(os.PathLike[str]):
    """A path-like object whose ``__fspath__`` raises."""

    def __fspath__(self) -> str:
        raise RuntimeError("no path")


@task(cache_policy=None)
def passthrough(value: Any) -> Any:
    return value


def _completes(events: Events, stage: str) -> list[dict[str, Any]]:
    """The COMPLETE events of ``stage``'s tries, in order of the calls."""
    found = [e for e in events() if e["eventType"] == "COMPLETE" and e["job"]["name"].endswith(f".{stage}")]
    return sorted(found, key=lambda e: e["eventTime"])


def _executions(events: Events, stage: str) -> list[dict[str, Any]]:
    """The execution facets of :func:`_completes`."""
    return [e["run"]["facets"]["metatrail_execution"] for e in _completes(events, stage)]


def _run_one(value: Any) -> tuple[float, Any]:
    """``passthrough(value)`` in a flow: the task's wall time and its return value."""

    @flow
    def one() -> tuple[float, Any]:
        start = time.perf_counter()
        result = passthrough(value)
        return time.perf_counter() - start, result

    took, result = one()
    return took, result


def test_slow_repr_is_never_called(events: Events) -> None:
    Lazy.calls = 0
    took, result = _run_one(Lazy())
    assert isinstance(result, Lazy) and Lazy.calls == 0
    assert took < SLOW_S
    (facet,) = _executions(events, "passthrough")
    assert facet["params"] == {"value": "<test_prefect_values.Lazy object>"}
    assert facet["extra"]["return_value"] == "<test_prefect_values.Lazy object>"
    assert facet["warnings"] == ["parameter 'value' (Lazy) is not JSON-serialisable; stringified",
                                 "return value (Lazy) is not JSON-serialisable; stringified"]


def test_dict_subclass_read_without_its_repr(events: Events) -> None:
    small = Registry(a=1, b=2)
    large = collections.defaultdict(int, {i: i for i in range(5_000)})

    @flow
    def registries() -> float:
        start = time.perf_counter()
        passthrough(small)
        passthrough(large)
        return time.perf_counter() - start

    assert registries() < SLOW_S
    first, second = _executions(events, "passthrough")
    assert first["params"] == {"value": {"a": 1, "b": 2}} and not first.get("warnings")
    text = second["params"]["value"]
    assert text.startswith("collections.defaultdict({0: 0, 1: 1, 2: 2,") and text.endswith("… (5,000 items)})")
    assert second["warnings"][0] == "parameter 'value' (defaultdict) is too large to record whole; shortened"


def test_bytes_are_described_not_copied(events: Events) -> None:
    blob = b"\x00" * (20 * 1024 * 1024)
    _, result = _run_one(blob)
    assert result is blob
    (facet,) = _executions(events, "passthrough")
    expected = "<bytes of 20,971,520 bytes: b'" + "\\x00" * 32 + "'…>"
    assert facet["params"] == {"value": expected}
    assert facet["extra"]["return_value"] == expected


def test_key_whose_str_raises_still_records_the_run(events: Events) -> None:
    @flow
    def bad_keys() -> int:
        passthrough({BadKey(): 1, "ok": 2})
        passthrough(BadPath())
        return 0

    assert bad_keys() == 0
    keyed, pathlike = _executions(events, "passthrough")
    assert keyed["params"] == {"value": {"<test_prefect_values.BadKey object>": 1, "ok": 2}}
    assert keyed["warnings"][0] == "parameter 'value' (dict) is keyed by objects that are not text; keys described"
    assert pathlike["params"] == {"value": "<test_prefect_values.BadPath object>"}


def test_huge_int_and_undecodable_text(tmp_path: Path, events: Events) -> None:
    name = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9.csv")  # a Latin-1 file name, as os.listdir gives it
    Path(name).write_text("1,2\n")

    @flow
    def odd() -> int:
        passthrough(10**5000)
        passthrough(name)
        return 0

    assert odd() == 0
    big, text = _executions(events, "passthrough")
    assert big["params"] == {"value": "<int of about 5,001 digits>"}
    assert big["warnings"][0] == "parameter 'value' (int) is an integer beyond 64 bits; recorded as text"
    assert text["params"] == {"value": f"{tmp_path}/caf\\udce9.csv"}
    assert text["warnings"][0] == ("parameter 'value' (str) is text with undecodable characters (lone surrogates); "
                                   "escaped as \\udcNN")


def test_only_explicit_paths_are_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, events: Events) -> None:
    (tmp_path / "train").mkdir()
    monkeypatch.chdir(tmp_path)
    train = str(tmp_path / "train")
    cases: list[tuple[Any, list[str]]] = [
        ("train", []),  # a word, though a directory of that name exists in the working directory
        (pathlib.Path("train"), [train]),  # an explicit path, relative to the working directory
        (train, [train]),
        (f"file://{train}", [train]),
        ("/tmp", []),  # too broad to be anyone's input
        (".", []),
        (pathlib.Path("."), []),
        ([train, "train", "/"], [train]),
    ]

    @flow
    def named() -> None:
        for value, _ in cases:
            passthrough(value)

    named()
    completes = _completes(events, "passthrough")
    assert [[i["name"] for i in e["inputs"]] for e in completes] == [expected for _, expected in cases]


@pytest.mark.parametrize(("value", "recorded", "why"), [
    (2**63 - 1, 2**63 - 1, None),
    (-(2**62), -(2**62), None),
    (2**63, str(2**63), values.BIG_INT),
    (-(2**63), str(-(2**63)), values.BIG_INT),  # 64 bits with its sign
    (0.5, 0.5, None),
    (float("nan"), "nan", values.NOT_JSON),
    (float("-inf"), "-inf", values.NOT_JSON),
    (True, True, None),
    (None, None, None),
    ("a" * values.MAX_TEXT, "a" * values.MAX_TEXT, None),
    ("café", "café", None),
    ("caf\udce9", "caf\\udce9", values.ESCAPED),
])
def test_scalars_are_recorded_as_the_walk_records_them(value: Any, recorded: Any, why: str | None) -> None:
    # Plain scalars take a short way past the walk (most arguments and return values are one): it must give what
    # the walk gives, limits included.
    assert values.shape(value) == (recorded, why)
    assert values._shape(value, 0, values._Walk()) == recorded


def test_scalars_of_subclasses_and_long_text_take_the_walk() -> None:
    class Count(int):
        def __index__(self) -> int:
            raise AssertionError("an int subclass's own methods are never run")

    assert values.shape(Count(3)) == (3, None)
    assert values.shape("a" * (values.MAX_TEXT + 1))[1] == values.TOO_LARGE
