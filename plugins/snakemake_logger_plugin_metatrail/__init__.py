"""The module Snakemake discovers for ``--logger metatrail``: a shim over :mod:`metatrail.plugins.snakemake`.

Snakemake imports every ``snakemake_logger_plugin_*`` package whenever it builds its command line (in job
subprocesses too), and an exception here would stop Snakemake itself. So this import must never fail: when the
plugin cannot be imported, a handler that records nothing takes its place and says why, once, when it is used.
The settings come from this package's own :mod:`~snakemake_logger_plugin_metatrail.settings`, which needs nothing
of metatrail, so a run given ``--logger-metatrail-*`` options still starts when metatrail is broken.
"""

import logging

from snakemake_interface_logger_plugins.base import LogHandlerBase
from snakemake_logger_plugin_metatrail.settings import LogHandlerSettings  # metatrail-free: options always parse

__all__ = ["LogHandler", "LogHandlerSettings"]

try:
    from metatrail.plugins.snakemake.handler import LogHandler
except Exception as _import_error:
    _IMPORT_ERROR: Exception = _import_error

    class LogHandler(LogHandlerBase):  # type: ignore[no-redef]
        """Stands in for the metatrail handler when it cannot be imported: records nothing, disturbs nothing."""

        def __post_init__(self) -> None:
            if not hasattr(self, "filters"):
                logging.Handler.__init__(self)
            self._warned = False

        def emit(self, record: logging.LogRecord) -> None:
            """Say once (on the ``metatrail`` logger) that nothing is recorded, and why."""
            if not self._warned:
                self._warned = True
                logging.getLogger("metatrail").warning(
                    "metatrail: the Snakemake plugin could not be imported (%s: %s); this run is not recorded, "
                    "the workflow is not affected. Reinstall with: pip install 'metatrail[snakemake]'",
                    type(_IMPORT_ERROR).__name__, _IMPORT_ERROR)

        writes_to_stream = property(lambda self: False, doc="Never writes to the console.")
        writes_to_file = property(lambda self: False, doc="Never writes a log file.")
        has_filter = property(lambda self: True, doc="No default filter needed.")
        has_formatter = property(lambda self: True, doc="No formatter needed.")
        needs_rulegraph = property(lambda self: False, doc="No rule graph needed.")
