"""Settings of the Snakemake logger plugin (``--logger-metatrail-<field>``, ``SNAKEMAKE_LOGGER_METATRAIL_<FIELD>``).

Defined in the module Snakemake discovers (:mod:`snakemake_logger_plugin_metatrail.settings`, which says why) and
named here too, beside the handler that reads them.
"""

from snakemake_logger_plugin_metatrail.settings import LogHandlerSettings

__all__ = ["LogHandlerSettings"]
