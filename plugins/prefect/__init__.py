"""metatrail for Prefect 3: every flow run and task run recorded, with no change to flow code.

Enable it with ``pip install "metatrail[prefect]"`` and ``PREFECT_PLUGINS_ENABLED=1``. Prefect then loads our
``prefect.plugins`` entry point (:mod:`metatrail.plugins.prefect.hook`) at ``import prefect`` in every process that
imports it: the flow process, thread-pool workers share it, process-pool children and remote workers load it
themselves.

How runs are observed: Prefect's engines report every flow and task run to an OpenTelemetry span (one span per run,
one span event per state change). We wrap the tracer Prefect uses for those spans (:mod:`.tracing`), so each state
change of a run reaches us in the thread that runs it, with the engine's live objects (parameters, task run,
return value) at hand; :mod:`.observer` turns them into Recorder calls. The user's OpenTelemetry setup is never
touched: no global TracerProvider is installed, so a provider the user sets, before or after ``import prefect``,
receives exactly the spans it would receive without us.

Layers: :mod:`.hook` (entry point) → :mod:`.tracing` (OpenTelemetry wrapper) → :mod:`.observer` (run lifecycle →
Recorder); Prefect-version specifics live in :mod:`.compat`, value shaping in :mod:`.values`,
the files that values name in :mod:`.paths`.
"""
