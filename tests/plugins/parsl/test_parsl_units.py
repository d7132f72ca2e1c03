"""The plugin's building blocks on real Parsl objects: call description, the task wrapper, import weight."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def test_the_context_travels_as_bytes_and_is_recorded_on_the_worker(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METATRAIL_WRITER", raising=False)
    store = os.environ["METATRAIL_STORE"]  # the autouse fixture's store (the worker's environment wins)
    ctx = {"run": "0192f3a0-0000-7000-8000-000000000000", "pipeline": "units", "namespace": "parsl", "version": "x",
           "store": store, "hash_cache": str(tmp_path / "hashcache.db"), "id": "0192f3a0-0000-7000-8000-000000000001",
           "stage": "analyse", "try": 0, "extra": {"parsl_task_id": 1}}
    payload = encode_context(ctx)
    assert isinstance(payload, bytes)  # one value for Parsl's (pure-Python) dill pickler, not a dict to walk
    func, args, kwargs = unpack_apply_message(pack_apply_message(tracked(analyse), (1,), {CTX_KEY: payload}))
    recorders = dict(worker._worker_recorders)
    worker._worker_recorders.clear()
    try:
        assert func(*args, **kwargs) == 2
        (rec,) = worker._worker_recorders.values()
        assert rec.settings.writer == "thread"  # a worker process writes on a thread, never starts a writer process
        assert rec.flush(30)
        rec.close(30)
    finally:
        worker._worker_recorders.clear()
        worker._worker_recorders.update(recorders)
    from metatrail.store import open_store

    with open_store(store) as opened:
        events = [e.body for e in opened.iter_events()]
    assert [e["eventType"] for e in events] == ["START", "COMPLETE"]
    assert {e["run"]["runId"] for e in events} == {ctx["id"]}


def test_worker_settings_choose_the_writer_thread_unless_a_process_is_asked_for(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METATRAIL_WRITER", raising=False)
    assert worker_settings(load_settings(writer="auto")).writer == "thread"
    assert worker_settings(load_settings(writer="thread")).writer == "thread"
    assert worker_settings(load_settings(writer="process")).writer == "process"


def test_the_signature_is_computed_once_per_function() -> None:
    describe_call(analyse, (1,), {})
    assert worker._signatures.get(analyse) is not None
    assert describe_call(analyse, (1, 3), {"mode": "x"})[0] == {"data": 1, "factor": 3, "mode": "x"}


def test_importing_the_plugin_does_not_import_parsl() -> None:
    # HTEX workers import metatrail.plugins.parsl.worker to unpickle the wrapper: it must stay light
    code = ("import sys, metatrail, metatrail.plugins.parsl, metatrail.plugins.parsl.worker; "
            "print([m for m in ('parsl', 'sqlalchemy', 'openlineage') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
