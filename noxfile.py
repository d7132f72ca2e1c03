"""Test environments. Workflow managers pin conflicting dependencies, so each gets its own environment.

``nox`` runs every environment (the whole suite, what CI runs); ``nox -s core`` one of them. Adding a host is one
entry in ENVIRONMENTS: the extras it installs and the test folders it runs.
"""

from __future__ import annotations

import os

import nox

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

# name -> (extras to install, pytest arguments)
ENVIRONMENTS: dict[str, tuple[list[str], list[str]]] = {
    "core": (["test", "dvc", "server", "gpu", "plot"], ["tests", "--ignore=tests/plugins"]),
    "snakemake": (["test", "snakemake"], ["tests/plugins/snakemake"]),
    "snakemake-oldest": (["test", "snakemake"], ["tests/plugins/snakemake"]),
    "parsl": (["test", "parsl"], ["tests/plugins/parsl"]),
    "parsl-oldest": (["test", "parsl"], ["tests/plugins/parsl"]),
    "airflow": (["test", "airflow"], ["tests/plugins/airflow"]),
    "prefect": (["test", "prefect"], ["tests/plugins/prefect"]),
}


# name -> requirements installed with the project: host releases to test (latest and oldest supported) and
# test-only helpers (snakemake's cluster executor)
REQUIREMENTS: dict[str, list[str]] = {
    "snakemake": ["snakemake>=9.27,<10", "snakemake-executor-plugin-cluster-generic>=1.0"],
    "snakemake-oldest": ["snakemake==9.0.0", "snakemake-executor-plugin-cluster-generic>=1.0"],
    # the first release with the memoizer interface the plugin wraps (Config(memoizer=...), start(config_run_dir=))
    "parsl-oldest": ["parsl==2026.1.26"],
}


def _make_session(name: str, extras: list[str], pytest_args: list[str]) -> None:
    @nox.session(name=name, python=False if os.environ.get("METATRAIL_NOX_NO_VENV") else None)
    def _session(session: nox.Session) -> None:
        # A regular (not editable) install: what users get, and what mypy can read as the package `metatrail`.
        session.install(f".[{','.join(extras)}]", *REQUIREMENTS.get(name, []))
        # A reused environment keeps an installed metatrail of the same version: put this tree's in place.
        session.install("--no-deps", "--force-reinstall", ".")
        if name == "core":
            session.run("ruff", "check", "core", "plugins", "tests", "bench", "examples", "noxfile.py")
            session.run("mypy", "-p", "metatrail")
        session.run("pytest", *(session.posargs or pytest_args))


for _name, (_extras, _args) in ENVIRONMENTS.items():
    _make_session(_name, _extras, _args)
