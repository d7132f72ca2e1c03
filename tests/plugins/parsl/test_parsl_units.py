"""The plugin's building blocks on real Parsl objects: call description, the task wrapper, import weight."""

from __future__ import annotations

import datetime as dt
import inspect
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from parsl import File
from parsl.app.bash import remote_side_bash_executor
from parsl.app.errors import wrap_error
from parsl.serialize import pack_apply_message, unpack_apply_message

from metatrail.config import load_settings
from metatrail.plugins.parsl import worker
from metatrail.plugins.parsl.worker import CTX_KEY, TrackedCall, describe_call, encode_context, tracked, worker_settings


def analyse(data, factor=2, *extra, inputs=(), outputs=(), stdout=None, **options):
    return factor


def test_describe_call_names_arguments_and_splits_files(tmp_path: Path) -> None:
    src, dst = File(str(tmp_path / "in.txt")), File(str(tmp_path / "out.txt"))
    params, inputs, outputs = describe_call(
        wrap_error(analyse), (File("rel.txt"), 3, "x"),
        {"inputs": [src, 42], "outputs": [dst], "stdout": "log.txt", "mode": "fast",
         "_parsl_monitoring_task_id": 4, "_parsl_monitoring_try_id": 0})
    assert params == {"data": str(Path("rel.txt").resolve()), "factor": 3, "extra[0]": "x", "inputs": [42],
                      "stdout": "log.txt", "mode": "fast"}
    assert inputs == [str(Path("rel.txt").resolve()), str(tmp_path / "in.txt")]
    assert outputs == [str(tmp_path / "out.txt")]


def test_describe_call_sees_through_bash_apps_and_remote_urls() -> None:
    from functools import partial

    def convert(src, level=1, inputs=(), outputs=()):
        return f"convert {src}"

    remote = File("https://example.org/data.csv")
    params, inputs, _ = describe_call(wrap_error(partial(remote_side_bash_executor, convert)), ("a",),
                                      {"level": 5, "inputs": [remote]})
    assert params == {"src": "a", "level": 5}
    assert inputs == ["https://example.org/data.csv"]  # named, never downloaded


def test_tracked_call_is_a_transparent_picklable_wrapper() -> None:
    wrapper = tracked(analyse)
    assert tracked(analyse) is wrapper  # one wrapper per function: Parsl's serializer cache keeps hitting
    assert wrapper.__name__ == "analyse"
    func, args, kwargs = unpack_apply_message(pack_apply_message(wrapper, (1,), {"factor": 9}))
    assert isinstance(func, TrackedCall)
    assert func(*args, **kwargs) == 9  # no context: a plain call, nothing recorded
    assert CTX_KEY not in kwargs


def _context(tmp_path: Path, stage: str) -> dict[str, Any]:
    """A task's context as the DFK makes it, for the autouse fixture's store (the worker's environment wins)."""
    return {"run": "0192f3a0-0000-7000-8000-000000000000", "pipeline": "units", "namespace": "parsl", "version": "x",
            "store": os.environ["METATRAIL_STORE"], "hash_cache": str(tmp_path / "hashcache.db"),
            "id": "0192f3a0-0000-7000-8000-000000000001", "stage": stage, "try": 0, "extra": {"parsl_task_id": 1}}


def _call_on_worker(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], ctx: dict[str, Any], *,
                    serialise: bool = True) -> tuple[Any, list[dict[str, Any]]]:
    """Call ``func`` as an HTEX worker does (through Parsl's serialiser unless ``serialise`` is false, with a
    Recorder of its own); its result and the events stored."""
    payload = encode_context(ctx)
    assert isinstance(payload, bytes)  # one value for Parsl's (pure-Python) dill pickler, not a dict to walk
    func, kwargs = tracked(func), {**kwargs, CTX_KEY: payload}
    if serialise:
        func, args, kwargs = unpack_apply_message(pack_apply_message(func, args, kwargs))
    recorders = dict(worker._worker_recorders)
    worker._worker_recorders.clear()
    try:
        result = func(*args, **kwargs)
        (rec,) = worker._worker_recorders.values()
        assert rec.settings.writer == "thread"  # a worker process writes on a thread, never starts a writer process
        assert rec.flush(30)
        rec.close(30)
    finally:
        worker._worker_recorders.clear()
        worker._worker_recorders.update(recorders)
    from metatrail.store import open_store

    with open_store(ctx["store"]) as opened:
        return result, [e.body for e in opened.iter_events()]


