"""OpenLineage events: our facets (JSON Schemas in ``schemas/``, classes in :mod:`.facets`) and the event builder."""
