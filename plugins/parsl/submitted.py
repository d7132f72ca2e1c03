"""The arguments of a Parsl task as it was submitted, for the record of a task that a failed dependency stopped.

When a task's dependencies are done, the DFK (``DataFlowKernel._unwrap_futures``) replaces each future among its
arguments by its result, *drops* a failed one from the positional arguments and from ``inputs=``, leaves a failed
keyword argument as its future, and overwrites ``task_record['args']`` with what is left. For ``f(ok, failed, c)``
the record then holds ``(ok_value, c)``: described by position, ``c`` would be recorded as the parameter ``failed``.
Nothing in the task record keeps the tuple as submitted, so :class:`SubmittedArgs` wraps the DFK's ``submit`` (on
that instance only) and keeps each pending task's positional arguments until the task launches (its record's
arguments are then complete: a try launches only when no dependency failed) or ends.

:func:`call_as_submitted` puts each failed dependency back in its own place, as a mark that names it. Where the
arguments as submitted are not known, the positional arguments are left out with a warning rather than recorded
under names that may be wrong.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from typing import Any

POSITIONAL_UNKNOWN = ("positional arguments not recorded: Parsl drops a failed dependency from them, and the "
                      "arguments as submitted are not known")


class SubmittedArgs:
    """The positional arguments of the tasks a DFK has submitted and not yet launched or ended, by task.

    A task is known by its keyword-argument dict: Parsl's apps build a fresh one per call and the DFK keeps that
    same object as ``task_record['kwargs']`` (it changes it in place), while the task id is known only after
    ``submit`` returns, by when the task may have ended already. Two pending tasks sharing one dict (a direct
    ``dfk.submit`` call reusing it) make both unknown rather than risk naming one's arguments after the other's.
    """

    def __init__(self) -> None:
        # id(kwargs dict) -> (that dict, positional args) or None (ambiguous); the dict is held so its id stays its
        self._pending: dict[int, tuple[Mapping[str, Any], tuple[Any, ...]] | None] = {}
        self.watching = False

    def watch(self, dfk: Any) -> None:
        """Wrap ``dfk.submit`` (that instance only) to keep the arguments.

        What ``submit`` returns or raises passes through unchanged; keeping the arguments costs one dict
        insertion per call, and nothing of ours raises into it."""
        original = dfk.submit

        def submit(*args: Any, **kwargs: Any) -> Any:
            key = self._keep(kwargs.get("app_args"), kwargs.get("app_kwargs")) if self.watching else None
            try:
                return original(*args, **kwargs)
            except BaseException:
                if key is not None:
                    self._pending.pop(key, None)
                raise

        dfk.submit = submit
        self.watching = True

    def _keep(self, app_args: Any, app_kwargs: Any) -> int | None:
        # Parsl's apps pass both by keyword; a task without positional arguments has nothing that could shift
        if not app_args or not isinstance(app_kwargs, dict):
            return None
        try:
            key = id(app_kwargs)
            self._pending[key] = None if key in self._pending else (app_kwargs, tuple(app_args))
            return key
        except Exception:
            return None

    def forget(self, kwargs: Any) -> None:
        """The task launched: its record's arguments are whole."""
        if self._pending:
            self._pending.pop(id(kwargs), None)

    def take(self, kwargs: Any) -> tuple[Any, ...] | None:
        """The positional arguments as submitted of the task whose keyword-argument dict is ``kwargs`` (and forget
        them): ``()`` for a task submitted without any, None when they are not known."""
        kept = id(kwargs) in self._pending
        entry = self._pending.pop(id(kwargs), None)
        if not self.watching:
            return None
        if not kept:
            return ()  # only tasks with positional arguments are kept
        if entry is None or entry[0] is not kwargs:
            return None
        return entry[1]

    def stop(self) -> None:
        """Keep nothing more (the DFK is cleaning up) and let go of what is kept."""
        self.watching = False
        self._pending.clear()


def call_as_submitted(submitted: tuple[Any, ...] | None, args: Sequence[Any], kwargs: Mapping[str, Any],
                      resolver: Any) -> tuple[tuple[Any, ...], dict[str, Any], list[str]]:
    """``(args, kwargs, warnings)`` to describe a task that never ran because a dependency failed.

    ``submitted``: its positional arguments as submitted (None: not known); ``args``/``kwargs``: its record's, after
    the DFK unwrapped them; ``resolver``: the DFK's ``dependency_resolver`` (which futures an argument holds). Each
    failed dependency becomes a mark naming the task it came from, in its own place; where the places cannot be
    told, the positional arguments are left out and a warning says so.
    """
    kw = {k: _mark(v) if _failed(v) else v for k, v in kwargs.items()}
    if submitted is None:
        return (), kw, [POSITIONAL_UNKNOWN]
    try:
        failed = [_failed_futures(a, resolver) for a in submitted]
    except Exception:
        return (), kw, [POSITIONAL_UNKNOWN]
    if sum(1 for f in failed if f) != len(submitted) - len(args):
        # e.g. a File argument staged in by the DFK whose staging failed: not a future as submitted
        return (), kw, [POSITIONAL_UNKNOWN]
    rest = iter(args)
    return tuple(_mark(*f) if f else next(rest) for f in failed), kw, []


def _failed(future: Any) -> bool:
    return isinstance(future, Future) and future.done() and (future.cancelled()
                                                              or future.exception(timeout=0) is not None)


def _failed_futures(arg: Any, resolver: Any) -> list[Any]:
    """The failed futures in ``arg``, found as the DFK finds them (a deep resolver looks inside lists and dicts)."""
    found = resolver.traverse_to_gather(arg) if resolver is not None else [arg]
    return [f for f in found if _failed(f)]


def _mark(*futures: Any) -> str:
    tasks = [f"task {f.tid}" for f in futures if isinstance(getattr(f, "tid", None), int)]
    return f"<failed dependency: {', '.join(tasks)}>" if tasks else "<failed dependency>"
