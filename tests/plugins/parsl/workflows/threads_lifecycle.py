"""ThreadPool workflows for what happens around a DFK's cleanup: ``python threads_lifecycle.py CASE``.

CASE:

* ``slow-hash``: the last tasks read input Files whose hashing (on the Recorder's writer) is still under way when
  the DFK cleans up, with a call cap (``METATRAIL_TIMEOUT``) far shorter than that; their events must still be
  stored before the process exits.
* ``cycles``: ``parsl.load`` ... cleanup five times in one process (a notebook, a service, a test suite); no
  recorder of an ended run may stay registered.
* ``odd-args``: an argument whose ``__getattr__`` raises KeyError (``AttrDict``, a common idiom).

Prints ``RESULTS <json>``.
"""

from __future__ import annotations

import gc
import json
import os
import sys

import parsl
from parsl import File, python_app
from parsl.config import Config
from parsl.executors import ThreadPoolExecutor

import metatrail.plugins.parsl
from metatrail.plugins.parsl import worker

HERE = os.getcwd()
BIG_FILE_MB = 48


class AttrDict(dict):
    """A dict read by attribute: ``__getattr__`` raises KeyError, not AttributeError, for a missing name."""

    __getattr__ = dict.__getitem__


@python_app
def size(inputs=()):
    import os

    return os.path.getsize(inputs[0].filepath)


@python_app
def learning_rate(cfg):
    return cfg.lr


def config() -> Config:
    return metatrail.plugins.parsl.track(Config(executors=[ThreadPoolExecutor(label="threads", max_threads=3)],
                                                run_dir=os.path.join(HERE, "runinfo")))


def slow_hash() -> dict:
    paths = []
    for i in range(3):
        path = os.path.join(HERE, f"big{i}.bin")
        with open(path, "wb") as fh:
            for _ in range(BIG_FILE_MB):
                fh.write(os.urandom(1 << 20))
        paths.append(path)
    with parsl.load(config()):
        sizes = [size(inputs=[File(p)]).result() >> 20 for p in paths]
    return {"sizes": sizes}


def cycles() -> dict:
    from metatrail.recorder import Recorder

    for i in range(5):
        with parsl.load(config()):
            learning_rate(AttrDict(lr=i)).result()
    gc.collect()
    recorders = [o for o in gc.get_objects() if isinstance(o, Recorder)]
    return {"registered": len(worker._LOCAL_RECORDERS), "open": sum(not r._closed for r in recorders)}


def odd_args() -> dict:
    with parsl.load(config()):
        return {"lr": learning_rate(AttrDict(lr=0.5)).result()}


if __name__ == "__main__":
    result = {"slow-hash": slow_hash, "cycles": cycles, "odd-args": odd_args}[sys.argv[1]]()
    print("RESULTS " + json.dumps(result, sort_keys=True), flush=True)
