"""One writer thread for the server's store: concurrent ingests are group-committed.

Requests hand their validated events to :meth:`IngestWriter.submit` and wait for the returned future; the writer
takes everything waiting (up to ``max_batch`` events), stores it in one transaction, and resolves
each request's future with its own counts. A request is acknowledged only after its events are committed. One
writer means SQLite never sees two writers of ours at once, and a transaction's cost is shared by every request in
it. If a combined batch fails on one request's events, each request is retried alone so only the faulty one fails.

Small jobs may be written *inline* (``inline_max``): when nothing is queued and the writer is idle, ``submit`` writes
them on the calling thread (the event loop) and returns a resolved future. A lone single-event POST then costs no
thread hand-over, which on a busy machine took longer than SQLite's commit. Only for SQLite, whose one-event commit
takes a fraction of a millisecond; a PostgreSQL round trip must not block the event loop. While a write is in
progress, inline or not, new jobs queue for the writer thread, so concurrent requests are still group-committed.
An inline write never waits for the store's write lock: when another connection holds it (an admin rebuild, a command
writing the same file), the store refuses at once (``wait=False``) and the job goes to the writer thread, which waits
for the lock while the event loop goes on serving.

SQLite's WAL checkpoints are taken off the request path too (``checkpoint``): a commit that finds the WAL past its
autocheckpoint size copies it into the database file before it returns, some 130 ms every 640 single events with the
default size, and an inline write does that on the event loop. The writer instead pokes a :class:`Checkpointer`
thread, which runs a passive checkpoint (it blocks neither readers nor writers) at most every ``interval`` seconds.
Under a steady stream of writes a passive checkpoint never catches up: commits land while it copies, so the WAL is
never wholly copied, SQLite never starts it over, and it grows by every commit (some 60 KB per single event) until the
commit path's own checkpoint, far out, copies it all at once. A commit that extends the file cost almost twice one
that overwrites it. So when a checkpoint leaves frames behind and the writer is idle (no write in progress, none
queued: the pauses between single events), a second pass copies them with the writer held (requests meanwhile queue
and are group-committed after it; it copies only what landed during the first pass): the WAL is then copied whole
and the next commit starts it over. Writes that follow each other without a pause (a push) are not held for it.

Bounded: past ``max_pending`` waiting events, ``submit`` raises :class:`Overloaded` (the route answers 503 with
``Retry-After``) rather than growing without limit.

A job may carry the pipelines its writer may read (a token limited to some pipelines): then it is refused
(:class:`PipelineForbidden`, nothing stored) when one of its runs is stored under another pipeline. The store looks
inside the job's own transaction, under the locks that serialise writes to those runs (SQLite's write lock;
PostgreSQL's run locks), so no other writer, of this server or of another process on the same database, can store the
run under another pipeline between the look and the write, as it could when the route looked before handing the job
over. Such a job is written alone; unrestricted jobs are not looked at, and are group-committed as before.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from metatrail.errors import EventError, ForeignRunError, StoreBusy, StoreError
from metatrail.openlineage.events import event_id
from metatrail.store.base import CanonicalEvent, EventStore, IngestResult

log = logging.getLogger("metatrail.server")


class Overloaded(Exception):
    """Too many events are waiting to be written; the client should retry later."""


# A write of a token limited to some pipelines into a run stored under another pipeline (nothing stored).
PipelineForbidden = ForeignRunError


@dataclass
class _Job:
    events: Sequence[Mapping[str, Any]]
    site: str | None
    sites: Sequence[str | None] | None = None  # one per event, instead of ``site``
    pipelines: frozenset[str] | None = None  # what the sending token may read; None = unrestricted (not checked)
    future: Future[IngestResult] = field(default_factory=Future)

    def event_sites(self) -> Sequence[str | None]:
        return self.sites if self.sites is not None else [self.site] * len(self.events)


class Checkpointer:
    """Runs ``checkpoint`` on its own thread, at most once per ``interval`` seconds, after :meth:`poke` (see module
    docstring). A failure is logged once and retried at the next poke: the commits it follows are already safe."""

    def __init__(self, checkpoint: Callable[[], object], *, interval: float = 1.0) -> None:
        self.checkpoint = checkpoint
        self.interval = interval
        self.runs = 0
        self._due = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._failed = False

    def poke(self) -> None:
        """Note that something was committed (cheap: no I/O, never blocks)."""
        self._due.set()
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if (self._thread is None or not self._thread.is_alive()) and not self._stop.is_set():
                    self._thread = threading.Thread(target=self._run, name="metatrail-server-checkpoint",
                                                    daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._due.wait()
            if self._stop.is_set():
                return
            self._due.clear()
            try:
                self.checkpoint()
                self.runs += 1
            except Exception as exc:
                if not self._failed:
                    log.warning("metatrail server: WAL checkpoint failed (commits are unaffected): %s", exc)
                    self._failed = True
            self._stop.wait(self.interval)

    def open(self) -> None:
        """Accept pokes again after :meth:`close`."""
        self._stop.clear()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread (a checkpoint in progress finishes first)."""
        self._stop.set()
        self._due.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        self._due.clear()


