"""Translate Airflow objects into what the Recorder takes: ids, parameters, inputs and outputs.

Pure functions over duck-typed Airflow objects (``RuntimeTaskInstance``, ORM ``DagRun``/``TaskInstance``, operators,
assets), so that the listener stays a thin sequence of calls. Nothing here calls the Airflow API server or the
metadata database; only :func:`local_paths` touches the filesystem (one ``stat`` per candidate).

Identity (the same in every process, so the scheduler, the task runner and a re-run agree):

* pipeline run id = ``uuid7_from(anchor, "<dag_id>.<run_id>")`` (``".<clear_number>"`` appended once a run has
  been cleared), where ``anchor`` is the run's ``logical_date``, or ``run_after`` for runs without one;
* execution id = ``uuid7_from(anchor, "<dag_id>.<run_id>.<task_id>.<try_number>.<map_index>")``: one per try of
  each (mapped) task instance.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from metatrail.logsafe import log_once
from metatrail.model import ArtifactRef, ErrorText, uuid7_from

INTEGRATION = "AIRFLOW"
MAX_TEXT = 2000  # longest string parameter kept (a rendered SQL file can be megabytes)
MAX_PATH_CANDIDATES = 64  # argument/return values looked at per task: a list of 10^6 strings is data, not paths
MAX_PATH_LENGTH = 4096  # PATH_MAX on Linux; a longer string cannot be a local path
MAX_SCANNED_ITEMS = 16  # items of a list/dict parameter looked at for lazy XCom sequences (bounded cost per value)
ASSET_NAMESPACE = "airflow"  # OpenLineage namespace of assets that name no location (``Asset("x")``)


def timestamp(value: Any) -> float | None:
    """Unix seconds of an aware ``datetime`` (Airflow's are all aware), else None."""
    if isinstance(value, dt.datetime):
        return value.timestamp()
    return None


def run_anchor(dag_run: Any) -> float:
    """The time part of a DAG run's ids: its logical date, or ``run_after`` when it has none (manual runs)."""
    for attr in ("logical_date", "run_after", "start_date"):
        ts = timestamp(getattr(dag_run, attr, None))
        if ts is not None:
            return ts
    return 0.0


def pipeline_run_id(dag_id: str, run_id: str, anchor: float, clear_number: int | None = 0) -> str:
    """The DAG run's id as a pipeline run (see module docstring)."""
    key = f"{dag_id}.{run_id}" + (f".{clear_number}" if clear_number else "")
    return uuid7_from(anchor, key)


def execution_id(dag_id: str, run_id: str, task_id: str, try_number: int, map_index: int | None,
                 anchor: float) -> str:
    """One task-instance try's id as an execution (see module docstring)."""
    index = -1 if map_index is None else map_index
    return uuid7_from(anchor, f"{dag_id}.{run_id}.{task_id}.{try_number}.{index}")


def _clip(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_TEXT:
        return value[:MAX_TEXT] + f"... [{len(value) - MAX_TEXT} more characters]"
    return value


def _json_plain(value: Any, depth: int = 0) -> Any:
    """A rendered value as recorded: tuples as lists, and Airflow's lazy XCom sequences (in small lists and dicts
    too) described by :func:`lazy_sequence_text`; other values as they are."""
    if _is_lazy_sequence(value):
        return lazy_sequence_text(value)
    if depth < 2 and type(value) in (list, tuple) and len(value) <= MAX_SCANNED_ITEMS:
        return [_json_plain(item, depth + 1) for item in value]
    if depth < 2 and type(value) is dict and len(value) <= MAX_SCANNED_ITEMS:
        return {key: _json_plain(item, depth + 1) for key, item in value.items()}
    if isinstance(value, tuple):
        return list(value)
    return value


def _is_lazy_sequence(value: Any) -> bool:
    kind = type(value)
    return kind.__name__ == "LazyXComSequence" and kind.__module__.startswith("airflow.")


def lazy_sequence_text(value: Any) -> str:
    """How a ``LazyXComSequence`` (what a task downstream of a mapped task gets) is recorded, without reading it.

    Its length and items live in the API server; ``len()``, iteration and ``repr`` of a sequence whose length was
    read all ask for them. So only what it already holds is used: the XCom it stands for and, when the task has
    already asked for it, its length: ``<LazyXComSequence of XCom 'return_value' of task 'add_one': 3 items>``,
    or ``…: length not read>``.
    """
    source = getattr(value, "_xcom_arg", None)
    key = getattr(source, "key", None)
    task_id = getattr(getattr(source, "operator", None), "task_id", None)
    what = f" of XCom {key!r} of task {task_id!r}" if isinstance(key, str) and isinstance(task_id, str) else ""
    length = getattr(value, "_len", None)  # set by Airflow once the length has been fetched; never fetched here
    size = f"{length} item{'' if length == 1 else 's'}" if isinstance(length, int) else "length not read"
    return f"<{type(value).__name__}{what}: {size}>"


def _is_empty(value: Any) -> bool:
    """None or an empty string/list/dict: a field that says nothing. Never ``==`` or ``bool()`` on other values:
    a DataFrame or an array answers those with an array, or raises."""
    return value is None or (isinstance(value, str | list | dict) and not value)


def _put(out: dict[str, Any], key: str, value: Any, name: str | None, redact: Any) -> None:
    """``out[key]`` = ``value`` as recorded (masked, clipped); a value that cannot be is left out, logged once."""
    try:
        out[key] = _clip(redact(_json_plain(value), name))
    except Exception as exc:
        log_once(f"param:{type(exc).__name__}", "metatrail: parameter %r not recorded (%s: %s)", key,
                 type(exc).__name__, exc)


def _template_fields(task: Any) -> Iterator[tuple[str, Any]]:
    """``(name, rendered value)`` of a task's template fields other than the call arguments; a field that cannot be
    read is left out, logged once."""
    for name in getattr(task, "template_fields", ()) or ():
        if name in ("op_args", "op_kwargs", "templates_dict") or not isinstance(name, str):
            continue
        try:
            value = getattr(task, name, None)
            if _is_empty(value):
                continue
        except Exception as exc:
            log_once(f"template-field:{type(exc).__name__}", "metatrail: template field %r not recorded (%s: %s)",
                     name, type(exc).__name__, exc)
            continue
        yield name, value


def task_params(task: Any, *, params: Mapping[str, Any] | None, conf: Mapping[str, Any] | None,
                redact: Any) -> dict[str, Any]:
    """Parameters of one task-instance try, flattened so that one odd value spoils only its own key.

    ``op_args.<i>`` and ``op_kwargs.<name>`` (rendered call arguments of Python/TaskFlow tasks), ``params.<name>``
    (DAG and task params, resolved), ``conf.<key>`` (the DAG run's ``conf``) and ``template.<field>`` (other
    rendered template fields, such as ``bash_command``). Values pass through Airflow's secrets masker.
    """
    out: dict[str, Any] = {}
    op_args = getattr(task, "op_args", None)
    if isinstance(op_args, Sequence) and not isinstance(op_args, str):
        for i, value in enumerate(op_args):
            _put(out, f"op_args.{i}", value, None, redact)
    op_kwargs = getattr(task, "op_kwargs", None)
    if isinstance(op_kwargs, Mapping):
        for name, value in op_kwargs.items():
            _put(out, f"op_kwargs.{name}", value, str(name), redact)
    for name, value in _template_fields(task):
        _put(out, f"template.{name}", value, name, redact)
    for name, value in (params or {}).items():
        _put(out, f"params.{name}", value, str(name), redact)
    for name, value in (conf or {}).items():
        _put(out, f"conf.{name}", value, str(name), redact)
    return out


def error_text(error: BaseException | str | None, redact: Any) -> ErrorText | str | None:
    """A task's error as recorded: its message and stack trace through Airflow's secrets masker, which masks the
    same secrets in Airflow's own task log (an error message often quotes a URL or a command with a password)."""
    if error is None:
        return None
    if isinstance(error, BaseException):
        text = ErrorText.of(error)
        return ErrorText(_masked(text.message, redact), None if text.stack is None else _masked(text.stack, redact))
    return _masked(str(error), redact)


def _masked(text: str, redact: Any) -> str:
    try:
        masked = redact(text, None)
        return masked if isinstance(masked, str) else str(masked)
    except Exception as exc:  # unmasked text may hold a secret: keep none of it
        log_once(f"error-mask:{type(exc).__name__}", "metatrail: error text not recorded: masking it failed (%s: %s)",
                 type(exc).__name__, exc)
        return "<not recorded: masking failed>"


def resolved_params(context: Mapping[str, Any] | None, task: Any) -> dict[str, Any]:
    """The params the task saw: from the task-runner's cached context when there is one (it includes
    ``dag_run.conf`` overrides), else the task's own defaults. Never renders the context again."""
    params = context.get("params") if context else None
    if params is None:
        params = getattr(task, "params", None)
    if params is None:
        return {}
    dump = getattr(params, "dump", None)
    if callable(dump):
        result = dump()
        return dict(result) if isinstance(result, Mapping) else {}
    return dict(params) if isinstance(params, Mapping) else {}


def operator_name(task: Any) -> str:
    """The operator's class as ``module.Class`` (TaskFlow tasks show their decorated operator class)."""
    cls = type(task)
    return f"{cls.__module__}.{cls.__qualname__}"


def asset_artifact(obj: Any) -> str | ArtifactRef | None:
    """What the Recorder takes for one inlet/outlet/hook-lineage item, or None when it names no dataset.

    ``Asset("file:///p")``, ``ObjectStoragePath``, ``"/p"`` → a local path (hashed); ``s3://…`` and other URIs → a
    remote dataset (never downloaded); an asset named without a location (``Asset("x")``) → dataset ``x`` in the
    ``airflow`` namespace, with no hash. Aliases and asset conditions name no dataset by themselves.
    """
    if isinstance(obj, str | os.PathLike):
        uri = os.fspath(obj)
    elif isinstance(getattr(obj, "uri", None), str):
        uri = obj.uri
    elif isinstance(getattr(obj, "protocol", None), str | tuple):  # ObjectStoragePath: str() is its URL
        uri = str(obj)
    else:
        return None
    uri = uri.strip()
    if not uri:
        return None
    if "://" in uri or uri.startswith("/"):
        return uri
    return ArtifactRef(uri=uri, namespace=ASSET_NAMESPACE, name=uri, kind="remote", hash_error="asset: no location")


def declared_artifacts(items: Iterable[Any] | None) -> list[str | ArtifactRef]:
    """Datasets of declared ``inlets``/``outlets`` (assets, paths), deduplicated."""
    return dedupe(asset_artifact(item) for item in (items or ()))


def dataset_key(item: str | ArtifactRef) -> tuple[str, str]:
    """The OpenLineage identity ``(namespace, name)`` of what the Recorder takes."""
    if isinstance(item, ArtifactRef):
        return item.namespace, item.name
    # Imported here: Airflow imports the plugin in every component, most of which never record anything.
    from metatrail.hashing import dataset_name

    return dataset_name(item)


def dedupe(items: Iterable[str | ArtifactRef | None]) -> list[str | ArtifactRef]:
    """Drop Nones and repeats of the same dataset (namespace + name), keeping the first."""
    seen: set[tuple[str, str]] = set()
    out: list[str | ArtifactRef] = []
    for item in items:
        if item is None:
            continue
        key = dataset_key(item)
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def _candidates(value: Any, depth: int = 0) -> Iterator[Any]:
    if isinstance(value, str | os.PathLike):
        yield value
    elif depth < 2 and isinstance(value, Mapping):
        for item in value.values():
            yield from _candidates(item, depth + 1)
    elif depth < 2 and isinstance(value, list | tuple | set | frozenset):
        for item in value:
            yield from _candidates(item, depth + 1)


def _too_broad() -> frozenset[str]:
    # Hashing one of these would read a whole machine's worth of files for one argument that merely named it.
    home = os.path.expanduser("~")
    return frozenset(os.path.normpath(p) for p in ("/", home, tempfile.gettempdir(), "/tmp", "/var/tmp", os.getcwd()))


def local_paths(values: Iterable[Any]) -> list[str]:
    """Values (and values inside lists/tuples/dicts, two levels down) that name an existing local file or directory.

    Only absolute paths and ``file://`` URIs count: a bare word such as ``"data"`` that happens to exist in the
    task's working directory is an argument, not a dataset. At most ``MAX_PATH_CANDIDATES`` values are looked at;
    ``/``, the home, temp and working directories are never taken.
    """
    found: list[str] = []
    broad: frozenset[str] | None = None
    for count, value in enumerate(v for item in values for v in _candidates(item)):
        if count >= MAX_PATH_CANDIDATES:
            break
        try:
            text = os.fspath(value)
        except TypeError:
            continue
        if not isinstance(text, str) or len(text) > MAX_PATH_LENGTH or "\n" in text or "\x00" in text:
            continue
        if text.startswith("file://"):
            namespace, path = dataset_key(text)
            if namespace != "file":
                continue
        elif text.startswith("/"):
            path = text
        else:
            continue
        path = os.path.normpath(path)
        if broad is None:
            broad = _too_broad()
        if path in broad or not os.path.exists(path):
            continue
        if path not in found:
            found.append(path)
    return found


def call_arguments(task: Any) -> list[Any]:
    """The rendered positional and keyword arguments of a Python/TaskFlow task (empty for other operators)."""
    values: list[Any] = []
    op_args = getattr(task, "op_args", None)
    if isinstance(op_args, Sequence) and not isinstance(op_args, str):
        values.extend(op_args)
    op_kwargs = getattr(task, "op_kwargs", None)
    if isinstance(op_kwargs, Mapping):
        values.extend(op_kwargs.values())
    return values


LineageMarks = tuple[tuple[int, ...], tuple[int, ...]]


def lineage_marks(collector: Any) -> LineageMarks:
    """The hook-lineage collector's state now: the count of each input and output entry, in the collector's order.

    Airflow's collector keeps one entry per (asset, extra, context object) in insertion order, never removes one,
    and counts each further access to it: so an entry this try reported is one that is new since the marks, or one
    whose count grew (the same path object read again, or a new one that reuses a freed object's id).
    """
    collected = collector.collected_assets
    return _counts(collected.inputs), _counts(collected.outputs)


def _counts(infos: Sequence[Any]) -> tuple[int, ...]:
    return tuple(int(info.count) for info in infos)


def lineage_since(collector: Any, marks: LineageMarks, until: LineageMarks | None = None,
                  ) -> tuple[list[str | ArtifactRef], list[str | ArtifactRef]]:
    """Inputs and outputs reported to the collector since ``marks`` (up to ``until``, when given; else up to now).

    Under ``airflow dags test`` every task runs in one process and the collector accumulates across tasks: what a
    try reported is what changed between the marks taken when it started and those taken when it ended (an end hook
    that runs late must not take the next task's entries).
    """
    collected = collector.collected_assets
    end = until if until is not None else (_counts(collected.inputs), _counts(collected.outputs))
    inputs = dedupe(asset_artifact(info.asset) for info in _grown(collected.inputs, marks[0], end[0]))
    outputs = dedupe(asset_artifact(info.asset) for info in _grown(collected.outputs, marks[1], end[1]))
    return inputs, outputs


def _grown(infos: Sequence[Any], before: tuple[int, ...], after: tuple[int, ...]) -> Iterator[Any]:
    """The entries that are new in ``after`` or whose count grew from ``before``."""
    for index, info in enumerate(infos[:len(after)]):
        if index >= len(before) or after[index] > before[index]:
            yield info


def lineage_is_full(marks: LineageMarks, limit: int | None) -> bool:
    """Whether the collector held ``limit`` inputs or outputs when ``marks`` were taken: Airflow then drops what
    hooks report (``[lineage] max_assets_per_collector``)."""
    if not limit:
        return False
    return len(marks[0]) >= limit or len(marks[1]) >= limit


def alias_outputs(context: Mapping[str, Any] | None) -> list[str | ArtifactRef]:
    """Assets a task attached at run time to its outlet aliases (``outlet_events[alias].add(asset)``)."""
    events = context.get("outlet_events") if context else None
    if events is None:
        return []
    found: list[str | ArtifactRef | None] = []
    for key in list(events):
        if type(key).__name__ != "AssetAlias":
            continue
        for event in getattr(events[key], "asset_alias_events", ()) or ():
            found.append(asset_artifact(getattr(event, "dest_asset_key", None)))
    return dedupe(found)
