"""What every benchmark prints about the machine it ran on (CPU model, usable cores, memory)."""

from __future__ import annotations

import os
from pathlib import Path


def _proc_field(path: str, key: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo."""
    return _proc_field("/proc/cpuinfo", "model name") or "unknown"


def usable_cpus() -> int | None:
    """CPUs this process may run on (its affinity), else the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def memory_total() -> str:
    """Total memory, e.g. ``23.5 GiB``."""
    field = _proc_field("/proc/meminfo", "MemTotal")
    return f"{int(field.split()[0]) / 2**20:.1f} GiB" if field else "unknown"
