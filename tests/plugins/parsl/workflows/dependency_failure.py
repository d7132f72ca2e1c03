"""Tasks stopped by a failed dependency in the middle of their arguments: ``python dependency_failure.py RESOLVER``.

RESOLVER: ``shallow`` (Parsl's default) or ``deep`` (``DEEP_DEPENDENCY_RESOLVER``: futures inside lists count).
Parsl's DFK drops a failed dependency from the positional arguments before it fails the task, so these calls are
where a description by position would name the arguments wrongly:

* ``after``: ``combine(ok, bad, 3)`` submitted after ``bad`` failed (the task fails at once, inside ``submit``);
* ``pending``: ``combine(ok, slow_bad, 3)`` submitted while ``slow_bad`` still runs;
* ``keyword``: ``combine(ok, b=bad, c=3)`` (the DFK leaves a failed keyword argument as its future);
* ``nested`` (deep only): ``combine([ok, bad], 2, 3)``; with the shallow resolver a list is not a dependency.

Prints ``RESULTS <json>``: each call's outcome, and under ``_tasks`` the Parsl task ids of each call and of its
dependencies, so the test can name what it expects.
"""

from __future__ import annotations

import json
import os
import sys

import parsl
from parsl import python_app
from parsl.config import Config
from parsl.dataflow.dependency_resolvers import DEEP_DEPENDENCY_RESOLVER, SHALLOW_DEPENDENCY_RESOLVER
from parsl.executors import ThreadPoolExecutor

import metatrail.plugins.parsl

HERE = os.getcwd()


@python_app
def ok():
    return 1


@python_app
def bad():
    raise ValueError("no value")


@python_app
def slow_bad():
    import time

    time.sleep(0.5)
    raise ValueError("no value, later")


@python_app
def combine(a, b, c):
    return [a, b, c]


def outcome(future):
    try:
        return future.result()
    except Exception as exc:
        return type(exc).__name__


resolver = sys.argv[1]
config = metatrail.plugins.parsl.track(Config(
    executors=[ThreadPoolExecutor(label="workers", max_threads=2)], run_dir=os.path.join(HERE, "runinfo"),
    dependency_resolver=DEEP_DEPENDENCY_RESOLVER if resolver == "deep" else SHALLOW_DEPENDENCY_RESOLVER))
results, tasks = {}, {}
with parsl.load(config):
    good, failed = ok(), bad()
    outcome(good), outcome(failed)
    calls = {"after": (combine(good, failed, 3), failed)}
    late = slow_bad()
    calls["pending"] = (combine(good, late, 3), late)
    calls["keyword"] = (combine(good, b=failed, c=3), failed)
    if resolver == "deep":
        calls["nested"] = (combine([good, failed], 2, 3), failed)
    for name, (future, dependency) in calls.items():
        results[name] = outcome(future)
        tasks[name] = {"task": future.tid, "ok": good.tid, "failed": dependency.tid}
results["_tasks"] = tasks
print("RESULTS " + json.dumps(results, sort_keys=True), flush=True)
