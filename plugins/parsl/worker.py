"""The part of the Parsl plugin that runs where a task runs (an HTEX worker process, or a ThreadPool thread).

:class:`TrackedCall` wraps the function the DataFlowKernel hands to an executor. On the worker it records the
execution's START just before the app body runs and its COMPLETE/FAIL just after, with the worker's own pid (so
energy is attributed to the process that did the work), the actual arguments as parameters and the ``inputs`` /
``outputs`` Files as datasets, hashed on the worker, where the files are.

Why the worker writes to the store itself (instead of shipping records back with the result): shipping back would
mean changing what the app returns or replacing the executor's future, and the plugin must never change a task's
result or the future the DFK waits on. The store takes many writing processes (SQLite WAL, or a server URL for
workers without a shared filesystem), so each worker has its own Recorder and writes off the task's thread.

Rules this module keeps, because it is imported inside every worker:

* Only the standard library is imported at module import; metatrail's recorder and Parsl are imported on first use,
  inside ``try``, so a broken or missing metatrail install makes a task run untracked, never fail.
* The per-task context travels as an extra keyword argument (:data:`CTX_KEY`), not inside the callable: Parsl's
  serializer caches callables by identity (``lru_cache``), and one wrapper per function keeps that cache working.
  To a worker process it travels as one ``bytes`` value (:func:`encode_context`): Parsl serialises arguments with
  dill's pure-Python pickler, which took ~65 us per task for the context as a dict (more under load, on the DFK's
  critical path) and ~4 us as bytes made by the C pickler.
* A worker process writes with the Recorder's writer *thread* unless ``writer`` is set to ``process`` (see
  :func:`worker_settings`), gathering :data:`WORKER_LINGER_S` of events into one transaction.
* HTEX ends workers with SIGTERM at shutdown, which skips ``atexit``; a worker process therefore flushes its pending
  events from a SIGTERM handler (installed only if the process has none of its own, bounded to half a second),
  then dies of SIGTERM as it would have.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import pickle
import signal
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

CTX_KEY = "_metatrail_parsl_ctx"
"""The keyword argument that carries the per-task context from the DFK to :class:`TrackedCall`."""

SIGTERM_FLUSH_SECONDS = 0.5  # HTEX's manager sends SIGKILL one second after SIGTERM
# A worker's writer gathers events this long into one transaction: with the Recorder's default (5 ms) a worker
# running sub-millisecond tasks committed every ~3 tasks, and the transactions cost it more CPU than the events
# (measured: 0.41 vs 0.12-0.16 ms of writer CPU per task, 2 HTEX workers on 2 cores). flush() never waits for it.
WORKER_LINGER_S = 0.05
# A worker that drops its events beside a store on a cluster filesystem (metatrail.store.drop) writes a file per batch:
# gathered longer, a busy worker makes two files a second, not twenty, for the filesystem's metadata server.
DROP_LINGER_S = 0.5
_OWN_KWARGS = frozenset({"inputs", "outputs"})

log = logging.getLogger("metatrail.parsl")

# Recorders registered by the DFK side of this process (ThreadPool tasks run in the DFK process and must write
# through the DFK's recorder); keyed by pipeline run id.
_LOCAL_RECORDERS: dict[str, Any] = {}
_worker_recorders: dict[tuple[str, str], Any] = {}
_unavailable: set[tuple[str, str]] = set()  # store settings whose recorder could not be created in this process
_lock = threading.Lock()
_in_flight: list[tuple[Any, Any]] = []  # (recorder, execution) of the task running on this process's main thread
_sigterm_installed = False


class TrackedCall:
    """A picklable wrapper around an app's function: records the execution where it runs.

    Called without the context keyword it is a plain pass-through. It never changes the return value or the
    exception of the wrapped function.
    """

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func
        self.__name__ = getattr(func, "__name__", type(func).__name__)
        self.__qualname__ = getattr(func, "__qualname__", self.__name__)
        self.__doc__ = getattr(func, "__doc__", None)
        self.__wrapped__ = func
        # The user function's call shape, computed on the first tracked call where the task runs: Parsl's
        # deserialiser caches the callable by its bytes, so a worker reuses this object (and the shape) for every task
        self._shape: CallShape | None = None

    def __getstate__(self) -> dict[str, Any]:
        # A signature holds the function's defaults and annotations, which need not pickle; the worker makes its own
        return {**self.__dict__, "_shape": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_shape", None)  # pickled by a version without the cache

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        ctx = kwargs.pop(CTX_KEY, None)
        if ctx is None:
            return self.func(*args, **kwargs)
        started = _start(self, ctx, args, kwargs)
        try:
            result = self.func(*args, **kwargs)
        except BaseException as exc:
            _finish(started, kwargs, None, exc)
            raise
        _finish(started, kwargs, result, None)
        return result

    def __repr__(self) -> str:
        return f"<metatrail TrackedCall {self.func!r}>"


_wrappers: weakref.WeakKeyDictionary[Any, TrackedCall] = weakref.WeakKeyDictionary()


def encode_context(ctx: Mapping[str, Any]) -> bytes:
    """The per-task context as it travels to a worker process (see the module docstring for why bytes)."""
    return pickle.dumps(ctx if type(ctx) is dict else dict(ctx), protocol=pickle.HIGHEST_PROTOCOL)


def _decode_context(ctx: Any) -> Mapping[str, Any]:
    # The DFK made these bytes for this task (the same trust as the rest of Parsl's pickled task payload).
    return pickle.loads(ctx) if isinstance(ctx, bytes) else ctx  # type: ignore[no-any-return]


def tracked(func: Callable[..., Any]) -> TrackedCall:
    """The one :class:`TrackedCall` for ``func`` (reused, so Parsl's serializer cache still hits)."""
    try:
        wrapper = _wrappers.get(func)
        if wrapper is None:
            wrapper = _wrappers[func] = TrackedCall(func)
        return wrapper
    except TypeError:  # not weak-referenceable or not hashable: one wrapper per call
        return TrackedCall(func)


# -- describing a call ------------------------------------------------------------------------------------------
def user_function(func: Any) -> Any:
    """The function the user wrote, under Parsl's wrappers (``wrap_error``, ``timeout``, bash app partials)."""
    try:
        target = inspect.unwrap(func)
        if isinstance(target, functools.partial) and target.args and callable(target.args[0]) and \
                getattr(target.func, "__name__", "") == "remote_side_bash_executor":
            target = inspect.unwrap(target.args[0])
        return target
    except Exception:
        return func


def _file_like(value: Any) -> Any:
    """The ``parsl.File`` behind ``value`` (a File or a DataFuture), or None.

    Checked by type, never by looking up an attribute on ``value``: an argument's ``__getattr__`` may raise anything
    (``class AttrDict(dict): __getattr__ = dict.__getitem__`` raises KeyError)."""
    types = _parsl_file_types or _load_parsl_file_types()
    if not types:  # no Parsl here: nothing can be a File
        return None
    File, DataFuture = types
    if isinstance(value, File):
        return value
    if isinstance(value, DataFuture):
        return value.file_obj if isinstance(value.file_obj, File) else None
    return None


_parsl_file_types: tuple[Any, Any] | tuple[()] | None = None


def _load_parsl_file_types() -> tuple[Any, Any] | tuple[()]:
    """``(File, DataFuture)``, imported on first use (an import statement per argument cost ~1 us on the task's
    thread); ``()`` where Parsl cannot be imported."""
    global _parsl_file_types
    try:
        from parsl.app.futures import DataFuture
        from parsl.data_provider.files import File

        _parsl_file_types = (File, DataFuture)
    except Exception:
        _parsl_file_types = ()
    return _parsl_file_types


def file_uri(file: Any) -> str:
    """What to hash for a ``parsl.File``: the absolute local path for ``file:`` URLs (or a staged copy), else
    the URL itself (remote objects are named, not downloaded)."""
    if file.scheme == "file" or file.local_path is not None:
        return os.path.abspath(str(file.filepath))
    return str(file.url)


def output_uris(outputs: Any) -> list[str]:
    """The paths/URLs of the Files in an ``outputs=`` list."""
    if not isinstance(outputs, (list, tuple)):
        return []
    return [file_uri(f) for f in map(_file_like, outputs) if f is not None]


_SIMPLE_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


class CallShape:
    """How the calls of one function are named, worked out once per function: its signature and, for the common
    signature (parameters passed by position or keyword, or keyword only; no ``/``, ``*args`` or ``**kwargs``), the
    names that bind a call without :meth:`inspect.Signature.bind_partial` (~2.5 us per call on the task's thread)."""

    __slots__ = ("_names", "_positional", "signature")

    def __init__(self, signature: inspect.Signature) -> None:
        self.signature = signature
        params = signature.parameters.values()
        simple = all(p.kind in _SIMPLE_KINDS for p in params)
        self._names: frozenset[str] | None = frozenset(signature.parameters) if simple else None
        self._positional = tuple(p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD)

    def bind(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The call's arguments by name, as ``bind_partial`` names them (in the signature's order; ``*args`` as
        ``name[i]``, ``**kwargs`` spread); raises TypeError where ``bind_partial`` does."""
        names, positional = self._names, self._positional
        if names is None or len(args) > len(positional) or any(k not in names for k in kwargs):
            return self._bind_by_inspect(args, kwargs)
        bound = dict(zip(positional, args, strict=False))  # fewer arguments than parameters: a partial bind
        if kwargs:
            if any(k in bound for k in kwargs):
                return self._bind_by_inspect(args, kwargs)  # a value given twice: bind_partial says so
            for name in self.signature.parameters:  # keywords in the signature's order, as bind_partial puts them
                if name in kwargs:
                    bound[name] = kwargs[name]
        return bound

    def _bind_by_inspect(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        sig = self.signature
        bound: dict[str, Any] = {}
        for name, value in sig.bind_partial(*args, **kwargs).arguments.items():
            kind = sig.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                bound.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                bound.update({f"{name}[{i}]": v for i, v in enumerate(value)})
            else:
                bound[name] = value
        return bound


_shapes: weakref.WeakKeyDictionary[Any, CallShape] = weakref.WeakKeyDictionary()


def call_shape(func: Any) -> CallShape:
    """The :class:`CallShape` of the user's function under ``func``, computed once per function (the signature
    was a third of the wrapper's time on the task's thread)."""
    try:
        shape = _shapes.get(func)
    except TypeError:  # not hashable or not weak-referenceable: no cache
        return CallShape(inspect.signature(user_function(func)))
    if shape is None:
        shape = _shapes[func] = CallShape(inspect.signature(user_function(func)))
    return shape


def describe_call(func: Any, args: Sequence[Any], kwargs: Mapping[str, Any], *,
                  shape: CallShape | None = None) -> tuple[dict[str, Any], list[str], list[str]]:
    """``(params, inputs, outputs)`` of one app call: arguments by name (Files as their paths; ``inputs`` that are
    not Files stay a parameter), input Files (``inputs=``, File arguments) and output Files (``outputs=``).
    ``shape``: the function's, when the caller has it already (else it is looked up for ``func``)."""
    bound: dict[str, Any]
    # Parsl's own keyword arguments (monitoring's task/try ids, staging switches) are not the app's parameters
    if any(k.startswith("_parsl") for k in kwargs):
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_parsl")}
    if not args and not kwargs:
        return {}, [], []  # what binding no arguments gives, without looking at the signature
    try:
        bound = (shape if shape is not None else call_shape(func)).bind(args, kwargs)
    except Exception:  # a signature we cannot bind to: positional names
        bound = {f"arg{i}": v for i, v in enumerate(args)}
        bound.update({k: v for k, v in kwargs.items() if k not in bound})
    params: dict[str, Any] = {}
    inputs: list[str] = []
    outputs: list[str] = []
    for name, value in bound.items():
        if name == "outputs" and isinstance(value, (list, tuple)):
            outputs.extend(output_uris(value))
            continue
        if name == "inputs" and isinstance(value, (list, tuple)):
            others = []
            for item in value:
                f = _file_like(item)
                if f is not None:
                    inputs.append(file_uri(f))
                else:
                    others.append(item)
            if others:
                params["inputs"] = others
            continue
        f = _file_like(value)
        if f is not None:
            params[name] = file_uri(f)
            if name not in ("stdout", "stderr"):
                inputs.append(file_uri(f))
        else:
            params[name] = value
    return params, inputs, outputs


