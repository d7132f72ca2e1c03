"""HTEX workers in an environment without metatrail: ``python -m metatrail.plugins.parsl worker_env.py DIR``.

The provider's ``worker_init`` (where a cluster job loads its modules or activates its environment) puts ``DIR`` first
on the workers' ``PYTHONPATH``; ``workflows/without_metatrail`` there makes ``import metatrail`` fail in the workers
only. The script never mentions metatrail: the zero-code runner tracks it.

Prints ``RESULTS <json>``: what each app returned, or the name of its exception.
"""

from __future__ import annotations

import json
import os
import shlex
import sys

import parsl
from parsl import File, python_app
from parsl.config import Config
from parsl.executors import HighThroughputExecutor
from parsl.providers import LocalProvider

HERE = os.getcwd()


@python_app
def double(x):
    return 2 * x


@python_app
def write(n, outputs=()):
    with open(outputs[0].filepath, "w") as fh:
        fh.write("".join(f"{i}\n" for i in range(n)))
    return n


def outcome(future):
    try:
        return future.result()
    except Exception as exc:
        return type(exc).__name__


config = Config(
    executors=[HighThroughputExecutor(
        label="workers", max_workers_per_node=2, cores_per_worker=1,
        provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1,
                               worker_init=f"export PYTHONPATH={shlex.quote(sys.argv[1])}"))],
    run_dir=os.path.join(HERE, "runinfo"), strategy="none")
with parsl.load(config):
    doubles = [double(i) for i in range(3)]
    written = write(5, outputs=[File(os.path.join(HERE, "out.txt"))])
    results = {"double": [outcome(d) for d in doubles], "write": outcome(written)}
print("RESULTS " + json.dumps(results, sort_keys=True), flush=True)