class IngestWriter:
    """The group-committing writer (see module docstring). ``on_inserted(events, site)`` is called after each
    commit with the events that were new (for fan-out); it must not block. ``checkpoint``, when given, is run by a
    :class:`Checkpointer` after commits."""

    def __init__(self, store: EventStore, *, max_pending: int = 200_000, max_batch: int = 5_000,
                 on_inserted: Callable[[list[Mapping[str, Any]], str | None], None] | None = None,
                 inline_max: int = 0, checkpoint: Callable[[], tuple[int, int] | None] | None = None) -> None:
        self.store = store
        self._checkpoint = checkpoint
        self.checkpointer = Checkpointer(self._checkpoint_whole) if checkpoint is not None else None
        self.max_pending = max_pending
        self.max_batch = max_batch
        self.on_inserted = on_inserted
        self.inline_max = inline_max
        self._queue: deque[_Job] = deque()
        self._pending = 0
        self._busy = False  # a write (inline or by the thread) is in progress
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.committed = 0
        self.transactions = 0

    @property
    def pending(self) -> int:
        """Events waiting to be written."""
        with self._cv:
            return self._pending

    def submit(self, events: Sequence[Mapping[str, Any]], site: str | None,
               sites: Sequence[str | None] | None = None, *,
               pipelines: frozenset[str] | None = None) -> Future[IngestResult]:
        """Queue validated events for writing under ``site`` (or ``sites``, one per event: all are written in one
        transaction); the future resolves after commit. With ``pipelines`` (what the writer may read), the future
        fails with :class:`PipelineForbidden` when a run of the events is stored under another pipeline (see module
        docstring)."""
        if sites is not None and len(sites) != len(events):
            raise ValueError(f"{len(sites)} sites for {len(events)} events")
        job = _Job(events=events, site=site, sites=sites, pipelines=pipelines)
        with self._cv:
            if self._closed:
                raise Overloaded("the server is shutting down")
            # A restricted job's look at the store is a query: not on the event loop, so never inline.
            # Only into a store that can refuse to wait for its write lock (held by another connection: an admin
            # rebuild, a command writing the same file): the event loop must never wait for it.
            inline = (len(events) <= self.inline_max and pipelines is None and not self._queue
                      and not self._busy and getattr(self.store, "can_refuse_to_wait", False))
            if inline:
                self._busy = True
        if inline:
            written = False
            try:
                written = self._write([job], wait=False)
            finally:
                with self._cv:
                    self._busy = False
                    self._wake_waiters()
            if written:
                return job.future
            # The store's write lock is held elsewhere: the writer thread waits for it, not the caller.
        with self._cv:
            if self._closed:
                raise Overloaded("the server is shutting down")
            if self._pending + len(events) > self.max_pending and self._pending > 0:
                raise Overloaded(f"{self._pending} events are waiting to be written")
            self._queue.append(job)
            self._pending += len(events)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="metatrail-server-writer", daemon=True)
                self._thread.start()
            self._cv.notify()
        return job.future

    def open(self) -> None:
        """Accept work again after :meth:`close` (an app whose lifespan is run more than once, as test clients do)."""
        with self._cv:
            self._closed = False
        if self.checkpointer is not None:
            self.checkpointer.open()

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued (up to ``timeout``), then stop."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        if self.checkpointer is not None:
            self.checkpointer.close(timeout)

    def _checkpoint_whole(self) -> None:
        """Checkpoint the WAL, then, when commits landed meanwhile, once more with the writer held (module
        docstring)."""
        assert self._checkpoint is not None
        commits = self.transactions
        first = self._checkpoint()
        # A passive checkpoint reports on the WAL as it found it: commits that landed since are not in its figures.
        if first is None or (self.transactions == commits and first[1] >= first[0]):
            return  # copied whole: the next commit starts the WAL over
        with self._cv:
            if self._busy or self._queue:
                # Writes follow each other without a pause (a push, a burst of batches): holding the writer for
                # the second pass would stall them for what they wrote meanwhile, and slowed a 40,000-event push by
                # a tenth. The WAL grows until a later checkpoint finds the writer idle (or the commit path's own).
                return
            self._busy = True  # requests arriving now queue for the writer thread and are group-committed after
        try:
            self._checkpoint()
        finally:
            with self._cv:
                self._busy = False
                self._wake_waiters()

    def _wake_waiters(self) -> None:
        """After a write (the condition's lock held): wake the writer thread when jobs are queued for it. Only then:
        waking the idle writer thread after every inline write, only for it to find nothing queued and wait again,
        cost a one-event POST a tenth of the event loop's time (a thread switch, and the GIL handed over and back)."""
        if self._queue:
            self._cv.notify_all()

    def _take(self) -> list[_Job] | None:
        with self._cv:
            while not self._queue or self._busy:
                if self._closed and not self._queue:
                    return None
                self._cv.wait(1.0)
            self._busy = True
            jobs = [self._queue.popleft()]
            size = len(jobs[0].events)
            if jobs[0].pipelines is None:
                while (self._queue and self._queue[0].pipelines is None
                       and size + len(self._queue[0].events) <= self.max_batch):
                    job = self._queue.popleft()
                    size += len(job.events)
                    jobs.append(job)
            # From here on a request's future cannot be cancelled (a request task cancelled at shutdown, or by a
            # client that went away, cancels the future it awaits): its events are written all the same (the
            # client retries; ingest is idempotent), and only the writer resolves the futures it took.
            for job in jobs:
                job.future.set_running_or_notify_cancel()
            return jobs

    def _run(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            try:
                self._write(jobs)
            except Exception as exc:
                # _write answers every job itself; this is for a fault of ours past that (a bug, memory running
                # out): the thread must live on, and each request must be answered (503: ingest is idempotent, so
                # the client's retry stores nothing twice), not left waiting for ever.
                log.error("metatrail server: the writer failed on %d events: %s", sum(len(j.events) for j in jobs),
                          exc, exc_info=exc)
            finally:
                with self._cv:
                    self._pending -= sum(len(j.events) for j in jobs)
                    self._busy = False
                    self._wake_waiters()
                for job in jobs:
                    _fail(job, StoreError("the writer could not finish this write"))

    def _write(self, jobs: list[_Job], *, wait: bool = True) -> bool:
        """Write ``jobs`` in one transaction and answer each; with ``wait=False`` (an inline write), return False,
        nothing written or answered, when another connection holds the store's write lock."""
        no_wait: dict[str, Any] = {} if wait else {"wait": False}
        try:
            if jobs[0].pipelines is not None:
                assert len(jobs) == 1  # _take hands a restricted job over alone
                # The store looks at the runs inside the write's transaction, under its locks (module docstring).
                result = self.store.ingest(jobs[0].events, sites=jobs[0].event_sites(),
                                           allowed_pipelines=jobs[0].pipelines, **no_wait)
            elif all(j.sites is None and j.site == jobs[0].site for j in jobs):
                result = self.store.ingest([e for j in jobs for e in j.events], site=jobs[0].site, **no_wait)
            else:
                result = self.store.ingest([e for j in jobs for e in j.events],
                                           sites=[s for j in jobs for s in j.event_sites()], **no_wait)
        except StoreBusy:
            if not wait:
                return False
            raise  # not asked for: a fault of the store's, answered by _run
        except ForeignRunError as exc:
            _fail(jobs[0], exc)
            return True
        except EventError as exc:
            if len(jobs) == 1:
                _fail(jobs[0], exc)
            else:
                for job in jobs:  # isolate the request whose events the store refused
                    self._write([job])
            return True
        except Exception as exc:
            if len(jobs) > 1 and not isinstance(exc, StoreError):
                # Not the store's fault: one request's events are the likely cause; the others must not fail with it.
                for job in jobs:
                    self._write([job])
                return True
            log.warning("metatrail server: write of %d events failed: %s", sum(len(j.events) for j in jobs), exc)
            for job in jobs:
                _fail(job, exc)
            return True
        self.transactions += 1
        self.committed += result.inserted
        if self.checkpointer is not None and result.inserted:
            self.checkpointer.poke()
        new = set(result.inserted_ids)
        inserted_by_site: dict[str | None, list[Mapping[str, Any]]] = {}
        if len(jobs) == 1 and self.on_inserted is None:
            _answer(jobs[0], result)  # the common case of a push or batch: no need to attribute ids
            return True
        for job in jobs:
            mine = 0
            for event, site in zip(job.events, job.event_sites(), strict=True):
                eid = event.id if isinstance(event, CanonicalEvent) else event_id(event)
                if eid in new:
                    new.discard(eid)  # an event sent twice in one batch counts once, for its first sender
                    mine += 1
                    inserted_by_site.setdefault(site, []).append(event)
            _answer(job, IngestResult(received=len(job.events), inserted=mine))
        if self.on_inserted is not None:
            for site, inserted in inserted_by_site.items():
                try:
                    self.on_inserted(inserted, site)
                except Exception as exc:  # fan-out must never fail an ingest that is already committed
                    log.warning("metatrail server: fan-out hook failed: %s", exc)
        return True


def _answer(job: _Job, result: IngestResult) -> None:
    """Resolve a job's future unless it is resolved already (or was cancelled before the writer took it)."""
    if not job.future.done():
        job.future.set_result(result)


def _fail(job: _Job, exc: BaseException) -> None:
    """Fail a job's future unless it is resolved already (or was cancelled before the writer took it)."""
    if not job.future.done():
        job.future.set_exception(exc)