def test_the_context_travels_as_bytes_and_is_recorded_on_the_worker(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METATRAIL_WRITER", raising=False)
    ctx = _context(tmp_path, "analyse")
    result, events = _call_on_worker(analyse, (1,), {}, ctx)
    assert result == 2
    assert [e["eventType"] for e in events] == ["START", "COMPLETE"]
    assert {e["run"]["runId"] for e in events} == {ctx["id"]}


class AttrDict(dict):  # type: ignore[type-arg]
    """A dict read by attribute, a common idiom: a missing name raises KeyError, not AttributeError."""

    __getattr__ = dict.__getitem__


def test_describe_call_never_looks_up_attributes_on_arguments(tmp_path: Path) -> None:
    from concurrent.futures import Future

    from parsl.app.futures import DataFuture

    produced = DataFuture(Future(), File(str(tmp_path / "made.txt")), tid=7)
    params, inputs, _ = describe_call(analyse, (AttrDict(lr=0.1),), {"inputs": [produced, AttrDict(k=1)]})
    assert params == {"data": {"lr": 0.1}, "inputs": [{"k": 1}]}
    assert inputs == [str(tmp_path / "made.txt")]


class Unlistable(list):  # type: ignore[type-arg]
    """A list that cannot be iterated: an argument no description can get through."""

    def __iter__(self) -> Any:
        raise RuntimeError("not today")


def test_a_call_that_cannot_be_described_is_recorded_without_params_saying_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METATRAIL_WRITER", raising=False)
    result, events = _call_on_worker(analyse, (1,), {"inputs": Unlistable([1])}, _context(tmp_path, "analyse"),
                                     serialise=False)  # Parsl cannot pickle it; a ThreadPool task is not pickled
    assert result == 2  # the task is not affected
    assert [e["eventType"] for e in events] == ["START", "COMPLETE"]
    facet = events[0]["run"]["facets"]["metatrail_execution"]
    assert facet["params"] == {}
    assert any("RuntimeError: not today" in w for w in facet["warnings"]), facet["warnings"]


_FIRST_TASK = """
import json, os, sys, time
from metatrail.plugins.parsl.worker import CTX_KEY, _worker_recorders, encode_context, tracked
def body():
    return time.time()
ctx = encode_context(json.loads(sys.argv[1]))
called = time.time()
began = tracked(body)(**{CTX_KEY: ctx})
(rec,) = _worker_recorders.values()
assert rec.flush(30)
print(json.dumps({"called": called, "began": began}))
"""


def test_the_first_task_of_a_fresh_worker_starts_after_metatrails_set_up(tmp_path: Path) -> None:
    # A fresh process imports the recorder and creates it on its first task (tens of ms): not the task's time.
    ctx = _context(tmp_path, "body")
    out = subprocess.run([sys.executable, "-c", _FIRST_TASK, json.dumps(ctx)], capture_output=True, text=True,
                         check=True, env={**os.environ, "METATRAIL_ENERGY": "0"})
    times = json.loads(out.stdout)
    from metatrail.store import open_store

    with open_store(ctx["store"]) as opened:
        (start,) = [e.body for e in opened.iter_events() if e.body["eventType"] == "START"]
    started = dt.datetime.fromisoformat(start["eventTime"]).timestamp()
    assert times["called"] <= started <= times["began"]
    # the set-up lies before the recorded start, and takes longer than what metatrail still does after it
    assert started - times["called"] > times["began"] - started


def test_worker_settings_choose_the_writer_thread_unless_a_process_is_asked_for(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METATRAIL_WRITER", raising=False)
    assert worker_settings(load_settings(writer="auto")).writer == "thread"
    assert worker_settings(load_settings(writer="thread")).writer == "thread"
    assert worker_settings(load_settings(writer="process")).writer == "process"


def test_the_signature_is_computed_once_per_function() -> None:
    describe_call(analyse, (1,), {})
    assert worker._shapes.get(analyse) is not None
    assert describe_call(analyse, (1, 3), {"mode": "x"})[0] == {"data": 1, "factor": 3, "mode": "x"}


def _by_position_or_keyword(a, b=2, *, c=3):
    return a


def _all_required(a, b, c):
    return a


def _keyword_only(*, k=1, m=2):
    return k


def _positional_only(a, /, b=2):
    return a


@pytest.mark.parametrize("func", [_by_position_or_keyword, _all_required, _keyword_only, _positional_only, analyse])
@pytest.mark.parametrize(("args", "kwargs"), [
    ((1,), {}), ((1, 2), {}), ((1, 2, 3), {}), ((1, 2, 3, 4), {}), ((1,), {"c": 5}), ((), {"c": 1, "a": 2}),
    ((), {"m": 1, "k": 2}), ((1,), {"a": 2}), ((1,), {"zz": 1}), ((), {"b": 1}), ((1,), {"b": 2, "options": 3}),
])
def test_binding_a_call_names_its_arguments_as_inspect_does(func: Any, args: tuple[Any, ...],
                                                           kwargs: dict[str, Any]) -> None:
    # The shape binds the common signatures itself (bind_partial was ~2.5 us per task); names, their order and the
    # calls it refuses must stay those of inspect, which binds every other signature
    shape = worker.CallShape(inspect.signature(func))
    try:
        expected: Any = list(shape._bind_by_inspect(args, kwargs).items())
    except TypeError:
        expected = TypeError
    try:
        got: Any = list(shape.bind(args, kwargs).items())
    except TypeError:
        got = TypeError
    assert got == expected


_NO_ROWS = (row for row in ())  # a default that neither pickle nor dill can serialise


def configure(data, rows=_NO_ROWS, *, level=1):
    return data * level


def test_a_wrapper_that_has_described_a_call_still_pickles_when_the_signature_does_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The wrapper keeps the signature it computed on its first tracked call (per-function work done once per
    # worker); a signature holds the defaults, and a generator cannot be pickled. A ThreadPool task first, then the same
    # app sent to an HTEX worker: the wrapper must still serialise, and be tracked there.
    monkeypatch.delenv("METATRAIL_WRITER", raising=False)
    result, events = _call_on_worker(configure, (2,), {"level": 3}, _context(tmp_path, "configure"),
                                     serialise=False)
    assert result == 6
    assert tracked(configure)._shape is not None
    assert events[0]["run"]["facets"]["metatrail_execution"]["params"] == {"data": 2, "level": 3}
    ctx = dict(_context(tmp_path, "configure"), id="0192f3a0-0000-7000-8000-000000000002")
    result, events = _call_on_worker(configure, (5,), {}, ctx)
    assert result == 5
    (start,) = [e for e in events if e["eventType"] == "START" and e["run"]["runId"] == ctx["id"]]
    assert start["run"]["facets"]["metatrail_execution"]["params"] == {"data": 5}


def test_importing_the_plugin_does_not_import_parsl() -> None:
    # HTEX workers import metatrail.plugins.parsl.worker to unpickle the wrapper: it must stay light
    code = ("import sys, metatrail, metatrail.plugins.parsl, metatrail.plugins.parsl.worker; "
            "print([m for m in ('parsl', 'sqlalchemy', 'openlineage') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_worker_on_another_host_does_not_write_the_dfks_store_path_on_its_own_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The DFK's store on a disk this worker's node does not share: the worker says so and records nothing, rather
    than create the path locally and keep its records where nobody looks."""
    import socket

    from metatrail.errors import ConfigError

    monkeypatch.delenv("METATRAIL_STORE", raising=False)
    unshared = tmp_path / "login-node-only" / ".metatrail" / "metatrail.db"
    ctx = {"run": "0190f0e2-0000-7000-8000-00000000a001", "store": f"sqlite:///{unshared}", "hash_cache": "",
           "host": "login01.elsewhere"}
    with pytest.raises(ConfigError, match="not on a filesystem this worker's host"):
        worker._recorder_for(ctx)
    assert worker._recorder_for(ctx) is None  # said once; later tasks run unrecorded at once
    assert not (tmp_path / "login-node-only").exists()
    # On the DFK's own host (HTEX with a local provider) the path is the DFK's: it is made as before.
    here = {**ctx, "host": socket.gethostname(), "store": f"sqlite:///{tmp_path / 'here' / 'metatrail.db'}"}
    rec = worker._recorder_for(here)
    try:
        assert rec is not None
    finally:
        rec.close()
        worker._worker_recorders.pop((here["store"], ""), None)


@pytest.mark.parametrize(("environment", "argument", "on_workers"), [
    (None, None, True), ("", None, True), ("1", None, True), ("on", None, True),
    ("0", None, False), ("off", None, False), (" No ", None, False), ("FALSE", None, False),
    ("0", True, True), ("1", False, False), (None, False, False)])
def test_worker_side_is_the_argument_else_the_environment_else_on(
        monkeypatch: pytest.MonkeyPatch, environment: str | None, argument: bool | None, on_workers: bool) -> None:
    from parsl.config import Config
    from parsl.executors import ThreadPoolExecutor

    from metatrail.plugins.parsl import WORKER_SIDE_ENV, track
    from metatrail.plugins.parsl.memoizer import TrackingMemoizer

    if environment is None:
        monkeypatch.delenv(WORKER_SIDE_ENV, raising=False)
    else:
        monkeypatch.setenv(WORKER_SIDE_ENV, environment)
    how = {} if argument is None else {"worker_side": argument}
    config = track(Config(executors=[ThreadPoolExecutor(label="pool")]), **how)
    assert isinstance(config.memoizer, TrackingMemoizer)  # recorded either way: from the DFK, or on the workers
    assert getattr(config.executors[0], "_metatrail_tracked", False) is on_workers


def test_a_worker_side_value_that_is_not_on_or_off_is_logged_once_and_the_default_kept(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from parsl.config import Config
    from parsl.executors import ThreadPoolExecutor

    from metatrail import logsafe
    from metatrail.plugins.parsl import WORKER_SIDE_ENV, track

    logsafe.reset()
    monkeypatch.setenv(WORKER_SIDE_ENV, "sometimes")
    with caplog.at_level(logging.WARNING, logger="metatrail"):
        configs = [track(Config(executors=[ThreadPoolExecutor(label="pool")])) for _ in range(2)]
    assert all(getattr(c.executors[0], "_metatrail_tracked", False) for c in configs)
    assert [r.getMessage() for r in caplog.records if WORKER_SIDE_ENV in r.getMessage()] == [
        "metatrail: ignoring METATRAIL_PARSL_WORKER_SIDE='sometimes' (valid: 1/on/true/yes for worker-side "
        "recording, 0/false/no/off to record from the DFK only); recording on the workers"]


@pytest.mark.parametrize(("version", "supported"), [
    ("2026.01.26", True), ("2026.1.26", True), ("2026.10.26", True), ("2027.01.05", True),
    ("2026.01.19", False), ("2025.12.08", False), ("2025.01.13", False), ("unknown", True)])
def test_the_oldest_supported_parsl_is_the_first_with_the_memoizer_interface_wrapped(
        version: str, supported: bool) -> None:
    from metatrail.plugins.parsl import compat

    assert compat.is_supported(version) is supported


def test_an_unsupported_parsl_runs_its_workflow_unrecorded_and_says_so_once(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    import parsl
    from parsl.config import Config
    from parsl.executors import ThreadPoolExecutor

    from metatrail import logsafe
    from metatrail.plugins.parsl import compat, track

    logsafe.reset()
    # What Parsl 2026.01.19 reports: its DFK would call our memoizer's start() without config_run_dir, and fail.
    monkeypatch.setattr(compat, "parsl_version", lambda: "2026.01.19")
    with caplog.at_level(logging.WARNING, logger="metatrail"):
        configs = [track(Config(executors=[ThreadPoolExecutor(label="pool")], run_dir=str(tmp_path)))
                   for _ in range(2)]
    assert all(c.memoizer is None and not getattr(c.executors[0], "_metatrail_tracked", False) for c in configs)
    assert [r.getMessage() for r in caplog.records if "not supported" in r.getMessage()] == [
        "metatrail: Parsl 2026.01.19 is not supported (needs 2026.1.26 or later); this workflow runs unrecorded"]
    with parsl.load(configs[0]):
        assert parsl.python_app(lambda: 7)().result() == 7  # the workflow itself is untouched