def describe_call_or_explain(func: Any, args: Sequence[Any], kwargs: Mapping[str, Any], *,
                             shape: CallShape | None = None
                             ) -> tuple[dict[str, Any] | None, list[str], list[str], list[str]]:
    """``(params, inputs, outputs, warnings)``: :func:`describe_call`, or, when the arguments cannot be described,
    no parameters (None), no files and a warning that says why; the execution is recorded either way."""
    try:
        params, inputs, outputs = describe_call(func, args, kwargs, shape=shape)
    except Exception as exc:
        _log_once(f"describe:{type(exc).__name__}", "metatrail: cannot describe the arguments of a Parsl task "
                  "(%s: %s); it is recorded without parameters", type(exc).__name__, exc)
        return None, [], [], [f"parameters and files not recorded: describing the arguments failed "
                              f"({type(exc).__name__}: {exc})"]
    return params, inputs, outputs, []


def with_warnings(extra: Mapping[str, Any], warnings: list[str]) -> dict[str, Any]:
    """A copy of an execution's ``extra`` carrying ``warnings`` (the Recorder puts them in the record's
    ``warnings``)."""
    return {**extra, "_warnings": warnings} if warnings else dict(extra)


# -- recording --------------------------------------------------------------------------------------------------
def register_local_recorder(pipeline_run_id: str, recorder: Any) -> None:
    """Make tasks of this pipeline run that execute in this process (ThreadPool) write through ``recorder``."""
    with _lock:
        _LOCAL_RECORDERS[pipeline_run_id] = recorder


