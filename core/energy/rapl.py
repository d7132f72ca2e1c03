"""CPU package, DRAM and (on request) psys energy from Linux powercap RAPL zones.

Layout (kernel ``Documentation/power/powercap/powercap.rst``): ``/sys/class/powercap`` holds the
``intel-rapl`` control type and flat links ``intel-rapl:<pkg>[:<sub>]`` to zones; ids are printed ``%x``
(hexadecimal, so ``intel-rapl:a`` is the eleventh package). Each zone has ``name`` (``package-N[-die-M]``,
``core``, ``uncore``, ``dram``, ``psys``), ``energy_uj`` and ``max_energy_range_uj``. AMD Zen CPUs (kernel >=
5.8 / 5.11) appear under the same ``intel-rapl`` control type with package and core zones only (no DRAM, no
psys); there is no separate ``amd-rapl`` powercap type (``amd_energy`` is a hwmon driver, not read here).
``intel-rapl-mmio`` zones duplicate the MSR packages and are used only where no MSR zone of the same name
exists.

Domains: ``cpu`` = sum of package zones, ``dram`` = sum of ``dram`` zones (usually sub-zones of a package),
``psys`` only with ``include_psys=True`` (it overlaps package and DRAM). ``core``/``uncore`` are parts of the
package and are never added. Counters wrap at ``max_energy_range_uj`` (read once per zone);
:func:`counter_delta` corrects one wrap per read. Since Linux 5.10 ``energy_uj`` is root-only: that yields
``joules=None`` with a reason that says how to grant access, never 0.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .meter import EnergyMeter, Reading, counter_delta

DEFAULT_ROOT = "/sys/class/powercap"
_ZONE_RE = re.compile(r"^(intel-rapl(?:-mmio)?):([0-9a-f]+)((?::[0-9a-f]+)*)$")
_CONTROL_TYPES = ("intel-rapl", "intel-rapl-mmio")
# The fastest plausible drain of one zone, used only to tell callers how often they must read.
_MAX_ZONE_POWER_W = 1000.0

PERMISSION_FIX = (
    "energy_uj is readable by root only since Linux 5.10 (CVE-2020-8694). Fix one of: "
    "(a) now, until reboot: sudo chmod a+r /sys/class/powercap/intel-rapl:*/energy_uj "
    "/sys/class/powercap/intel-rapl:*:*/energy_uj; "
    "(b) at every boot, for group 'power': add the udev rule "
    '\'ACTION=="add", SUBSYSTEM=="powercap", KERNEL=="intel-rapl:*", '
    'RUN+="/bin/chgrp power /sys%p/energy_uj", RUN+="/bin/chmod g+r /sys%p/energy_uj"\' '
    "to /etc/udev/rules.d/70-powercap.rules and add the user to group 'power' (usermod -aG power USER); "
    "(c) in a container: run a privileged node daemon or bind-mount a readable copy of the tree and point "
    "METATRAIL_POWERCAP_ROOT at it"
)

SysfsReader = Callable[[Path], str]


def read_sysfs(path: Path) -> str:
    """Read a small sysfs attribute (the default :class:`RaplMeter` reader; the seam tests replace)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 4096).decode("ascii", "replace")
    finally:
        os.close(fd)


@dataclass(slots=True)
class RaplZone:
    """One powercap zone and its wraparound state."""

    path: Path
    control_type: str
    ids: tuple[int, ...]
    name: str
    max_range_uj: int | None
    last_uj: int | None = None
    accumulated_uj: int = 0
    wraps: int = 0
    unusable: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """``name`` plus the zone directory, e.g. ``package-0 (intel-rapl:0)``."""
        return f"{self.name} ({self.path.name})"

    def kind(self) -> str:
        """``cpu``, ``dram``, ``psys``, ``part`` (core/uncore: inside a package) or ``unknown``."""
        if self.name.startswith("package"):
            return "cpu"
        if self.name in ("dram", "psys"):
            return self.name
        if self.name in ("core", "uncore"):
            return "part"
        return "unknown"


def _describe_oserror(path: Path, exc: OSError) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied reading {path}: {PERMISSION_FIX}"
    return f"cannot read {path}: {exc.strerror or exc} (errno {exc.errno})"


