"""What the energy sampler reads at every sample, per look: ``/proc`` files kept open (``metatrail.energy.procfs``)
against opening, reading and closing each file at each look (how the sampler read them before, the baseline).

    python bench/bench_procfs.py [--looks 3000] [--out bench/results/procfs.txt]

Three reads, each timed both ways in this one run (best of 5 rounds of ``--looks`` looks, so other work on the
machine disturbs both alike):

* node busy time: the first line of ``/proc/stat``;
* the CPU time of a task in the host's own process whose host has ``T`` threads and one child (the Recorder's
  writer process, or a task's subprocess, makes every host one of these): the host's children from its threads'
  ``children`` files, then the child's ``/proc/<pid>/stat``; ``T`` = 4, 16, 64;
* system calls per look (as ``strace`` counted them; almost every one gives the GIL up: the sampler then waits for
  the host's busy thread to hand it back, and that thread pays two context switches per hand-back).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import threading
import time
import timeit
from collections.abc import Callable
from pathlib import Path

from metatrail.energy.cputime import ProcessTree, node_busy_seconds

RESULTS = Path(__file__).resolve().parent / "results" / "procfs.txt"
TICKS = os.sysconf("SC_CLK_TCK")


# -- the baseline: every file opened, read and closed at each look --------------------------------------------------
def node_busy_per_look() -> float:
    with open("/proc/stat", "rb") as fh:
        fields = fh.readline().split()
    return sum(int(fields[i]) for i in (1, 2, 3, 6, 7)) / TICKS


def children_per_look(pid: int) -> list[int]:
    out: list[int] = []
    base = f"/proc/{pid}/task"
    for tid in os.listdir(base):
        fd = os.open(f"{base}/{tid}/children", os.O_RDONLY | os.O_CLOEXEC)
        try:
            while chunk := os.read(fd, 1 << 16):
                out.extend(map(int, chunk.split()))
        finally:
            os.close(fd)
    return out


def stat_per_look(pid: int) -> float:
    fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    try:
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    fields = data[data.rindex(b")") + 2:].split()
    return sum(int(f) for f in fields[11:15]) / TICKS


def tree_per_look() -> float:
    total = time.process_time()
    for kid in children_per_look(os.getpid()):
        total += stat_per_look(kid)
        children_per_look(kid)  # the walk goes on into each child (as the kept-open reader's does)
    return total


def best(fn: Callable[[], object], looks: int) -> float:
    """Best of 5 rounds, in microseconds per look."""
    return min(timeit.repeat(fn, number=looks, repeat=5)) / looks * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--looks", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    lines: list[str] = []

    def say(line: str = "") -> None:
        print(line)
        lines.append(line)

    say(f"/proc reads per energy sample: kept open vs opened at each look, {time.strftime('%Y-%m-%d %H:%M:%S %z')}")
    say()
    say(f"machine       {platform.platform()}, {os.cpu_count()} logical CPUs; load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at start")
    say(f"python        {platform.python_implementation()} {platform.python_version()}")
    say(f"timing        best of 5 rounds of {args.looks} looks each, both ways in this run")
    say()
    say(f"{'read':<44}{'per look':>10}{'kept open':>11}{'ratio':>8}{'syscalls per look':>22}")
    per_look, kept = best(node_busy_per_look, args.looks), best(node_busy_seconds, args.looks)
    assert abs(node_busy_per_look() - node_busy_seconds()) < 1.0
    say(f"{'node busy time (/proc/stat first line)':<44}{per_look:>8.1f}us{kept:>9.1f}us{kept / per_look:>8.2f}"
        f"{'~6 -> ~2':>22}")
    child = subprocess.Popen(["sleep", "600"])
    stop = threading.Event()
    started: list[threading.Thread] = []
    try:
        for threads in (4, 16, 64):
            while len(threading.enumerate()) < threads:
                t = threading.Thread(target=stop.wait, daemon=True)
                t.start()
                started.append(t)
            tree = ProcessTree(os.getpid(), include_children=True)
            assert tree.descendants() == [child.pid] and sorted(children_per_look(os.getpid())) == [child.pid]
            tree.seconds()
            per_look, kept = best(tree_per_look, args.looks), best(tree.seconds, args.looks)
            n = len(os.listdir(f"/proc/{os.getpid()}/task"))
            # System calls per look, as strace counted them with 16 threads (67.5 and 33.5): per look, a directory
            # listing, then an open, a read and a close per thread; kept, a pread per thread. Both then read the
            # child's stat and list its own children (opening its thread's file), as the sampler's walk does.
            say(f"{f'own task, {n} threads + 1 child (CPU time)':<44}{per_look:>8.1f}us{kept:>9.1f}us"
                f"{kept / per_look:>8.2f}{f'~{3 * n + 20} -> ~{n + 18}':>22}")
    finally:
        stop.set()
        for t in started:
            t.join()
        child.kill()
        child.wait()
    say()
    say("ratio = kept open / per look (lower is better); a sample reads node busy time once and each task tree once")
    args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
