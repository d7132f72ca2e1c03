"""SIGTERM in multiprocessing children: a worker that ``Pool.__exit__`` (or ``terminate()``) ends stores what it
recorded first, and still ends killed by SIGTERM; a process's own SIGTERM handler is kept; other processes are left
alone. Each scenario runs in a fresh interpreter with its own store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from metatrail.store import open_store

# The parent installs a Recorder that lingers 30 s for company before it stores a batch: only a flush stores a
# worker's events before SIGTERM ends it, so without one they are all lost.
PRELUDE = """
import json, multiprocessing as mp, os, signal, sys, time
from metatrail import recorder as rm
rm._recorder = rm.Recorder(linger_s=30.0)

def warm_up():
    # What a fresh process's writer does once before it stores anything: import the modules it builds and stores
    # with, open the store (creating it). Done before the tasks, so the SIGTERM budget (SIGTERM_FLUSH_S, for
    # storing what was recorded) is not spent on a new interpreter's imports: on a loaded 2-core machine they alone
    # took 1.85 s of the 2 s in a worker that forkserver or spawn started.
    rm.get_recorder()._import_writer_modules()

def record(i):
    rec = rm.get_recorder()
    execution = rec.execution_started("pool", "square", params={"i": i})
    rec.execution_finished(execution)
    return i * i
"""

POOL = PRELUDE + """
if __name__ == "__main__":
    with mp.get_context(sys.argv[1]).Pool(2, initializer=warm_up) as pool:
        print(json.dumps(pool.map(record, range(10))))
"""

TERMINATED = PRELUDE + """
def child(ready, own_handler, marker):
    def handler(signum, frame):
        open(marker, "w").write("handled")
        time.sleep(0.5)  # longer than the watch thread would leave SIGTERM to the main thread
        os._exit(3)
    if own_handler == "own":
        signal.signal(signal.SIGTERM, handler)
    warm_up()
    record(7)
    if own_handler == "own-later":  # set after metatrail set its own: the program's, from then on
        signal.signal(signal.SIGTERM, handler)
    ready.set()
    time.sleep(60)

if __name__ == "__main__":
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    p = ctx.Process(target=child, args=(ready, sys.argv[1], sys.argv[2]))
    p.start()
    assert ready.wait(60)
    p.terminate()
    p.join(60)
    print(json.dumps({"exitcode": p.exitcode}))
"""

# The child is inside the Recorder's lock when SIGTERM comes, as a worker that had begun its exit flush (the pool's
# sentinel came first) is when terminate() catches it: the handler must still let the writer store.
IN_LOCK = PRELUDE + """
def child(ready):
    warm_up()
    record(7)
    with rm.get_recorder()._cv:
        ready.set()
        time.sleep(60)

if __name__ == "__main__":
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    p = ctx.Process(target=child, args=(ready,))
    p.start()
    assert ready.wait(60)
    p.terminate()
    p.join(60)
    print(json.dumps({"exitcode": p.exitcode}))
"""

# The child's main thread is where no Python signal handler can run: in C code that lets go of the GIL and runs
# none (a numerical library, a database driver's wait; here a key derivation of minutes), or passed over by the
# kernel for another thread while it waits for a lock (here it blocks SIGTERM itself, so the kernel must pass it
# over; a pool's idle worker waited so for its next task, and the pool's terminate() waited for it for ever).
STUCK = PRELUDE + """
import hashlib

def child(ready, how, held):
    warm_up()
    record(7)
    if how == "c-code":
        ready.set()
        hashlib.pbkdf2_hmac("sha256", b"p", b"s", 2_000_000_000)  # minutes; C's int holds no more
    else:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        ready.set()
        held.acquire()

if __name__ == "__main__":
    ctx = mp.get_context("fork")
    ready, held = ctx.Event(), ctx.Lock()
    held.acquire()
    p = ctx.Process(target=child, args=(ready, sys.argv[1], held))
    p.start()
    assert ready.wait(60)
    p.terminate()
    p.join(60)
    if p.is_alive():
        p.kill()
    print(json.dumps({"exitcode": p.exitcode}))
"""

# A child that records forks grandchildren that do not; SIGTERM ends each grandchild and only it, also one that it
# reaches while the fork is still under way (terminated at once).
GRANDCHILD = PRELUDE + """
def grandchild():
    time.sleep(60)

