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

from typing import Any

__all__ = ["track"]


def track(config: Any, *, pipeline: str | None = None, namespace: str | None = None,
          worker_side: bool = True) -> Any:
    """Make ``config`` (a ``parsl.Config``) record its workflow runs; returns the same object.

    * ``pipeline``: the pipeline name (default: Parsl's workflow name, the script's name without ``.py``).
    * ``namespace``: the OpenLineage namespace (default: ``METATRAIL_NAMESPACE`` / config file, else ``parsl``).
    * ``worker_side``: record start, end and energy where each task runs (every executor in the config must then
      be able to import ``metatrail`` on its workers); ``False`` records from the DFK only (launch and return
      times).

    The config's memoizer is wrapped (memoization and checkpointing are unchanged) and each executor's ``submit``
    is wrapped on that instance. Calling it twice is harmless. It never raises: if recording cannot be set up,
    the config comes back as it was and the reason is logged once.
    """
    try:
        from metatrail.plugins.parsl.memoizer import TrackingMemoizer, wrap_submit

        if not isinstance(config.memoizer, TrackingMemoizer):
            config.memoizer = TrackingMemoizer(config.memoizer, pipeline=pipeline, namespace=namespace)
        if worker_side:
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
