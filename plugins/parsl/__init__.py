"""metatrail for Parsl: record every app invocation of a Parsl workflow, without touching the apps.

Enable it with one line where the ``Config`` is made::

    import metatrail.plugins.parsl
    config = metatrail.plugins.parsl.track(Config(executors=[...]))

or with no code change at all (see :mod:`metatrail.plugins.parsl.autoload`)::

    python -m metatrail.plugins.parsl my_workflow.py ...      # or: METATRAIL_PARSL=1 with the .pth hook installed

This package is imported inside every HTEX worker (the task wrapper lives here), so it imports nothing heavy:
Parsl and the recorder are imported when :func:`track` runs.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["WORKER_SIDE_ENV", "track", "worker_side_from_environment"]

WORKER_SIDE_ENV = "METATRAIL_PARSL_WORKER_SIDE"


def track(config: Any, *, pipeline: str | None = None, namespace: str | None = None,
          worker_side: bool | None = None) -> Any:
    """Make ``config`` (a ``parsl.Config``) record its workflow runs; returns the same object.

    * ``pipeline``: the pipeline name (default: Parsl's workflow name, the script's name without ``.py``).
    * ``namespace``: the OpenLineage namespace (default: ``METATRAIL_NAMESPACE`` / config file, else ``parsl``).
    * ``worker_side``: record start, end and energy where each task runs (every executor in the config must then
      be able to import ``metatrail`` on its workers); ``False`` records from the DFK only (launch and return
      times). Precedence: this argument when given, else ``METATRAIL_PARSL_WORKER_SIDE`` (on/off, 1/0; how the
      zero-code activation, which cannot pass arguments, is switched), else on.

    The config's memoizer is wrapped (memoization and checkpointing are unchanged) and, worker side, each
    executor's ``submit`` is wrapped on that instance. Calling it twice is harmless. It never raises: if recording
    cannot be set up, the config comes back as it was and the reason is logged once.
    """
    try:
        from metatrail.plugins.parsl import compat
        from metatrail.plugins.parsl.memoizer import TrackingMemoizer, wrap_submit

        if not compat.is_supported():
            from metatrail.logsafe import log_once

            log_once("parsl:version", "metatrail: Parsl %s is not supported (needs %s or later); this workflow runs "
                     "unrecorded", compat.parsl_version(), ".".join(map(str, compat.MINIMUM_VERSION)))
            return config
        if not isinstance(config.memoizer, TrackingMemoizer):
            config.memoizer = TrackingMemoizer(config.memoizer, pipeline=pipeline, namespace=namespace)
        if worker_side if worker_side is not None else worker_side_from_environment():
            for executor in config.executors:
                wrap_submit(executor)
    except Exception as exc:
        try:
            from metatrail.logsafe import log_once

            log_once(f"parsl:track:{type(exc).__name__}", "metatrail: Parsl tracking is off (%s: %s)",
                     type(exc).__name__, exc)
        except Exception:  # even logging is broken: stay silent rather than break the workflow
            pass
    return config


def worker_side_from_environment() -> bool:
    """``METATRAIL_PARSL_WORKER_SIDE`` as a switch: on when unset or empty; a value that is not an on/off word is
    logged once and the default (on) is kept, because a typo must not stop the workflow."""
    from metatrail.config import FALSE_WORDS, TRUE_WORDS

    raw = os.environ.get(WORKER_SIDE_ENV, "")
    word = raw.strip().lower()
    if not word or word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    from metatrail.logsafe import log_once

    log_once(f"parsl:worker-side:{raw}", "metatrail: ignoring %s=%r (valid: %s for worker-side recording, %s to "
             "record from the DFK only); recording on the workers", WORKER_SIDE_ENV, raw,
             "/".join(sorted(TRUE_WORDS)), "/".join(sorted(FALSE_WORDS)))
    return True
