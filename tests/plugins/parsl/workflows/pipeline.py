"""A Parsl workflow the Parsl plugin tests run as a user would: ``python pipeline.py EXECUTOR MODE [PHASES]``.

EXECUTOR: ``threads`` (ThreadPoolExecutor) or ``htex`` (HighThroughputExecutor, local provider, 2 workers).
MODE: ``track`` (``metatrail.plugins.parsl.track(config)``), ``track-dfk`` (the same with ``worker_side=False``) or
``plain`` (the config as the user wrote it; the
zero-code runner and the ``.pth`` hook use this). PHASES: ``all`` (default) or ``cached`` (only the memoized app:
a rerun that reuses the checkpoint of an earlier run in the same directory).

Each phase waits for the one before, so Parsl task ids are the same in every run (golden files rely on it). The last
line printed is ``RESULTS <json>``: what the apps returned, so tests can compare runs with and without the plugin.
"""

from __future__ import annotations

import json
import os
import sys

import parsl
from parsl import File, join_app, python_app
from parsl.config import Config
from parsl.dataflow.memoization import BasicMemoizer
from parsl.executors import HighThroughputExecutor, ThreadPoolExecutor
from parsl.providers import LocalProvider
from parsl.utils import get_all_checkpoints

HERE = os.getcwd()


@python_app
def square(x):
    return x * x


@python_app
def total(*values):
    return sum(values)


@python_app
def generate(n, outputs=()):
    with open(outputs[0].filepath, "w") as fh:
        fh.write("".join(f"{i}\n" for i in range(n)))
    return n


@python_app
def transform(factor, inputs=(), outputs=()):
    with open(inputs[0].filepath) as src, open(outputs[0].filepath, "w") as dst:
        for line in src:
            dst.write(f"{int(line) * factor}\n")
    return factor


@python_app
def summarise(inputs=(), outputs=()):
    with open(inputs[0].filepath) as src:
        value = sum(int(line) for line in src)
    with open(outputs[0].filepath, "w") as dst:
        dst.write(f"{value}\n")
    return value


@python_app
def flaky(marker):
    # fails on its first try, succeeds on the retry: the marker file remembers the first try
    import os  # apps from __main__ travel to HTEX workers by value, without this module's imports

    if not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError("first try fails")
    return "recovered"


@python_app
def always_fails(code):
    raise ValueError(f"bad input {code}")


@python_app
def downstream(value):
    return value


@join_app
def sum_of_squares(n):
    return total(*[square(i) for i in range(n)])


@python_app(cache=True)
def cached(x, log=None):
    # the log file counts real executions: a memo hit does not run this body
    with open(log, "a") as fh:
        fh.write(f"{x}\n")
    return x + 100


def config(executor: str) -> Config:
    if executor == "threads":
        executors = [ThreadPoolExecutor(label="workers", max_threads=2)]
    else:
        executors = [HighThroughputExecutor(
            label="workers", max_workers_per_node=2, cores_per_worker=1, heartbeat_period=2,
            heartbeat_threshold=10, provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1))]
    run_dir = os.path.join(HERE, "runinfo")
    memoizer = BasicMemoizer(checkpoint_mode="task_exit",
                             checkpoint_files=get_all_checkpoints(run_dir) if os.path.isdir(run_dir) else None)
    return Config(executors=executors, retries=1, run_dir=run_dir, memoizer=memoizer, strategy="none")


def outcome(future):
    try:
        return future.result()
    except Exception as exc:
        return f"{type(exc).__name__}"


def main(executor: str, mode: str, phases: str) -> dict:
    cfg = config(executor)
    if mode in ("track", "track-dfk"):
        import metatrail.plugins.parsl

        cfg = metatrail.plugins.parsl.track(cfg, worker_side=mode == "track")
    results: dict = {}
    log = os.path.join(HERE, "cached.log")
    with parsl.load(cfg):
        if phases == "all":
            squares = [square(i) for i in range(3)]
            results["total"] = total(*squares).result()
            results["squares"] = [s.result() for s in squares]

            raw = generate(5, outputs=[File(os.path.join(HERE, "raw.txt"))])
            mid = transform(3, inputs=[raw.outputs[0]], outputs=[File(os.path.join(HERE, "mid.txt"))])
            final = summarise(inputs=[mid.outputs[0]], outputs=[File(os.path.join(HERE, "final.txt"))])
            results["final"] = final.result()

            results["flaky"] = outcome(flaky(os.path.join(HERE, "flaky.marker")))
            bad = always_fails(7)
            results["bad"] = outcome(bad)
            results["downstream"] = outcome(downstream(bad))
            results["join"] = outcome(sum_of_squares(3))
            results["cached_first"] = cached(1, log=log).result()
        results["cached_again"] = cached(1, log=log).result()
    with open(log) as fh:
        results["cached_executions"] = len(fh.read().split())
    return results


if __name__ == "__main__":
    args = sys.argv[1:] + ["all"] * (3 - len(sys.argv[1:]))
    out = main(args[0], args[1], args[2])
    print("RESULTS " + json.dumps(out, sort_keys=True), flush=True)
