"""The Recorder's writer process: builds and stores events outside the host's interpreter.

Why: a host that runs many short tasks in one Python process (a Parsl thread pool, a Prefect flow, ``airflow dags
test``) is bound by its GIL. Building an event and writing it to the store is Python code; on a writer *thread* it
competes with the host's own threads for the GIL, and on sub-millisecond tasks that shows in the host's wall clock.
In a child process it does not: what stays on the host is capturing the task (as before) and pickling the captured
items to a pipe, about a tenth of the work.

Contract:

* :meth:`WriterProcess.start` spawns ``python -m metatrail.writerproc`` (the host's own interpreter) in a new session
  (a Ctrl-C meant for the host does not stop it mid-write) and returns ``None`` when that is not possible; the
  Recorder then goes on writing on its thread.
* :meth:`WriterProcess.send` hands over one batch of the Recorder's items; ``False`` means nothing was sent and the
  caller must write the batch itself. A batch counts as done only when the child acknowledges that it is stored
  (``on_done``), so ``Recorder.flush`` keeps its meaning.
* If the child dies, the batches it had not acknowledged go back to the caller (``on_lost``, in order), which
  writes them on its thread: nothing is lost, and an event written twice is stored once (the store is idempotent).
* When the host exits (or calls :meth:`close`), the child reads to the end of the pipe, stores what is left, and
  exits: events submitted just before a crash of the host are still stored (with no host left to acknowledge to,
  the child stops acknowledging, not storing). :meth:`close` never waits for a stalled child.
* The child only stores. Energy reports are made by the host (its meter) before a batch is sent; shipping to a
  server stays with the host, which is told of every stored batch.

Frames on both pipes are a 4-byte big-endian length and a pickle. Host to child: the settings, then
``(seq, cwd, items)``; child to host: ``(seq, written, failed)``.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from metatrail.logsafe import log, log_once

_HEADER = struct.Struct(">I")
MAX_FRAME = 1 << 30


def _write_frame(stream: IO[bytes], payload: bytes) -> None:
    stream.write(_HEADER.pack(len(payload)) + payload)
    stream.flush()


def _read_frame(stream: IO[bytes]) -> bytes | None:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes")
    payload = stream.read(size)
    return payload if len(payload) == size else None


def usable_interpreter() -> bool:
    """Whether ``sys.executable`` is a Python we can start (not an embedding program such as uWSGI)."""
    exe = sys.executable
    return bool(exe) and os.path.basename(exe).lower().startswith(("python", "pypy")) and os.access(exe, os.X_OK)


class WriterProcess:
    """The host side of one writer child (see module docstring)."""

    def __init__(self, proc: subprocess.Popen[bytes], on_done: Callable[[int, int, int], None],
                 on_lost: Callable[[list[Any]], None]) -> None:
        self._proc = proc
        self._on_done = on_done
        self._on_lost = on_lost
        self._lock = threading.Lock()
        self._unacked: dict[int, list[Any]] = {}
        self._seq = 0
        self._dead = False
        self._sending = False  # a frame is being written: the pipe's buffer lock is held, maybe for long
        self._closing = False  # close() was called: no more sends
        self._reader = threading.Thread(target=self._read_acks, name="metatrail-writer-acks", daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, settings: Any, on_done: Callable[[int, int, int], None],
              on_lost: Callable[[list[Any]], None]) -> WriterProcess | None:
        """Spawn the child and hand it ``settings``; None when it cannot run here."""
        if not usable_interpreter():
            return None
        try:
            # -P: ``-m`` would put the working directory (the user's workflow, with its own ``logging.py`` or
            # ``random.py`` perhaps) first on the child's path, where the host, a console script, never looks.
            proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "metatrail.writerproc", str(os.getpid())], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=None, close_fds=True, start_new_session=True)
        except OSError as exc:
            log_once("writerproc-spawn", "metatrail: cannot start the writer process (%s); writing in-process", exc)
            return None
        assert proc.stdin is not None
        try:
            _write_frame(proc.stdin, pickle.dumps(settings, protocol=pickle.HIGHEST_PROTOCOL))
        except (OSError, pickle.PicklingError) as exc:
            log_once("writerproc-settings", "metatrail: cannot start the writer process (%s); writing in-process",
                     exc)
            proc.kill()
            return None
        try:  # its work is metatrail's, not the tasks': keep it out of their energy
            from metatrail.energy.cputime import exclude_own_process

            exclude_own_process(proc.pid)
        except Exception as exc:  # energy support missing or broken: the writer runs all the same
            log_once("writerproc-energy", "metatrail: could not leave the writer process out of task energy (%s)", exc)
        return cls(proc, on_done, on_lost)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        return not self._dead

    def send(self, items: list[Any]) -> bool:
        """Hand ``items`` to the child; False if they were not sent (unpicklable, or the child is gone)."""
        if self._dead:
            return False
        try:
            payload = pickle.dumps((self._seq + 1, os.getcwd(), items), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # an unpicklable value in this batch: the caller writes it in-process
            log_once(f"writerproc-pickle:{type(exc).__name__}", "metatrail: a batch could not be handed to the "
                     "writer process (%s: %s); written in-process", type(exc).__name__, exc)
            return False
        with self._lock:
            if self._dead or self._closing:
                return False
            self._seq += 1
            self._unacked[self._seq] = items
            self._sending = True
        try:
            assert self._proc.stdin is not None
            _write_frame(self._proc.stdin, payload)
            sent = True
        except (OSError, ValueError):
            sent = False
        finally:
            with self._lock:
                self._sending = False
                closing = self._closing
            if closing:  # close() came while this frame was on its way: it left the closing to us
                self._close_stdin()
        if not sent:
            self._lose()
        return True  # stored by the child, or handed to on_lost, which writes it (with anything else unacknowledged)

    def close(self) -> None:
        """No more batches: the child stores what it has and exits. Does not wait for it.

        A send in progress (the child stalled, say on a store that another process holds locked, and the pipe full)
        holds the pipe's buffer lock until the child reads on; closing the pipe here would wait for that lock, for as
        long as the store stays locked. So the closing is left to that send, which closes the pipe once its frame is
        through: the child gets every whole batch and stores it, and a host that exits first leaves them in the pipe
        for the child all the same.
        """
        with self._lock:
            self._closing = True
            if self._sending:
                return
        self._close_stdin()

    def _close_stdin(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            if self._proc.stdin is not None:
                self._proc.stdin.close()

    def abandon(self) -> None:
        """In a forked child of the host: let go of the parent's pipes without touching the writer process."""
        self._dead = True
        for stream in (self._proc.stdin, self._proc.stdout):
            try:
                if stream is not None:
                    os.close(stream.fileno())
            except (OSError, ValueError):
                pass

    def _read_acks(self) -> None:
        stdout = self._proc.stdout
        assert stdout is not None
        try:
            while True:
                frame = _read_frame(stdout)
                if frame is None:
                    break
                seq, written, failed = pickle.loads(frame)
                with self._lock:
                    items = self._unacked.pop(seq, None)
                if items is not None:
                    self._on_done(len(items), written, failed)
        except Exception as exc:
            log_once("writerproc-acks", "metatrail: lost contact with the writer process (%s)", exc)
        self._lose()
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            self._proc.wait(timeout=5)
        if self._proc.returncode is not None:  # reaped: its pid may now be reused by anyone's process
            with contextlib.suppress(Exception):
                from metatrail.energy.cputime import forget_own_process

                forget_own_process(self._proc.pid)

    def _lose(self) -> None:
        with self._lock:
            if self._dead and not self._unacked:
                return
            self._dead = True
            lost = [item for seq in sorted(self._unacked) for item in self._unacked[seq]]
            self._unacked.clear()
        if lost:
            log.warning("metatrail: the writer process ended with %d events unstored; writing them in-process",
                        len(lost))
            self._on_lost(lost)


