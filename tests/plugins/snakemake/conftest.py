"""Fixtures for the Snakemake plugin tests (helpers in smkrun.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # smkrun.py

from smkrun import Snakemake, make_plugin_path


@pytest.fixture(scope="session")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``PYTHONPATH`` entry holding the discovery module, laid out as in an installed wheel."""
    return make_plugin_path(tmp_path_factory.mktemp("site"))


@pytest.fixture
def snakemake(plugin_path: Path, tmp_path: Path) -> Iterator[Snakemake]:
    """A runner for this test's workflows."""
    yield Snakemake(plugin_path, tmp_path)
