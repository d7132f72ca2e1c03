"""metatrail's custom OpenLineage facets, as ``openlineage-python`` classes.

Spec first: each class mirrors a JSON Schema shipped in ``schemas/`` (tests validate every event we emit against
those schemas and the OpenLineage spec). Naming follows the custom-facet rules: class ``Metatrail{Name}{Entity}Facet``,
event key ``metatrail_{name}``, ``_schemaURL`` an immutable URL (a release tag) with a JSON pointer to the definition.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import attr
from openlineage.client.generated.base import DatasetFacet, RunFacet

from metatrail.openlineage.names import PRODUCER, SCHEMA_BASE, schema_url


def load_schema(name: str) -> dict[str, Any]:
    """The shipped JSON Schema document of facet ``name``."""
    text = resources.files("metatrail.openlineage").joinpath("schemas", f"{name}.json").read_text("utf-8")
    result: dict[str, Any] = json.loads(text)
    return result


@attr.define
class MetatrailExecutionRunFacet(RunFacet):
    """Identity, parameters and context of one execution or pipeline run (key ``metatrail_execution``)."""

    pipeline: str
    kind: str
    site: str
    integration: str
    stage: str | None = attr.field(default=None)
    host: str | None = attr.field(default=None)
    user: str | None = attr.field(default=None)
    pid: int | None = attr.field(default=None)
    integrationVersion: str | None = attr.field(default=None)
    tryNumber: int | None = attr.field(default=None)
    params: dict[str, Any] = attr.field(factory=dict)
    codeVersion: dict[str, Any] | None = attr.field(default=None)
    exitCode: int | None = attr.field(default=None)
    durationSeconds: float | None = attr.field(default=None)
    warnings: list[str] = attr.field(factory=list)
    extra: dict[str, Any] = attr.field(factory=dict)
    metrics: dict[str, Any] = attr.field(factory=dict)

    @staticmethod
    def _get_schema() -> str:
        return schema_url("MetatrailExecutionRunFacet")


@attr.define
class MetatrailArtifactDatasetFacet(DatasetFacet):
    """Content identity of an artifact (key ``metatrail_artifact``); ``hash`` null means ``hashError`` says why."""

    uri: str
    kind: str
    algorithm: str | None
    hash: str | None
    size: int | None = attr.field(default=None)
    nfiles: int | None = attr.field(default=None)
    hashError: str | None = attr.field(default=None)

    @staticmethod
    def _get_schema() -> str:
        return schema_url("MetatrailArtifactDatasetFacet")


@attr.define
class MetatrailEnergyRunFacet(RunFacet):
    """Energy and carbon of one execution (key ``metatrail_energy``); the body comes from the energy monitor."""

    @staticmethod
    def _get_schema() -> str:
        return schema_url("MetatrailEnergyRunFacet")


__all__ = ["PRODUCER", "SCHEMA_BASE", "MetatrailArtifactDatasetFacet", "MetatrailEnergyRunFacet",
           "MetatrailExecutionRunFacet", "load_schema", "schema_url"]
