"""Fixtures for the energy tests: a kernel-shaped powercap tree, a power source driving it, the fake NVML module,
and the facet schema validator. Fakes stand in for hardware only; metatrail's own code runs for real."""

from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from fake_pynvml import FakeGpu, FakeNvml
from powercap_fake import PowercapTree, build_standard_tree

REPO = pathlib.Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO / "core" / "openlineage" / "schemas" / "MetatrailEnergyRunFacet.json"
SPEC_DIR = REPO.parent / "shared" / "openlineage-spec"


@pytest.fixture
def powercap(tmp_path: pathlib.Path) -> PowercapTree:
    """The standard two-package tree."""
    return build_standard_tree(tmp_path / "sys")


@pytest.fixture
def make_powercap(tmp_path: pathlib.Path) -> Callable[[str], PowercapTree]:
    """A factory for empty trees (tests add their own zones)."""

    def make(name: str = "custom") -> PowercapTree:
        return PowercapTree(tmp_path / name)

    return make


@pytest.fixture
def fake_nvml() -> Callable[..., FakeNvml]:
    """A factory for fake NVML modules: ``fake_nvml(FakeGpu("GPU-..."), ...)``."""

    def make(*gpus: FakeGpu, init_error: int | None = None) -> FakeNvml:
        return FakeNvml(list(gpus), init_error=init_error)

    return make


def _registry(own_schema: dict[str, Any]) -> Any:
    """Our schema plus OpenLineage's core schema (from shared/openlineage-spec; a minimal stand-in for its
    BaseFacet/RunFacet if that copy is absent, so the test never silently skips)."""
    from referencing import Registry, Resource

    core_path = SPEC_DIR / "OpenLineage.json"
    if core_path.exists():
        core = json.loads(core_path.read_text())
    else:
        core = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": "https://openlineage.io/spec/2-0-2/OpenLineage.json",
            "$defs": {
                "BaseFacet": {
                    "type": "object",
                    "properties": {
                        "_producer": {"type": "string", "format": "uri"},
                        "_schemaURL": {"type": "string", "format": "uri"},
                    },
                    "required": ["_producer", "_schemaURL"],
                },
                "RunFacet": {"type": "object", "allOf": [{"$ref": "#/$defs/BaseFacet"}]},
            },
        }
    return Registry().with_resources(
        [(core["$id"], Resource.from_contents(core)), (own_schema["$id"], Resource.from_contents(own_schema))]
    )


@pytest.fixture(scope="session")
def validate_facet() -> Iterator[Callable[[dict[str, Any]], None]]:
    """Validate a payload, wrapped as a run facet with ``_producer``/``_schemaURL``, against our schema."""
    from jsonschema import Draft202012Validator, FormatChecker

    schema = json.loads(SCHEMA_PATH.read_text())
    Draft202012Validator.check_schema(schema)
    facet_schema = {"$ref": schema["$id"] + "#/$defs/MetatrailEnergyRunFacet"}
    validator = Draft202012Validator(facet_schema, registry=_registry(schema), format_checker=FormatChecker())

    def validate(payload: dict[str, Any]) -> None:
        from metatrail.energy.facet import FACET_KEY, SCHEMA_URL

        json.dumps(payload, allow_nan=False)  # JSON-serialisable, no NaN/inf
        wrapped = {"_producer": "https://github.com/metatrail/metatrail/tree/v0.1.0", "_schemaURL": SCHEMA_URL}
        wrapped.update(payload)
        errors = sorted(validator.iter_errors(wrapped), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:10])
        assert FACET_KEY == "metatrail_energy"

    yield validate
