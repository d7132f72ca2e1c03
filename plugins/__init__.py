"""Workflow-manager plugins: one package per host, each a thin translation of host objects into Recorder calls."""
