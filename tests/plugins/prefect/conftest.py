"""Fixtures for the Prefect plugin tests: real Prefect, one API server per test session, the real plugin.

Before any test module imports Prefect, this file points Prefect at a private home and at the server this session
starts on 127.0.0.1 (``prefect server start --no-services --no-ui``), turns every network-facing extra off
(analytics, ``DO_NOT_TRACK``, no ephemeral server fallback, no logs to the API) and sets
``PREFECT_PLUGINS_ENABLED=1``, so that ``import prefect`` in this process loads metatrail through its
``prefect.plugins`` entry point exactly as a user's process does.

The server can take a minute to start on a loaded machine: its start-up wait is ``METATRAIL_PREFECT_SERVER_TIMEOUT``
seconds (default 300), one try, and a failure shows the server's log.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_HOME = tempfile.mkdtemp(prefix="metatrail-prefect-")
_PORT = _free_port()
API_URL = f"http://127.0.0.1:{_PORT}/api"
PREFECT_ENV = {
    "PREFECT_HOME": _HOME,
    "PREFECT_API_URL": API_URL,
    "PREFECT_PLUGINS_ENABLED": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_ENABLED": "false",
    "PREFECT_LOGGING_TO_API_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
    "PREFECT_TASKS_RUNNER_PROCESS_POOL_MAX_WORKERS": "2",
}
os.environ.update(PREFECT_ENV)
for _var in ("PREFECT_PROFILE", "PREFECT_API_KEY", "OTEL_PYTHON_TRACER_PROVIDER"):
    os.environ.pop(_var, None)

SERVER_TIMEOUT = float(os.environ.get("METATRAIL_PREFECT_SERVER_TIMEOUT", "300"))


def pytest_unconfigure(config: pytest.Config) -> None:
    """The private Prefect home goes, even when no test ran (collection errors, ``-k`` matching nothing)."""
    shutil.rmtree(_HOME, ignore_errors=True)


def _healthy() -> bool:
    try:
        with urllib.request.urlopen(f"{API_URL}/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.fixture(scope="session", autouse=True)
def prefect_server() -> Iterator[str]:
    """The session's Prefect API server (its URL); stopped, with its process group, at the end."""
    log_path = Path(_HOME) / "server.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(_PORT),
             "--no-services", "--no-ui", "--analytics-off"],
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_TIMEOUT
        while not _healthy():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                pytest.fail(f"Prefect server did not answer at {API_URL} within {SERVER_TIMEOUT:.0f}s "
                            f"(exit {proc.poll()}); raise METATRAIL_PREFECT_SERVER_TIMEOUT on a loaded "
                            f"machine. Server log:\n{tail}")
            time.sleep(0.5)
        yield API_URL
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(autouse=True)
def fresh_recorder() -> Iterator[None]:
    """The process-wide Recorder is rebuilt for each test, so it reads the test's METATRAIL_* settings."""
    from metatrail import recorder

    recorder._recorder = None
    yield
    current, recorder._recorder = recorder._recorder, None
    if current is not None:
        current.close(10)


@pytest.fixture
def events() -> Callable[[], list[dict[str, Any]]]:
    """Flushes this process's Recorder, then returns every event in the test's store."""

    def read() -> list[dict[str, Any]]:
        from metatrail import get_recorder
        from metatrail.store import open_store

        recorder = get_recorder()
        assert recorder.flush(30), "events were not stored within 30s"
        with open_store(recorder.settings.store) as store:
            return [e.body for e in store.iter_events()]

    return read
