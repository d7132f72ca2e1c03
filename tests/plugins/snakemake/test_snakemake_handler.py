"""The handler's boundary contract, in process: records built as Snakemake builds them (a ``LogRecord`` with the
real ``LogEvent`` and the same extra fields, as the interface package's own test kit does), a real Recorder and
store. End-to-end behaviour with the real Snakemake is in the other test files."""

from __future__ import annotations

import logging
import logging.handlers
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from olspec import assert_valid
from smkrun import read_events, shim_source, store_url
from snakemake_interface_logger_plugins.common import LogEvent

from metatrail import logsafe
from metatrail.config import load_settings
from metatrail.openlineage.events import iso_time
from metatrail.plugins.snakemake import compat
from metatrail.plugins.snakemake import handler as handler_module
from metatrail.plugins.snakemake.guard import TEMP_REMOVED, RecordClock, TempFileGuard
from metatrail.plugins.snakemake.handler import WRITE_LINGER_S, LogHandler
from metatrail.plugins.snakemake.settings import LogHandlerSettings
from metatrail.plugins.snakemake.tracker import WorkflowTracker, record_matters
from metatrail.recorder import Recorder
from metatrail.store import open_store


@pytest.fixture(autouse=True)
def _fresh_log_once() -> None:
    """Each test sees its own first warnings (log_once remembers per process)."""
    logsafe.reset()


def _common(**overrides: Any) -> SimpleNamespace:
    values = {"printshellcmds": False, "nocolor": True, "quiet": None, "debug_dag": False, "verbose": False,
              "show_failed_logs": False, "stdout": False, "dryrun": False}
    values.update(overrides)
    return SimpleNamespace(**values)


def _record(event: LogEvent | None, msg: str = "", **fields: Any) -> logging.LogRecord:
    record = logging.LogRecord("snakemake.logging", logging.INFO, "snakemake", 1, msg, None, None)
    if event is not None:
        record.event = event
    for key, value in fields.items():
        setattr(record, key, value)
    return record


def _workflow_records(workdir: Path) -> list[logging.LogRecord]:
    (workdir / "out.txt").write_text("x\n")
    return [
        _record(LogEvent.WORKFLOW_STARTED, "Workflow has started!", workflow_id="3f1c", snakefile_main=str(
            workdir / "Snakefile"), cwd=str(workdir), config_md5="99914b932bd37a50b983c5e7c90ae93b"),
        _record(LogEvent.JOB_STARTED, "Execute 1 jobs...", jobs=[1]),
        _record(LogEvent.JOB_INFO, " Rule: one, Jobid: 1", jobid=1, rule_name="one", input=[], output=["out.txt"],
                log=[], benchmark=None, wildcards={}, threads=1, resources=None, shellcmd="echo x > out.txt",
                indent=False, is_checkpoint=False, local=True, reason="Missing output files: out.txt",
                rule_msg=None),
        _record(LogEvent.JOB_FINISHED, "Finished jobid: 1 (Rule: one)", job_id=1),
    ]


def test_capabilities_and_settings_fields() -> None:
    handler = LogHandler(_common(), LogHandlerSettings())
    assert (handler.writes_to_stream, handler.writes_to_file, handler.has_filter, handler.has_formatter,
            handler.needs_rulegraph) == (False, False, True, True, False)
    assert isinstance(handler, logging.Handler)
    assert [f for f in LogHandlerSettings.__dataclass_fields__] == ["store", "pipeline", "namespace", "flush_timeout"]
    assert all("help" in f.metadata and f.metadata["env_var"] for f in LogHandlerSettings.__dataclass_fields__.values())
    handler.close()
    handler.close()  # Snakemake closes plugin handlers twice


def test_records_a_run_and_closes_once(tmp_path: Path) -> None:
    handler = LogHandler(_common(), LogHandlerSettings(pipeline="unit", namespace="tests"))
    for record in _workflow_records(tmp_path):
        handler.emit(record)
    handler.close()
    handler.close()
    handler.emit(_record(LogEvent.JOB_INFO, jobid=2, rule_name="late"))  # after close: ignored, no error
    events = read_events()
    assert [(e["job"]["name"], e["eventType"]) for e in events] == [
        ("unit", "START"), ("unit.one", "START"), ("unit.one", "COMPLETE"), ("unit", "COMPLETE")]
    for event in events:
        assert_valid(event)
        assert event["job"]["namespace"] == "tests"


