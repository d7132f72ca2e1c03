"""The plugin's parts on their own, in-process and fast: the time cap, id derivation, parameter and dataset
translation (with Airflow's real assets, paths and secrets masker), the ``[metatrail]`` section."""

from __future__ import annotations

import configparser
import os
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("airflow", reason="Airflow tests run in the Airflow environment: nox -s airflow")

from metatrail.boundedcall import MAX_BACKLOG, BoundedCaller, WhenBusy
from metatrail.errors import ConfigError
from metatrail.model import ArtifactRef, ErrorText
from metatrail.plugins.airflow import adapter, compat
from metatrail.plugins.airflow.config import read_config

# -- the time cap ------------------------------------------------------------------------------------------------


def test_a_body_that_finishes_in_time_runs_on_the_worker_thread() -> None:
    seen: list[str] = []
    assert BoundedCaller().call("hook", lambda: seen.append(threading.current_thread().name), 5.0)
    assert seen == ["metatrail-airflow-hook"]


def test_a_raising_body_is_contained_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    guard = BoundedCaller()

    def boom() -> None:
        raise ValueError("broken translation")

    for _ in range(3):
        assert guard.call("unit_raise_hook", boom, 5.0)
    messages = [r.getMessage() for r in caplog.records if "unit_raise_hook failed" in r.getMessage()]
    assert messages == ["metatrail: unit_raise_hook failed (ValueError: broken translation); the task is not affected"]


