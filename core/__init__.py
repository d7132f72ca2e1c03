"""metatrail: implicit, federated metadata for workflows.

Enable a plugin in your workflow manager (Airflow, Prefect, Snakemake, Parsl) or wrap a script, and every task
execution is recorded with its identity, parameters, input/output content hashes, lineage and energy, as OpenLineage
events in a durable local store.

This module stays light: importing it imports no workflow manager, FastAPI, torch or pandas, and reads no config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "execution", "get_recorder", "pipeline_run"]

if TYPE_CHECKING:
    from metatrail.recorder import Recorder


def get_recorder() -> Recorder:
    """The process-wide Recorder (created on first use, configured from the environment)."""
    from metatrail.recorder import get_recorder as _get

    return _get()


def execution(*args: Any, **kwargs: Any) -> Any:
    """Context manager recording one execution; see :func:`metatrail.api.execution`."""
    from metatrail.api import execution as _execution

    return _execution(*args, **kwargs)


def pipeline_run(*args: Any, **kwargs: Any) -> Any:
    """Context manager recording one pipeline run; see :func:`metatrail.api.pipeline_run`."""
    from metatrail.api import pipeline_run as _pipeline_run

    return _pipeline_run(*args, **kwargs)
