"""Aggregate recorded energy facets into table rows, and plot them (PNG with matplotlib, or self-contained HTML).

Input records are mappings with ``pipeline``, ``stage``, ``execution`` labels, ``energy`` (a ``metatrail_energy``
facet body) and optionally ``metrics`` (name -> number, e.g. accuracy, loss). :func:`aggregate` groups them by
``stage``, ``execution`` or ``pipeline``; :func:`plot` draws energy per row, the CPU/DRAM/GPU split and a trade-off
scatter of a chosen metric against energy. Measured and estimated joules stay in separate columns; a run whose
domain was not measured adds nothing to that domain and is counted in ``incomplete``.
"""

from __future__ import annotations

import html
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import ConfigError, MissingExtraError

GroupBy = Literal["stage", "execution", "pipeline", "run"]
DOMAINS = ("cpu", "dram", "gpu")
COLOURS = {"cpu": "#4C78A8", "dram": "#F58518", "gpu": "#54A24B", "measured": "#3B3B6D", "estimated": "#B0B0B0"}


@dataclass(slots=True)
class EnergyRow:
    """One aggregated row: sums over the runs in the group (``None`` where no run had a value)."""

    key: str
    pipeline: str
    stage: str
    runs: int = 0
    cpu_j: float | None = None
    dram_j: float | None = None
    gpu_j: float | None = None
    measured_j: float | None = None
    estimated_j: float | None = None
    co2e_g: float | None = None
    wall_s: float = 0.0
    incomplete: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    _metric_counts: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def total_j(self) -> float | None:
        """Measured plus estimated joules (IT energy)."""
        parts = [v for v in (self.measured_j, self.estimated_j) if v is not None]
        return sum(parts) if parts else None

    def as_dict(self) -> dict[str, Any]:
        """A plain dict for tables and JSON output."""
        return {
            "key": self.key,
            "pipeline": self.pipeline,
            "stage": self.stage,
            "runs": self.runs,
            "cpu_j": self.cpu_j,
            "dram_j": self.dram_j,
            "gpu_j": self.gpu_j,
            "measured_j": self.measured_j,
            "estimated_j": self.estimated_j,
            "total_j": self.total_j,
            "co2e_g": self.co2e_g,
            "wall_s": self.wall_s,
            "incomplete": self.incomplete,
            "metrics": dict(self.metrics),
        }