def test_a_hanging_body_costs_one_cap_then_later_calls_return_at_once() -> None:
    guard = BoundedCaller()
    release = threading.Event()
    started = time.monotonic()
    assert not guard.call("unit_hang", release.wait, 0.3)
    capped = time.monotonic() - started
    ran: list[int] = []
    started = time.monotonic()
    assert not guard.call("unit_after_hang", lambda: ran.append(1), 5.0)
    assert time.monotonic() - started < 0.3
    assert ran == []  # skipped (the default), not queued behind the stuck body
    assert guard.overruns == 1 and guard.skipped == 1
    release.set()
    deadline = time.monotonic() + 5
    while not guard.call("unit_recovered", lambda: ran.append(2), 5.0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ran == [2]
    assert 0.3 <= capped < 5.0


def test_an_end_hook_behind_a_stuck_body_is_queued_not_dropped_and_costs_no_wait() -> None:
    guard = BoundedCaller()
    release = threading.Event()
    ran: list[str] = []
    assert not guard.call("unit_slow_start", lambda: (release.wait(30), ran.append("start")), 0.2)
    started = time.monotonic()
    assert not guard.call("unit_end", lambda: ran.append("end"), 5.0, WhenBusy.QUEUE)
    assert time.monotonic() - started < 0.2  # the task is not kept waiting for it
    assert not guard.call("unit_next_start", lambda: ran.append("next"), 5.0)  # start hooks are still skipped
    assert ran == [] and (guard.queued, guard.skipped) == (1, 1)
    assert guard.busy and not guard.drain(0.1)
    release.set()
    assert guard.drain(5.0) and not guard.busy
    assert ran == ["start", "end"]  # in order: the end hook finds what its start hook left


def test_a_queued_end_hook_that_must_be_waited_for_gets_one_cap() -> None:
    """In a task-runner process the end hook is the last chance before the process ends: it waits, bounded."""
    guard = BoundedCaller()
    release = threading.Event()
    ran: list[str] = []
    assert not guard.call("unit_slow", release.wait, 0.1)
    started = time.monotonic()
    assert not guard.call("unit_end_waits", lambda: ran.append("end"), 0.3, WhenBusy.QUEUE_AND_WAIT)
    assert 0.3 <= time.monotonic() - started < 3
    threading.Timer(0.2, release.set).start()
    assert guard.call("unit_end_in_time", lambda: ran.append("end2"), 5.0, WhenBusy.QUEUE_AND_WAIT)
    assert ran == ["end", "end2"]


def test_the_queue_behind_a_stuck_body_is_bounded() -> None:
    guard = BoundedCaller()
    release = threading.Event()
    try:
        assert not guard.call("unit_stuck", release.wait, 0.1)
        for _ in range(MAX_BACKLOG + 5):
            guard.call("unit_many_ends", lambda: None, 5.0, WhenBusy.QUEUE)
        assert guard.queued == MAX_BACKLOG - 1 and guard.skipped == 6
    finally:
        release.set()


def test_a_task_runner_waits_for_a_hanging_store_once_then_briefly(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The end-of-try flush of a task-runner process is bounded, and a stuck store costs one full wait only."""
    from airflow.sdk.execution_time.task_runner import TaskRunnerMarker

    from metatrail.plugins.airflow import config
    from metatrail.plugins.airflow.listener import SHORT_FLUSH, MetatrailListener
    from metatrail.store.sqlite_writer import SqliteWriter

    release = threading.Event()
    monkeypatch.setattr(SqliteWriter, "ingest", lambda self, events, **kw: release.wait(30))
    monkeypatch.setenv("METATRAIL_TIMEOUT", "0.5")
    config.plugin_config.cache_clear()
    try:
        listener = MetatrailListener()
        listener.on_starting(TaskRunnerMarker())
        recorder = listener._recorder_for(config.plugin_config())
        recorder.pipeline_run_started("p", run_id="0190a2a6-5c00-7000-8000-000000000001")
        waits = []
        for _ in range(2):
            started = time.monotonic()
            listener.before_stopping(TaskRunnerMarker())
            waits.append(time.monotonic() - started)
        assert recorder.pending == 1  # still not stored: the store hangs
        assert 0.5 <= waits[0] < 3 and waits[1] < SHORT_FLUSH + 1
        # outside a task runner (`airflow dags test`, one process) a try ends without waiting at all
        other = MetatrailListener()
        other._recorder = recorder
        started = time.monotonic()
        other.before_stopping(TaskRunnerMarker())
        assert time.monotonic() - started < SHORT_FLUSH
    finally:
        release.set()
        config.plugin_config.cache_clear()


# -- ids ---------------------------------------------------------------------------------------------------------


def test_ids_are_deterministic_and_distinguish_every_part_of_a_try() -> None:
    anchor = 1704067200.0
    base = adapter.execution_id("d", "r", "t", 1, -1, anchor)
    assert base == adapter.execution_id("d", "r", "t", 1, None, anchor)
    parts = [("d2", "r", "t", 1, -1), ("d", "r2", "t", 1, -1), ("d", "r", "t2", 1, -1), ("d", "r", "t", 2, -1),
             ("d", "r", "t", 1, 0)]
    variants = {adapter.execution_id(*p, anchor) for p in parts}  # type: ignore[arg-type]
    assert len(variants) == 5 and base not in variants
    assert adapter.pipeline_run_id("d", "r", anchor) == adapter.pipeline_run_id("d", "r", anchor, 0)
    assert adapter.pipeline_run_id("d", "r", anchor) != adapter.pipeline_run_id("d", "r", anchor, 1)
    assert base[:13] == adapter.pipeline_run_id("d", "r", anchor)[:13]  # both carry the run's logical time


# -- parameters --------------------------------------------------------------------------------------------------


class _Task:
    template_fields = ("bash_command", "env", "op_args", "op_kwargs")

    def __init__(self) -> None:
        self.op_args = ("a", ("tuple", 2))
        self.op_kwargs = {"password": "hunter2-very-secret", "rows": 3, "long": "x" * 5000}
        self.bash_command = "echo hi"
        self.env = {}


def test_parameters_are_flattened_clipped_and_masked_by_airflow() -> None:
    params = adapter.task_params(_Task(), params={"scale": 2}, conf={"label": "x"}, redact=compat.redactor())
    assert params["op_args.0"] == "a"
    assert params["op_args.1"] == ["tuple", 2]
    assert params["op_kwargs.password"] == "***"  # Airflow's masker hides sensitive names
    assert params["op_kwargs.rows"] == 3
    assert params["op_kwargs.long"].startswith("x" * adapter.MAX_TEXT) and "3000 more characters" in params[
        "op_kwargs.long"]
    assert params["template.bash_command"] == "echo hi"
    assert "template.env" not in params  # empty fields say nothing
    assert (params["params.scale"], params["conf.label"]) == (2, "x")


def _lazy_sequence() -> object:
    """A real ``LazyXComSequence`` of the XComs of a task ``add_one``, as a reduce task downstream of a mapped task
    gets it. This process has no supervisor, so anything that reads it (its length, its items) raises."""
    from airflow.providers.standard.operators.empty import EmptyOperator
    from airflow.sdk import DAG
    from airflow.sdk.definitions.xcom_arg import PlainXComArg
    from airflow.sdk.execution_time.lazy_sequence import LazyXComSequence

    with DAG("unit_lazy", schedule=None):
        upstream = EmptyOperator(task_id="add_one")
    return LazyXComSequence(xcom_arg=PlainXComArg(upstream), ti=None)


class _ReduceTask:
    def __init__(self, lazy: object) -> None:
        self.op_args = [lazy]
        self.op_kwargs = {"nested": {"values": lazy, "n": 1}, "pair": ("a", lazy)}


def test_a_lazy_xcom_sequence_is_described_without_reading_it(caplog: pytest.LogCaptureFixture) -> None:
    from metatrail.recorder import safe_params

    lazy = _lazy_sequence()
    with pytest.raises(ImportError, match="SUPERVISOR_COMMS"):  # reading it asks the supervisor; none here
        len(lazy)  # type: ignore[arg-type]
    unread = "<LazyXComSequence of XCom 'return_value' of task 'add_one': length not read>"
    params = adapter.task_params(_ReduceTask(lazy), params=None, conf=None, redact=compat.redactor())
    assert params == {"op_args.0": unread, "op_kwargs.nested": {"values": unread, "n": 1},
                      "op_kwargs.pair": ["a", unread]}
    warnings: list[str] = []
    assert safe_params(params, warnings) == params and warnings == []  # stored as it is: nothing to warn about
    assert not [r for r in caplog.records if r.getMessage().startswith("metatrail:")]
    lazy._len = 1  # type: ignore[attr-defined]  # what Airflow keeps once the task has asked for the length
    assert adapter.task_params(_ReduceTask(lazy), params=None, conf=None, redact=compat.redactor())["op_args.0"] == (
        "<LazyXComSequence of XCom 'return_value' of task 'add_one': 1 item>")


class _FrameLike:
    """Answers ``==`` with another frame and raises in ``bool()``, as a pandas DataFrame or a numpy array does."""

    def __eq__(self, other: object) -> _FrameLike:  # type: ignore[override]
        return _FrameLike()

    __hash__ = object.__hash__

    def __bool__(self) -> bool:
        raise ValueError("The truth value of a DataFrame is ambiguous.")


class _OddTask:
    template_fields = ("frame", "broken", "table", "empty")

    def __init__(self) -> None:
        self.frame = _FrameLike()
        self.table = "sales_20240101"
        self.empty = ""

    @property
    def broken(self) -> str:
        raise RuntimeError("cannot render")


def test_an_odd_template_field_costs_only_that_field() -> None:
    params = adapter.task_params(_OddTask(), params={"scale": 2}, conf=None, redact=compat.redactor())
    assert isinstance(params["template.frame"], _FrameLike)  # kept as it is; the Recorder describes non-JSON values
    assert params["template.table"] == "sales_20240101"
    assert params["params.scale"] == 2
    assert "template.broken" not in params and "template.empty" not in params


def test_an_error_is_recorded_with_the_secrets_airflow_masks_masked() -> None:
    from airflow.sdk.log import mask_secret

    mask_secret("unit-pw-S3CRET")
    try:
        raise RuntimeError("401 for https://api.example/items?api_key=unit-pw-S3CRET")
    except RuntimeError as exc:
        text = adapter.error_text(exc, compat.redactor())
    assert isinstance(text, ErrorText)
    assert text.message == "RuntimeError: 401 for https://api.example/items?api_key=***"
    assert text.stack is not None and "api_key=***" in text.stack and "unit-pw-S3CRET" not in text.stack
    assert adapter.error_text("Executor said unit-pw-S3CRET", compat.redactor()) == "Executor said ***"
    assert adapter.error_text(None, compat.redactor()) is None


def test_supported_airflow_versions_start_at_3_2() -> None:
    """3.0 and 3.1 call no end hook for a task that skips itself (``on_task_instance_skipped`` is new in 3.2.0)."""
    assert [v for v in ("2.11.0", "3.0.6", "3.1.8", "3.2.0", "3.2.1rc1", "3.3.2", "3.10.0.dev0", "4.0.0", "unknown")
            if compat.supports(v)] == ["3.2.0", "3.2.1rc1", "3.3.2", "3.10.0.dev0", "4.0.0"]
    assert compat.is_supported()  # the Airflow these tests run


# -- datasets ----------------------------------------------------------------------------------------------------


def test_assets_and_paths_map_to_datasets() -> None:
    from airflow.sdk import Asset, AssetAlias, ObjectStoragePath

    assert adapter.asset_artifact(Asset("file:///data/x.csv")) == "file:///data/x.csv"
    assert adapter.asset_artifact(Asset("s3://bucket/key")) == "s3://bucket/key"
    assert adapter.asset_artifact(ObjectStoragePath("file:///data/y")) == "file:///data/y"
    named = adapter.asset_artifact(Asset(name="daily_report"))
    assert isinstance(named, ArtifactRef)
    assert (named.namespace, named.name, named.hash) == ("airflow", "daily_report", None)
    assert adapter.asset_artifact(AssetAlias("alias")) is None
    assert adapter.declared_artifacts([Asset("file:///d/a"), "/d/a", Asset("s3://b/k")]) == ["file:///d/a",
                                                                                           "s3://b/k"]


def test_a_tries_hook_lineage_ends_where_its_end_hook_was_called() -> None:
    """Under ``dags test`` one collector serves every task; an end hook that ran late (queued behind a stuck hook)
    must not take what the next task added."""
    from airflow.sdk.lineage import HookLineageCollector

    collector = HookLineageCollector()
    collector.add_input_asset(object(), uri="file:///d/earlier.csv")
    start = adapter.lineage_marks(collector)
    collector.add_input_asset(object(), uri="file:///d/in.csv")
    collector.add_output_asset(object(), uri="file:///d/out.csv")
    end = adapter.lineage_marks(collector)
    collector.add_output_asset(object(), uri="file:///d/next_task.csv")
    assert adapter.lineage_since(collector, start, end) == (["file:///d/in.csv"], ["file:///d/out.csv"])
    assert adapter.lineage_since(collector, start)[1] == ["file:///d/out.csv", "file:///d/next_task.csv"]


def test_a_repeated_access_merged_into_an_earlier_entry_is_this_tries_lineage() -> None:
    """Airflow's collector keys an entry by (asset, context object) and counts repeats: a path object that two tasks
    of one ``dags test`` process read (a module-level constant, or a new object at a freed object's address) is one
    entry, made by the first task; the second task's read only counts it up."""
    from airflow.sdk import ObjectStoragePath
    from airflow.sdk.lineage import HookLineageCollector

    collector = HookLineageCollector()
    shared = ObjectStoragePath("file:///d/shared.csv")
    collector.add_input_asset(shared, uri=str(shared))  # the first task
    collector.add_input_asset(object(), uri="file:///d/other.csv")
    start = adapter.lineage_marks(collector)
    collector.add_input_asset(shared, uri=str(shared))  # the second task reads the same object
    assert len(collector.collected_assets.inputs) == 2
    assert adapter.lineage_since(collector, start) == (["file:///d/shared.csv"], [])


def test_a_full_collector_is_recognised_at_airflows_own_limit() -> None:
    from airflow.sdk.lineage import HookLineageCollector

    limit = compat.hook_lineage_limit()
    assert limit == 100  # [lineage] max_assets_per_collector, Airflow's default
    collector = HookLineageCollector()
    keep = [object() for _ in range(limit)]  # live context objects: each a distinct entry
    for i, context in enumerate(keep[:-1]):
        collector.add_output_asset(context, uri=f"file:///d/out-{i}.csv")
    assert not adapter.lineage_is_full(adapter.lineage_marks(collector), limit)
    collector.add_output_asset(keep[-1], uri="file:///d/last.csv")
    start = adapter.lineage_marks(collector)
    assert adapter.lineage_is_full(start, limit)
    collector.add_output_asset(object(), uri="file:///d/dropped.csv")  # Airflow takes it no more…
    collector.add_output_asset(keep[0], uri="file:///d/out-0.csv")  # …nor counts a repeat
    assert adapter.lineage_since(collector, start) == ([], [])
    assert not adapter.lineage_is_full(start, None)


def test_only_existing_absolute_paths_count_and_broad_directories_never(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.csv").write_text("1\n")
    (tmp_path / "rel").write_text("")
    (tmp_path / "sub").mkdir()
    values = [str(tmp_path / "in.csv"), "rel", str(tmp_path / "missing"), {"nested": [f"file://{tmp_path}/sub"]},
              "/", os.path.expanduser("~"), str(tmp_path), "not\na path", 42, None]
    assert adapter.local_paths(values) == [str(tmp_path / "in.csv"), str(tmp_path / "sub")]


def test_path_candidates_are_capped(tmp_path: Path) -> None:
    files = []
    for i in range(adapter.MAX_PATH_CANDIDATES + 10):
        f = tmp_path / f"{i}.txt"
        f.write_text("")
        files.append(str(f))
    assert len(adapter.local_paths([files])) == adapter.MAX_PATH_CANDIDATES


# -- the [metatrail] section -------------------------------------------------------------------------------------


def _cfg(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read_string(text)
    return parser


def test_config_defaults_take_the_airflow_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METATRAIL_NAMESPACE", raising=False)
    cfg = read_config(_cfg("[core]\nx = 1\n"))
    assert (cfg.disabled, cfg.namespace, cfg.hook_timeout) == (False, "airflow", 2.0)
    monkeypatch.setenv("METATRAIL_NAMESPACE", "from-env")
    assert read_config(_cfg("")).namespace == "from-env"


def test_config_section_overrides_metatrail_settings(tmp_path: Path) -> None:
    cfg = read_config(_cfg(f"[metatrail]\nnamespace = team\nhook_timeout = 0.5\nstore = sqlite:///{tmp_path}/s.db\n"
                           "site = lab\n"))
    assert (cfg.namespace, cfg.hook_timeout) == ("team", 0.5)
    assert cfg.settings is not None
    assert (cfg.settings.store, cfg.settings.site) == (f"sqlite:///{tmp_path}/s.db", "lab")


def test_config_disabled_and_invalid_values() -> None:
    assert read_config(_cfg("[metatrail]\ndisabled = True\n")).disabled
    assert not read_config(_cfg("[metatrail]\ndisabled = false\n")).disabled
    with pytest.raises(ConfigError, match="hook_timeout"):
        read_config(_cfg("[metatrail]\nhook_timeout = soon\n"))


# -- hooks called with ORM objects (scheduler, API server) -------------------------------------------------------


def test_scheduler_side_hooks_record_from_loaded_orm_values(tmp_path: Path) -> None:
    """The scheduler calls DAG-run hooks, and the failure hook of a task that died unreported, with ORM objects."""
    import datetime as dt
    import uuid

    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.providers.standard.operators.empty import EmptyOperator
    from airflow.sdk import DAG
    from olspec import assert_valid

    from metatrail.plugins.airflow import config
    from metatrail.plugins.airflow.listener import MetatrailListener
    from metatrail.store import open_store

    logical = dt.datetime(2024, 5, 1, tzinfo=dt.UTC)
    with DAG("orm_dag", schedule=None, start_date=logical) as dag:
        op = EmptyOperator(task_id="t")
    dag_run = DagRun(dag_id=dag.dag_id, run_id="scheduled__x", logical_date=logical, run_after=logical,
                     run_type="scheduled", conf={"k": 1}, start_date=logical + dt.timedelta(minutes=1))
    ti = TaskInstance(task=op, dag_version_id=uuid.uuid4(), run_id="scheduled__x")
    ti.dag_run, ti.try_number, ti.state = dag_run, 1, "failed"
    config.plugin_config.cache_clear()
    try:
        listener = MetatrailListener()
        listener.on_dag_run_running(dag_run, "")
        listener.on_task_instance_failed(None, ti, "Executor reported that the task instance finished with failed")
        dag_run.end_date = logical + dt.timedelta(minutes=2)
        listener.on_dag_run_failed(dag_run, "task_failure")
        assert listener._recorder.flush(10)
        with open_store(os.environ["METATRAIL_STORE"]) as store:
            events = [e.body for e in store.iter_events()]
    finally:
        config.plugin_config.cache_clear()
    for e in events:
        assert_valid(e)
    pipeline_id = adapter.pipeline_run_id("orm_dag", "scheduled__x", logical.timestamp())
    assert [(e["job"]["name"], e["eventType"]) for e in events] == [
        ("orm_dag", "START"), ("orm_dag.t", "FAIL"), ("orm_dag", "FAIL")]
    assert {events[0]["run"]["runId"], events[2]["run"]["runId"]} == {pipeline_id}
    assert events[0]["run"]["facets"]["metatrail_execution"]["params"] == {"conf.k": 1}
    task_fail = events[1]
    assert task_fail["run"]["runId"] == adapter.execution_id("orm_dag", "scheduled__x", "t", 1, -1,
                                                             logical.timestamp())
    assert task_fail["run"]["facets"]["parent"]["run"]["runId"] == pipeline_id
    assert task_fail["run"]["facets"]["metatrail_execution"]["extra"]["reportedOutsideTask"] is True
    assert task_fail["run"]["facets"]["errorMessage"]["message"].startswith("Executor reported")


_TASK_RUNNER_ENDS = """
import os, sys
from airflow.sdk.execution_time.task_runner import TaskRunnerMarker
from metatrail.plugins.airflow import config
from metatrail.plugins.airflow.listener import MetatrailListener

big = sys.argv[1]
with open(big, "wb") as f:
    f.truncate(1536 * 1024 * 1024)  # sparse: seconds of hashing
listener = MetatrailListener()
listener.on_starting(TaskRunnerMarker())
recorder = listener._recorder_for(config.plugin_config())
recorder.execution_finished(recorder.execution_started("dag", "task"), outputs=[big])
listener.before_stopping(TaskRunnerMarker())  # bounded: the output is still being hashed when it gives up
os._exit(0)  # as the task runner ends
"""


def test_a_task_runner_hands_what_it_could_not_store_to_a_writer_process(tmp_path: Path) -> None:
    """A deployed task runner ends with ``os._exit`` right after its bounded flush: a try whose output took longer to
    hash than that lost its events. They are handed to a writer process that stores them after the runner ends."""
    import subprocess
    import sys

    from metatrail.store import open_store

    script = tmp_path / "runner.py"
    script.write_text(_TASK_RUNNER_ENDS)
    store = f"sqlite:///{tmp_path / 'm.db'}"
    env = {**os.environ, "METATRAIL_STORE": store, "METATRAIL_ENERGY": "0", "METATRAIL_TIMEOUT": "0.3",
           "METATRAIL_WRITER": "thread"}
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "big.bin")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "handed to a writer process" in done.stdout + done.stderr  # where Airflow sends its log
    deadline = time.monotonic() + 120
    types: list[str] = []
    while time.monotonic() < deadline and len(types) < 2:
        time.sleep(0.5)
        with open_store(store) as held:
            types = sorted(e.body["eventType"] for e in held.iter_events())
    assert types == ["COMPLETE", "START"]