def release_local_recorder(pipeline_run_id: str) -> None:
    """Forget the recorder of a pipeline run that has ended (one DFK after another in a process must not keep every
    earlier run's recorder alive)."""
    with _lock:
        _LOCAL_RECORDERS.pop(pipeline_run_id, None)


def worker_settings(settings: Any) -> Any:
    """``settings`` for a Recorder in a worker process: ``writer = auto`` becomes ``thread``.

    ``auto`` starts a writer process once a process has recorded 32 events, for a host whose many threads share one
    GIL. An HTEX worker runs one task at a time, and every worker of a node would start its own writer process: each
    imports the store's SQLAlchemy (~0.65 s CPU) and then pickles every event across a pipe, CPU that the node's
    cores (shared with the workers) pay on top of the writing itself. ``writer = process`` is still honoured.
    """
    from dataclasses import replace

    return replace(settings, writer="thread") if settings.writer == "auto" else settings


def _recorder_for(ctx: Mapping[str, Any]) -> Any:
    local = _LOCAL_RECORDERS.get(ctx["run"])
    if local is not None:
        return local
    # A worker process: the DFK's store unless this worker's environment names another one (a remote worker may have
    # to reach the store by another URL than the DFK's path); see _use_dfk_store.
    key = (str(ctx.get("store") or ""), str(ctx.get("hash_cache") or ""))
    rec = _worker_recorders.get(key)  # every task after a worker's first: no lock needed to read a dict
    if rec is not None:
        return rec
    with _lock:
        rec = _worker_recorders.get(key)
        if rec is None:
            if key in _unavailable:
                return None
            try:
                from metatrail.config import load_settings
                from metatrail.recorder import Recorder

                overrides: dict[str, Any] = {}
                if key[0] and _use_dfk_store(os.environ.get("METATRAIL_STORE"), key[0]):
                    _check_reachable(key[0], ctx.get("host"))
                    overrides["store"] = key[0]
                    if not os.environ.get("METATRAIL_HASH_CACHE") and key[1]:
                        overrides["hash_cache"] = key[1]
                settings = worker_settings(load_settings(**overrides))
                dropping = settings.store.startswith("drop:")
                rec = _worker_recorders[key] = Recorder(settings,
                                                        linger_s=DROP_LINGER_S if dropping else WORKER_LINGER_S)
            except Exception:
                _unavailable.add(key)  # a broken install or config: say it once (caller logs), then run untracked
                raise
    _install_sigterm_flush()
    return rec


