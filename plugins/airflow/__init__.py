"""metatrail for Apache Airflow 3.2 and later: record every DAG run and task-instance try, with no change to DAG code.

Enabled by installing ``metatrail[airflow]`` (the ``airflow.plugins`` entry point loads :mod:`.plugin`); disabled by
``METATRAIL_DISABLED=1`` or ``[metatrail] disabled = True`` in ``airflow.cfg``. Modules: :mod:`.plugin` (the
``AirflowPlugin``), :mod:`.listener` (hooks → Recorder calls), :mod:`.adapter` (ids, parameters, datasets),
:mod:`.config` (the ``[metatrail]`` section), :mod:`.compat` (Airflow versions); the hard time cap is
:mod:`metatrail.boundedcall`, shared with the Prefect plugin.

Importing this package imports no Airflow module; :mod:`.plugin` does, and only Airflow imports it.
"""
