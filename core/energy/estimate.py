"""The estimate used when no CPU counter is readable: TDP per logical CPU x busy CPU-seconds.

Model: ``P_node = W_cpu x (busy logical CPUs)``, so the node's estimated energy is ``W_cpu x B`` joules where
``B`` is the node's busy CPU-seconds (:func:`metatrail.energy.cputime.node_busy_seconds`), and a task's share
is ``W_cpu x c_task`` under either attribution policy (the model has no idle power to split off). Linear in
utilisation, like CodeCarbon's ``process`` mode; it ignores idle/static power, frequency, AVX and memory-bound
work, so it is a rough figure: recorded with ``method: "estimated"`` and never added to measured values.

``W_cpu`` (watts per logical CPU at full load), first match wins: the ``tdp_per_cpu_w`` argument;
``METATRAIL_CPU_TDP_PER_CORE_W``; ``METATRAIL_CPU_TDP_W`` (whole-package TDP) divided by the logical CPU
count; the default :data:`DEFAULT_TDP_PER_CPU_W` (4 W: CodeCarbon's constant for unknown CPUs; a 280 W /
128-thread server part is 2.2 W, a 125 W / 32-thread desktop part 3.9 W).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

from .cputime import node_busy_seconds
from .meter import EnergyMeter, Reading

DEFAULT_TDP_PER_CPU_W = 4.0
MODEL = "TDP per logical CPU x busy CPU-seconds (linear, no idle power)"


def _watts(name: str, notes: list[str] | None) -> float | None:
    """The environment variable ``name`` as watts, or None when unset or refused: a value that is not a finite
    number > 0 is refused (an infinite TDP would make every estimate null) with a note saying so."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        number = float(raw)
    except ValueError:
        number = math.nan
    if math.isfinite(number) and number > 0:
        return number
    if notes is not None:
        notes.append(f"{name}={raw!r} refused (must be a finite number of watts > 0); ignored")
    return None


def resolve_tdp_per_cpu(argument: float | None = None, n_cpus: int | None = None,
                        notes: list[str] | None = None) -> tuple[float, str]:
    """``(watts per logical CPU, where it came from)`` by the precedence in the module docstring; each value
    refused on the way is described in ``notes`` when given."""
    if argument is not None:
        if math.isfinite(argument) and argument > 0:
            return float(argument), "argument"
        if notes is not None:
            notes.append(f"TDP per CPU {argument!r} refused (must be a finite number of watts > 0); ignored")
    per_core = _watts("METATRAIL_CPU_TDP_PER_CORE_W", notes)
    if per_core is not None:
        return per_core, "METATRAIL_CPU_TDP_PER_CORE_W"
    package = _watts("METATRAIL_CPU_TDP_W", notes)
    cpus = n_cpus or os.cpu_count() or 1
    if package is not None:
        return package / cpus, f"METATRAIL_CPU_TDP_W / {cpus} logical CPUs"
    return DEFAULT_TDP_PER_CPU_W, "default"


class CpuEstimateMeter(EnergyMeter):
    """Estimated CPU energy from busy CPU time (see the module docstring)."""

    name = "estimate"

    def __init__(
        self,
        *,
        tdp_per_cpu_w: float | None = None,
        busy_seconds: Callable[[], float] = node_busy_seconds,
    ) -> None:
        super().__init__()
        self._argument = tdp_per_cpu_w
        self._busy = busy_seconds
        self.watts_per_cpu = DEFAULT_TDP_PER_CPU_W
        self.source = "default"
        self._base: float | None = None
        self.last_busy: float | None = None
        """Node busy seconds as of the last :meth:`read` (the monitor reuses it rather than read them again)."""
        self.notes: list[str] = []
        """Settings refused while opening (the facet's ``errors`` carry them)."""

    @property
    def busy_source(self) -> Callable[[], float]:
        """The function this meter reads node busy seconds with."""
        return self._busy

    def _open(self) -> str | None:
        self.watts_per_cpu, self.source = resolve_tdp_per_cpu(self._argument, notes=self.notes)
        try:
            self._base = self._busy()
        except Exception as exc:
            return f"node CPU time unreadable ({exc}): cannot estimate CPU energy"
        return None

    @property
    def parameters(self) -> dict[str, object]:
        """The model parameters and their source, recorded in the facet."""
        return {"tdp_per_cpu_w": self.watts_per_cpu, "tdp_source": self.source}

    def read(self) -> dict[str, Reading]:
        """Estimated cumulative joules for ``cpu``; never raises."""
        self.last_busy = None
        try:
            busy = self.last_busy = self._busy()
        except Exception as exc:
            return {"cpu": Reading("cpu", None, "estimated", reason=f"node CPU time unreadable: {exc}")}
        if self._base is None:
            self._base = busy
        joules = max(0.0, busy - self._base) * self.watts_per_cpu
        return {"cpu": Reading("cpu", joules, "estimated", has_idle=False, detail=self.parameters)}