def _check_reachable(url: str, dfk_host: Any) -> None:
    """Raise ``ConfigError`` when this worker runs on another host than the DFK and the directory of the DFK's
    embedded store does not exist here: the filesystem is not shared (or mounted elsewhere), and creating the path
    would put this worker's records on this node's own disk, where nobody looks for them."""
    import socket

    from metatrail.errors import ConfigError
    from metatrail.store.drop import store_path_of

    path = store_path_of(url)
    if path is None or not dfk_host or dfk_host == socket.gethostname() or os.path.isdir(os.path.dirname(path)):
        return
    raise ConfigError(f"the workflow's store {path} (on {dfk_host}) is not on a filesystem this worker's host "
                      f"({socket.gethostname()}) shares: its directory does not exist here. Set METATRAIL_STORE "
                      "in the workers' environment to a metatrail server, or to the store's path as this host mounts "
                      "it; this worker's tasks run unrecorded")


def _use_dfk_store(own: str | None, given: str) -> bool:
    """Whether a worker records to ``given``, the store URL the DFK handed over, rather than ``own``, its
    ``METATRAIL_STORE``: when it has none, and when ``given`` drops events beside the very store file ``own``
    names (an environment inherited from the DFK's, on a shared filesystem: see
    :func:`metatrail.store.drop.url_for_workers`)."""
    if not own:
        return True
    from metatrail.store.drop import SCHEME, store_path_of

    if not given.startswith(f"{SCHEME}:"):
        return False
    own_path, given_path = store_path_of(own), store_path_of(given)
    if own_path is None or given_path is None:
        return False
    return os.path.realpath(own_path) == os.path.realpath(given_path)  # the same file, also through a symlink


