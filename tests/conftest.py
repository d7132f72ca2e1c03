"""Shared fixtures: isolated stores and a real PostgreSQL.

PostgreSQL: the server at ``METATRAIL_TEST_PG`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``) is
used when it answers; otherwise a private cluster is started from the ``initdb``/``pg_ctl`` binaries on this machine
(PATH or /usr/lib/postgresql/*/bin) in a temporary directory. With neither, the PostgreSQL tests fail with a message
saying what to install: they are never skipped.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/olspec.py, tests/golden.py


@pytest.fixture(autouse=True)
def _isolated_metatrail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test records into its own store and never sees the developer's .metatrail or kill switch."""
    monkeypatch.setenv("METATRAIL_STORE", f"sqlite:///{tmp_path / '.metatrail' / 'metatrail.db'}")
    monkeypatch.setenv("METATRAIL_HASH_CACHE", str(tmp_path / ".metatrail" / "hashcache.db"))
    for var in ("METATRAIL_DISABLED", "METATRAIL_CONFIG", "METATRAIL_PIPELINE_RUN", "METATRAIL_SERVER"):
        monkeypatch.delenv(var, raising=False)


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A base URL (without database) of a PostgreSQL server this test session may create databases on."""
    url = os.environ.get("METATRAIL_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
    host_port = url.split("@", 1)[-1].split("/", 1)[0]
    host, _, port = host_port.partition(":")
    if _answers(host, int(port or 5432)):
        yield url.rsplit("/", 1)[0] if url.count("/") > 2 else url
        return
    initdb, pg_ctl = _pg_binary("initdb"), _pg_binary("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.fail("no PostgreSQL answers at 127.0.0.1:5432 and no initdb/pg_ctl found to start one: "
                    "install PostgreSQL (apt-get install postgresql) or set METATRAIL_TEST_PG")
    data = tempfile.mkdtemp(prefix="metatrail-pg-")
    port_n = _free_port()
    user = [] if os.geteuid() != 0 else ["sudo", "-u", "postgres"] if shutil.which("sudo") else []
    if os.geteuid() == 0:
        shutil.chown(data, "postgres")
    subprocess.run([*user, initdb, "-D", data, "-U", "postgres", "--auth=trust"], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run([*user, pg_ctl, "-D", data, "-o", f"-p {port_n} -k {data} -h 127.0.0.1", "-w", "start",
                    "-l", f"{data}/log"], check=True, stdout=subprocess.DEVNULL)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port_n}"
    finally:
        subprocess.run([*user, pg_ctl, "-D", data, "-m", "fast", "stop"], check=False, stdout=subprocess.DEVNULL)
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    import psycopg

    name = f"mt_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{pg_server}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{pg_server}/{name}"
    finally:
        deadline = time.time() + 10
        with psycopg.connect(f"{pg_server}/postgres", autocommit=True) as conn:
            while True:
                try:
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                    break
                except psycopg.Error:
                    if time.time() > deadline:
                        raise
                    time.sleep(0.2)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same store tests run against SQLite and PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url
