"""The ``metatrail`` command.

Human output is rich tables; ``--json`` output is stable for scripts. Every error is one line on stderr
(``metatrail: error: …``) and a non-zero exit status (2 for usage/config/store errors).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metatrail import __version__
from metatrail.errors import ConfigError, MetatrailError

HASH_RE = re.compile(r"^[0-9a-f]{32}(\.dir)?$")


# -- helpers ------------------------------------------------------------------------------------------------------
def _store(args: argparse.Namespace) -> Any:
    from metatrail.config import load_settings
    from metatrail.store import open_store

    return open_store(load_settings(store=getattr(args, "store", None)).store)


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


def cmd_status(args: argparse.Namespace) -> int:
    with _store(args) as store:
        stats = store.stats()
    if args.json:
        _print_json(stats)
        return 0
    console = _console()
    console.print(f"store      {stats['url']}")
    console.print(f"events     {stats['events']}")
    console.print(f"pipelines  {stats['pipelines']}")
    console.print(f"runs       {stats['runs']} ({stats['executions']} executions)  "
                  + "  ".join(f"{k}: {v}" for k, v in sorted(stats["states"].items())))
    console.print(f"artifacts  {stats['artifacts']}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    with _store(args) as store:
        rows = store.list_runs(pipeline=args.pipeline, state=args.state, kind=args.kind,
                               since=_parse_time(args.since) if args.since else None, limit=args.limit)
    if args.json:
        _print_json(rows)
        return 0
    from rich.table import Table

    table = Table(title=f"runs ({len(rows)})")
    for col in ("run id", "pipeline", "stage", "state", "started (UTC)", "duration", "site"):
        table.add_column(col, no_wrap=col in ("run id", "started (UTC)"))
    colours = {"completed": "green", "failed": "red", "running": "yellow"}
    for r in rows:
        state = f"[{colours.get(r['state'], 'white')}]{r['state']}[/]"
        table.add_row(r["run_id"], r["pipeline"], r["stage"] or f"({r['kind']})", state, _ts(r["started_at"]),
                      _dur(r["duration_s"]), r["site"] or "-")
    _console().print(table)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with _store(args) as store:
        run = store.get_run(args.run_id)
    if run is None:
        raise ConfigError(f"no run {args.run_id!r} in the store")
    if args.json:
        _print_json(run)
        return 0
    from rich.table import Table

    console = _console()
    console.print(f"[bold]{run['pipeline']}[/] / {run['stage'] or run['kind']}  run {run['run_id']}")
    console.print(f"state {run['state']}   started {_ts(run['started_at'])}   ended {_ts(run['ended_at'])}   "
                  f"duration {_dur(run['duration_s'])}")
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
    carbon = energy.get("carbon") or {}
    if carbon.get("co2e_g") is not None:
        console.print(f"  carbon {carbon['co2e_g']:.4g} g CO2e at {carbon.get('intensity_g_per_kwh')} g/kWh "
                      f"({carbon.get('intensity_source')}, {carbon.get('intensity_year')}), PUE {carbon.get('pue')}")


def _artifact_keys(store: Any, target: str) -> list[str]:
    from metatrail import hashing

    if target.startswith(("md5:", "sha256:")):
        return [target]
    if HASH_RE.match(target) and not Path(target).exists():
        return [f"md5:{target}"]
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

    def grow(tree: Any, art: str, depth: int, seen: set[str]) -> None:
        runs = produced_by.get(art, []) if direction != "downstream" else consumed_by.get(art, [])
        for run in runs:
            branch = tree.add(("produced by " if direction != "downstream" else "read by ") + label(run))
            if run in seen or depth <= 0:
                continue
            seen.add(run)
            nxt = run_inputs.get(run, []) if direction != "downstream" else run_outputs.get(run, [])
            for a in sorted(nxt):
                grow(branch.add(label(a)), a, depth - 1, seen)

    console = _console()
    for key in keys:
        root = Tree(label(f"artifact:{key}"))
        grow(root, f"artifact:{key}", args.depth, set())
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


def cmd_pipeline(args: argparse.Namespace) -> int:
    from metatrail.model import PipelineRun, Status
    from metatrail.recorder import get_recorder

    rec = get_recorder()
    if args.action == "start":
        params = dict(_parse_param(p) for p in args.param or [])
        run = rec.pipeline_run_started(args.pipeline, params=params, namespace=args.namespace, integration="SHELL")
        rec.flush(rec.settings.flush_timeout)
        print(run.id)
        return 0
    with _store(args) as store:
        row = store.get_run(args.run_id)
    if row is None:
        raise ConfigError(f"no pipeline run {args.run_id!r} in the store")
    run = PipelineRun(id=row["run_id"], pipeline=row["pipeline"], namespace=row["namespace"], integration="SHELL",
                      started_at=row["started_at"])
    rec.pipeline_run_finished(run, status=Status(args.status), error=args.error)
    ok = rec.flush(rec.settings.flush_timeout)
    return 0 if ok else 1


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


def cmd_run(args: argparse.Namespace) -> int:
    """Run a command, record it as an execution, return its exit status with its output untouched."""
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ConfigError("no command given: metatrail run [options] -- CMD ARGS...")
    from metatrail import hashing
    from metatrail.config import is_disabled
    from metatrail.logsafe import log_once
    from metatrail.model import ArtifactRef, PipelineRun
    from metatrail.recorder import get_recorder, safe_params

    if is_disabled():
        return subprocess.call(command)
    rec = get_recorder()
    params = safe_params(dict(_parse_param(p) for p in args.param or []))
    parent_id = args.pipeline_run or os.environ.get("METATRAIL_PIPELINE_RUN")
    parent = None
    if parent_id:
        parent = PipelineRun(id=parent_id, pipeline=args.pipeline, namespace=args.namespace or rec.settings.namespace,
                             integration="SHELL")
    # Inputs are hashed before the command can change them.
    inputs: list[ArtifactRef] = []
    try:
        cache = hashing.HashCache(rec.settings.hash_cache)
        inputs = [hashing.hash_path(p, cache) for p in args.input or []]
        cache.close()
    except Exception as exc:  # recording must never stop the command
        log_once("run-hash", "metatrail: could not hash inputs: %s", exc)
    started = time.time()
    try:
        child = subprocess.Popen(command)
    except OSError as exc:
        ex = rec.execution_started(args.pipeline, args.stage, pipeline_run=parent, inputs=inputs, params=params,
                                   integration="SHELL", namespace=args.namespace, started_at=started,
                                   measure_energy=False)
        rec.execution_failed(ex, error=f"cannot run {command[0]!r}: {exc.strerror or exc}", exit_code=127)
        rec.flush(rec.settings.flush_timeout)
        print(f"metatrail: cannot run {command[0]!r}: {exc.strerror or exc}", file=sys.stderr)
        return 127 if isinstance(exc, FileNotFoundError) else 126
    processes = _command_processes(child.pid)
    ex = rec.execution_started(args.pipeline, args.stage, pipeline_run=parent, inputs=inputs, params=params,
                               integration="SHELL", namespace=args.namespace, started_at=started, pid=child.pid,
                               extra={"command": command}, energy_source=processes)

    def forward(signum: int, _frame: Any) -> None:
        child.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    returncode, cpu_s = _reap(child)
    if processes is not None:
        # The exact CPU time of the whole tree, even if it ended between two energy samples.
        processes.exited(child.pid, cpu_s)
        processes.close()
    exit_code = returncode if returncode >= 0 else 128 - returncode
    ended = time.time()
    metrics = _read_metrics(args.metrics_file) if args.metrics_file else None
    if returncode == 0:
        rec.execution_finished(ex, outputs=args.output or [], ended_at=ended, exit_code=0, metrics=metrics)
    else:
        reason = (f"command exited with status {returncode}" if returncode > 0
                  else f"command killed by signal {signal.Signals(-returncode).name}")
        rec.execution_finished(ex, status="failed", error=reason, outputs=args.output or [], ended_at=ended,
                               exit_code=exit_code, metrics=metrics)
    if not rec.flush(rec.settings.flush_timeout):
        print("metatrail: warning: the record was not stored within the flush timeout", file=sys.stderr)
    return exit_code


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
    p.add_argument("--state", choices=["running", "completed", "failed", "aborted", "unknown"])
    p.add_argument("--kind", choices=["execution", "pipeline_run", "run"])
    p.add_argument("--since", help="ISO time or age (2h, 7d)")
    p.add_argument("--limit", type=int, default=50)
    p = add("show", cmd_show, "one run with its inputs, outputs, parameters")
    p.add_argument("run_id")
    p = add("lineage", cmd_lineage, "lineage of an artifact (a path, URL or content hash)")
    p.add_argument("target", metavar="PATH_OR_HASH")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--upstream", action="store_true", help="what produced it (default)")
    g.add_argument("--downstream", action="store_true", help="what consumed it")
    g.add_argument("--both", action="store_true")
    p.add_argument("--depth", type=int, default=10, help="run hops (default 10)")
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except MetatrailError as exc:
        print(f"metatrail: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
