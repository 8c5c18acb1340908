"""`fedtune report RUN_DIR`: report.html and report.md for a run, finished, stopped or resumed.

The figures come from the run's `metrics.jsonl` (one line per round) and the evaluation summary
(`eval/summary.json`, written by `fedtune local up` or the stack's `evaluate` service);
`config.json` only labels them (profile, model). report.html is one self-contained file: inline
CSS and SVG, no script, and a Content-Security-Policy that forbids every request, so it opens
from disk on an offline machine and cannot call anywhere.

Clocks: the ServerApp's timestamps (t_start, t_sent, t_received, t_end) and each node's
(t_process_start ... t_reply) come from different machines. Durations are measured on one side
only; to draw a node's events on the server's time axis its clock offset is estimated as NTP does,
from the send/receive pairs: with a = t_process_start - t_sent (offset + delivery delay) and
b = t_received - t_reply (upload delay - offset), offset = (a - b) / 2, wrong by at most
(a + b) / 2. Of a node's rounds the one with the smallest a + b (tightest bound) is used.
"""

from __future__ import annotations

import html
import json
import math
import os
import statistics
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.results.metrics import read_jsonl

BENCHMARKS = ("pubmedqa", "medmcqa", "medqa", "careqa")
MB = 1024**2  # FlowerTune's "MB": array payload bytes / 2**20
# Reported figures to compare with (issue 14): the seed recipe's and the FlowerTune medical
# leaderboard's best Bio-Medical-Llama-3-8B entry.
REFERENCES = (
    ("seed recipe (reported)", {"pubmedqa": 0.6960, "medmcqa": 0.5912, "medqa": 0.6394, "careqa": 0.5318}, 3000.96),
    ("leaderboard best, Bio-Medical-Llama-3-8B",
     {"pubmedqa": 0.7040, "medmcqa": 0.6093, "medqa": 0.6582, "careqa": 0.5536}, 1.6 * 1000),
)
EVAL_SUMMARY = Path("eval") / "summary.json"
CSP = "default-src 'none'; style-src 'unsafe-inline'"

# Phases of a client's round on the server's time axis: (name, from event, to event, colour).
PHASES = (
    ("send", "t_start", "t_sent", "#9aa5b1"),
    ("delivery + ClientApp start", "t_sent", "t_process_start", "#f0b429"),
    ("ClientApp init", "t_process_start", "t_handler_start", "#de911d"),
    ("prepare", "t_handler_start", "t_train_start", "#8bd3c7"),
    ("training", "t_train_start", "t_train_end", "#2f80ed"),
    ("build reply", "t_train_end", "t_reply", "#7b61ff"),
    ("upload + receive", "t_reply", "t_received", "#eb5757"),
    ("wait for others", "t_received", "t_aggregate", "#e4e7eb"),
)
NODE_EVENTS = ("t_process_start", "t_handler_start", "t_train_start", "t_train_end", "t_reply")
AGGREGATE_COLOUR = "#27ae60"
PALETTE = ("#2f80ed", "#eb5757", "#27ae60", "#f2994a", "#9b51e0", "#56ccf2", "#6fcf97", "#bb6bd9", "#828282", "#f2c94c")


@dataclass
class RunData:
    run_dir: Path
    rounds: list[dict[str, Any]]
    evaluation: dict[str, Any] | None
    config: dict[str, Any] = field(default_factory=dict)


def load_run(run_dir: Path) -> RunData:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics}: no such file (is {run_dir} a run directory, results/run-<id>?)")
    evaluation_path, config_path = run_dir / EVAL_SUMMARY, run_dir / "config.json"
    return RunData(
        run_dir,
        read_jsonl(metrics),
        json.loads(evaluation_path.read_text()) if evaluation_path.is_file() else None,
        json.loads(config_path.read_text()) if config_path.is_file() else {},
    )


# ------------------------------------------------------------------------------ figures


def communication_mb(rounds: list[dict[str, Any]]) -> float | None:
    return rounds[-1]["cumulative_mib"] if rounds else None


