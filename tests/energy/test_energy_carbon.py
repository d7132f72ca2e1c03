"""The shipped grid-intensity table, region and PUE resolution, and the carbon block."""

from __future__ import annotations

import pytest

from metatrail.energy.carbon import J_PER_KWH, carbon_block, grid_intensity, load_table, resolve_pue


def test_every_entry_has_value_source_year_licence() -> None:
    table = load_table()
    assert table["default"] == "WORLD" and "WORLD" in table["entries"]
    assert len(table["entries"]) > 150
    for code, entry in table["entries"].items():
        assert isinstance(entry["g_co2e_per_kwh"], int | float) and 0 <= entry["g_co2e_per_kwh"] < 1500, code
        assert entry["source"] and entry["licence"] and 2000 <= entry["year"] <= 2030, code


@pytest.mark.parametrize(("region", "code", "value"), [("FR", "FR", 56.0), ("fra", "FR", 56.0), ("DE", "DE", 380.9)])
def test_lookup_by_alpha2_or_alpha3(region: str, code: str, value: float) -> None:
    found = grid_intensity(region)
    assert found.region == code and found.g_per_kwh == pytest.approx(value, abs=0.5) and found.note is None


def test_region_from_environment_and_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METATRAIL_CARBON_REGION", raising=False)
    world = grid_intensity()
    assert world.region == "WORLD" and world.region_source.startswith("default")
    monkeypatch.setenv("METATRAIL_CARBON_REGION", "NO")
    assert grid_intensity().region == "NO" and grid_intensity().region_source == "METATRAIL_CARBON_REGION"
    monkeypatch.setenv("METATRAIL_CARBON_REGION", "US-CA")
    assert grid_intensity().region == "US" and "sub-national" in (grid_intensity().note or "")
    monkeypatch.setenv("METATRAIL_CARBON_REGION", "ATLANTIS")
    unknown = grid_intensity()
    assert unknown.region == "WORLD" and "unknown carbon region" in (unknown.note or "")


def test_pue_kept_separate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METATRAIL_PUE", "1.5")
    block, errors = carbon_block(3.6e6, None, region="FR")
    assert errors == []
    assert block["it_energy_j"] == 3.6e6 and block["facility_energy_j"] == pytest.approx(5.4e6)
    assert block["co2e_it_g"] == pytest.approx(56.0, abs=0.1)
    assert block["co2e_g"] == pytest.approx(1.5 * block["co2e_it_g"])
    assert block["pue_source"] == "METATRAIL_PUE" and block["energy_basis"] == "measured"


@pytest.mark.parametrize("raw", ["0.8", "abc"])
def test_bad_pue_is_refused_with_a_message(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("METATRAIL_PUE", raw)
    pue, source, error = resolve_pue()
    assert pue == 1.0 and source == "default" and error and raw in error


def test_no_energy_means_no_carbon() -> None:
    block, _ = carbon_block(None, None)
    assert block["co2e_g"] is None and block["energy_basis"] == "none" and block["reason"]
    both, _ = carbon_block(J_PER_KWH, J_PER_KWH, region="WORLD")
    assert both["energy_basis"] == "measured+estimated" and both["co2e_g"] == pytest.approx(960.0)


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf"])
def test_non_finite_pue_is_refused_and_the_carbon_figures_kept(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("METATRAIL_PUE", raw)
    block, errors = carbon_block(J_PER_KWH, None, region="WORLD")
    assert (block["pue"], block["pue_source"]) == (1.0, "default")
    assert block["facility_energy_j"] == J_PER_KWH and block["co2e_g"] == pytest.approx(480.0)
    assert errors == [f"METATRAIL_PUE={raw!r} is not a finite number; used 1.0"]
    monkeypatch.delenv("METATRAIL_PUE")
    block, errors = carbon_block(J_PER_KWH, None, region="WORLD", pue=float(raw))
    assert block["pue"] == 1.0 and block["co2e_g"] == pytest.approx(480.0) and "refused" in errors[0]


def test_carbon_settings_resolved_once_still_follow_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The region and PUE are resolved once per distinct setting (not per task), yet a changed variable is read
    afresh, and the notes handed back are each call's own."""
    monkeypatch.setenv("METATRAIL_CARBON_REGION", "NO")
    monkeypatch.setenv("METATRAIL_PUE", "1.2")
    first, _ = carbon_block(3.6e6, None)
    assert first["region"] == "NO" and first["pue"] == pytest.approx(1.2)
    monkeypatch.setenv("METATRAIL_CARBON_REGION", "FR")
    monkeypatch.setenv("METATRAIL_PUE", "0.5")
    second, errors = carbon_block(3.6e6, None)
    assert second["region"] == "FR" and second["region_source"] == "METATRAIL_CARBON_REGION"
    assert second["pue"] == 1.0 and errors == ["METATRAIL_PUE='0.5' is below 1 (PUE = facility / IT energy); used 1.0"]
    errors.append("changed by the caller")
    assert carbon_block(3.6e6, None)[1] == ["METATRAIL_PUE='0.5' is below 1 (PUE = facility / IT energy); used 1.0"]
    second["region"] = "changed by the caller"
    assert carbon_block(3.6e6, None)[0]["region"] == "FR"
