"""The schemathesis run of ``test_fuzz.py`` on a PostgreSQL store. That module builds its app when it is imported,
over the store ``METATRAIL_FUZZ_STORE`` names (a throw-away SQLite file by default), so the PostgreSQL run is a pytest
of its own, in a subprocess, on a fresh database (100 cases per operation, as there): no case may cause a 5xx there
either."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

FUZZ = Path(__file__).with_name("test_fuzz.py")


def test_no_server_errors_on_postgresql(pg_url: str) -> None:
    env = {**os.environ, "METATRAIL_FUZZ_STORE": pg_url}
    done = subprocess.run([sys.executable, "-m", "pytest", str(FUZZ), "-q", "-p", "no:cacheprovider",
                           "--hypothesis-show-statistics"], cwd=FUZZ.parent, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    passed = re.search(r"(\d+) passed", done.stdout)
    assert passed is not None and int(passed.group(1)) >= 20, done.stdout[-2000:]  # a test per operation (26)
    assert "failed" not in done.stdout.splitlines()[-1]
