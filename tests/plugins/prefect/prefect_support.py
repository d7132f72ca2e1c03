"""Helpers for the Prefect plugin tests that run scripts in fresh interpreters."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def run_python(script: Path | str, *args: str, env: dict[str, str] | None = None,
               timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run a Python script in a fresh interpreter of this environment, as a user would (``python flow.py``)."""
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=str(HERE))