class _Core:
    """What the wrapper uses of metatrail's core, imported on a process's first tracked task (not at module import,
    see the module docstring) and then held: an import statement on every task cost ~0.7 us each."""

    def __init__(self) -> None:
        from metatrail.config import is_disabled
        from metatrail.model import PipelineRun

        self.is_disabled = is_disabled
        self.PipelineRun = PipelineRun


_core: _Core | None = None
# The parent run handed to the Recorder with each execution, one per pipeline run (the Recorder reads its id and
# namespace): made once, not per task. Bounded: a process may serve many DFK runs one after another.
_parent_runs: dict[str, Any] = {}
_MAX_PARENT_RUNS = 64


def _parent_run(ctx: Mapping[str, Any], core: _Core) -> Any:
    run = _parent_runs.get(ctx["run"])
    if run is None or run.pipeline != ctx["pipeline"] or run.namespace != ctx["namespace"]:
        if len(_parent_runs) >= _MAX_PARENT_RUNS:
            _parent_runs.clear()
        run = _parent_runs[ctx["run"]] = core.PipelineRun(
            id=ctx["run"], pipeline=ctx["pipeline"], namespace=ctx["namespace"], integration="PARSL")
    return run


def _start(call: TrackedCall, ctx_value: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    global _core
    try:
        core = _core
        if core is None:
            core = _core = _Core()
        if core.is_disabled():
            return None
        ctx = _decode_context(ctx_value)
        rec = _recorder_for(ctx)
        if rec is None:
            return None
        shape = call._shape
        if shape is None and (args or kwargs):
            try:
                shape = call._shape = CallShape(inspect.signature(user_function(call.func)))
            except Exception:  # described by position; describe_call_or_explain says why if that fails too
                shape = None
        params, inputs, _, warnings = describe_call_or_explain(call.func, args, kwargs, shape=shape)
        # The start is when the app body is about to run: a fresh worker's first task would otherwise include
        # metatrail's imports and its Recorder's creation above (tens of ms), which are not the task's time.
        at = time.time()
        execution = rec.execution_started(
            ctx["pipeline"], ctx["stage"], pipeline_run=_parent_run(ctx, core), execution_id=ctx["id"],
            inputs=inputs, params=params, integration="PARSL", namespace=ctx["namespace"], started_at=at,
            try_number=ctx["try"] + 1, integration_version=ctx.get("version"),
            extra=with_warnings(ctx["extra"], warnings), pid=os.getpid(), measure_energy=True)
        started = (rec, execution)
        if threading.current_thread() is threading.main_thread():
            _in_flight[:] = [started]
        return started
    except Exception as exc:
        _log_once(f"start:{type(exc).__name__}", "metatrail: cannot record the start of a Parsl task (%s: %s); "
                  "the task is not affected", type(exc).__name__, exc)
        return None


def _finish(started: Any, kwargs: Mapping[str, Any], result: Any, error: BaseException | None) -> None:
    if started is None:
        return
    at = time.time()
    try:
        rec, execution = started
        if threading.current_thread() is threading.main_thread():
            _in_flight.clear()
        if error is None:
            error = _wrapped_exception(result)
        outputs = output_uris(kwargs.get("outputs"))
        if error is None:
            rec.execution_finished(execution, outputs=outputs, ended_at=at)
        else:
            rec.execution_failed(execution, error=error, outputs=outputs, ended_at=at,
                                 exit_code=_exit_code(error))
    except Exception as exc:
        _log_once(f"finish:{type(exc).__name__}", "metatrail: cannot record the end of a Parsl task (%s: %s); "
                  "the task is not affected", type(exc).__name__, exc)


def _wrapped_exception(result: Any) -> BaseException | None:
    """Parsl apps return their exception wrapped (``RemoteExceptionWrapper``) instead of raising it."""
    if type(result).__name__ != "RemoteExceptionWrapper":
        return None
    value = getattr(result, "e_value", None)
    return value if isinstance(value, BaseException) else None


def _exit_code(error: BaseException) -> int | None:
    code = getattr(error, "exitcode", None)  # parsl.app.errors.BashExitFailure
    return code if isinstance(code, int) else None


def _install_sigterm_flush() -> None:
    """In a worker process, flush pending events when SIGTERM ends it (HTEX shutdown, batch walltime)."""
    global _sigterm_installed
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    _sigterm_installed = True
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return  # the host or the user handles SIGTERM; leave it to them
        signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError) as exc:
        _log_once("sigterm", "metatrail: cannot watch SIGTERM (%s); events pending at shutdown may be lost", exc)


def _on_sigterm(signum: int, frame: Any) -> None:
    def drain() -> None:
        try:
            for rec, execution in list(_in_flight):
                from metatrail.model import Status

                rec.execution_finished(execution, status=Status.ABORTED,
                                       error="the worker process was terminated (SIGTERM) while the task ran")
            for rec in list(_worker_recorders.values()):
                rec.flush(SIGTERM_FLUSH_SECONDS)
        except Exception:  # dying anyway; nothing useful to do with it
            pass

    # The flush runs on a helper thread: if the signal interrupted this (main) thread inside the recorder, waiting
    # here for its lock would never end; a bounded join always does.
    helper = threading.Thread(target=drain, name="metatrail-sigterm", daemon=True)
    helper.start()
    helper.join(SIGTERM_FLUSH_SECONDS)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _log_once(key: str, message: str, *args: object) -> None:
    try:
        from metatrail.logsafe import log_once

        log_once(f"parsl:{key}", message, *args)
    except Exception:
        log.warning(message, *args)
