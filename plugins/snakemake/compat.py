"""Everything that differs between Snakemake 9 releases, and everything that reads Snakemake's own files.

Log records are duck-typed (``getattr`` with defaults), so one translation serves 9.0 to 9.27:

* ``WORKFLOW_STARTED`` carries only ``workflow_id`` and ``snakefile`` up to 9.1x; later releases add the info header
  (``snakefile_main``, ``config_md5``, ``configfiles``, ``host``, ``user``, ``snakemake_version``, ``cwd`` …), where
  ``snakefile`` became the path of Snakemake's own ``workflow.py``. :func:`workflow_info` fills what a release does
  not send from this process (host, user, version) and leaves the config hash ``None`` where it cannot be known.
* File lists in ``JOB_INFO``/``JOB_ERROR`` are display strings: a path, optionally followed by an annotation in
  parentheses (``" (pipe)"``, ``" (send to storage)"`` …), or ``<TBD>`` for a checkpoint target not yet known.
  :func:`file_list` turns them back into paths.
* Rule ``params`` are in no record; Snakemake writes them (stringified, sorted, without names) into its persistence
  record of each output before it logs ``JOB_FINISHED``. :func:`read_metadata` reads that record from the file
  backend (``.snakemake/metadata/``); the database backend (``--persistence-backend db``, 9.2x) and
  ``--drop-metadata`` leave ``params`` unknown.
"""

from __future__ import annotations

import getpass
import json
import logging
import logging.handlers
import os
import re
import socket
import sys
import threading
from base64 import urlsafe_b64encode
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

from metatrail.plugins.snakemake.guard import WORKDIR_ATTRIBUTE

# Labels Snakemake's ``fmt_iofile`` appends to a path (snakemake/io/fmt.py); a storage phrase may follow a label.
_ANNOTATION = re.compile(
    r" \((?:pipe|service|nodelocal|update|before update|cached|access: [^()]*|"
    r"retrieve from storage|only provide storage uri|send to storage|in storage)"
    r"(?:, (?:retrieve from storage|only provide storage uri|send to storage|in storage))?\)$"
)
_TBD = "<TBD>"
_EXIT_STATUS = re.compile(r"non-zero exit status (-?\d+)")
METADATA_MAX_BYTES = 1 << 20  # a persistence record is a few KB; a bigger file is not one


def record_value(record: Any, name: str, default: Any = None) -> Any:
    """An extra attribute of a Snakemake log record (``getattr`` with a default: fields vary by release)."""
    return getattr(record, name, default)


# event -> its lower-case value: an enum's ``value`` is a property, and every record Snakemake logs asks for it.
_EVENT_NAMES: dict[Any, str] = {}
_EVENT_NAMES_MAX = 256  # Snakemake has ~20 events; a host logging ever new event objects does not grow this


def event_name(record: Any) -> str | None:
    """The ``LogEvent`` of a record as its lower-case value (``"job_info"``), or None for a plain message."""
    event = getattr(record, "event", None)
    if event is None:
        return None
    try:
        return _EVENT_NAMES[event]
    except KeyError:
        name = str(getattr(event, "value", event)).lower()
        if len(_EVENT_NAMES) < _EVENT_NAMES_MAX:
            _EVENT_NAMES[event] = name
        return name
    except TypeError:  # an unhashable event: never remembered
        return str(getattr(event, "value", event)).lower()


@cache
def snakemake_version() -> str | None:
    """The installed Snakemake version (from package metadata: importing snakemake here would be circular)."""
    from importlib import metadata

    try:
        return metadata.version("snakemake")
    except metadata.PackageNotFoundError:
        return None


def snakemake_logger() -> logging.Logger | None:
    """The logger Snakemake logs every record on (``snakemake.logging.logger``), or None outside Snakemake."""
    module = sys.modules.get("snakemake.logging")
    logger = getattr(module, "logger", None)
    return logger if isinstance(logger, logging.Logger) else None


def listener_queue(handler: logging.Handler) -> Any:
    """The queue of the ``logging.handlers.QueueListener`` whose thread this is, when ``handler`` is its only
    handler (Snakemake 9 delivers every record to its logger plugins through one such listener); else None."""
    target = getattr(threading.current_thread(), "_target", None)  # the thread's running target (CPython)
    listener = getattr(target, "__self__", None)
    if not isinstance(listener, logging.handlers.QueueListener) or tuple(listener.handlers) != (handler,):
        return None
    queue = getattr(listener, "queue", None)
    return queue if callable(getattr(queue, "empty", None)) else None


def workflow_info(record: Any) -> dict[str, Any]:
    """What a ``WORKFLOW_STARTED`` record says about the run, with the same keys on every Snakemake 9 release.

    ``workdir`` is where the workflow runs: the directory :class:`~metatrail.plugins.snakemake.guard.WorkdirStamp`
    noted when Snakemake logged the record, else this process's now (the same directory: Snakemake changes back
    only after its loggers stopped). Never the record's ``cwd``: that is the directory before a ``workdir:``
    directive took effect."""
    snakefile = record_value(record, "snakefile_main") or record_value(record, "snakefile")
    workflow_id = record_value(record, "workflow_id")
    try:
        user = record_value(record, "user") or getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers): the user is simply unknown
        user = None
    return {
        "workflow_id": str(workflow_id) if workflow_id is not None else None,
        "snakefile": os.path.abspath(str(snakefile)) if snakefile else None,
        "workdir": record_value(record, WORKDIR_ATTRIBUTE) or os.getcwd(),
        "config_md5": record_value(record, "config_md5"),
        "configfiles": [str(f) for f in record_value(record, "configfiles", None) or []],
        "host": record_value(record, "host") or socket.gethostname(),
        "user": user,
        "snakemake_version": record_value(record, "snakemake_version") or snakemake_version(),
    }


