"""The one interface every energy meter implements (RAPL, NVML, estimate).

Contract of :class:`EnergyMeter`:

* **Construction does no I/O.** Paths, injected modules and settings are stored; nothing is probed.
* :meth:`EnergyMeter.open` probes the hardware once (idempotent, never raises). Afterwards :attr:`available`
  says whether the meter can read anything and :attr:`unavailable_reason` says why not and how to fix it.
* :meth:`EnergyMeter.read` never raises and returns ``{domain: Reading}`` for every domain the meter knows.
  A reading is a **cumulative** energy in joules since the meter was opened, already corrected for counter
  wraparound, so two reads give a delta by subtraction. A domain that cannot be read has ``joules=None`` and a
  ``reason`` (never 0). Cumulative values stay correct only if ``read`` is called at least every
  :attr:`max_read_interval_s` seconds (counters wrap); a caller that pauses longer starts a new baseline.
* Domain keys: ``cpu`` (RAPL packages), ``dram``, ``psys``, ``gpu:<uuid>`` (one per GPU), and the same keys
  for estimates, with ``Reading.method == "estimated"``.
* :meth:`EnergyMeter.suspend` / :meth:`EnergyMeter.resume` stop and restart any background sampling while
  nobody needs readings; :meth:`EnergyMeter.close` releases everything. Both never raise.

Pure helpers used by the meters live here too: :func:`counter_delta` (wraparound-aware difference) is what the
property tests exercise.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Literal

Method = Literal["rapl-counter", "nvml-energy-counter", "nvml-power-sampling", "estimated"]

MEASURED_METHODS: frozenset[str] = frozenset({"rapl-counter", "nvml-energy-counter", "nvml-power-sampling"})


@dataclass(frozen=True, slots=True)
class Reading:
    """One domain's cumulative energy since the meter was opened.

    ``joules`` is ``None`` when the domain could not be read; ``reason`` then says why and how to fix it.
    ``wraps`` counts the wraparounds corrected so far, ``unusable`` the deltas that had to be dropped (counter
    reset, unknown range). ``sources`` names what was summed (RAPL zone names, a GPU UUID).
    """

    domain: str
    joules: float | None
    method: Method
    reason: str | None = None
    wraps: int = 0
    unusable: int = 0
    sources: tuple[str, ...] = ()
    has_idle: bool = True
    """False for models whose energy is zero when the node is idle (the estimate): idle cannot be split
    off."""
    detail: dict[str, object] = field(default_factory=dict)


class EnergyMeter(ABC):
    """A source of cumulative energy readings per domain (see the module docstring for the contract)."""

    name: ClassVar[str] = "meter"

    def __init__(self) -> None:
        self._opened = False
        self._available = False
        self._reason: str | None = "meter not opened yet"

    @property
    def available(self) -> bool:
        """True once :meth:`open` found at least one readable domain."""
        return self._available

    @property
    def unavailable_reason(self) -> str | None:
        """Why the meter is unavailable and how to fix it; ``None`` when available."""
        return None if self._available else self._reason

    @property
    def max_read_interval_s(self) -> float:
        """Longest gap between two reads that still keeps cumulative values right (counter wrap period)."""
        return float("inf")

    def open(self) -> None:
        """Probe the hardware once; never raises. Later calls do nothing."""
        if self._opened:
            return
        self._opened = True
        try:
            self._reason = self._open()
        except Exception as exc:  # a meter bug must not reach the host task
            self._reason = f"{self.name} meter failed to open: {type(exc).__name__}: {exc}"
        self._available = self._reason is None

    @abstractmethod
    def _open(self) -> str | None:
        """Probe; return ``None`` when something is readable, else the reason (with the fix)."""

    @abstractmethod
    def read(self) -> dict[str, Reading]:
        """Cumulative readings per domain; never raises (see the module docstring)."""

    def suspend(self) -> None:
        """Stop background sampling while nobody needs readings (default: nothing to stop)."""
        return None

    def resume(self) -> None:
        """Restart background sampling after :meth:`suspend` (default: nothing to restart)."""
        return None

    def close(self) -> None:
        """Release files, threads and libraries; never raises."""
        return None


def counter_delta(old: int, new: int, max_range: int | None) -> tuple[int | None, bool]:
    """Difference of two readings of a counter that wraps at ``max_range``; returns ``(delta, wrapped)``.

    ``new >= old`` is a plain difference. Otherwise the counter wrapped once (the caller reads often enough
    for at most one wrap): ``(max_range - old) + new``. Without a usable range the delta is unknowable:
    ``(None, True)``.
    """
    if new >= old:
        return new - old, False
    if max_range is None or max_range <= 0 or old > max_range:
        return None, True
    return (max_range - old) + new, True
