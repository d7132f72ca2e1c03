"""Settings of the Snakemake logger plugin: ``--logger-metatrail-<field>`` options, or the environment variables
``SNAKEMAKE_LOGGER_METATRAIL_<FIELD>``; both override metatrail's own configuration (``METATRAIL_*``, config file).

This module deliberately has no ``from __future__ import annotations``: Snakemake builds its command line from the
field types at run time, and string annotations break that. Each field names its ``type`` in its metadata because
Snakemake's option parser understands ``typing.Optional`` but not ``X | None``.

It lives in the module Snakemake discovers, not in :mod:`metatrail.plugins.snakemake`, and imports nothing of
metatrail: Snakemake builds its command line (and reads profiles) from these fields before any record is logged, so
they must exist even when metatrail cannot be imported, or a run given ``--logger-metatrail-*`` options would stop at
its start with an unknown-argument error instead of running unrecorded.
"""

from dataclasses import dataclass, field

from snakemake_interface_logger_plugins.settings import LogHandlerSettingsBase


@dataclass
class LogHandlerSettings(LogHandlerSettingsBase):
    """Options of ``--logger metatrail``; each one unset means: use metatrail's own configuration."""

    store: str | None = field(
        default=None,
        metadata={
            "help": "Store URL to record into (default: METATRAIL_STORE, else .metatrail/metatrail.db found upward "
                    "from the working directory, created there if none).",
            "env_var": True,
            "type": str,
        },
    )
    pipeline: str | None = field(
        default=None,
        metadata={
            "help": "Pipeline name (default: the Snakefile's directory name, or its stem for a named .smk file).",
            "env_var": True,
            "type": str,
        },
    )
    namespace: str | None = field(
        default=None,
        metadata={
            "help": "OpenLineage job namespace (default: METATRAIL_NAMESPACE, else 'snakemake').",
            "env_var": True,
            "type": str,
        },
    )
    flush_timeout: float | None = field(
        default=None,
        metadata={
            "help": "Seconds Snakemake may wait at its end for pending records to be stored "
                    "(default: METATRAIL_FLUSH_TIMEOUT, else 30).",
            "env_var": True,
            "type": float,
        },
    )
