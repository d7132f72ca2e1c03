"""The ``metatrail`` command.

Human output is rich tables; ``--json`` output is stable for scripts. Every error is one line on stderr
(``metatrail: error: …``) and a non-zero exit status: 2 for usage/config/store errors, 1 when what was asked about
is not in the store (:class:`NotFound`). ``run`` and ``pipeline`` put the user's command and script first: what
cannot be recorded there is a warning (``metatrail: warning: …``), never a changed exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from metatrail import __version__
from metatrail.errors import ConfigError, MetatrailError

HASH_RE = re.compile(r"^[0-9a-f]{32}(\.dir)?$")
HASH_LENGTHS = {"md5": 32, "sha256": 64}  # hex digits of a content hash by algorithm


# -- helpers ------------------------------------------------------------------------------------------------------
def _store(args: argparse.Namespace) -> Any:
    """The store the command works on. An embedded store first takes in the segments that writers on other hosts
    dropped beside it (:mod:`metatrail.store.drop`), so that what a command shows includes them."""
    from metatrail.config import load_settings
    from metatrail.store import open_store
    from metatrail.store.drop import SCHEME, ingest_drops, ingester_elsewhere, pending_segments, store_path_of

    url = load_settings(store=getattr(args, "store", None)).store
    if url.startswith(f"{SCHEME}:"):
        raise ConfigError(f"{url} only takes events from writers; read the store it drops for: "
                          f"sqlite:///{store_path_of(url)}")
    store = open_store(url)
    path = store_path_of(url)
    if path is not None and pending_segments(path) and ingester_elsewhere(path) is None:
        ingest_drops(store, path)  # not while a workflow on another host takes them in: one host writes the file
    return store


def _site(args: argparse.Namespace) -> str:
    """This machine's configured site (``METATRAIL_SITE``)."""
    from metatrail.config import load_settings

    return load_settings(store=getattr(args, "store", None)).site


def _events_of(store: Any) -> Any:
    """A run's events (with its child runs'), for metatrail.abandoned."""
    return lambda run_id: store.iter_events(run_id=run_id)


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True, default=str, ensure_ascii=False) + "\n")