def results_table(data: RunData) -> list[dict[str, Any]]:
    """Rows of the comparison: this run, then the references; accuracies None when not measured."""
    ev = data.evaluation or {}
    accuracies = ev.get("accuracies", {})
    this = {name: accuracies.get(name) for name in BENCHMARKS}
    # Said in the row itself, so the numbers are never read as the recipe's: the 8B-shaped benchmark
    # model has random weights too, and is not the tiny one.
    notes = [n for n, on in (("tiny model", (ev.get("profile") or data.config.get("profile")) == "tiny"),
                             ("random weights", ev.get("random_weights"))) if on]
    rows = [{"label": "this run" + (f" ({', '.join(notes)})" if notes else ""),
             "accuracies": this, "average": ev.get("average") if len(accuracies) == len(BENCHMARKS) else None,
             "communication_mb": communication_mb(data.rounds)}]
    for label, reference, comm_mb in REFERENCES:
        rows.append({"label": label, "accuracies": reference, "average": statistics.fmean(reference.values()),
                     "communication_mb": comm_mb})
    return rows


@dataclass(frozen=True)
class ClockOffset:
    offset: float  # node clock - server clock, seconds
    bound: float  # |error| <= bound
    round: int  # the round whose send/receive pair gave it


def clock_offsets(rounds: list[dict[str, Any]]) -> dict[int, ClockOffset]:
    best: dict[int, ClockOffset] = {}
    for record in rounds:
        for client in record.get("clients", []):
            stamps = [client.get(k) for k in ("t_sent", "t_process_start", "t_reply", "t_received")]
            if None in stamps:
                continue
            sent, process_start, reply, received = stamps
            a, b = process_start - sent, received - reply
            candidate = ClockOffset((a - b) / 2, (a + b) / 2, record["round"])
            node = client["node_id"]
            if node not in best or candidate.bound < best[node].bound:
                best[node] = candidate
    return best


def round_timeline(record: dict[str, Any], offsets: dict[int, ClockOffset]) -> tuple[float, list[tuple[str, dict[str, float]]], tuple[float, float] | None]:
    """Seconds since the round's t_start, on the server's clock: (length, [(client label, events)],
    aggregation (start, end) or None). Node events are shifted by the node's estimated offset."""
    origin = record.get("t_start")
    if origin is None:
        return 0.0, [], None
    aggregation = None
    if record.get("t_end") is not None and record.get("aggregate_seconds") is not None:
        aggregation = (record["t_end"] - record["aggregate_seconds"] - origin, record["t_end"] - origin)
    rows = []
    for client in sorted(record.get("clients", []), key=lambda c: c.get("partition_id", 0)):
        shift = offsets[client["node_id"]].offset if client["node_id"] in offsets else None
        events = {"t_start": 0.0}
        for key in ("t_sent", "t_received"):
            if client.get(key) is not None:
                events[key] = client[key] - origin
        if shift is not None:
            for key in NODE_EVENTS:
                if client.get(key) is not None:
                    events[key] = client[key] - shift - origin
        if aggregation is not None:
            events["t_aggregate"] = aggregation[0]
        rows.append((site_label(client), events))
    length = max([record.get("t_end", origin) - origin, *(max(e.values()) for _, e in rows)] if rows else [0.0])
    return length, rows, aggregation


def site_label(client: dict[str, Any]) -> str:
    return f"site {client.get('partition_id', '?')}"


def phase_durations(client: dict[str, Any]) -> dict[str, float | None]:
    """Durations measured on one clock each (no alignment needed)."""

    def span(a: str, b: str) -> float | None:
        return client[b] - client[a] if client.get(a) is not None and client.get(b) is not None else None

    return {
        "server: sent to received": span("t_sent", "t_received"),
        "node: process start to reply": span("t_process_start", "t_reply"),
        "node: ClientApp init": span("t_process_start", "t_handler_start"),
        "node: prepare": span("t_handler_start", "t_train_start"),
        "node: training": span("t_train_start", "t_train_end"),
        "node: build reply": span("t_train_end", "t_reply"),
    }


