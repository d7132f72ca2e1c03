"""Helpers for the Snakemake plugin tests: run the real ``snakemake`` command on workflows copied into a temporary
directory, with the plugin discoverable, recording into the test's own store (see tests/conftest.py).

Discovery: Snakemake finds logger plugins with ``pkgutil.iter_modules()``, which sees packages on ``sys.path`` but
not those an editable install serves through an import hook. A regular install (what nox does) is tested as it is;
for an editable one :func:`make_plugin_path` lays the module out as an installed wheel does, in a folder put on
``PYTHONPATH``, from where ``[tool.setuptools] package-dir`` maps it (so a wrong mapping fails here too).
"""

from __future__ import annotations

import hashlib
import json
import os
import pkgutil
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent
WORKFLOWS = HERE / "workflows"
FAULTS = HERE / "faults"
GOLDEN = HERE / "golden"
SHIM = "snakemake_logger_plugin_metatrail"
RUN_TIMEOUT = 300  # seconds; a run that takes longer is a hang, and fails the test


def shim_source() -> Path:
    """Where pyproject.toml maps the discovery module from."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert SHIM in config["packages"], f"{SHIM} missing from [tool.setuptools] packages"
    assert "metatrail.plugins.snakemake" in config["packages"], "metatrail.plugins.snakemake not packaged"
    return REPO / config["package-dir"][SHIM]


def make_plugin_path(root: Path) -> Path:
    """A folder for ``PYTHONPATH`` from which Snakemake discovers the plugin: empty when the installed copy is
    discoverable already (a regular install, as in nox), else holding the module as an installed wheel would."""
    if not any(module.name == SHIM for module in pkgutil.iter_modules()):
        (root / SHIM).symlink_to(shim_source(), target_is_directory=True)
    return root


def store_url() -> str:
    """The store this test records into (set by the autouse fixture in tests/conftest.py)."""
    return os.environ["METATRAIL_STORE"]


def read_events(url: str | None = None) -> list[dict[str, Any]]:
    """Every event in the store, in log order."""
    from metatrail.store import open_store

    with open_store(url or store_url()) as store:
        return [e.body for e in store.iter_events()]


def md5(path: Path) -> str:
    """The DVC md5 of a file or directory, computed without any cache."""
    from metatrail.hashing import hash_path

    ref = hash_path(path, None)
    assert ref.hash is not None, ref.hash_error
    return ref.hash.value


def snapshot(workdir: Path, *, skip: Sequence[str] = (".snakemake", ".metatrail")) -> dict[str, str]:
    """Relative path -> sha256 of every file a run left in ``workdir`` (Snakemake's own state excluded)."""
    result: dict[str, str] = {}
    for path in sorted(workdir.rglob("*")):
        rel = path.relative_to(workdir)
        if rel.parts[0] in skip or not path.is_file():
            continue
        result[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return result


class Snakemake:
    """Runs ``python -m snakemake`` (this environment's) in a copy of a test workflow."""

    def __init__(self, plugin_path: Path, tmp_path: Path) -> None:
        self.plugin_path = plugin_path
        self.tmp_path = tmp_path

    def workflow(self, name: str, dest: str | None = None) -> Path:
        """Copy ``workflows/<name>`` to ``<tmp>/<dest or name>`` and return it."""
        target = self.tmp_path / (dest or name)
        shutil.copytree(WORKFLOWS / name, target)
        return target

    def env(self, extra: Mapping[str, str] | None = None, *, faults: bool = False) -> dict[str, str]:
        """The environment of a run: this process's (store settings included), the plugin on PYTHONPATH."""
        env = dict(os.environ)
        paths = [str(self.plugin_path)] + ([str(FAULTS)] if faults else [])
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONHASHSEED"] = "0"  # Snakemake orders ready jobs through sets: fixed order, fixed golden files
        env.update(extra or {})
        return env

    def run(self, workdir: Path, *args: str, logger: bool = True, env: Mapping[str, str] | None = None,
            faults: bool = False, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run Snakemake to its end; ``logger`` adds ``--logger metatrail``."""
        cmd = [sys.executable, "-m", "snakemake", *args, *(["--logger", "metatrail"] if logger else [])]
        return subprocess.run(cmd, cwd=workdir, env=self.env(env, faults=faults), capture_output=True, text=True,
                              timeout=timeout, check=False)

    def popen(self, workdir: Path, *args: str, env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
        """Start Snakemake with the plugin in its own process group (so a test can send it Ctrl-C).

        Ctrl-C is given its default action first, then Snakemake is exec'd in the same process: a test suite started
        in the background by a shell without job control inherits SIGINT ignored, and so would Snakemake and its
        jobs, which would then never see the test's Ctrl-C."""
        cmd = [sys.executable, "-c", _WITH_DEFAULT_SIGINT, sys.executable, "-m", "snakemake", *args,
               "--logger", "metatrail"]
        return subprocess.Popen(cmd, cwd=workdir, env=self.env(env), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)


_WITH_DEFAULT_SIGINT = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                        "os.execv(sys.argv[1], sys.argv[1:])")


def clean_run_events(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    """The stored events of a Snakemake run that succeeded without a word from metatrail on stderr; each is checked
    against the OpenLineage schemas."""
    from olspec import assert_valid

    assert result.returncode == 0, result.stderr
    assert "metatrail:" not in result.stderr, result.stderr
    events = read_events()
    for event in events:
        assert_valid(event)
    return events


def by_job(events: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Events grouped by OpenLineage job name (``<pipeline>.<rule>``)."""
    grouped: dict[str, list[Mapping[str, Any]]] = {}
    for event in events:
        grouped.setdefault(event["job"]["name"], []).append(event)
    return grouped


def dataset_versions(datasets: Sequence[Mapping[str, Any]]) -> dict[str, str | None]:
    """Dataset name -> recorded content hash."""
    return {d["name"]: (d.get("facets", {}).get("version") or {}).get("datasetVersion") for d in datasets}


def execution_facet(event: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ``metatrail_execution`` run facet of an event."""
    facet: Mapping[str, Any] = event["run"]["facets"]["metatrail_execution"]
    return facet



def golden_name(stem: str) -> str:
    """The golden file for the installed Snakemake: ``<stem>.json`` for current releases, a separate file for the
    oldest supported one (9.0 logs no config hash and computes no ``mem`` resource)."""
    from importlib.metadata import version

    major, minor = (int(part) for part in version("snakemake").split(".")[:2])
    return f"{stem}.snakemake-9.0.json" if (major, minor) < (9, 1) else f"{stem}.json"


_TYPE_ORDER = {"START": 0, "RUNNING": 1, "COMPLETE": 2, "FAIL": 2, "ABORT": 2}


def stable_order(events: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Events with their ``eventTime`` replaced by a rank that does not depend on scheduling: golden.normalise
    orders by (job, event type, eventTime), and jobs of one rule that Snakemake may run in either order (fan-out)
    would otherwise swap places between runs. Rank = (job, event type, which Snakemake run, wildcards)."""
    starts = sorted((e["eventTime"], e["run"]["runId"]) for e in events
                    if e["eventType"] == "START" and execution_facet(e)["kind"] == "pipeline_run")
    run_index = {run_id: i for i, (_, run_id) in enumerate(starts)}

    def key(e: Mapping[str, Any]) -> tuple[Any, ...]:
        facet = execution_facet(e)
        parent = e["run"]["facets"].get("parent", {}).get("run", {}).get("runId", e["run"]["runId"])
        return (e["job"]["name"], _TYPE_ORDER.get(e["eventType"], 3), run_index.get(parent, -1),
                json.dumps(facet["params"].get("wildcards", {}), sort_keys=True), e["eventTime"])

    ranked = sorted(events, key=key)
    return [{**e, "eventTime": f"2000-01-01T00:00:00.{i:06d}+00:00"} for i, e in enumerate(ranked)]
