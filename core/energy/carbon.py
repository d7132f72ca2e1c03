"""Carbon from energy with a shipped, offline grid-intensity table; PUE kept separate.

* Table: ``metatrail/energy/data/grid_intensity.json`` (yearly averages per country, value, source, year and
  licence per entry, ``WORLD`` as the default). No geolocation and no network, ever.
* Region: the ``region`` argument, else ``METATRAIL_CARBON_REGION`` (ISO 3166-1 alpha-2 or alpha-3; a
  sub-national code such as ``US-CA`` uses its country), else the world average.
* PUE: the ``pue`` argument, else ``METATRAIL_PUE``, else 1.0. IT energy (what the meters saw) and facility
  energy (IT x PUE) are both recorded; ``co2e_g`` is the facility figure, ``co2e_it_g`` the IT one.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

J_PER_KWH = 3.6e6


@dataclass(frozen=True, slots=True)
class GridIntensity:
    """One table entry as used: region code, g CO2e per kWh, and its provenance."""

    region: str
    g_per_kwh: float
    source: str
    year: int | None
    licence: str
    region_source: str
    note: str | None = None


@lru_cache(maxsize=1)
def load_table() -> dict[str, Any]:
    """The shipped grid-intensity table (parsed once)."""
    from importlib import resources

    text = resources.files(__name__.rsplit(".", 1)[0]).joinpath("data/grid_intensity.json").read_text("utf-8")
    table: dict[str, Any] = json.loads(text)
    return table


def _entry(table: dict[str, Any], code: str) -> tuple[str, dict[str, Any]] | None:
    entries: dict[str, dict[str, Any]] = table["entries"]
    key = code.strip().upper()
    if key in entries:
        return key, entries[key]
    if key == "WLD":
        return "WORLD", entries["WORLD"]
    for alpha2, entry in entries.items():
        if entry.get("alpha3") == key:
            return alpha2, entry
    return None


def grid_intensity(region: str | None = None) -> GridIntensity:
    """The intensity for ``region`` (argument > ``METATRAIL_CARBON_REGION`` > world default); never raises."""
    table = load_table()
    source = "argument"
    if not region:
        region, source = os.environ.get("METATRAIL_CARBON_REGION") or None, "METATRAIL_CARBON_REGION"
    note = None
    found = None
    if region:
        found = _entry(table, region)
        if found is None and "-" in region:
            found = _entry(table, region.split("-", 1)[0])
            if found is not None:
                note = f"no entry for sub-national region {region!r}; used the country average"
        if found is None:
            note = (
                f"unknown carbon region {region!r} (use an ISO 3166-1 code such as FR or FRA); used the world average"
            )
    if found is None:
        found = ("WORLD", table["entries"]["WORLD"])
        source = source if region else "default (set METATRAIL_CARBON_REGION to an ISO country code)"
    code, entry = found
    return GridIntensity(
        code,
        float(entry["g_co2e_per_kwh"]),
        str(entry["source"]),
        int(entry["year"]) if entry.get("year") is not None else None,
        str(entry["licence"]),
        source,
        note,
    )


def resolve_pue(argument: float | None = None) -> tuple[float, str, str | None]:
    """``(pue, source, error)``: argument > ``METATRAIL_PUE`` > 1.0; a value that is not a finite number >= 1 is
    refused (1.0 is used and ``error`` says why): NaN or infinity would make every carbon figure null."""
    if argument is not None:
        if math.isfinite(argument) and argument >= 1.0:
            return float(argument), "argument", None
        return 1.0, "default", f"PUE {argument} refused (must be a finite number >= 1); used 1.0"
    raw = os.environ.get("METATRAIL_PUE")
    if raw is None or raw.strip() == "":
        return 1.0, "default", None
    try:
        value = float(raw)
    except ValueError:
        return 1.0, "default", f"METATRAIL_PUE={raw!r} is not a number; used 1.0"
    if not math.isfinite(value):
        return 1.0, "default", f"METATRAIL_PUE={raw!r} is not a finite number; used 1.0"
    if value < 1.0:
        return 1.0, "default", f"METATRAIL_PUE={raw!r} is below 1 (PUE = facility / IT energy); used 1.0"
    return value, "METATRAIL_PUE", None


@lru_cache(maxsize=16)
def _carbon_settings(
    region: str | None, region_env: str | None, pue: float | None, pue_env: str | None
) -> tuple[GridIntensity, float, str, tuple[str, ...]]:
    """The intensity and PUE for these arguments and environment values, and the notes on them: resolved once per
    distinct setting, not per task (the table look-up and the refusals cost more than the rest of a facet).
    The environment values are part of the key, so a changed variable is read afresh."""
    intensity = grid_intensity(region)
    pue_value, pue_source, pue_error = resolve_pue(pue)
    notes = tuple(n for n in (intensity.note, pue_error) if n)
    return intensity, pue_value, pue_source, notes


def carbon_block(
    measured_j: float | None,
    estimated_j: float | None,
    *,
    region: str | None = None,
    pue: float | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """The facet's ``carbon`` object and any configuration errors to report."""
    settings = _carbon_settings(region, os.environ.get("METATRAIL_CARBON_REGION"), pue, os.environ.get("METATRAIL_PUE"))
    intensity, pue_value, pue_source, notes = settings
    errors = list(notes)
    parts = [v for v in (measured_j, estimated_j) if v is not None]
    basis = (
        "measured+estimated"
        if measured_j is not None and estimated_j is not None
        else "measured"
        if measured_j is not None
        else "estimated"
        if estimated_j is not None
        else "none"
    )
    it_j = sum(parts) if parts else None
    facility_j = it_j * pue_value if it_j is not None else None
    block: dict[str, Any] = {
        "region": intensity.region,
        "region_source": intensity.region_source,
        "intensity_g_per_kwh": intensity.g_per_kwh,
        "intensity_source": intensity.source,
        "intensity_year": intensity.year,
        "intensity_licence": intensity.licence,
        "energy_basis": basis,
        "it_energy_j": it_j,
        "pue": pue_value,
        "pue_source": pue_source,
        "facility_energy_j": facility_j,
        "co2e_it_g": it_j / J_PER_KWH * intensity.g_per_kwh if it_j is not None else None,
        "co2e_g": facility_j / J_PER_KWH * intensity.g_per_kwh if facility_j is not None else None,
        "reason": None if it_j is not None else "no energy measured or estimated",
    }
    return block, errors