def _add(current: float | None, value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return current
    return (current or 0.0) + float(value)


def _key(record: Mapping[str, Any], by: GroupBy) -> str:
    if by == "execution":
        return str(record.get("execution", ""))
    if by == "run":  # the pipeline run (an execution recorded without one is a run of its own)
        return str(record.get("run") or record.get("execution", ""))
    if by == "pipeline":
        return str(record.get("pipeline", ""))
    return f"{record.get('pipeline', '')}.{record.get('stage', '')}"


def aggregate(records: Iterable[Mapping[str, Any]], by: GroupBy = "stage") -> list[EnergyRow]:
    """Sum energy per group (``stage`` = pipeline + stage, ``execution``, ``pipeline``, or ``run``: one pipeline run,
    the unit a trade-off compares); metrics are averaged."""
    if by not in ("stage", "execution", "pipeline", "run"):
        raise ConfigError(f"unknown grouping {by!r}; valid: stage, execution, pipeline, run")
    rows: dict[str, EnergyRow] = {}
    for record in records:
        facet: Mapping[str, Any] = record.get("energy") or {}
        key = _key(record, by)
        row = rows.get(key)
        if row is None:
            row = rows[key] = EnergyRow(key, str(record.get("pipeline", "")), str(record.get("stage", "")))
        row.runs += 1
        domains: Mapping[str, Any] = facet.get("domains") or {}
        missing = False
        for d in DOMAINS:
            entry = domains.get(d)
            if entry is None:
                continue
            if entry.get("value_j") is None:
                missing = True
            setattr(row, f"{d}_j", _add(getattr(row, f"{d}_j"), entry.get("value_j")))
        row.incomplete += int(missing or facet.get("measured_j") is None)
        row.measured_j = _add(row.measured_j, facet.get("measured_j"))
        row.estimated_j = _add(row.estimated_j, facet.get("estimated_j"))
        row.co2e_g = _add(row.co2e_g, (facet.get("carbon") or {}).get("co2e_g"))
        row.wall_s += float(facet.get("wall_s") or 0.0)
        for name, value in (record.get("metrics") or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                n = row._metric_counts.get(name, 0)
                row.metrics[name] = (row.metrics.get(name, 0.0) * n + float(value)) / (n + 1)
                row._metric_counts[name] = n + 1
    return sorted(rows.values(), key=lambda r: -(r.total_j or 0.0))


def table(rows: Iterable[EnergyRow]) -> list[dict[str, Any]]:
    """Rows as plain dicts (what a ``metatrail energy`` command prints)."""
    return [r.as_dict() for r in rows]


def plot(
    rows: list[EnergyRow],
    path: str | os.PathLike[str],
    *,
    metric: str | None = None,
    title: str = "Energy per stage",
    tradeoff: list[EnergyRow] | None = None,
) -> Path:
    """Write a PNG (``.png``, needs the ``plot`` extra) or a self-contained HTML page (``.html``) of ``rows``.

    Panels: total energy per row (measured and estimated apart), the CPU/DRAM/GPU split, and ``metric`` (default:
    the first metric any row has) against total energy, one point per row of ``tradeoff`` (pass the same records
    aggregated ``by="run"``: one point per pipeline run), else of ``rows``. Returns the path written.
    """
    out = Path(path)
    points = tradeoff if tradeoff is not None else rows
    metric = metric or next((m for r in points for m in r.metrics), None)
    if out.suffix.lower() == ".png":
        _plot_png(rows, out, metric, title, points)
    elif out.suffix.lower() in (".html", ".htm"):
        out.write_text(render_html(rows, metric=metric, title=title, tradeoff=points), encoding="utf-8")
    else:
        raise ConfigError(f"unknown plot format {out.suffix!r} for {out}; use .png or .html")
    return out


def _point_label(row: EnergyRow) -> str:
    """A short label: a run id is cut to its tail (UUIDv7s share their leading, time part)."""
    return row.key if len(row.key) < 24 else f"{row.pipeline} …{row.key[-6:]}"


def _plot_png(rows: list[EnergyRow], out: Path, metric: str | None, title: str,
              tradeoff: list[EnergyRow]) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingExtraError("matplotlib", "plot") from exc
    fig = Figure(figsize=(15, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    labels = [r.key for r in rows]
    y = list(range(len(rows)))
    measured = [r.measured_j or 0.0 for r in rows]
    estimated = [r.estimated_j or 0.0 for r in rows]
    ax1.barh(y, measured, color=COLOURS["measured"], label="measured")
    ax1.barh(y, estimated, left=measured, color=COLOURS["estimated"], label="estimated")
    ax1.set_yticks(y, labels)
    ax1.invert_yaxis()
    ax1.set_xlim(0, max([m + e for m, e in zip(measured, estimated, strict=True)] + [0.0]) * 1.08 or 1.0)
    ax1.set_xlabel("energy (J)")
    ax1.set_title("Energy (measured, then estimated)")
    ax1.legend(loc="lower right")
    left = [0.0] * len(rows)
    for d in DOMAINS:
        values = [getattr(r, f"{d}_j") or 0.0 for r in rows]
        ax2.barh(y, values, left=left, color=COLOURS[d], label=d.upper())
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax2.set_yticks(y, [""] * len(rows))
    ax2.invert_yaxis()
    ax2.set_xlabel("measured energy (J)")
    ax2.set_title("CPU / DRAM / GPU split")
    if any(left):
        ax2.legend(loc="lower right")
    else:  # an empty chart with a legend reads as zero joules: say why there is nothing
        ax2.set_xticks([])
        ax2.text(0.5, 0.5, "nothing measured: no readable RAPL or NVML counter\n(estimates are in the first panel)",
                 ha="center", va="center", transform=ax2.transAxes)
    points = [(r.total_j, r.metrics[metric], _point_label(r)) for r in tradeoff
              if metric and metric in r.metrics and r.total_j]
    if points:
        ax3.scatter([p[0] for p in points], [p[1] for p in points], color=COLOURS["gpu"])
        for x, v, name in points:
            ax3.annotate(name, (x, v), fontsize=8, xytext=(4, 4), textcoords="offset points")
        ax3.margins(0.25)
        ax3.set_xlabel("energy (J)")
        ax3.set_ylabel(metric or "")
        ax3.set_title(f"{metric} vs energy")
    else:
        ax3.text(0.5, 0.5, "no metric recorded", ha="center", va="center", transform=ax3.transAxes)
        ax3.set_axis_off()
    fig.suptitle(title)
    fig.savefig(out, format="png", dpi=110)


def _fmt(value: float | None, unit: str = "J") -> str:
    if value is None:
        return "n/a"
    for scale, prefix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _bars_svg(rows: list[EnergyRow], stacks: list[tuple[str, list[float]]], width: int = 560) -> str:
    label_w, bar_h, gap = 170, 18, 6
    height = len(rows) * (bar_h + gap) + 30
    top = max((sum(v[i] for _, v in stacks) for i in range(len(rows))), default=0.0) or 1.0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">']
    for i, r in enumerate(rows):
        y = i * (bar_h + gap) + 4
        parts.append(
            f'<text x="{label_w - 6}" y="{y + bar_h - 5}" text-anchor="end" font-size="12">'
            f"{html.escape(r.key[:28])}</text>"
        )
        x = float(label_w)
        for name, values in stacks:
            w = values[i] / top * (width - label_w - 80)
            if w > 0:
                parts.append(
                    f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{COLOURS[name]}">'
                    f"<title>{html.escape(r.key)} {name}: {_fmt(values[i])}</title></rect>"
                )
            x += w
        total = sum(v[i] for _, v in stacks)
        parts.append(f'<text x="{x + 4:.1f}" y="{y + bar_h - 5}" font-size="11">{_fmt(total)}</text>')
    legend_y = height - 8
    for j, (name, _) in enumerate(stacks):
        parts.append(
            f'<rect x="{label_w + j * 90}" y="{legend_y - 10}" width="10" height="10" fill="{COLOURS[name]}"/>'
        )
        parts.append(f'<text x="{label_w + j * 90 + 14}" y="{legend_y}" font-size="11">{name}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _scatter_svg(rows: list[EnergyRow], metric: str | None, size: int = 420) -> str:
    points = [(r.total_j, r.metrics[metric], r.key) for r in rows if metric and metric in r.metrics and r.total_j]
    if not points:
        return "<p>No metric recorded for these runs.</p>"
    pad = 50
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    sx = (size - 2 * pad) / ((x1 - x0) or 1.0)
    sy = (size - 2 * pad) / ((y1 - y0) or 1.0)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" role="img">',
        f'<line x1="{pad}" y1="{size - pad}" x2="{size - pad}" y2="{size - pad}" stroke="#333"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{size - pad}" stroke="#333"/>',
        f'<text x="{size / 2}" y="{size - 12}" text-anchor="middle" font-size="12">energy (J)</text>',
        f'<text x="14" y="{size / 2}" font-size="12" transform="rotate(-90 14 {size / 2})" '
        f'text-anchor="middle">{html.escape(metric or "")}</text>',
    ]
    for x, v, name in points:
        cx, cy = pad + (x - x0) * sx, size - pad - (v - y0) * sy
        parts.append(
            f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="5" fill="{COLOURS["gpu"]}">'
            f"<title>{html.escape(name)}: {_fmt(x)}, {html.escape(metric or '')} = {v:.4g}</title></circle>"
        )
        parts.append(f'<text x="{cx + 7:.1f}" y="{cy - 6:.1f}" font-size="10">{html.escape(name[:24])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_html(rows: list[EnergyRow], *, metric: str | None = None, title: str = "Energy per stage",
                tradeoff: list[EnergyRow] | None = None) -> str:
    """A self-contained HTML page (inline SVG and CSS, no scripts, no network) of the three panels and a table."""
    totals = [("measured", [r.measured_j or 0.0 for r in rows]), ("estimated", [r.estimated_j or 0.0 for r in rows])]
    totals_svg = _bars_svg(rows, [("measured", totals[0][1]), ("estimated", totals[1][1])])
    split = [(d, [getattr(r, f"{d}_j") or 0.0 for r in rows]) for d in DOMAINS]
    head = "".join(
        f"<th>{h}</th>"
        for h in ("row", "runs", "CPU", "DRAM", "GPU", "measured", "estimated", "CO2e", "wall", "incomplete")
    )
    body = "".join(
        "<tr>"
        + "".join(
            f"<td>{c}</td>"
            for c in (
                html.escape(r.key),
                r.runs,
                _fmt(r.cpu_j),
                _fmt(r.dram_j),
                _fmt(r.gpu_j),
                _fmt(r.measured_j),
                _fmt(r.estimated_j),
                _fmt(r.co2e_g, "g"),
                f"{r.wall_s:.1f} s",
                r.incomplete,
            )
        )
        + "</tr>"
        for r in rows
    )
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;margin:2em;color:#222}section{margin-bottom:2em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "td:first-child{text-align:left}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        "<section><h2>Energy per row (measured, then estimated)</h2>" + totals_svg + "</section>"
        "<section><h2>CPU / DRAM / GPU split (measured)</h2>" + _bars_svg(rows, split) + "</section>"
        f"<section><h2>Trade-off: {html.escape(metric or 'no metric')} vs energy</h2>"
        + _scatter_svg(tradeoff if tradeoff is not None else rows, metric)
        + "</section>"
        f"<section><h2>Table</h2><table><tr>{head}</tr>{body}</table></section>"
        "</body></html>"
    )
