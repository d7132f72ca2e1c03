"""The plugin never disturbs Snakemake: with the store unwritable, with a store too slow for the Recorder's time
caps, or with the plugin unimportable, a real run (one job failing under --keep-going) ends with the same exit code
and leaves the same files as a run without the plugin, and the problem is reported once on stderr."""

from __future__ import annotations

from pathlib import Path

import pytest
from olspec import assert_valid
from smkrun import Snakemake, read_events, snapshot

ARGS = ("--cores", "2", "--keep-going")


def _prepare(snakemake: Snakemake, dest: str) -> Path:
    wf = snakemake.workflow("faulty", dest)
    (wf / "FAIL_c").write_text("")
    return wf


@pytest.fixture(scope="module")
def baseline(plugin_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, str]]:
    """Exit code and files of the run without the plugin (once for the module)."""
    runner = Snakemake(plugin_path, tmp_path_factory.mktemp("baseline"))
    wf = _prepare(runner, "baseline")
    result = runner.run(wf, *ARGS, logger=False)
    assert result.returncode == 1, result.stderr  # the failing job fails the run
    files = snapshot(wf)
    assert "checked/a.txt" in files and "summary.txt" not in files
    return result.returncode, files


def test_unwritable_store(snakemake: Snakemake, baseline: tuple[int, dict[str, str]], tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the store's directory should be\n")
    wf = _prepare(snakemake, "run")
    result = snakemake.run(wf, *ARGS, env={"METATRAIL_STORE": f"sqlite:///{blocker}/store/metatrail.db",
                                           "METATRAIL_FLUSH_TIMEOUT": "2"})
    assert (result.returncode, snapshot(wf)) == baseline
    assert "metatrail: cannot write to the store" in result.stderr
    assert result.stderr.count("metatrail: cannot write to the store") == 1  # once, not per event


def test_store_slower_than_the_time_caps(snakemake: Snakemake, baseline: tuple[int, dict[str, str]]) -> None:
    wf = _prepare(snakemake, "run")
    # Every store write takes 1.5 s, more than the Recorder may wait at exit (1 s) or the temp-file guard may hold
    # a deletion (0.5 s a file).
    result = snakemake.run(wf, *ARGS, faults=True, env={
        "METATRAIL_TEST_FAULT": "slow_store", "METATRAIL_TEST_STORE_DELAY": "1.5",
        "METATRAIL_FLUSH_TIMEOUT": "1", "METATRAIL_TIMEOUT": "0.5"})
    assert (result.returncode, snapshot(wf)) == baseline
    assert "store is not keeping up" in result.stderr  # the guard gave up waiting
    assert "events were not stored before exit" in result.stderr  # the exit flush gave up waiting
    for event in read_events():  # what did get stored before the exit is whole and valid
        assert_valid(event)


@pytest.mark.parametrize("fault", ["no_handler", "no_metatrail"])
def test_plugin_import_error(snakemake: Snakemake, baseline: tuple[int, dict[str, str]], fault: str) -> None:
    wf = _prepare(snakemake, "run")
    # The plugin's options still parse (Snakemake would stop at an unknown argument before running anything).
    result = snakemake.run(wf, *ARGS, "--logger-metatrail-namespace", "lab", "--logger-metatrail-flush-timeout", "5",
                           faults=True, env={"METATRAIL_TEST_FAULT": fault})
    assert (result.returncode, snapshot(wf)) == baseline
    assert result.stderr.count("metatrail: the Snakemake plugin could not be imported") == 1
