"""The ``metatrail energy`` command: energy (and carbon) per stage or execution, as a table, JSON or a chart.

Importing this module imports nothing heavy; the handler reads the store and :mod:`metatrail.energy.report`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from metatrail.errors import ConfigError


def register(sub: Any) -> None:
    """Add ``energy`` to the ``metatrail`` command's subparsers."""
    p = sub.add_parser("energy", help="energy and carbon per stage or execution",
                       description="Energy and carbon per stage or execution, from the recorded runs.")
    p.add_argument("--store", help="store URL (default: METATRAIL_STORE or the nearest .metatrail/)")
    p.add_argument("--pipeline")
    p.add_argument("--run", help="a pipeline run id (its executions) or an execution id")
    p.add_argument("--by", choices=["stage", "execution", "pipeline", "run"], default="stage",
                   help="group by stage, execution, pipeline, or pipeline run (default: stage)")
    p.add_argument("--json", action="store_true", help="stable JSON output for scripts")
    p.add_argument("--plot", metavar="FILE.png|FILE.html", help="write charts: energy per row, CPU/GPU/DRAM split, "
                   "and a metric against energy, one point per pipeline run")
    p.add_argument("--metric", help="metric for the trade-off chart (default: the first one recorded)")
    p.add_argument("--limit", type=int, default=10_000, help="most executions read (default 10000)")
    p.set_defaults(func=cmd_energy)


def _records(store: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.run:
        run = store.get_run(args.run)
        if run is None:
            raise ConfigError(f"no run {args.run!r} in the store")
        rows = [run] if run["kind"] == "execution" else [
            r for r in store.list_runs(pipeline=run["pipeline"], kind="execution", limit=args.limit)
            if r["parent_run_id"] == run["run_id"]]
    else:
        rows = store.list_runs(pipeline=args.pipeline, kind="execution", limit=args.limit)
    return [{"pipeline": r["pipeline"], "stage": r["stage"], "execution": r["run_id"], "run": r.get("parent_run_id"),
             "energy": r.get("energy"), "metrics": r.get("metrics") or {}} for r in rows]


def cmd_energy(args: argparse.Namespace) -> int:
    from metatrail.config import load_settings
    from metatrail.energy import report
    from metatrail.store import open_store

    with open_store(load_settings(store=args.store).store) as store:
        records = _records(store, args)
    if not records:
        raise ConfigError("no executions recorded" + (f" for pipeline {args.pipeline!r}" if args.pipeline else ""))
    rows = report.aggregate(records, by=args.by)
    if args.plot:
        path = report.plot(rows, args.plot, metric=args.metric,
                           title=f"Energy per {args.by}" + (f" — {args.pipeline}" if args.pipeline else ""),
                           tradeoff=report.aggregate(records, by="run"))
        print(f"wrote {path}", file=sys.stderr)
    if args.json:
        sys.stdout.write(json.dumps(report.table(rows), indent=2, sort_keys=True) + "\n")
        return 0
    from rich.console import Console
    from rich.table import Table

    def joules(value: float | None) -> str:
        if value is None:
            return "[dim]null[/]"
        return f"{value / 3.6e6:.3g} kWh" if value >= 3.6e5 else f"{value:,.1f} J"

    table = Table(title=f"energy by {args.by} ({sum(r.runs for r in rows)} executions)")
    for col in (args.by, "runs", "cpu", "dram", "gpu", "measured", "estimated", "CO2e", "incomplete"):
        table.add_column(col, justify="left" if col == args.by else "right")
    def grams(value: float | None) -> str:
        if value is None:
            return "[dim]null[/]"
        return f"{value * 1000:.3g} mg" if value < 1 else f"{value:,.3g} g"

    for r in rows:
        label = {"execution": f"{r.stage} {r.key[:13]}", "run": f"{r.pipeline} …{r.key[-12:]}"}.get(args.by, r.key)
        table.add_row(label, str(r.runs), joules(r.cpu_j), joules(r.dram_j), joules(r.gpu_j), joules(r.measured_j),
                      joules(r.estimated_j), grams(r.co2e_g),
                      str(r.incomplete))
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    console.print("[dim]measured = hardware counters (RAPL, NVML); estimated = TDP x utilisation model; "
                  "null = not measurable here (see `metatrail show RUN` for the reason)[/]")
    return 0