def pipeline_name(snakefile: str | None, workdir: str | None) -> str:
    """The default pipeline name: the Snakefile's directory (``workflow/`` skipped, as in the standard layout), or
    the file's stem when it has its own name (``align.smk`` → ``align``)."""
    if snakefile:
        path = Path(snakefile)
        if path.stem.lower() != "snakefile":
            return path.stem
        directory = path.parent
        if directory.name == "workflow" and directory.parent.name:
            directory = directory.parent
        if directory.name:
            return directory.name
    return Path(workdir or os.getcwd()).name or "snakemake"


def file_list(values: Iterable[Any] | None) -> list[str]:
    """Paths from a record's display list: annotations stripped, unknown checkpoint targets and blanks dropped."""
    paths: list[str] = []
    for value in values or ():
        if value is None:
            continue
        text = str(value)
        if text == _TBD or not text.strip():
            continue
        paths.append(_ANNOTATION.sub("", text))
    return paths


def wildcards(value: Any) -> dict[str, Any]:
    """A job's wildcards as a plain dict."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    items = getattr(value, "items", None)
    if callable(items):
        return {str(k): _plain(v) for k, v in items()}
    return {}


def resources(value: Any) -> dict[str, Any]:
    """A job's resources (a Snakemake ``Resources`` named list) as a dict, without the scheduler's ``_cores`` and
    ``_nodes`` bookkeeping."""
    items = getattr(value, "items", None)
    if not callable(items):
        return {}
    return {str(k): _plain(v) for k, v in items() if not str(k).startswith("_")}


def _plain(value: Any) -> Any:
    # TBDString and other str subclasses become plain str, so parameters compare and serialise as text.
    if isinstance(value, str):
        return str(value)
    if isinstance(value, bool | int | float) or value is None:
        return value
    return str(value)


def exit_code(message: str | None) -> int | None:
    """The exit status named in Snakemake's error text for a failed shell command, if any."""
    if not message:
        return None
    match = _EXIT_STATUS.search(message)
    return int(match.group(1)) if match else None


def _record_path(root: str, key: str) -> str:
    # The layout of FilePersistence._record_path: urlsafe base64 of the key, split into NAME_MAX-1 chunks, every
    # chunk but the last prefixed with "@" (a directory level).
    max_len = _name_max(root)
    encoded = urlsafe_b64encode(key.encode()).decode()
    chunks = [encoded[i : i + max_len - 1] for i in range(0, len(encoded), max_len - 1)]
    chunks = ["@" + c for c in chunks[:-1]] + chunks[-1:]
    return os.path.join(root, *chunks)


_NAME_MAX: dict[str, int] = {}


def _name_max(root: str) -> int:
    """The longest file name under ``root`` (asked once per directory: it is read at every job's end)."""
    known = _NAME_MAX.get(root)
    if known is not None:
        return known
    try:
        value = _NAME_MAX[root] = os.pathconf(root, "PC_NAME_MAX") or 255
    except (OSError, ValueError):
        return 255  # not remembered: the directory may not exist yet
    return value


def read_metadata(output: str, workdir: str) -> dict[str, Any] | None:
    """Snakemake's persistence record for ``output`` (a path as the rule names it, relative to ``workdir``), or None
    when there is none (no output, ``--drop-metadata``, the database backend, a storage file)."""
    root = os.path.join(workdir, ".snakemake", "metadata")
    try:
        # Raw system calls, and no stat first: this runs on Snakemake's listener thread at every job's end, where a
        # buffered text file cost about a third more.
        fd = os.open(_record_path(root, output), os.O_RDONLY | os.O_CLOEXEC)
        try:
            raw = _read_at_most(fd, METADATA_MAX_BYTES + 1)
        finally:
            os.close(fd)
        if len(raw) > METADATA_MAX_BYTES:
            return None
        data = json.loads(raw)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = os.read(fd, limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def finished_since(metadata: Mapping[str, Any] | None, started_at: float) -> bool:
    """Whether a persistence record says its job finished, in a try that started no earlier than ``started_at``
    (the time of the job's record): not a record an earlier run left. Snakemake marks a job started just after it
    logs the job (the record's ``starttime``; 9.0 takes it from the marker file's mtime, hence a little slack) and
    sets ``incomplete`` to false when the job has finished."""
    if not metadata or metadata.get("incomplete") is not False:
        return False
    start = metadata.get("starttime")
    return isinstance(start, int | float) and not isinstance(start, bool) and start >= started_at - 0.5


def rule_params(metadata: Mapping[str, Any] | None) -> list[Any] | None:
    """The rule's ``params`` from a persistence record: their values as Snakemake stored them, or None."""
    if not metadata:
        return None
    params = metadata.get("params")
    return list(params) if isinstance(params, list) else None
