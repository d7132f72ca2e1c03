"""Fakes of the powercap sysfs interface: a kernel-shaped tree under a temporary directory and a power source
that drives its counters. Hardware fakes only; metatrail's code reads them through its real file-reading path."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import threading

DEFAULT_RANGE_UJ = 262_143_328_850  # a real max_energy_range_uj (scaphandre #351)


class PowercapTree:
    """A powercap sysfs tree as the kernel lays it out, under a temporary directory.

    ``devices/virtual/powercap/intel-rapl/intel-rapl:N[:M]`` holds the zones (sub-zones nested in their package),
    ``class/powercap`` holds the ``intel-rapl`` control-type link and flat ``intel-rapl:N[:M]`` links, as
    ``/sys/class/powercap`` does. :attr:`root` is what a meter is pointed at.
    """

    def __init__(self, base: pathlib.Path) -> None:
        self.base = base
        self.control = base / "devices" / "virtual" / "powercap" / "intel-rapl"
        self.root = base / "class" / "powercap"
        self.control.mkdir(parents=True)
        self.root.mkdir(parents=True)
        (self.control / "enabled").write_text("0\n")
        (self.root / "intel-rapl").symlink_to(os.path.relpath(self.control, self.root))
        self.zones: dict[str, pathlib.Path] = {}
        self._lock = threading.Lock()

    def add_zone(self, zone: str, name: str, energy_uj: int = 0, max_uj: int = DEFAULT_RANGE_UJ) -> pathlib.Path:
        """Create zone ``zone`` (``intel-rapl:0`` or ``intel-rapl:0:2``) with its ``name`` and counters."""
        parts = zone.split(":")
        parent = self.control if len(parts) == 2 else self.zones[":".join(parts[:2])]
        path = parent / zone
        path.mkdir()
        (path / "name").write_text(name + "\n")
        (path / "energy_uj").write_text(f"{energy_uj:020d}\n")
        (path / "max_energy_range_uj").write_text(f"{max_uj}\n")
        (path / "enabled").write_text("1\n")
        (self.root / zone).symlink_to(os.path.relpath(path, self.root))
        self.zones[zone] = path
        return path

    def energy_uj(self, zone: str) -> int:
        """The zone's current counter."""
        return int((self.zones[zone] / "energy_uj").read_text())

    def set(self, zone: str, energy_uj: int) -> None:
        """Write the counter in place with one fixed-width write, so a concurrent reader never sees a torn value
        (sysfs reads are atomic)."""
        fd = os.open(self.zones[zone] / "energy_uj", os.O_WRONLY)
        try:
            os.pwrite(fd, f"{energy_uj:020d}\n".encode(), 0)
        finally:
            os.close(fd)

    def advance(self, zone: str, joules: float) -> None:
        """Add energy to a zone, wrapping at its ``max_energy_range_uj`` like the hardware counter."""
        with self._lock:
            top = int((self.zones[zone] / "max_energy_range_uj").read_text())
            self.set(zone, (self.energy_uj(zone) + round(joules * 1e6)) % top)

    def wrap(self, zone: str, joules_after_wrap: float) -> None:
        """Move the counter just past its wrap point: ``joules_after_wrap`` beyond the range."""
        top = int((self.zones[zone] / "max_energy_range_uj").read_text())
        self.advance(zone, (top - self.energy_uj(zone)) / 1e6 + joules_after_wrap)


def build_standard_tree(base: pathlib.Path) -> PowercapTree:
    """Two packages with core, uncore and dram sub-zones, and a psys zone (the shape in the kernel docs)."""
    tree = PowercapTree(base)
    tree.add_zone("intel-rapl:0", "package-0", 1_000_000)
    tree.add_zone("intel-rapl:0:0", "core", 500_000)
    tree.add_zone("intel-rapl:0:1", "uncore", 100_000)
    tree.add_zone("intel-rapl:0:2", "dram", 300_000, max_uj=65_712_999_613)
    tree.add_zone("intel-rapl:1", "package-1", 2_000_000)
    tree.add_zone("intel-rapl:1:0", "core", 0)
    tree.add_zone("intel-rapl:1:1", "dram", 0, max_uj=65_712_999_613)
    tree.add_zone("intel-rapl:2", "psys", 0)
    return tree


# The source runs in a process of its own, as RAPL hardware counts on whatever the measured process does: a thread
# here would wait for the GIL while a test burns CPU, and a counter that lags its clock by 0.1 s reads as 10 % less
# energy in a 1 s window.
_SOURCE_PROGRAM = """
import os, sys, time
period, spec = float(sys.argv[1]), sys.argv[2:]
zones = [(spec[i], float(spec[i + 1]), int(spec[i + 2])) for i in range(0, len(spec), 3)]
def advance(path, joules, top):
    fd = os.open(path, os.O_RDWR)
    try:
        now = int(os.pread(fd, 64, 0))
        os.pwrite(fd, b"%020d\\n" % ((now + round(joules * 1e6)) % top), 0)
    finally:
        os.close(fd)
sys.stdout.write("ready\\n")
sys.stdout.flush()
last = time.monotonic()
while True:
    time.sleep(period)
    now = time.monotonic()
    for path, watts, top in zones:
        advance(path, watts * (now - last), top)
    last = now
"""


class PowerSource:
    """Drives powercap counters at constant power, like a CPU drawing ``watts`` per zone, from a separate process
    that advances them every ``period_s`` until the block ends."""

    def __init__(self, tree: PowercapTree, watts: dict[str, float], period_s: float = 0.01) -> None:
        self.tree, self.watts, self.period_s = tree, watts, period_s
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> PowerSource:
        args = [sys.executable, "-c", _SOURCE_PROGRAM, str(self.period_s)]
        for zone, watts in self.watts.items():
            path = self.tree.zones[zone]
            args += [str(path / "energy_uj"), str(watts), (path / "max_energy_range_uj").read_text().strip()]
        self._proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None and self._proc.stdout.readline() == "ready\n"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            assert self._proc.stdout is not None
            self._proc.stdout.close()
