"""The ``prefect.plugins`` entry point.

With ``PREFECT_PLUGINS_ENABLED=1`` Prefect calls :func:`setup_environment` at the end of ``import prefect`` in every
process (flow processes, process-pool children, workers, the CLI, the API server). It installs the run observer
(:func:`metatrail.plugins.prefect.tracing.install`), which costs a few milliseconds and reads no file: settings,
the store and the energy meter are opened on the first run only. It returns no environment changes, never raises,
and does nothing under ``METATRAIL_DISABLED=1``.
"""

from __future__ import annotations

from typing import Any

from metatrail.logsafe import log_once
from metatrail.plugins.prefect.compat import register_hook

# The plugin-API versions we implement (``prefect.plugins`` checks it before registering us).
PREFECT_PLUGIN_API_REQUIRES = ">=0.1,<1"


@register_hook
def setup_environment(*, ctx: Any) -> None:
    """Install the flow/task run observer in this process; returns no environment changes."""
    try:
        from metatrail.config import is_disabled

        if is_disabled():
            return None
        from metatrail.plugins.prefect import tracing

        tracing.install()
    except Exception as exc:  # the plugin must never stop ``import prefect``
        log_once("prefect-setup", "metatrail: Prefect plugin not installed (%s: %s); flows run unrecorded",
                 type(exc).__name__, exc)
    return None