def gpu_by_site(rounds: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per site (partition): peak of the rounds' peaks, mean of their means, mean utilisation."""
    per_site: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in rounds:
        for client in record.get("clients", []):
            if client.get("gpu_samples"):
                per_site[site_label(client)].append(client)
    return {
        site: {
            "peak_bytes": max(c["gpu_mem_peak_bytes"] for c in clients),
            "mean_bytes": statistics.fmean(c["gpu_mem_mean_bytes"] for c in clients),
            "util_mean": statistics.fmean(c["gpu_util_mean"] for c in clients),
            "rounds": len(clients),
            "samples": int(sum(c["gpu_samples"] for c in clients)),
        }
        for site, clients in sorted(per_site.items(), key=lambda kv: _site_order(kv[0]))
    }


def _site_order(label: str) -> tuple[int, str]:
    tail = label.rsplit(" ", 1)[-1]
    return (int(tail), "") if tail.isdigit() else (1 << 30, label)


def run_facts(data: RunData) -> dict[str, Any]:
    ev = data.evaluation or {}
    aggregated = [r for r in data.rounds if r.get("status", "aggregated") == "aggregated"]
    return {
        "run": data.run_dir.name,
        "profile": ev.get("profile") or data.config.get("profile", "unknown"),
        "model": ev.get("base_model") or data.config.get("model.name", "unknown"),
        "random weights": "yes (the scores are those of a model with random weights, not the recipe's)"
                          if ev.get("random_weights") else "no",
        "adapter evaluated": ev.get("peft_path", "none"),
        "evaluation": (f"{ev.get('mode', '?')} path" + (f", first {ev['limit']} questions per benchmark" if ev.get("limit") else ", full benchmarks"))
                      if ev else "not run (fedtune eval --peft-path <run>/peft_N --output-dir <run>/eval)",
        "rounds": f"{len(aggregated)} aggregated of {len(data.rounds)} recorded"
                  + (f" (configured {data.config['num-server-rounds']})" if "num-server-rounds" in data.config else ""),
        "wire format": ", ".join(sorted({str(r["comm_format"]) for r in data.rounds if r.get("comm_format")})) or "not recorded",
    }


# ------------------------------------------------------------------------------ markdown


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def render_markdown(data: RunData) -> str:
    lines = [f"# FlowerTune medical: {data.run_dir.name}", ""]
    lines += [f"- {key}: {value}" for key, value in run_facts(data).items()] + [""]
    lines += ["## Accuracy and communication", "",
              "| | " + " | ".join(BENCHMARKS) + " | average | communication (MB) |",
              "| --- " * (len(BENCHMARKS) + 3) + "|"]
    for row in results_table(data):
        cells = [_fmt(row["accuracies"][name]) for name in BENCHMARKS]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {_fmt(row['average'])} | {_fmt(row['communication_mb'], 2)} |")
    lines += ["", "MB as FlowerTune counts it: payload bytes of the arrays sent to and received from the sampled "
              "clients, / 2^20. The leaderboard lists its entry as 1.6 GB.", ""]
    lines += ["## Rounds", "", "| round | status | train loss | clients (site: loss) | MB this round | cumulative MB | round s | aggregation s |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in data.rounds:
        clients = ", ".join(f"{c.get('partition_id')}: {c['train_loss']:.4f}" for c in r.get("clients", []))
        lines.append(f"| {r['round']} | {r.get('status', 'aggregated')} | {_fmt(r.get('train_loss'))} | {clients} | "
                     f"{_fmt(r.get('bytes_round', 0) / MB, 2)} | {_fmt(r.get('cumulative_mib'), 2)} | "
                     f"{_fmt(r.get('round_seconds'), 1)} | {_fmt(r.get('aggregate_seconds'), 3)} |")
    offsets = clock_offsets(data.rounds)
    lines += ["", "## Where the time went", "", "Durations, each measured on one clock (seconds):", "",
              "| round | site | " + " | ".join(phase_durations({})) + " |", "| --- " * (2 + len(phase_durations({}))) + "|"]
    for r in data.rounds:
        for c in r.get("clients", []):
            lines.append(f"| {r['round']} | {c.get('partition_id')} | " + " | ".join(_fmt(v, 2) for v in phase_durations(c).values()) + " |")
    lines += ["", _alignment_note(), "", "| node | offset (node - server), s | bound, s | from round |", "| --- | --- | --- | --- |"]
    lines += [f"| {node} | {o.offset:+.3f} | ±{o.bound:.3f} | {o.round} |" for node, o in sorted(offsets.items())]
    lines += ["", "## GPU use per site (while training)", ""]
    gpus = gpu_by_site(data.rounds)
    if gpus:
        lines += ["| site | peak memory (GiB) | mean memory (GiB) | mean utilisation (%) | rounds | samples |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {site} | {g['peak_bytes'] / 2**30:.2f} | {g['mean_bytes'] / 2**30:.2f} | {g['util_mean']:.1f} | {g['rounds']} | {g['samples']} |"
                  for site, g in gpus.items()]
    else:
        lines.append("No GPU samples: the nodes trained without a GPU (or without NVML).")
    return "\n".join(lines) + "\n"


def _alignment_note() -> str:
    return ("Node clocks are aligned to the ServerApp's per node, NTP-style, from the round with the tightest "
            "send/receive pair: offset = ((t_process_start - t_sent) - (t_received - t_reply)) / 2, wrong by at most "
            "((t_process_start - t_sent) + (t_received - t_reply)) / 2.")


# ------------------------------------------------------------------------------ SVG


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    if not math.isfinite(low) or not math.isfinite(high):
        return [0.0]
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if raw <= m * step)
    first = math.floor(low / step) * step
    return [first + i * step for i in range(int(math.ceil((high - first) / step - 1e-9)) + 1)]


def _tick_label(value: float) -> str:
    return f"{value:.4g}"


class Plot:
    """An SVG chart with linear axes; marks carry class="mark" (the browser test counts them)."""

    W, H, LEFT, RIGHT, TOP, BOTTOM = 520, 300, 64, 16, 28, 44

    def __init__(self, name: str, title: str, rounds: list[int], ys: list[float], xlabel: str, ylabel: str,
                 y_from_zero: bool = False) -> None:
        self.name, self.parts = name, []
        step = max(1, round((max(rounds) - min(rounds)) / 8))  # whole rounds only
        self.xt = list(range(min(rounds), max(rounds) + step, step))
        self.yt = nice_ticks(0.0 if y_from_zero else min(ys), max(ys))
        self.x0, self.x1, self.y0, self.y1 = self.xt[0], self.xt[-1], self.yt[0], self.yt[-1]
        w, h = self.W, self.H
        self.parts.append(f'<text x="{w / 2}" y="16" class="title">{html.escape(title)}</text>')
        for t in self.xt:
            x = self.x(t)
            self.parts.append(f'<line x1="{x:.1f}" y1="{self.TOP}" x2="{x:.1f}" y2="{h - self.BOTTOM}" class="grid"/>'
                              f'<text x="{x:.1f}" y="{h - self.BOTTOM + 16}" class="tick">{_tick_label(t)}</text>')
        for t in self.yt:
            y = self.y(t)
            self.parts.append(f'<line x1="{self.LEFT}" y1="{y:.1f}" x2="{w - self.RIGHT}" y2="{y:.1f}" class="grid"/>'
                              f'<text x="{self.LEFT - 6}" y="{y + 4:.1f}" class="tick end">{_tick_label(t)}</text>')
        self.parts.append(f'<text x="{w / 2}" y="{h - 6}" class="label">{html.escape(xlabel)}</text>'
                          f'<text x="14" y="{h / 2}" class="label" transform="rotate(-90 14 {h / 2})">{html.escape(ylabel)}</text>')

    def x(self, value: float) -> float:
        return self.LEFT + (value - self.x0) / ((self.x1 - self.x0) or 1) * (self.W - self.LEFT - self.RIGHT)

    def y(self, value: float) -> float:
        return self.H - self.BOTTOM - (value - self.y0) / ((self.y1 - self.y0) or 1) * (self.H - self.TOP - self.BOTTOM)

    def line(self, points: list[tuple[float, float]], colour: str, label: str) -> None:
        path = " ".join(f"{'M' if i == 0 else 'L'}{self.x(px):.1f},{self.y(py):.1f}" for i, (px, py) in enumerate(points))
        self.parts.append(f'<path d="{path}" class="mark" fill="none" stroke="{colour}" stroke-width="2"><title>{html.escape(label)}</title></path>')
        for px, py in points:
            self.dot(px, py, colour, f"{label}: round {px:g}, {py:.4g}", 3.5)

    def dot(self, px: float, py: float, colour: str, label: str, radius: float = 3.0) -> None:
        self.parts.append(f'<circle cx="{self.x(px):.1f}" cy="{self.y(py):.1f}" r="{radius}" fill="{colour}" class="mark">'
                          f'<title>{html.escape(label)}</title></circle>')

    def svg(self) -> str:
        return (f'<svg class="chart" data-chart="{self.name}" viewBox="0 0 {self.W} {self.H}" width="{self.W}" '
                f'height="{self.H}" role="img" xmlns="http://www.w3.org/2000/svg">{"".join(self.parts)}</svg>')


def loss_chart(rounds: list[dict[str, Any]]) -> str | None:
    aggregated = [r for r in rounds if r.get("train_loss") is not None]
    if not aggregated:
        return None
    clients = [(r["round"], c) for r in aggregated for c in r.get("clients", [])]
    ys = [r["train_loss"] for r in aggregated] + [c["train_loss"] for _, c in clients]
    plot = Plot("loss", "Training loss per round", [r["round"] for r in aggregated], ys, "round", "train loss (response tokens)")
    for number, client in clients:
        colour = PALETTE[int(client.get("partition_id", 0)) % len(PALETTE)]
        plot.dot(number, client["train_loss"], colour, f"{site_label(client)}, round {number}: {client['train_loss']:.4f}")
    plot.line([(r["round"], r["train_loss"]) for r in aggregated], "#111", "aggregate (weighted by examples)")
    return plot.svg()


def communication_chart(rounds: list[dict[str, Any]]) -> str | None:
    if not rounds:
        return None
    points = [(r["round"], r["cumulative_mib"]) for r in rounds]
    plot = Plot("communication", "Cumulative communication", [p[0] for p in points], [p[1] for p in points],
                "round", "MB (down + up)", y_from_zero=True)
    plot.line(points, "#27ae60", "cumulative MB")
    return plot.svg()


def timeline_chart(record: dict[str, Any], offsets: dict[int, ClockOffset]) -> str | None:
    length, rows, aggregation = round_timeline(record, offsets)
    if not rows:
        return None
    row_h, left, right, top, bottom, width = 22, 110, 16, 28, 40, 760
    height = top + bottom + row_h * (len(rows) + 1)
    ticks = nice_ticks(0.0, length)
    scale = (width - left - right) / (ticks[-1] or 1)
    parts = [f'<text x="{width / 2}" y="16" class="title">Round {record["round"]}: '
             f'{html.escape(f"{length:.1f}")} s on the ServerApp clock</text>']
    for t in ticks:
        x = left + t * scale
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{height - bottom}" class="grid"/>'
                     f'<text x="{x:.1f}" y="{height - bottom + 16}" class="tick">{_tick_label(t)}</text>')
    parts.append(f'<text x="{width / 2}" y="{height - 6}" class="label">seconds since the round started</text>')
    for i, (label, events) in enumerate(rows):
        y = top + i * row_h
        parts.append(f'<text x="{left - 6}" y="{y + 15}" class="tick end">{html.escape(label)}</text>')
        for name, start, end, colour in PHASES:
            if start in events and end in events and events[end] >= events[start]:
                x0, x1 = left + events[start] * scale, left + events[end] * scale
                parts.append(f'<rect x="{x0:.1f}" y="{y + 3}" width="{max(x1 - x0, 0.8):.1f}" height="{row_h - 6}" '
                             f'fill="{colour}" class="mark"><title>{html.escape(label)}: {html.escape(name)} '
                             f'{events[end] - events[start]:.3f} s</title></rect>')
    if aggregation is not None:
        y = top + len(rows) * row_h
        x0, x1 = left + aggregation[0] * scale, left + aggregation[1] * scale
        parts.append(f'<text x="{left - 6}" y="{y + 15}" class="tick end">ServerApp</text>'
                     f'<rect x="{x0:.1f}" y="{y + 3}" width="{max(x1 - x0, 0.8):.1f}" height="{row_h - 6}" '
                     f'fill="{AGGREGATE_COLOUR}" class="mark"><title>aggregation {aggregation[1] - aggregation[0]:.3f} s</title></rect>')
    return (f'<svg class="chart" data-chart="timeline-{record["round"]}" viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}" role="img" xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>')


