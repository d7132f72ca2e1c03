"""RaplMeter against kernel-shaped powercap trees."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
import stat
import tempfile
import warnings
from collections.abc import Callable

import pytest
from powercap_fake import PowercapTree, build_standard_tree

from metatrail.energy.meter import counter_delta
from metatrail.energy.rapl import PERMISSION_FIX, RaplMeter, read_sysfs


def _opened(root: pathlib.Path, **kwargs: object) -> RaplMeter:
    meter = RaplMeter(root, **kwargs)  # type: ignore[arg-type]
    meter.open()
    return meter


def test_construction_does_no_io(tmp_path: pathlib.Path) -> None:
    meter = RaplMeter(tmp_path / "does-not-exist")
    assert meter.zones == [] and not meter.available


def test_discovers_packages_and_dram_never_core_uncore_or_psys(powercap: PowercapTree) -> None:
    meter = _opened(powercap.root)
    assert meter.available, meter.unavailable_reason
    names = sorted(z.path.name for z in meter.zones)
    assert names == ["intel-rapl:0", "intel-rapl:0:2", "intel-rapl:1", "intel-rapl:1:1"]
    assert any("core" in s for s in meter.skipped) and any("uncore" in s for s in meter.skipped)
    assert any("psys" in s for s in meter.skipped)
    assert set(meter.read()) == {"cpu", "dram"}


def test_deltas_sum_packages_and_dram_only(powercap: PowercapTree) -> None:
    meter = _opened(powercap.root)
    before = meter.read()
    powercap.advance("intel-rapl:0", 10.0)
    powercap.advance("intel-rapl:1", 5.0)
    powercap.advance("intel-rapl:0:0", 7.0)  # core: part of package-0, never added
    powercap.advance("intel-rapl:0:1", 1.0)  # uncore: likewise
    powercap.advance("intel-rapl:0:2", 2.0)
    powercap.advance("intel-rapl:1:1", 1.5)
    powercap.advance("intel-rapl:2", 100.0)  # psys: not requested
    after = meter.read()
    assert after["cpu"].joules is not None and before["cpu"].joules is not None
    assert after["cpu"].joules - before["cpu"].joules == pytest.approx(15.0)
    assert after["dram"].joules is not None and before["dram"].joules is not None
    assert after["dram"].joules - before["dram"].joules == pytest.approx(3.5)
    assert after["cpu"].method == "rapl-counter"


def test_psys_only_on_request(powercap: PowercapTree) -> None:
    meter = _opened(powercap.root, include_psys=True)
    first = meter.read()["psys"].joules
    powercap.advance("intel-rapl:2", 42.0)
    second = meter.read()["psys"].joules
    assert first is not None and second is not None and second - first == pytest.approx(42.0)


def test_wraparound_uses_max_energy_range(powercap: PowercapTree) -> None:
    meter = _opened(powercap.root)
    start = meter.read()["cpu"]
    powercap.wrap("intel-rapl:0", 0.5)  # crosses max_energy_range_uj, lands 0.5 J past zero (below the start)
    end = meter.read()["cpu"]
    assert powercap.energy_uj("intel-rapl:0") == 500_000
    assert end.wraps == start.wraps + 1
    assert end.joules is not None and start.joules is not None
    top = int((powercap.zones["intel-rapl:0"] / "max_energy_range_uj").read_text())
    assert end.joules - start.joules == pytest.approx((top - 1_000_000) / 1e6 + 0.5)


def test_wraparound_delta_is_exact(make_powercap: Callable[[str], PowercapTree]) -> None:
    tree = make_powercap("small")
    tree.add_zone("intel-rapl:0", "package-0", 900_000, max_uj=1_000_000)
    meter = _opened(tree.root)
    a = meter.read()["cpu"].joules
    tree.advance("intel-rapl:0", 0.25)  # 900,000 -> 1,150,000 -> wraps to 150,000
    b = meter.read()["cpu"]
    assert tree.energy_uj("intel-rapl:0") == 150_000
    assert a is not None and b.joules is not None
    assert b.joules - a == pytest.approx(0.25) and b.wraps == 1


def test_hexadecimal_zone_ids(make_powercap: Callable[[str], PowercapTree]) -> None:
    tree = make_powercap("big")
    for i in range(12):  # intel-rapl:0 .. intel-rapl:b
        tree.add_zone(f"intel-rapl:{i:x}", f"package-{i}", 0)
    tree.add_zone("intel-rapl:a:0", "dram", 0)
    meter = _opened(tree.root)
    assert {z.path.name for z in meter.zones} >= {"intel-rapl:a", "intel-rapl:b", "intel-rapl:a:0"}
    assert sorted(z.ids for z in meter.zones if z.kind() == "cpu")[-1] == (11,)
    first = meter.read()
    tree.advance("intel-rapl:b", 2.0)
    tree.advance("intel-rapl:a:0", 1.0)
    second = meter.read()
    assert second["cpu"].joules == pytest.approx((first["cpu"].joules or 0) + 2.0)
    assert second["dram"].joules == pytest.approx((first["dram"].joules or 0) + 1.0)


def test_dram_zone_at_any_sub_index_is_found(make_powercap: Callable[[str], PowercapTree]) -> None:
    # CodeCarbon 3.3.2 skips a DRAM sub-zone at intel-rapl:0:1, the kernel docs' layout (reference section 6).
    tree = make_powercap("docs-layout")
    tree.add_zone("intel-rapl:0", "package-0", 0)
    tree.add_zone("intel-rapl:0:0", "core", 0)
    tree.add_zone("intel-rapl:0:1", "dram", 0)
    meter = _opened(tree.root)
    tree.advance("intel-rapl:0:1", 4.0)
    assert meter.read()["dram"].joules == pytest.approx(4.0)


def test_devices_path_as_root_and_mmio_duplicates(make_powercap: Callable[[str], PowercapTree]) -> None:
    tree = make_powercap("mmio")
    tree.add_zone("intel-rapl:0", "package-0", 0)
    mmio = tree.base / "devices" / "virtual" / "powercap" / "intel-rapl-mmio" / "intel-rapl-mmio:0"
    mmio.mkdir(parents=True)
    for name, value in (("name", "package-0"), ("energy_uj", "0"), ("max_energy_range_uj", "1000000000")):
        (mmio / name).write_text(value + "\n")
    meter = _opened(tree.base / "devices" / "virtual" / "powercap")
    assert [z.path.name for z in meter.zones] == ["intel-rapl:0"]
    assert any("duplicate" in s for s in meter.skipped)


def test_amd_layout_has_no_dram(make_powercap: Callable[[str], PowercapTree]) -> None:
    tree = make_powercap("amd")  # amd Zen: package + core under the intel-rapl control type
    tree.add_zone("intel-rapl:0", "package-0", 0)
    tree.add_zone("intel-rapl:0:0", "core", 0)
    meter = _opened(tree.root)
    dram = meter.read()["dram"]
    assert meter.available and dram.joules is None and dram.reason and "AMD" in dram.reason


def test_missing_tree_is_unavailable_with_reason(tmp_path: pathlib.Path) -> None:
    meter = _opened(tmp_path / "nothing")
    assert not meter.available
    assert meter.unavailable_reason and "no powercap tree" in meter.unavailable_reason
    assert all(r.joules is None and r.reason for r in meter.read().values())


def test_permission_denied_through_the_reader_seam(powercap: PowercapTree) -> None:
    def deny(path: pathlib.Path) -> str:
        if path.name == "energy_uj":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return read_sysfs(path)

    meter = _opened(powercap.root, reader=deny)
    assert not meter.available
    reason = meter.unavailable_reason or ""
    assert "permission denied" in reason and "udev" in reason and "chmod" in reason and "group" in reason
    cpu = meter.read()["cpu"]
    assert cpu.joules is None and cpu.joules != 0 and PERMISSION_FIX in (cpu.reason or "")


def _read_as_nobody(root: pathlib.Path) -> dict[str, object]:
    """Fork (no exec: the interpreter lives under a root-only home), drop to uid nobody, open a meter."""
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+): the child only reads
        pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            meter = RaplMeter(root)
            meter.open()
            cpu = meter.read()["cpu"]
            out = {"available": meter.available, "reason": meter.unavailable_reason, "joules": cpu.joules}
            os.write(write_fd, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    data = b""
    while chunk := os.read(read_fd, 65536):
        data += chunk
    os.close(read_fd)
    os.waitpid(pid, 0)
    result: dict[str, object] = json.loads(data)
    return result


def test_permission_denied_on_a_root_only_counter_real_oserror() -> None:
    """The kernel's own EACCES: energy_uj mode 0400 owned by root, read by an unprivileged process."""
    base = pathlib.Path(tempfile.mkdtemp(prefix="metatrail-rapl-"))
    try:
        os.chmod(base, 0o755)
        tree = build_standard_tree(base / "sys")
        for p in [base, *base.rglob("*")]:
            if p.is_dir() and not p.is_symlink():
                os.chmod(p, 0o755)
        for zone in tree.zones.values():
            os.chmod(zone / "energy_uj", stat.S_IRUSR)  # 0400, as since Linux 5.10
        if os.geteuid() == 0:
            result = _read_as_nobody(tree.root)
        else:
            for zone in tree.zones.values():
                os.chmod(zone / "energy_uj", 0)
            meter = RaplMeter(tree.root)
            meter.open()
            result = {"available": meter.available, "reason": meter.unavailable_reason}
            result["joules"] = meter.read()["cpu"].joules
        assert result["available"] is False
        assert result["joules"] is None
        assert "permission denied" in str(result["reason"]) and "udev" in str(result["reason"])
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_unreadable_entry_gives_null_and_reason(powercap: PowercapTree) -> None:
    meter = _opened(powercap.root)
    assert meter.available
    counter = powercap.zones["intel-rapl:1"] / "energy_uj"
    counter.unlink()
    counter.mkdir()  # reading it now fails with EISDIR, a real OSError from the kernel
    cpu = meter.read()["cpu"]
    assert cpu.joules is None and "cannot read" in (cpu.reason or "") and "intel-rapl:1" in (cpu.reason or "")


def test_counter_delta_without_range_is_unknowable() -> None:
    assert counter_delta(10, 5, None) == (None, True)
    assert counter_delta(10, 5, 20) == (15, True)
    assert counter_delta(5, 10, None) == (5, False)
