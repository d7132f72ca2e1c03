"""Test helper: validate events against the OpenLineage spec (core + standard facets), our own facet schemas, and
Marquez's acceptance rules (the non-null fields and the namespace pattern its ingest enforces).

The spec files are a verbatim copy of OpenLineage's ``spec/`` (see ``data/openlineage-spec/VERSION``), so the tests
run on a clean clone.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource

SPEC = Path(__file__).parent / "data" / "openlineage-spec"
OUR_SCHEMAS = Path(__file__).resolve().parents[1] / "core" / "openlineage" / "schemas"
_SLOTS = {"RunFacet": "run", "JobFacet": "job", "DatasetFacet": "dataset",
          "InputDatasetFacet": "inputFacets", "OutputDatasetFacet": "outputFacets"}


@cache
def _schemas() -> tuple[dict[str, Any], Registry, dict[tuple[str, str], dict[str, Any]]]:
    core = json.loads((SPEC / "OpenLineage.json").read_text())
    resources = [(core["$id"], Resource.from_contents(core))]
    index: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted((SPEC / "facets").glob("*.json")) + sorted(OUR_SCHEMAS.glob("*.json")):
        schema = json.loads(path.read_text())
        resources.append((schema["$id"], Resource.from_contents(schema)))
        for key, prop in schema.get("properties", {}).items():
            defn = schema["$defs"][prop["$ref"].split("/")[-1]] if "$ref" in prop else {}
            for part in defn.get("allOf", []):
                base = part.get("$ref", "").split("/")[-1]
                if base in _SLOTS:
                    index[(_SLOTS[base], key)] = schema
    return core, Registry().with_resources(resources), index


def spec_errors(event: dict[str, Any]) -> list[str]:
    """Every way ``event`` violates the core schema or a known facet schema (standard or ours); [] when valid."""
    core, registry, index = _schemas()
    checker = FormatChecker(formats=["uuid", "date-time"])
    errors = [f"core {e.json_path}: {e.message[:200]}"
              for e in Draft202012Validator(core, registry=registry, format_checker=checker).iter_errors(event)]

    def check(slot: str, facets: dict[str, Any] | None, where: str) -> None:
        for key, facet in (facets or {}).items():
            schema = index.get((slot, key))
            if schema is None:
                if key.startswith("metatrail_"):
                    errors.append(f"{where}.{key}: our facet has no shipped schema")
                continue
            validator = Draft202012Validator(schema, registry=registry, format_checker=checker)
            errors.extend(f"{where}.{key}{e.json_path[1:]}: {e.message[:200]}"
                          for e in validator.iter_errors({key: facet}))

    check("run", (event.get("run") or {}).get("facets"), "run.facets")
    check("job", (event.get("job") or {}).get("facets"), "job.facets")
    for side, extra in (("inputs", "inputFacets"), ("outputs", "outputFacets")):
        for i, ds in enumerate(event.get(side) or []):
            check("dataset", ds.get("facets"), f"{side}[{i}].facets")
            check(extra, ds.get(extra), f"{side}[{i}].{extra}")
    return errors


_NAMESPACE = re.compile(r"^[a-zA-Z:;=/0-9_\-\.@+]{1,1024}$")


def marquez_errors(event: dict[str, Any]) -> list[str]:
    """Reasons Marquez 0.51 would refuse ``event`` (non-null fields, jobType fields, dataset namespace pattern)."""
    problems: list[str] = []

    def need(obj: Any, path: str, *keys: str) -> None:
        for key in keys:
            if not isinstance(obj, dict) or obj.get(key) is None:
                problems.append(f"{path}.{key} must not be null")

    need(event, "$", "eventTime", "producer", "run", "job")
    need(event.get("run"), "run", "runId")
    need(event.get("job"), "job", "namespace", "name")
    facets = (event.get("run") or {}).get("facets") or {}
    for key, facet in facets.items():
        need(facet, f"run.facets.{key}", "_producer", "_schemaURL")
    if "parent" in facets:
        need(facets["parent"].get("run"), "run.facets.parent.run", "runId")
        need(facets["parent"].get("job"), "run.facets.parent.job", "namespace", "name")
    job_type = ((event.get("job") or {}).get("facets") or {}).get("jobType")
    if job_type is not None:
        need(job_type, "job.facets.jobType", "processingType", "integration", "jobType")
    for side in ("inputs", "outputs"):
        for i, ds in enumerate(event.get(side) or []):
            need(ds, f"{side}[{i}]", "namespace", "name")
            if isinstance(ds.get("name"), str) and not ds["name"].strip():
                problems.append(f"{side}[{i}].name is blank")
            if isinstance(ds.get("namespace"), str) and not _NAMESPACE.match(ds["namespace"]):
                problems.append(f"{side}[{i}].namespace {ds['namespace']!r} fails Marquez's namespace pattern")
    return problems


def assert_valid(event: dict[str, Any]) -> None:
    """Fail with every problem listed when ``event`` is not spec-valid or Marquez would refuse it."""
    problems = spec_errors(event) + marquez_errors(event)
    assert not problems, "invalid OpenLineage event:\n  " + "\n  ".join(problems)