def gpu_chart(gpus: dict[str, dict[str, float]]) -> str | None:
    if not gpus:
        return None
    row_h, left, width, top = 34, 90, 800, 28
    half = (width - left - 80) / 2
    peak = max(g["peak_bytes"] for g in gpus.values()) / 2**30 or 1.0
    parts = [f'<text x="{left + half / 2}" y="16" class="title">memory (GiB): peak, mean</text>'
             f'<text x="{left + half + 60 + half / 2}" y="16" class="title">mean utilisation (%)</text>']
    for i, (site, g) in enumerate(gpus.items()):
        y = top + i * row_h
        peak_w, mean_w = g["peak_bytes"] / 2**30 / peak * half, g["mean_bytes"] / 2**30 / peak * half
        util_w = g["util_mean"] / 100 * half
        parts.append(
            f'<text x="{left - 6}" y="{y + 18}" class="tick end">{html.escape(site)}</text>'
            f'<rect x="{left}" y="{y + 2}" width="{max(peak_w, 0.8):.1f}" height="12" fill="#9b51e0" class="mark">'
            f'<title>{html.escape(site)}: peak {g["peak_bytes"] / 2**30:.2f} GiB</title></rect>'
            f'<rect x="{left}" y="{y + 16}" width="{max(mean_w, 0.8):.1f}" height="12" fill="#bb6bd9" class="mark">'
            f'<title>{html.escape(site)}: mean {g["mean_bytes"] / 2**30:.2f} GiB</title></rect>'
            f'<text x="{left + peak_w + 4:.1f}" y="{y + 12}" class="tick start">{g["peak_bytes"] / 2**30:.1f}</text>'
            f'<rect x="{left + half + 60}" y="{y + 6}" width="{max(util_w, 0.8):.1f}" height="18" fill="#2f80ed" class="mark">'
            f'<title>{html.escape(site)}: {g["util_mean"]:.1f} %</title></rect>'
            f'<text x="{left + half + 64 + util_w:.1f}" y="{y + 19}" class="tick start">{g["util_mean"]:.0f}</text>')
    height = top + row_h * len(gpus) + 8
    return (f'<svg class="chart" data-chart="gpu" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
            f'role="img" xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>')