def test_the_recorder_batches_the_events_of_a_run(tmp_path: Path) -> None:
    """Snakemake ends a few dozen jobs a second: the handler's Recorder lingers for a fuller batch rather than
    storing (and, past the first events, handing to its writer process) each event on its own."""
    handler = LogHandler(_common(), None)
    for record in _workflow_records(tmp_path):
        handler.emit(record)
    recorder = handler._recorder
    assert recorder is not None and recorder.linger_s == WRITE_LINGER_S > 0.1
    handler.close()
    assert recorder.pending == 0 and len(read_events()) == 4


def test_a_temp_file_deletion_does_not_wait_for_the_writers_linger(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The temp-file guard waits until the event naming the file is stored; a writer lingering for a fuller batch
    (here far longer than the guard may wait) is flushed, not waited for."""
    monkeypatch.chdir(tmp_path)  # Snakemake runs in the workflow's directory: its relative paths start there
    recorder = Recorder(load_settings(), linger_s=60.0)
    tracker = WorkflowTracker(lambda: recorder)
    try:
        records = _workflow_records(tmp_path)
        records[2].output = ["tmp.txt"]
        (tmp_path / "tmp.txt").write_text("temporary\n")
        for record in records:
            tracker.handle(record)
        assert recorder.pending > 0  # lingering
        assert tracker.wait_hashed(f"{TEMP_REMOVED}tmp.txt.", time.monotonic() + 20)
        complete = [e for e in read_events() if e["eventType"] == "COMPLETE"]
        assert [o["name"] for o in complete[0]["outputs"]] == [str(tmp_path / "tmp.txt")]
        assert complete[0]["outputs"][0]["facets"]["metatrail_artifact"]["hash"] is not None  # hashed before deletion
    finally:
        tracker.finish()
        recorder.close(10)


def test_records_of_no_interest_still_end_the_run_no_earlier_than_they_came(tmp_path: Path) -> None:
    """Progress records and plain messages are dropped at the top of ``emit``, but the run still ends at the last
    record Snakemake logged (as when every record went through the tracker)."""
    handler = LogHandler(_common(), LogHandlerSettings(pipeline="unit"))
    records = _workflow_records(tmp_path)
    last = records[-1].created + 5.0
    progress = _record(LogEvent.PROGRESS, done=1, total=1)
    progress.created = last - 1.0
    message = _record(None, "Complete log(s): .snakemake/log/x.log")
    message.created = last
    assert not record_matters(progress) and not record_matters(message)
    for record in [*records, progress, message]:
        handler.emit(record)
    handler.close()
    run_end = [e for e in read_events() if e["job"]["name"] == "unit" and e["eventType"] == "COMPLETE"]
    assert [e["eventTime"] for e in run_end] == [iso_time(last)]


def test_record_matters_keeps_every_record_the_tracker_acts_on() -> None:
    kept = [
        *(_record(event) for event in (LogEvent.WORKFLOW_STARTED, LogEvent.JOB_INFO, LogEvent.JOB_STARTED,
                                       LogEvent.JOB_FINISHED, LogEvent.JOB_ERROR, LogEvent.ERROR, LogEvent.GROUP_INFO)),
        _record(None, "Submitted job 3 with external jobid 'slurm-12'."),
        _record(None, "Submitted group job abc with external jobid '12'."),
        _record(None, "Job 3 has been submitted with SLURM jobid 12 (log: x)."),
        _record(None, "Trying to restart job 3."),
        _record(None, f"{TEMP_REMOVED}tmp.txt."),
        _record(None, "Terminating processes on user request, this might take some time."),
    ]
    dropped = [_record(LogEvent.PROGRESS, done=1, total=2), _record(LogEvent.SHELLCMD, shellcmd="true"),
               _record(LogEvent.RUN_INFO), _record(LogEvent.RESOURCES_INFO), _record(None, "Select jobs to execute..."),
               _record(None, ""), _record(None, {"not": "text"})]
    assert [record_matters(r) for r in kept] == [True] * len(kept)
    assert [record_matters(r) for r in dropped] == [False] * len(dropped)


def _listen(handler: logging.Handler, *others: logging.Handler) -> tuple[queue.Queue[Any],
                                                                         logging.handlers.QueueListener]:
    """Deliver records to ``handler`` as Snakemake 9 does: through a QueueListener thread."""
    records: queue.Queue[Any] = queue.Queue(-1)
    listener = logging.handlers.QueueListener(records, handler, *others, respect_handler_level=True)
    listener.start()
    return records, listener


def _delivered(records: queue.Queue[Any], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while records.unfinished_tasks and time.monotonic() < deadline:
        time.sleep(0.01)
    return not records.unfinished_tasks


def test_the_listener_rests_once_it_delivered_every_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the queue is empty the handler rests on the listener thread instead of letting it wait on the queue
    (where every record Snakemake puts would wake it): records put meanwhile wait, and ``close`` ends the rest."""
    monkeypatch.setattr(handler_module, "LISTENER_REST_S", 60.0)
    handler = LogHandler(_common(), LogHandlerSettings(pipeline="unit"))
    records, listener = _listen(handler)
    try:
        for record in _workflow_records(tmp_path):
            records.put_nowait(record)
        deadline = time.monotonic() + 10
        while not records.empty() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)
        records.put_nowait(_record(LogEvent.PROGRESS, done=1, total=1))
        time.sleep(0.3)
        assert records.qsize() == 1  # not taken: the listener rests after the last record of the burst
    finally:
        started = time.monotonic()
        handler.close()
        listener.stop()
    assert time.monotonic() - started < 30  # close ended the rest (60 s)
    assert [(e["job"]["name"], e["eventType"]) for e in read_events()] == [
        ("unit", "START"), ("unit.one", "START"), ("unit.one", "COMPLETE"), ("unit", "COMPLETE")]


