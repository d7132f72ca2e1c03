"""A workflow that leaves Parsl while an app still runs: ``python abort.py``.

One HTEX worker runs a short app (so its recorder is warm), then an app that would sleep for a minute; once that app
has started, the script leaves the ``with parsl.load()`` block, so Parsl cleans up and its provider terminates the
worker with SIGTERM. Prints ``RESULTS <json>``.
"""

from __future__ import annotations

import json
import os
import time

import parsl
from parsl import python_app
from parsl.config import Config
from parsl.executors import HighThroughputExecutor
from parsl.providers import LocalProvider

import metatrail.plugins.parsl

HERE = os.getcwd()


@python_app
def quick():
    return "quick"


@python_app
def sleeper(marker):
    import time

    open(marker, "w").close()
    time.sleep(60)
    return "woke up"


config = metatrail.plugins.parsl.track(Config(
    executors=[HighThroughputExecutor(label="workers", max_workers_per_node=1, cores_per_worker=1,
                                      provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1))],
    run_dir=os.path.join(HERE, "runinfo"), strategy="none"))
marker = os.path.join(HERE, "sleeper.started")
t0 = time.monotonic()
with parsl.load(config):
    results = {"quick": quick().result()}
    sleeping = sleeper(marker)
    while not os.path.exists(marker):
        time.sleep(0.1)
    time.sleep(1.0)  # the START event is written; the task is in its sleep
results["sleeper_done"] = sleeping.done()
print("RESULTS " + json.dumps(results, sort_keys=True), flush=True)