def main() -> int:
    """The child: read batches until the host closes the pipe, store each, acknowledge each."""
    acks: IO[bytes] | None = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the acknowledgements
    # The host names itself: read from getppid() here, a host that ended while this interpreter started (one that
    # hands its events over and exits) would be init or a subreaper, whose end never comes.
    _let_go_of_the_hosts_stderr_when_it_ends(int(sys.argv[1]) if len(sys.argv) > 1 else os.getppid())
    source = sys.stdin.buffer
    frame = _read_frame(source)
    if frame is None:
        return 0
    from metatrail.recorder import Recorder

    recorder = Recorder(pickle.loads(frame), energy_monitor=_ReportsArriveMade(), shipper=_ShippedByTheHost())
    while True:
        frame = _read_frame(source)
        if frame is None:
            break
        seq, cwd, items = pickle.loads(frame)
        if cwd != os.getcwd():  # relative paths are the host's: resolve them where the host is now
            with contextlib.suppress(OSError):
                os.chdir(cwd)
        written, failed = recorder.written, recorder.failed_writes
        recorder.write_items(items)
        if acks is not None:
            try:
                _write_frame(acks, pickle.dumps((seq, recorder.written - written, recorder.failed_writes - failed)))
            except OSError:
                # The host is gone (killed, or exited without waiting): nobody listens for acknowledgements, but
                # the batches still in the pipe were accepted, and this process is the only one left to store them.
                with contextlib.suppress(OSError):
                    acks.close()
                acks = None
    recorder.close()
    return 0


def _let_go_of_the_hosts_stderr_when_it_ends(host: int, poll_s: float = 0.2) -> None:
    """While the host lives, this process writes its warnings to the host's stderr, where its user sees them. Once
    the host has ended, that stderr must be let go: a program that ran the host with its output captured (a
    pipeline runner, ``subprocess.run(..., capture_output=True)``) reads until every writer of the pipe is gone,
    and this process may still be storing the host's last batches for a long time (a store another process holds
    locked). A daemon thread notices the host's end (this process is re-parented) and points stderr elsewhere."""

    def watch() -> None:
        while os.getppid() == host:
            time.sleep(poll_s)
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.dup2(devnull, 1)
            os.close(devnull)

    threading.Thread(target=watch, name="metatrail-writer-host-watch", daemon=True).start()


class _ShippedByTheHost:
    """The child's shipper: the host ships what the child stored (it is told on each acknowledgement), so a
    configured server still gets everything when the host's own exit step runs."""

    def notify(self) -> None:
        pass


class _ReportsArriveMade:
    """The child's energy monitor: the host's monitor made each report before the item was sent."""

    def task_report(self, stopped: object) -> dict[str, Any] | None:
        return None


if __name__ == "__main__":
    sys.exit(main())
