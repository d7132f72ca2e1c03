"""The names events carry: our producer and facet schema URLs, and the OpenLineage spec's, as plain constants.

Building an event needs only these strings, so the recording path never imports ``openlineage-python`` (its client
package loads every transport: about half a second of CPU in each process that records, the Recorder's writer
process included). ``tests/olreference.py`` builds the same events with openlineage-python's classes, and tests hold
the two equal and these URLs equal to the classes' own.
"""

from __future__ import annotations

SCHEMA_BASE = "https://raw.githubusercontent.com/metatrail/metatrail/v0.1.0/core/openlineage/schemas/"
PRODUCER = "https://github.com/metatrail/metatrail/tree/v0.1.0"

RUN_EVENT_SCHEMA = "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent"
RUN_STATES = frozenset({"START", "RUNNING", "COMPLETE", "ABORT", "FAIL", "OTHER"})

_SPEC_FACETS = "https://openlineage.io/spec/facets/"
# facet class -> the spec version openlineage-python's class of that name declares
SPEC_FACET_VERSIONS = {
    "ProcessingEngineRunFacet": "1-1-1",
    "JobTypeJobFacet": "2-0-4",
    "ParentRunFacet": "1-2-0",
    "ErrorMessageRunFacet": "1-0-1",
    "DatasetVersionDatasetFacet": "1-0-1",
    "OutputStatisticsOutputDatasetFacet": "1-0-2",
}


def schema_url(name: str) -> str:
    """The ``_schemaURL`` of our facet ``name``."""
    return f"{SCHEMA_BASE}{name}.json#/$defs/{name}"


def spec_facet_url(name: str) -> str:
    """The ``_schemaURL`` of the OpenLineage spec facet ``name`` (one of :data:`SPEC_FACET_VERSIONS`)."""
    return f"{_SPEC_FACETS}{SPEC_FACET_VERSIONS[name]}/{name}.json#/$defs/{name}"