class RaplMeter(EnergyMeter):
    """Energy of CPU packages and DRAM from powercap RAPL counters (see the module docstring)."""

    name = "rapl"

    def __init__(
        self,
        sysfs_root: str | os.PathLike[str] = DEFAULT_ROOT,
        *,
        include_psys: bool = False,
        reader: SysfsReader | None = None,
    ) -> None:
        super().__init__()
        self.root = Path(sysfs_root)
        self.include_psys = include_psys
        self._read_text: SysfsReader = reader or read_sysfs
        self.zones: list[RaplZone] = []
        self.skipped: list[str] = []

    @property
    def max_read_interval_s(self) -> float:
        ranges = [z.max_range_uj for z in self.zones if z.max_range_uj]
        return min(ranges) / 1e6 / _MAX_ZONE_POWER_W if ranges else float("inf")

    def _open(self) -> str | None:
        if not self.root.is_dir():
            return (
                f"no powercap tree at {self.root}: this kernel or VM exposes no RAPL "
                "(load the intel_rapl_msr module on bare metal; most VMs and containers have none), "
                "so CPU energy falls back to an estimate"
            )
        for zone in self._discover():
            kind = zone.kind()
            if kind in ("cpu", "dram") or (kind == "psys" and self.include_psys):
                self.zones.append(zone)
            else:
                self.skipped.append(zone.label)
        if not any(z.kind() == "cpu" for z in self.zones):
            return f"no RAPL package zone under {self.root} (found: {', '.join(self.skipped) or 'nothing'})"
        self.read()  # baseline, and an early permission check
        domain = self.read()["cpu"]
        return domain.reason if domain.joules is None else None

    def _discover(self) -> list[RaplZone]:
        found: dict[tuple[str, tuple[int, ...]], Path] = {}

        def visit(directory: Path, depth: int) -> None:
            try:
                entries = sorted(directory.iterdir())
            except OSError:
                return
            for entry in entries:
                m = _ZONE_RE.match(entry.name)
                if m and entry.is_dir():
                    ids = (int(m.group(2), 16), *(int(x, 16) for x in m.group(3).split(":")[1:]))
                    found.setdefault((m.group(1), ids), entry)
                    if depth < 3:
                        visit(entry, depth + 1)
                elif entry.name in _CONTROL_TYPES and depth == 0 and entry.is_dir():
                    visit(entry, 1)

        visit(self.root, 0)
        zones: list[RaplZone] = []
        for (ctype, ids), path in sorted(found.items()):
            try:
                name = self._read_text(path / "name").strip()
            except OSError as exc:
                self.skipped.append(f"{path.name} ({_describe_oserror(path / 'name', exc)})")
                continue
            zones.append(RaplZone(path, ctype, ids, name, self._read_max(path)))
        msr_names = {z.name for z in zones if z.control_type == "intel-rapl"}
        kept = []
        for z in zones:
            if z.control_type == "intel-rapl-mmio" and z.name in msr_names:
                self.skipped.append(f"{z.label}: duplicate of the MSR zone")
            else:
                kept.append(z)
        return kept

    def _read_max(self, path: Path) -> int | None:
        try:
            value = int(self._read_text(path / "max_energy_range_uj").strip())
        except (OSError, ValueError):
            return None
        return value if value > 0 else None

    def _read_zone(self, zone: RaplZone) -> str | None:
        path = zone.path / "energy_uj"
        try:
            raw = int(self._read_text(path).strip())
        except OSError as exc:
            return _describe_oserror(path, exc)
        except ValueError:
            return f"unparseable counter in {path}"
        if zone.last_uj is not None:
            delta, wrapped = counter_delta(zone.last_uj, raw, zone.max_range_uj)
            if delta is None:
                zone.unusable += 1
            else:
                zone.accumulated_uj += delta
                zone.wraps += int(wrapped)
        zone.last_uj = raw
        return None

    def read(self) -> dict[str, Reading]:
        """Cumulative joules for ``cpu``, ``dram`` and (if requested) ``psys``; never raises."""
        out: dict[str, Reading] = {}
        domains = ["cpu", "dram"] + (["psys"] if self.include_psys else [])
        for domain in domains:
            zones = [z for z in self.zones if z.kind() == domain]
            if not zones:
                out[domain] = Reading(domain, None, "rapl-counter", reason=self._missing(domain))
                continue
            errors = [e for e in (self._read_zone(z) for z in zones) if e]
            if errors:
                extra = f" (and {len(errors) - 1} more zone(s))" if len(errors) > 1 else ""
                reason: str | None = errors[0] + extra
                joules: float | None = None
            else:
                reason, joules = None, sum(z.accumulated_uj for z in zones) / 1e6
            out[domain] = Reading(
                domain,
                joules,
                "rapl-counter",
                reason=reason,
                wraps=sum(z.wraps for z in zones),
                unusable=sum(z.unusable for z in zones),
                sources=tuple(z.label for z in zones),
            )
        return out

    def _missing(self, domain: str) -> str:
        if not self._available and self._reason and self._opened and not self.zones:
            return self._reason
        if domain == "dram":
            return (
                "no RAPL dram zone on this CPU (AMD RAPL and many client CPUs expose package and core only); "
                "DRAM energy is not measured"
            )
        if domain == "psys":
            return "no RAPL psys zone (psys exists on Skylake and newer client platforms only)"
        return f"no RAPL {domain} zone under {self.root}"
