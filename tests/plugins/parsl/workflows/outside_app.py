"""HTEX tries that fail outside the app body: ``python outside_app.py``.

* ``die`` ends its worker process on its first try (``os._exit``, as a segfault or the OOM killer would); Parsl
  retries it (``retries=1``) and the second try succeeds.
* ``generator`` returns a generator: its body succeeds, but the result cannot be sent back, so Parsl fails the task.

Prints ``RESULTS <json>``.
"""

from __future__ import annotations

import json
import os

import parsl
from parsl import python_app
from parsl.config import Config
from parsl.executors import HighThroughputExecutor
from parsl.providers import LocalProvider

import metatrail.plugins.parsl

HERE = os.getcwd()


@python_app
def die(marker, x=1):
    import os

    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(9)
    return "survived"


@python_app
def generator(n):
    return (i for i in range(n))


config = metatrail.plugins.parsl.track(Config(
    executors=[HighThroughputExecutor(label="workers", max_workers_per_node=1, cores_per_worker=1,
                                      provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1))],
    retries=1, run_dir=os.path.join(HERE, "runinfo")))
results = {}
with parsl.load(config):
    results["die"] = die(os.path.join(HERE, "died.marker"), x=42).result()
    try:
        generator(3).result()
    except Exception as exc:
        results["generator"] = type(exc).__name__
print("RESULTS " + json.dumps(results, sort_keys=True), flush=True)
