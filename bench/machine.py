"""What every benchmark prints about its machine (CPU model, usable cores, memory) and the tree it measured."""

from __future__ import annotations

import os
import subprocess
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


def tree_state() -> str:
    """The commit measured, and whether core/ differs from it (other developers work in the same tree)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "core"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    return f"{head}" + (f", core/ with {len(dirty)} uncommitted change(s)" if dirty else ", core/ clean")


def use_bytecode() -> str:
    """Measure modules as an installer leaves them: byte-compiled. ``pip`` compiles a wheel's modules at install and
    Python caches the rest at first import, but a machine with ``PYTHONDONTWRITEBYTECODE`` set (and an installer
    that does not compile, as ``uv`` by default) makes every process compile each module it imports from source:
    hundreds of milliseconds of CPU per process for SQLAlchemy alone, which a short benchmark would charge to
    whichever side imports more. Compiles this interpreter's site-packages and this checkout's sources (only what
    is stale), and drops the variable for this process and the processes it starts. Returns a line for the
    report."""
    import compileall
    import sysconfig

    root = Path(__file__).resolve().parent.parent
    dirs = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], str(root / "core"),
            str(root / "plugins")}
    for folder in sorted(dirs):
        if Path(folder).is_dir():
            compileall.compile_dir(folder, quiet=2, workers=0)
    was_set = os.environ.pop("PYTHONDONTWRITEBYTECODE", None) is not None
    return ("modules byte-compiled as installed" + (" (PYTHONDONTWRITEBYTECODE was set here: unset for the runs)"
                                                    if was_set else ""))