def _ts(value: float | None) -> str:
    if value is None:
        return "-"
    return dt.datetime.fromtimestamp(value, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _dur(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def _parse_time(text: str) -> float:
    """An ISO date/date-time (UTC unless it says otherwise) or a relative age like ``2h``, ``30m``, ``7d``."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if m:
        return time.time() - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"cannot read time {text!r}: use ISO 8601 (2026-11-27T10:00) or an age (30m, 2h, 7d)") \
            from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def _non_negative_int(text: str) -> int:
    """An argparse type: a count or a depth, never below 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _console() -> Any:
    from rich.console import Console

    # Piped output keeps whole lines (rich would fold tables at 80 columns).
    return Console(width=None if sys.stdout.isatty() else 160)


def _parse_param(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"parameter {text!r} must be key=value")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


# -- commands -----------------------------------------------------------------------------------------------------
def cmd_init(args: argparse.Namespace) -> int:
    from metatrail.config import STORE_DIR_NAME
    from metatrail.store import open_store

    directory = Path.cwd() / STORE_DIR_NAME
    directory.mkdir(exist_ok=True)
    config = directory / "config.toml"
    if not config.exists():
        config.write_text("[metatrail]\n# store = \"sqlite:///path/to/metatrail.db\"\n# namespace = \"default\"\n"
                          "# site = \"local\"\n")
    store = open_store(f"sqlite:///{directory / 'metatrail.db'}")
    store.close()
    print(f"initialised {directory}")
    return 0


# status looks at this many running runs at most to tell the abandoned ones apart (each costs a read of its events)
STATUS_ABANDONED_LOOK = 10_000


def cmd_status(args: argparse.Namespace) -> int:
    from metatrail.abandoned import find_abandoned

    with _store(args) as store:
        stats = store.stats()
        # Abandoned runs are stored as running: say how many of the running ones are (what `runs` calls them).
        running = stats["states"].get("running", 0)
        if running:
            rows = store.list_runs(state="running", limit=STATUS_ABANDONED_LOOK)
            stats["abandoned"] = len(find_abandoned(rows, store.get_run, events_of=_events_of(store),
                                                    site=_site(args)))
            if running > len(rows):
                stats["abandoned_looked_at"] = len(rows)
        else:
            stats["abandoned"] = 0
        if drops := _drops_note(stats["url"]):
            stats["drops"] = drops
    if args.json:
        _print_json(stats)
        return 0
    console = _console()
    console.print(f"store      {stats['url']}")
    if note := _journal_note(stats["url"]):
        console.print(f"journal    {note}")
    console.print(f"events     {stats['events']}")
    console.print(f"pipelines  {stats['pipelines']}")
    states = []
    for state, count in sorted(stats["states"].items()):
        text = f"{state}: {count}"
        if state == "running" and stats["abandoned"]:
            looked = stats.get("abandoned_looked_at")
            of = f" of the {looked} newest" if looked else ""
            text += f" ({stats['abandoned']}{of} abandoned: metatrail runs --state abandoned)"
        states.append(text)
    console.print(f"runs       {stats['runs']} ({stats['executions']} executions)  " + "  ".join(states))
    console.print(f"artifacts  {stats['artifacts']}")
    if drops := stats.get("drops"):
        line = f"drops      {drops['waiting']} segments waiting"
        if drops["taken_in_by"]:
            line += f" (taken in by the workflow on {drops['taken_in_by']})"
        if drops["rejected"]:
            line += f", {drops['rejected']} rejected (see {drops['rejected_dir']})"
        console.print(line)
    return 0


def _drops_note(url: str) -> dict[str, Any] | None:
    """Segments left in the store's drop directory after the command took in what it could (metatrail.store.drop):
    waiting (the store was busy) and rejected; None when there is no drop directory."""
    from metatrail.store.drop import REJECTED, drop_dir, ingester_elsewhere, pending_segments, store_path_of

    path = store_path_of(url)
    if path is None or not drop_dir(path).is_dir():
        return None
    rejected = drop_dir(path) / REJECTED
    try:
        count = sum(1 for _ in rejected.iterdir()) if rejected.is_dir() else 0
    except OSError:
        count = 0
    return {"waiting": len(pending_segments(path)), "rejected": count, "rejected_dir": str(rejected),
            "taken_in_by": ingester_elsewhere(path)}


def _journal_note(url: str) -> str:
    """For an SQLite store on a network filesystem: that it uses a rollback journal, and why (see
    metatrail.store.sqlitefile)."""
    if not url.startswith("sqlite:///"):
        return ""
    from metatrail.fstype import network_filesystem

    network = network_filesystem(url[len("sqlite:///"):])
    return f"rollback (the store is on {network}, where SQLite's write-ahead log cannot work)" if network else ""


def cmd_runs(args: argparse.Namespace) -> int:
    from metatrail.abandoned import find_abandoned

    # Abandoned runs are running runs told apart here: all running ones are looked at, then the limit applies.
    only_abandoned = args.state == "abandoned"
    with _store(args) as store:
        rows = store.list_runs(pipeline=args.pipeline, state="running" if only_abandoned else args.state,
                               kind=args.kind, since=_parse_time(args.since) if args.since else None,
                               limit=1_000_000 if only_abandoned else args.limit)
        abandoned = (find_abandoned(rows, store.get_run, events_of=_events_of(store), site=_site(args))
                     if any(r["state"] == "running" for r in rows) else {})
    if only_abandoned:
        rows = [r for r in rows if r["run_id"] in abandoned][: args.limit]
    for r in rows:
        r["abandoned"] = abandoned.get(r["run_id"])
    if args.json:
        _print_json(rows)
        return 0
    from rich.table import Table

    table = Table(title=f"runs ({len(rows)})")
    if any(r["abandoned"] for r in rows):
        table.caption = ("abandoned: recorded as running, but the process that recorded it has ended without "
                         "finishing it (metatrail show RUN says why; metatrail abort --abandoned records their end)")
    for col in ("run id", "pipeline", "stage", "state", "started (UTC)", "duration", "site"):
        table.add_column(col, no_wrap=col in ("run id", "started (UTC)"))
    colours = {"completed": "green", "failed": "red", "running": "yellow", "abandoned": "magenta"}
    for r in rows:
        shown = "abandoned" if r["abandoned"] else r["state"]
        state = f"[{colours.get(shown, 'white')}]{shown}[/]"
        table.add_row(r["run_id"], r["pipeline"], r["stage"] or f"({r['kind']})", state, _ts(r["started_at"]),
                      _dur(r["duration_s"]), r["site"] or "-")
    _console().print(table)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from metatrail.abandoned import find_abandoned, is_abandoned_record

    with _store(args) as store:
        run = store.get_run(args.run_id)
        if run is None:
            raise ConfigError(f"no run {args.run_id!r} in the store")
        run["abandoned"] = find_abandoned([run], store.get_run, events_of=_events_of(store),
                                          site=_site(args)).get(run["run_id"])
    if args.json:
        _print_json(run)
        return 0
    from rich.table import Table

    console = _console()
    console.print(f"[bold]{run['pipeline']}[/] / {run['stage'] or run['kind']}  run {run['run_id']}")
    ended = _ts(run["ended_at"])
    if is_abandoned_record(run):
        ended = f"at an unknown moment after {ended}"
    console.print(f"state {run['state']}   started {_ts(run['started_at'])}   ended {ended}   "
                  f"duration {_dur(run['duration_s'])}")
    if run["abandoned"]:
        console.print(f"[magenta]abandoned[/]: {run['abandoned']}; nothing will finish this run "
                      f"(metatrail abort {run['run_id']} records its end)")
    if run["parent_run_id"]:
        console.print(f"pipeline run {run['parent_run_id']}")
    if run["error"]:
        console.print(f"[red]error[/] {run['error']}")
    if run["params"]:
        console.print("params " + json.dumps(run["params"], sort_keys=True))
    for title, items in (("inputs", run["inputs"]), ("outputs", run["outputs"])):
        if not items:
            continue
        table = Table(title=title)
        for col in ("name", "hash", "size"):
            table.add_column(col)
        for e in items:
            table.add_row(e["name"] if e["namespace"] == "file" else f"{e['namespace']}/{e['name']}",
                          e["hash"] or f"[red]null[/] ({e['hash_error'] or 'unknown'})",
                          str(e["size"]) if e["size"] is not None else "-")
        console.print(table)
    if run.get("metrics"):
        console.print("metrics " + json.dumps(run["metrics"], sort_keys=True))
    energy = run["facets"].get("metatrail_energy")
    if energy:
        _print_energy(console, energy)
    if run["children"]:
        console.print(f"{len(run['children'])} executions: "
                      + ", ".join(f"{c['stage']} ({c['state']})" for c in run["children"][:20]))
    return 0


def _print_energy(console: Any, energy: dict[str, Any]) -> None:
    """Energy per domain with its method, or the reason it is missing; estimates apart from measurements."""
    from rich.markup import escape

    def joules(value: Any) -> str:
        return "null" if value is None else f"{value:.3f} J"

    coverage = energy.get("coverage")
    console.print(f"energy  measured {joules(energy.get('measured_j'))}, estimated {joules(energy.get('estimated_j'))}"
                  f" (policy {energy.get('policy')}, coverage "
                  f"{'null' if coverage is None else f'{coverage:.0%}'})")
    for domain, entry in sorted((energy.get("domains") or {}).items()):
        if entry.get("value_j") is not None:
            console.print(f"  {domain:5} {joules(entry['value_j'])}  {escape('[' + str(entry.get('method')) + ']')}")
        else:
            console.print(f"  {domain:5} [dim]null[/]  {escape(str(entry.get('reason')))}")
    for domain, entry in sorted((energy.get("estimated") or {}).items()):
        console.print(f"  {domain:5} {joules(entry.get('value_j'))}  estimated: {escape(str(entry.get('model')))}")
    backends = (energy.get("meter") or {}).get("backends")
    for backend in backends if isinstance(backends, list) else ():
        if isinstance(backend, dict) and backend.get("available") is False and backend.get("reason"):
            console.print(f"  [dim]{escape(str(backend.get('name')))} unavailable:[/] {escape(str(backend['reason']))}")
    carbon = energy.get("carbon") or {}
    if carbon.get("co2e_g") is not None:
        console.print(f"  carbon {carbon['co2e_g']:.4g} g CO2e at {carbon.get('intensity_g_per_kwh')} g/kWh "
                      f"({carbon.get('intensity_source')}, {carbon.get('intensity_year')}), PUE {carbon.get('pue')}")


class NotFound(MetatrailError):
    """What the command was asked about is not in the store (exit status 1, as ``grep`` finding nothing)."""


def _hash_key(target: str) -> str | None:
    """The artifact key (``md5:…``) ``target`` names as a content hash, or None when it is not one. A target
    that says it is a hash (``md5:``/``sha256:``) but is malformed is a usage error."""
    algorithm, sep, value = target.partition(":")
    if sep and algorithm.lower() in HASH_LENGTHS:
        value = value.lower()
        if not re.fullmatch(rf"[0-9a-f]{{{HASH_LENGTHS[algorithm.lower()]}}}(\.dir)?", value):
            raise ConfigError(f"malformed hash {target!r}: use md5:<32 hex digits>[.dir] or sha256:<64 hex digits>")
        return f"{algorithm.lower()}:{value}"
    if HASH_RE.match(target) and not Path(target).exists():
        return f"md5:{target}"
    return None


def _artifact_keys(store: Any, target: str) -> list[str]:
    from metatrail import hashing

    key = _hash_key(target)
    if key is not None:
        if not store.find_artifacts(key=key):
            raise NotFound(f"no artifact with hash {key} in the store")
        return [key]
    if "://" not in target and os.path.exists(target):
        ref = hashing.hash_path(target, None)
        if ref.hash is not None:
            key = f"{ref.hash.name}:{ref.hash.value}"
            if store.find_artifacts(key=key):
                return [key]
    namespace, name = hashing.dataset_name(target)
    keys = sorted({a["artifact_key"] for a in store.find_artifacts(namespace=namespace, name=name)})
    if not keys:
        raise ConfigError(f"no artifact {target!r} in the store (looked up by content hash and by name)")
    return keys


def cmd_lineage(args: argparse.Namespace) -> int:
    direction = "downstream" if args.downstream else "both" if args.both else "upstream"
    with _store(args) as store:
        keys = _artifact_keys(store, args.target)
        graph = store.lineage(keys, direction=direction, depth=args.depth)
    graph["direction"] = direction
    if args.json:
        _print_json(graph)
        return 0
    from rich.tree import Tree

    nodes = {n["id"]: n for n in graph["nodes"]}
    produced_by: dict[str, list[str]] = {}
    consumed_by: dict[str, list[str]] = {}
    run_inputs: dict[str, list[str]] = {}
    run_outputs: dict[str, list[str]] = {}
    for e in graph["edges"]:
        if e["type"] == "output":
            produced_by.setdefault(e["to"], []).append(e["from"])
            run_outputs.setdefault(e["from"], []).append(e["to"])
        else:
            consumed_by.setdefault(e["from"], []).append(e["to"])
            run_inputs.setdefault(e["to"], []).append(e["from"])

    def label(node_id: str) -> str:
        n = nodes.get(node_id, {"type": "artifact", "names": [node_id], "hash": None})
        if n["type"] == "run":
            return f"[bold]{n['pipeline']}.{n['stage'] or '(pipeline)'}[/] [dim]{n['run_id']}[/] {n['state']}"
        return f"[cyan]{', '.join(n['names'][:3])}[/] [dim]{n.get('hash') or n.get('key', '')}[/]"

    def branches(tree: Any, art: str, depth: int, seen: set[str]) -> Iterator[tuple[Any, str, int]]:
        """Add the runs around ``art`` under ``tree``; yield each artifact node still to grow, in order."""
        runs = produced_by.get(art, []) if direction != "downstream" else consumed_by.get(art, [])
        for run in runs:
            branch = tree.add(("produced by " if direction != "downstream" else "read by ") + label(run))
            if run in seen or depth <= 0:
                continue
            seen.add(run)
            nxt = run_inputs.get(run, []) if direction != "downstream" else run_outputs.get(run, [])
            for a in sorted(nxt):
                yield branch.add(label(a)), a, depth - 1

    def grow(root: Any, art: str, depth: int) -> None:
        # Depth first with a stack of generators rather than recursion: a chain of a thousand runs would pass
        # Python's recursion limit; the order (and so which repeat of a run is expanded) is the recursive one.
        seen: set[str] = set()
        stack = [branches(root, art, depth, seen)]
        while stack:
            step = next(stack[-1], None)
            if step is None:
                stack.pop()
            else:
                stack.append(branches(*step, seen))

    console = _console()
    for key in keys:
        root = Tree(label(f"artifact:{key}"))
        grow(root, f"artifact:{key}", args.depth)
        console.print(root)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    with _store(args) as store:
        out = sys.stdout
        for ev in store.iter_events(pipeline=args.pipeline, since=_parse_time(args.since) if args.since else None):
            out.write(json.dumps(ev.body, sort_keys=True, ensure_ascii=False) + "\n")
    return 0


def cmd_hash(args: argparse.Namespace) -> int:
    from metatrail import hashing
    from metatrail.config import load_settings

    cache = hashing.HashCache(load_settings().hash_cache) if not args.no_cache else None
    refs = [hashing.hash_path(p, cache) for p in args.paths]
    if args.json:
        _print_json([{"uri": r.uri, "namespace": r.namespace, "name": r.name, "kind": r.kind,
                      "algorithm": r.hash.name if r.hash else None, "hash": r.hash.value if r.hash else None,
                      "size": r.size, "nfiles": r.nfiles, "error": r.hash_error} for r in refs])
    else:
        for r in refs:
            print(f"{r.hash.value if r.hash else 'null'}  {r.uri}" + (f"  ({r.hash_error})" if r.hash_error else ""))
    return 0 if all(r.hash for r in refs) else 1


def _warn(message: str) -> None:
    print(f"metatrail: warning: {message}", file=sys.stderr)


def _recorder_or_none(what: str) -> Any:
    """The process's Recorder with its settings resolved, or None (after one warning) when they cannot be: a bad
    setting must cost the record, never the user's command or script."""
    from metatrail.recorder import get_recorder

    try:
        rec = get_recorder()
        rec.settings  # noqa: B018 -- resolve now, before anything runs, rather than in the writer thread
    except Exception as exc:
        _warn(f"{exc}; {what} is not recorded")
        return None
    return rec


def _run_id(text: str) -> str:
    """A run id as ``pipeline start`` prints it (a UUID); anything else is a usage error."""
    import uuid

    try:
        uuid.UUID(text)
    except ValueError:
        raise ConfigError(f"{text!r} is not a run id (a UUID, as 'metatrail pipeline start' prints it)") from None
    return text


def cmd_pipeline(args: argparse.Namespace) -> int:
    """``pipeline start|finish``. Only usage errors fail (exit 2): a run that cannot be recorded is a warning on
    stderr and exit 0, so that a ``set -e`` script around ``RUN=$(metatrail pipeline start P)`` goes on running."""
    from metatrail.config import is_disabled

    if args.action == "start":
        params = dict(_parse_param(p) for p in args.param or [])
        if is_disabled():
            from metatrail.model import uuid7

            print(uuid7())  # a fresh id, so that the script's later steps run unchanged; nothing is read or written
            return 0
        return _pipeline_start(args, params)
    run_id = _run_id(args.run_id)
    if is_disabled():
        return 0
    return _pipeline_finish(args, run_id)


def _pipeline_start(args: argparse.Namespace, params: dict[str, Any]) -> int:
    from metatrail.model import uuid7

    rec = _recorder_or_none("the pipeline run")
    if rec is None:
        print(uuid7())
        return 0
    # The run lasts as long as the script that started it (this process ends at once): its pid is the script's.
    run = rec.pipeline_run_started(args.pipeline, params=params, namespace=args.namespace, integration="SHELL",
                                   pid=os.getppid())
    if not rec.flush(rec.settings.flush_timeout):
        _warn(f"the start of pipeline run {run.id} was not stored (see above); its executions are recorded "
              "without it and 'pipeline finish' will not find it")
    print(run.id)
    return 0


def _pipeline_finish(args: argparse.Namespace, run_id: str) -> int:
    from metatrail.model import PipelineRun, Status

    rec = _recorder_or_none("the end of the pipeline run")
    if rec is None:
        return 0
    try:
        with _store(args) as store:
            row = store.get_run(run_id)
    except MetatrailError as exc:
        _warn(f"{exc}; the end of pipeline run {run_id} is not recorded")
        return 0
    if row is None:
        _warn(f"no pipeline run {run_id!r} in the store (was its start stored?); its end is not recorded")
        return 0
    run = PipelineRun(id=row["run_id"], pipeline=row["pipeline"], namespace=row["namespace"], integration="SHELL",
                      started_at=row["started_at"])
    rec.pipeline_run_finished(run, status=Status(args.status), error=args.error)
    if not rec.flush(rec.settings.flush_timeout):
        _warn(f"the end of pipeline run {run_id} was not stored (see above)")
    return 0


def cmd_abort(args: argparse.Namespace) -> int:
    """``abort``: record the end of runs that nothing will finish, as ABORT events (see :mod:`metatrail.abandoned`).
    A named run must be running; one whose recording process is alive on this host is refused (stop it first)."""
    from metatrail.abandoned import abort_events, find_abandoned, recording_process
    from metatrail.config import is_disabled

    if not args.run_ids and not args.abandoned:
        raise ConfigError("name the runs to abort, or give --abandoned (the runs 'metatrail runs' calls abandoned)")
    if is_disabled():
        return 0
    site = _site(args)
    with _store(args) as store:
        events_of = _events_of(store)
        reasons: dict[str, str] = {}
        if args.abandoned:
            rows = store.list_runs(state="running", pipeline=args.pipeline, limit=1_000_000)
            reasons.update(find_abandoned(rows, store.get_run, events_of=events_of, site=site))
        for run_id in args.run_ids:
            run = store.get_run(run_id)
            if run is None:
                raise NotFound(f"no run {run_id!r} in the store")
            if run["state"] != "running":
                raise ConfigError(f"run {run_id} is not running (it is {run['state']}): there is nothing to abort")
            fate, gone = recording_process(run, events_of)
            if fate == "alive":
                raise ConfigError(f"run {run_id} is still being recorded by process {run.get('pid')} on this host: "
                                  "stop that process (its own end is then recorded) rather than abort the run")
            reasons[run_id] = (find_abandoned([run], store.get_run, events_of=events_of, site=site).get(run_id)
                               or gone or "ended by hand")
        if args.reason:
            reasons = {run_id: f"{args.reason} ({why})" for run_id, why in reasons.items()}
        events = abort_events(store, reasons, by="metatrail abort")
        if events and not args.dry_run:
            store.ingest(events)
    done = [{"run_id": e["run"]["runId"], "job": e["job"].get("name"), "last_seen": e["eventTime"],
             "reason": reasons[e["run"]["runId"]]} for e in events]
    if events and not args.dry_run:
        _ship_now(args)
    if args.json:
        _print_json(done)
        return 0
    verb = "would abort" if args.dry_run else "aborted"
    for d in done:
        print(f"{verb} {d['run_id']} {d['job']} (last seen {d['last_seen']}): {d['reason']}")
    if not done:
        print("no run to abort")
    return 0


def _ship_now(args: argparse.Namespace) -> None:
    """Ship what was just stored when a server is configured (bounded as at exit; what is left goes with the next
    shipper or ``metatrail push``)."""
    from metatrail.config import load_settings
    from metatrail.ship import LazyShipper

    try:
        settings = load_settings(store=getattr(args, "store", None))
        shipper = LazyShipper(lambda: settings)
        shipper.notify()
        shipper.close()
    except Exception as exc:
        _warn(f"not shipped to the server now ({exc}); metatrail push sends it")


def _read_metrics(path: str) -> dict[str, Any] | None:
    """The JSON object of result metrics a command wrote; a missing or bad file is reported, never fatal."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        print(f"metatrail: warning: metrics file {path} not read: {exc}", file=sys.stderr)
        return None
    if not isinstance(data, dict):
        print(f"metatrail: warning: metrics file {path} does not hold a JSON object", file=sys.stderr)
        return None
    return data


def _command_processes(pid: int) -> Any:
    """The energy monitor's view of the command: its tree, whose final CPU time ``_reap`` will supply."""
    try:
        from metatrail.energy.processes import TaskProcesses

        processes = TaskProcesses()
        processes.add(pid)
        return processes
    except Exception:  # energy is optional: without it the command is still recorded
        return None


def _reap(child: subprocess.Popen[bytes]) -> tuple[int, float | None]:
    """Wait for the command; its exit status and the user+system CPU seconds of it and every descendant it
    waited for (``os.wait4``'s resource usage), or None where the platform cannot tell."""
    wait4 = getattr(os, "wait4", None)
    if wait4 is not None:
        try:
            _, status, usage = wait4(child.pid, 0)
        except ChildProcessError:
            pass
        else:
            child.returncode = os.waitstatus_to_exitcode(status)
            return child.returncode, usage.ru_utime + usage.ru_stime
    return child.wait(), None


def _exit_code(returncode: int) -> int:
    """The status a POSIX shell reports for the command: its own, or 128 + N when signal N killed it."""
    return returncode if returncode >= 0 else 128 - returncode


def _signal_name(signum: int) -> str:
    """``SIGTERM``, or the number of a signal Python has no name for (``35``: the real-time signals)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def _cannot_run(command: list[str], exc: OSError) -> tuple[int, str]:
    """The shell's exit status for a command that could not be started (127 not found, 126 not executable) and
    why."""
    code = 127 if isinstance(exc, FileNotFoundError) else 126
    return code, f"cannot run {command[0]!r}: {exc.strerror or exc}"


class _ForegroundSignals:
    """Signals while the command runs, handled as a shell handles them for a foreground job.

    SIGINT and SIGQUIT come from the terminal, which sends them to the whole process group: the command gets its
    own, so metatrail only outlives it (to record the result) and forwards nothing. They are caught by a handler
    that does nothing rather than set to SIG_IGN, because an ignored signal stays ignored in the command after
    ``exec``, while a caught one is reset to its default there. SIGTERM and SIGHUP sent to metatrail are passed on
    to the command (a batch system or ``kill`` names metatrail's pid only). A signal that was already ignored when
    metatrail started (``nohup``, a background job of a script) is left ignored, for the command to inherit.
    Installed before the command starts, so no signal falls into a gap where metatrail would die without it.
    """

    IGNORED = (signal.SIGINT, signal.SIGQUIT)
    FORWARDED = (signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}
        self._pid: int | None = None
        self._pending: list[int] = []

    def __enter__(self) -> _ForegroundSignals:
        for sig in (*self.IGNORED, *self.FORWARDED):
            previous = signal.getsignal(sig)
            if previous == signal.SIG_IGN:
                continue
            self._previous[sig] = previous
            signal.signal(sig, self._swallow if sig in self.IGNORED else self._forward)
        return self

    def __exit__(self, *_exc: object) -> None:
        self._pid = None
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)

    def started(self, pid: int) -> None:
        """The command runs as ``pid``: pass on what arrived while it was being started."""
        self._pid = pid
        for sig in self._pending:
            self._send(sig)
        self._pending.clear()

    def ended(self) -> None:
        """The command was reaped: its pid may be reused, so nothing is sent to it any more."""
        self._pid = None

    def _swallow(self, _signum: int, _frame: Any) -> None:
        return None

    def _forward(self, signum: int, _frame: Any) -> None:
        if self._pid is None:
            self._pending.append(signum)
        else:
            self._send(signum)

    def _send(self, signum: int) -> None:
        if self._pid is None:
            return
        with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
            os.kill(self._pid, signum)


def _run_unrecorded(command: list[str]) -> int:
    """Run the command as a shell would, recording nothing (kill switch, or settings that cannot be read)."""
    with _ForegroundSignals() as signals:
        try:
            child = subprocess.Popen(command)
        except OSError as exc:
            code, reason = _cannot_run(command, exc)
            print(f"metatrail: {reason}", file=sys.stderr)
            return code
        signals.started(child.pid)
        returncode, _ = _reap(child)
        signals.ended()
    return _exit_code(returncode)


def _command_of(args: argparse.Namespace) -> list[str]:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ConfigError("no command given: metatrail run [options] -- CMD ARGS...")
    return command


def cmd_run(args: argparse.Namespace) -> int:
    """Run a command, record it as an execution, return its exit status with its output untouched."""
    from metatrail.config import is_disabled

    command = _command_of(args)
    params = dict(_parse_param(p) for p in args.param or [])
    if is_disabled():
        return _run_unrecorded(command)
    rec = _recorder_or_none("the command")
    if rec is None:
        return _run_unrecorded(command)
    return _run_recorded(rec, command, args, params)


def _hash_inputs(rec: Any, paths: list[str]) -> list[Any]:
    """The inputs' hashes, taken before the command can change them; none when hashing fails."""
    from metatrail import hashing
    from metatrail.logsafe import log_once

    try:
        cache = hashing.HashCache(rec.settings.hash_cache)
        try:
            return [hashing.hash_path(p, cache) for p in paths]
        finally:
            cache.close()
    except Exception as exc:  # recording must never stop the command
        log_once("run-hash", "metatrail: could not hash inputs: %s", exc)
        return []


def _run_recorded(rec: Any, command: list[str], args: argparse.Namespace, params: dict[str, Any]) -> int:
    from metatrail.model import PipelineRun
    from metatrail.recorder import safe_params

    settings = rec.settings
    parent_id = args.pipeline_run or os.environ.get("METATRAIL_PIPELINE_RUN")
    parent = None
    if parent_id:
        parent = PipelineRun(id=parent_id, pipeline=args.pipeline, namespace=args.namespace or settings.namespace,
                             integration="SHELL")
    start = {"pipeline_run": parent, "inputs": _hash_inputs(rec, args.input or []), "params": safe_params(params),
             "integration": "SHELL", "namespace": args.namespace}
    started = time.time()
    with _ForegroundSignals() as signals:
        try:
            child = subprocess.Popen(command)
        except OSError as exc:
            code, reason = _cannot_run(command, exc)
            ex = rec.execution_started(args.pipeline, args.stage, started_at=started, measure_energy=False, **start)
            rec.execution_failed(ex, error=reason, exit_code=code)
            _flush_or_warn(rec)
            print(f"metatrail: {reason}", file=sys.stderr)
            return code
        signals.started(child.pid)
        processes = _command_processes(child.pid)
        ex = rec.execution_started(args.pipeline, args.stage, started_at=started, pid=child.pid,
                                   extra={"command": command}, energy_source=processes, **start)
        returncode, cpu_s = _reap(child)
        signals.ended()
    exit_code = _exit_code(returncode)
    try:
        _record_end(rec, args, ex, (child.pid, processes), returncode, cpu_s)
    except KeyboardInterrupt:
        _warn("interrupted while storing the record; it may be incomplete")
    return exit_code


def _record_end(rec: Any, args: argparse.Namespace, ex: Any, tree: tuple[int, Any], returncode: int,
                cpu_s: float | None) -> None:
    """Record how the command ended; ``tree``: its pid and the energy monitor's view of its processes."""
    pid, processes = tree
    if processes is not None:
        # The exact CPU time of the whole tree, even if it ended between two energy samples.
        processes.exited(pid, cpu_s)
        processes.close()
    ended = time.time()
    metrics = _read_metrics(args.metrics_file) if args.metrics_file else None
    if returncode == 0:
        rec.execution_finished(ex, outputs=args.output or [], ended_at=ended, exit_code=0, metrics=metrics)
    else:
        reason = (f"command exited with status {returncode}" if returncode > 0
                  else f"command killed by signal {_signal_name(-returncode)}")
        rec.execution_finished(ex, status="failed", error=reason, outputs=args.output or [], ended_at=ended,
                               exit_code=_exit_code(returncode), metrics=metrics)
    _flush_or_warn(rec)


def _flush_or_warn(rec: Any) -> None:
    if not rec.flush(rec.settings.flush_timeout):
        _warn("the record was not stored (the store failed or the flush timeout passed; see above)")


# -- parser -------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metatrail", description="Implicit, federated metadata for workflows.")
    parser.add_argument("--version", action="version", version=f"metatrail {__version__}")
    sub = parser.add_subparsers(dest="command_name", metavar="COMMAND", required=True)

    def add(name: str, func: Any, help_: str, store: bool = True, json_: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        if store:
            p.add_argument("--store", help="store URL (default: METATRAIL_STORE or the nearest .metatrail/)")
        if json_:
            p.add_argument("--json", action="store_true", help="stable JSON output for scripts")
        return p

    add("init", cmd_init, "create .metatrail/ (store and config) in the working directory", store=False, json_=False)
    add("status", cmd_status, "what the store holds")
    p = add("runs", cmd_runs, "list runs, newest first")
    p.add_argument("--pipeline")
    p.add_argument("--state", choices=["running", "completed", "failed", "aborted", "unknown", "abandoned"],
                   help="abandoned: running, but the process that recorded it has ended (see metatrail abort)")
    p.add_argument("--kind", choices=["execution", "pipeline_run", "run"])
    p.add_argument("--since", help="ISO time or age (2h, 7d)")
    p.add_argument("--limit", type=_non_negative_int, default=50)
    p = add("abort", cmd_abort, "record the end of runs that nothing will finish (abandoned, or named)")
    p.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="runs to end (they must be running)")
    p.add_argument("--abandoned", action="store_true",
                   help="every run whose recording process on this host has ended without finishing it")
    p.add_argument("--pipeline", help="with --abandoned: only this pipeline's runs")
    p.add_argument("--reason", help="said in each ABORT event, before what was found")
    p.add_argument("--dry-run", action="store_true", help="say what would be aborted; record nothing")
    p = add("show", cmd_show, "one run with its inputs, outputs, parameters")
    p.add_argument("run_id")
    p = add("lineage", cmd_lineage, "lineage of an artifact (a path, URL or content hash)")
    p.add_argument("target", metavar="PATH_OR_HASH")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--upstream", action="store_true", help="what produced it (default)")
    g.add_argument("--downstream", action="store_true", help="what consumed it")
    g.add_argument("--both", action="store_true")
    p.add_argument("--depth", type=_non_negative_int, default=10, help="run hops (default 10)")
    p = add("export", cmd_export, "export events", json_=False)
    p.add_argument("format", choices=["openlineage"], help="openlineage: JSON Lines on stdout")
    p.add_argument("--pipeline")
    p.add_argument("--since", help="ISO time or age (2h, 7d)")
    p = add("hash", cmd_hash, "DVC-compatible md5 of files and directories", store=False)
    p.add_argument("paths", nargs="+")
    p.add_argument("--no-cache", action="store_true")
    p = add("pipeline", cmd_pipeline, "record a pipeline run from a shell script", json_=False)
    psub = p.add_subparsers(dest="action", required=True)
    ps = psub.add_parser("start", help="record the start; prints the run id (export METATRAIL_PIPELINE_RUN=…)")
    ps.add_argument("pipeline")
    ps.add_argument("-p", "--param", action="append", metavar="KEY=VALUE")
    ps.add_argument("--namespace")
    ps.add_argument("--store")
    pf = psub.add_parser("finish", help="record the end of a pipeline run")
    pf.add_argument("run_id")
    pf.add_argument("--status", choices=["completed", "failed", "aborted"], default="completed")
    pf.add_argument("--error")
    pf.add_argument("--store")
    p = add("run", cmd_run, "run a command and record it as an execution", store=False, json_=False)
    p.add_argument("--pipeline", required=True)
    p.add_argument("--stage", required=True)
    p.add_argument("-i", "--input", action="append", metavar="PATH", help="input file, directory or URL")
    p.add_argument("-o", "--output", action="append", metavar="PATH", help="output file or directory")
    p.add_argument("-p", "--param", action="append", metavar="KEY=VALUE", help="parameter (value JSON or text)")
    p.add_argument("--pipeline-run", help="parent pipeline run id (default: $METATRAIL_PIPELINE_RUN)")
    p.add_argument("--metrics-file", metavar="FILE", help="JSON object of result metrics the command writes "
                   "(accuracy, loss ...), read when it ends")
    p.add_argument("--namespace")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS")
    _register_optional(sub)
    return parser


def _register_optional(sub: Any) -> None:
    """Commands of optional parts register themselves; their heavy imports happen only when they run."""
    for module in ("metatrail.server.commands", "metatrail.energy.commands"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ImportError:
            continue
        mod.register(sub)


# Commands that only read a store: the notice that an SQLite store on a network filesystem uses a rollback journal
# (metatrail.store.sqlitefile) is for the processes that record into it, and `metatrail status` shows it; these
# commands log it at INFO rather than repeat the warning at every query.
READING_COMMANDS = frozenset({"status", "runs", "show", "lineage", "export", "energy", "hash"})


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command_name in READING_COMMANDS:
        from metatrail.store import sqlitefile

        sqlitefile.NETWORK_NOTICE_LEVEL = logging.INFO
    try:
        result: int = args.func(args)
        return result
    except NotFound as exc:
        print(f"metatrail: error: {exc}", file=sys.stderr)
        return 1
    except MetatrailError as exc:
        print(f"metatrail: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