def test_the_listener_does_not_rest_when_it_serves_other_handlers(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Another plugin on the same listener (a console one, say) must get its records without delay."""
    monkeypatch.setattr(handler_module, "LISTENER_REST_S", 60.0)
    handler = LogHandler(_common(), None)
    records, listener = _listen(handler, logging.NullHandler())
    try:
        for record in _workflow_records(tmp_path):
            records.put_nowait(record)
        assert _delivered(records)
        records.put_nowait(_record(LogEvent.PROGRESS, done=1, total=1))
        assert _delivered(records)
    finally:
        handler.close()
        listener.stop()


def test_the_temp_file_guard_wakes_a_resting_listener() -> None:
    """Before a temp file is deleted the guard waits until the earlier records were handled; a listener resting in
    ``emit`` (see LISTENER_REST_S) is woken for that, rather than the deletion waiting out its rest."""
    clock = RecordClock()
    guard = TempFileGuard(clock, lambda message, deadline: True, timeout=5.0)
    earlier, removal = _record(LogEvent.JOB_FINISHED, job_id=1), _record(None, f"{TEMP_REMOVED}tmp.txt.")

    def resting_listener() -> None:
        clock.wake.wait(60.0)
        clock.processed(earlier)

    clock.filter(earlier)
    listener = threading.Thread(target=resting_listener)
    listener.start()
    try:
        clock.filter(removal)
        guard.filter(removal)  # on Snakemake's thread, before it deletes the file
        assert (guard.waits, guard.timeouts) == (1, 0)  # woken and notified, not timed out (5 s) behind the rest
        assert clock.position() == (2, 1)
    finally:
        clock.wake.set()
        listener.join(10)


def test_malformed_records_never_raise(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    handler = LogHandler(_common(), None)
    bad_args = _record(None, "%s %s")
    bad_args.args = ("only one",)
    weird = [
        _record(LogEvent.JOB_INFO),  # no fields at all
        _record(LogEvent.JOB_FINISHED, job_id=object()),
        _record(LogEvent.JOB_ERROR, jobid=None),
        _record(LogEvent.ERROR),
        bad_args,
        _record(LogEvent.GROUP_INFO, group_id=None, jobs=None),
        _record(LogEvent.JOB_INFO, jobid=[1], rule_name=3, input=5, output=object(), wildcards="x", threads="2",
                resources=42, log=None),
    ]
    with caplog.at_level(logging.WARNING, logger="metatrail"):
        for record in [*_workflow_records(tmp_path)[:1], *weird]:
            handler.emit(record)
        handler.close()
    assert read_events()[0]["eventType"] == "START"


def test_kill_switch_and_dry_run_do_no_io(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store_dir = Path(store_url().removeprefix("sqlite:///")).parent
    dry = LogHandler(_common(dryrun=True), None)
    for record in _workflow_records(tmp_path):
        dry.emit(record)
    dry.close()
    monkeypatch.setenv("METATRAIL_DISABLED", "1")
    off = LogHandler(_common(), None)
    for record in _workflow_records(tmp_path):
        off.emit(record)
    off.close()
    assert not store_dir.exists()


def test_bad_configuration_disables_with_one_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("METATRAIL_TIMEOUT", "soon")
    handler = LogHandler(_common(), None)
    with caplog.at_level(logging.WARNING, logger="metatrail"):
        for record in _workflow_records(tmp_path) * 2:
            handler.emit(record)
        handler.close()
    messages = [r.getMessage() for r in caplog.records if "recording is off" in r.getMessage()]
    assert len(messages) == 1 and "timeout" in messages[0]


class _BlockingStore:
    """A store whose writes hang until released: the Recorder's caps must not wait for it."""

    def __init__(self, url: str) -> None:
        self.inner = open_store(url)
        self.release = threading.Event()

    def ingest(self, events: Any, **kwargs: Any) -> Any:
        self.release.wait(60)
        return self.inner.ingest(events, **kwargs)

    def close(self) -> None:
        self.inner.close()


def test_close_is_capped_when_the_store_hangs(tmp_path: Path) -> None:
    store = _BlockingStore(store_url())
    recorder = Recorder(load_settings(flush_timeout=0.5), store=store)
    handler = LogHandler(_common(), None, recorder=recorder)
    try:
        for record in _workflow_records(tmp_path):
            handler.emit(record)
        started = time.monotonic()
        handler.close()
        assert time.monotonic() - started < 10  # capped at flush_timeout (0.5 s), not the store's 60 s
        assert recorder.pending > 0
    finally:
        store.release.set()
        recorder.flush(10)


def test_compat_helpers() -> None:
    assert compat.file_list(["a.txt", "p (pipe)", "s3://b/k (send to storage)", "<TBD>", None, "x (y).txt"]) == [
        "a.txt", "p", "s3://b/k", "x (y).txt"]
    assert compat.pipeline_name("/p/proj/workflow/Snakefile", None) == "proj"
    assert compat.pipeline_name("/p/proj/Snakefile", None) == "proj"
    assert compat.pipeline_name("/p/proj/align.smk", None) == "align"
    assert compat.exit_code("Command 'x' returned non-zero exit status 3.") == 3
    assert compat.exit_code("no status here") is None
    assert compat.read_metadata("missing.txt", "/nonexistent") is None


def test_read_metadata_reads_a_persistence_record_of_bounded_size(tmp_path: Path) -> None:
    root = tmp_path / ".snakemake" / "metadata"
    root.mkdir(parents=True)

    def write(key: str, text: str) -> None:
        Path(compat._record_path(str(root), key)).write_text(text, encoding="utf-8")

    write("out/a.txt", '{"params": ["x", "\u00e9"], "rule": "one"}')
    write("out/big.txt", '{"params": [], "pad": "' + "x" * compat.METADATA_MAX_BYTES + '"}')
    write("out/list.txt", "[1, 2]")
    write("out/bad.txt", "{not json")
    assert compat.rule_params(compat.read_metadata("out/a.txt", str(tmp_path))) == ["x", "\u00e9"]
    assert [compat.read_metadata(key, str(tmp_path)) for key in ("out/big.txt", "out/list.txt", "out/bad.txt",
                                                                  "out/none.txt")] == [None] * 4


def test_import_metatrail_stays_free_of_snakemake() -> None:
    code = ("import sys, metatrail, metatrail.plugins.snakemake as p; "
            "assert 'snakemake' not in sys.modules and 'snakemake_interface_logger_plugins' not in sys.modules, "
            "sorted(m for m in sys.modules if 'snakemake' in m); print(p.__all__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False,
                            env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr


def test_snakemake_discovers_plugin_and_its_options(plugin_path: Path) -> None:
    code = ("from dataclasses import fields; "
            "from snakemake_interface_logger_plugins.registry import LoggerPluginRegistry; "
            "p = LoggerPluginRegistry().get_plugin('metatrail'); "
            "print(p.log_handler.__module__, [f.name for f in fields(p.settings_cls)])")
    env = {**os.environ, "PYTHONPATH": str(plugin_path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                            env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "metatrail.plugins.snakemake.handler"
    help_text = subprocess.run([sys.executable, "-m", "snakemake", "--help"], capture_output=True, text=True,
                               timeout=120, check=False, env=env).stdout
    for option in ("--logger-metatrail-store", "--logger-metatrail-pipeline", "--logger-metatrail-namespace",
                   "--logger-metatrail-flush-timeout"):
        assert option in help_text
    assert "SNAKEMAKE_LOGGER_METATRAIL_STORE" in help_text


def test_pyproject_ships_the_discovery_module() -> None:
    source = shim_source()  # asserts both packages are listed in [tool.setuptools] packages
    assert (source / "__init__.py").is_file() and source.name == "snakemake_logger_plugin_metatrail"