def child(out):
    warm_up()
    record(7)
    codes = []
    for wait in (0.5, 0, 0, 0, 0, 0, 0, 0, 0, 0):
        g = mp.get_context("fork").Process(target=grandchild)
        g.start()
        time.sleep(wait)
        g.terminate()
        g.join(60)
        codes.append(g.exitcode)
    time.sleep(1.0)  # what the child's SIGTERM watch would wait before it ended the child
    out.put(sorted(set(codes)))

if __name__ == "__main__":
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    p = ctx.Process(target=child, args=(out,))
    p.start()
    grandchild_exit = out.get(timeout=60)
    p.join(60)
    print(json.dumps({"child": p.exitcode, "grandchild": grandchild_exit}))
"""

PLAIN = """
import json, signal
from metatrail.recorder import get_recorder
rec = get_recorder()
rec.execution_finished(rec.execution_started("plain", "step"))
print(json.dumps({"default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "stored": rec.flush(60)}))
"""


def _run(tmp_path: Path, script: str, *args: str) -> dict[str, object] | list[int]:
    env = {**os.environ, "METATRAIL_STORE": f"sqlite:///{tmp_path / 'store.db'}",
           "METATRAIL_HASH_CACHE": str(tmp_path / "hc.db"), "METATRAIL_ENERGY": "0"}
    env.pop("METATRAIL_DISABLED", None)
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(script))
    done = subprocess.run([sys.executable, str(path), *args], env=env, capture_output=True, text=True, timeout=180,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result: dict[str, object] | list[int] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _stored(tmp_path: Path) -> list[tuple[str | None, str | None]]:
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        return sorted((e.body.get("eventType"), e.body["job"]["name"]) for e in store.iter_events())
    finally:
        store.close()


@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_workers_of_a_pool_left_as_a_context_manager_store_their_events(tmp_path: Path, start_method: str) -> None:
    assert _run(tmp_path, POOL, start_method) == [i * i for i in range(10)]  # results unchanged
    assert _stored(tmp_path) == [("COMPLETE", "pool.square")] * 10 + [("START", "pool.square")] * 10


def test_a_terminated_child_stores_its_events_and_still_dies_of_sigterm(tmp_path: Path) -> None:
    assert _run(tmp_path, TERMINATED, "default", str(tmp_path / "marker")) == {"exitcode": -signal.SIGTERM}
    assert _stored(tmp_path) == [("COMPLETE", "pool.square"), ("START", "pool.square")]


def test_a_child_that_sigterm_catches_inside_the_recorders_lock_stores_its_events(tmp_path: Path) -> None:
    assert _run(tmp_path, IN_LOCK) == {"exitcode": -signal.SIGTERM}
    assert _stored(tmp_path) == [("COMPLETE", "pool.square"), ("START", "pool.square")]


@pytest.mark.parametrize("how", ["c-code", "signal-on-another-thread"])
def test_a_child_whose_main_thread_cannot_run_the_handler_stores_its_events_and_dies_of_sigterm(
        tmp_path: Path, how: str) -> None:
    assert _run(tmp_path, STUCK, how) == {"exitcode": -signal.SIGTERM}
    assert _stored(tmp_path) == [("COMPLETE", "pool.square"), ("START", "pool.square")]


def test_sigterm_to_a_forked_grandchild_ends_it_and_not_the_child_that_forked_it(tmp_path: Path) -> None:
    assert _run(tmp_path, GRANDCHILD) == {"child": 0, "grandchild": [-signal.SIGTERM]}
    assert _stored(tmp_path) == [("COMPLETE", "pool.square"), ("START", "pool.square")]


@pytest.mark.parametrize("when", ["own", "own-later"])
def test_a_childs_own_sigterm_handler_is_kept(tmp_path: Path, when: str) -> None:
    marker = tmp_path / "marker"
    assert _run(tmp_path, TERMINATED, when, str(marker)) == {"exitcode": 3}
    assert marker.read_text() == "handled"


def test_a_process_that_is_not_a_multiprocessing_child_keeps_the_default_action(tmp_path: Path) -> None:
    assert _run(tmp_path, PLAIN) == {"default": True, "stored": True}