# ------------------------------------------------------------------------------ HTML

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#1f2933;padding:0 16px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #e4e7eb}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #d9e2ec;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}tr.this td{font-weight:600;background:#f0f4f8}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 16px}dt{color:#52606d}dd{margin:0}
.charts{display:flex;flex-wrap:wrap;gap:16px}.note{color:#52606d;max-width:900px}
svg .title{font-size:13px;font-weight:600;text-anchor:middle}svg .label{font-size:12px;text-anchor:middle;fill:#52606d}
svg .tick{font-size:11px;text-anchor:middle;fill:#52606d}svg .tick.end{text-anchor:end}svg .tick.start{text-anchor:start}
svg .grid{stroke:#e4e7eb}.legend span{display:inline-block;margin-right:14px}.legend i{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:-1px}
"""


def _table(header: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        f'<tr class="{classes[i] if classes else ""}">' + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
        for i, row in enumerate(rows))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(data: RunData) -> str:
    e = html.escape
    facts = "".join(f"<dt>{e(k)}</dt><dd>{e(str(v))}</dd>" for k, v in run_facts(data).items())
    table_rows = results_table(data)
    results = _table(
        ["", *BENCHMARKS, "average", "communication (MB)"],
        [[r["label"], *(_fmt(r["accuracies"][n]) for n in BENCHMARKS), _fmt(r["average"]), _fmt(r["communication_mb"], 2)]
         for r in table_rows],
        ["this", *[""] * (len(table_rows) - 1)])
    offsets = clock_offsets(data.rounds)
    charts = [c for c in (loss_chart(data.rounds), communication_chart(data.rounds)) if c]
    timelines = [t for t in (timeline_chart(r, offsets) for r in data.rounds) if t]
    legend = "".join(f'<span><i style="background:{c}"></i>{e(n)}</span>' for n, _, _, c in PHASES)
    legend += f'<span><i style="background:{AGGREGATE_COLOUR}"></i>aggregation (ServerApp)</span>'
    offset_table = _table(["node", "offset (node − server), s", "bound, s", "from round"],
                          [[str(n), f"{o.offset:+.3f}", f"±{o.bound:.3f}", str(o.round)] for n, o in sorted(offsets.items())])
    gpus = gpu_by_site(data.rounds)
    gpu_section = (gpu_chart(gpus) + _table(
        ["site", "peak memory (GiB)", "mean memory (GiB)", "mean utilisation (%)", "rounds", "samples"],
        [[s, f"{g['peak_bytes'] / 2**30:.2f}", f"{g['mean_bytes'] / 2**30:.2f}", f"{g['util_mean']:.1f}", str(g["rounds"]), str(g["samples"])]
         for s, g in gpus.items()])) if gpus else '<p class="note">No GPU samples: the nodes trained without a GPU (or without NVML).</p>'
    timeline_section = (f'<p class="legend">{legend}</p>' + "".join(timelines) + f'<p class="note">{e(_alignment_note())}</p>' + offset_table
                        if timelines else '<p class="note">This run\'s metrics.jsonl has no per-message timestamps.</p>')
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<title>fedtune report: {e(data.run_dir.name)}</title><style>{STYLE}</style></head>
<body>
<h1>FlowerTune medical: {e(data.run_dir.name)}</h1>
<dl>{facts}</dl>
<h2>Accuracy and communication</h2>
{results}
<p class="note">MB as FlowerTune counts it: payload bytes of the arrays sent to and received from the sampled clients, / 2<sup>20</sup>.
The leaderboard lists its entry's communication as 1.6 GB.</p>
<h2>Training</h2>
<div class="charts">{"".join(charts)}</div>
<h2>Where the time went, per round and SuperNode</h2>
{timeline_section}
<h2>GPU use per site (sampled while training)</h2>
{gpu_section}
</body></html>
"""


# ------------------------------------------------------------------------------ files and CLI


def _write_atomic(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp", encoding="utf-8") as tmp:
        tmp.write(text)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.chmod(tmp.name, 0o644)
    os.replace(tmp.name, path)


def write_report(run_dir: Path) -> tuple[Path, Path]:
    data = load_run(run_dir)
    html_path, md_path = run_dir / "report.html", run_dir / "report.md"
    _write_atomic(html_path, render_html(data))
    _write_atomic(md_path, render_markdown(data))
    return html_path, md_path


def latest_run(results: Path) -> Path:
    """The run whose summary.json was written last (the stack's run that just ended)."""
    finished = sorted(results.glob("run-*/summary.json"), key=lambda p: p.stat().st_mtime)
    if not finished:
        raise FileNotFoundError(f"{results}: no run-*/summary.json")
    return finished[-1].parent


def cmd_report(args) -> int:
    try:
        run_dir = latest_run(Path(args.path)) if args.latest else Path(args.path)
        html_path, md_path = write_report(run_dir)
    except (FileNotFoundError, json.JSONDecodeError, KeyError) as exc:
        print(f"fedtune report: {exc}", file=sys.stderr)
        return 2
    print(f"report: {html_path}\nreport: {md_path}")
    print(render_markdown(load_run(run_dir)).split("## Rounds")[0].rstrip())
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("report", help="report.html and report.md for a run (results/run-<id>)",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a run directory, or with --latest a results directory")
    parser.add_argument("--latest", action="store_true", help="report the run in PATH whose summary.json is newest")
    parser.set_defaults(func=cmd_report)
