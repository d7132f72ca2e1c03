"""metatrail for Snakemake: a logger plugin that records every job of a run, with no change to the workflow.

Enable it with ``snakemake --logger metatrail`` (or ``logger: [metatrail]`` in a profile). Snakemake finds it as
the module ``snakemake_logger_plugin_metatrail``, a shim over :mod:`metatrail.plugins.snakemake.handler`; options are
``--logger-metatrail-<name>`` (see :mod:`metatrail.plugins.snakemake.settings`). Importing this package imports
neither Snakemake nor the Recorder.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LogHandler", "LogHandlerSettings"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing the package (for instance to read its docstring) stays free of Snakemake imports.
    if name == "LogHandler":
        from metatrail.plugins.snakemake.handler import LogHandler

        return LogHandler
    if name == "LogHandlerSettings":
        from metatrail.plugins.snakemake.settings import LogHandlerSettings

        return LogHandlerSettings
    raise AttributeError(name)
