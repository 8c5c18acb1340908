"""The run's charts, drawn with matplotlib: inline SVG for report.html, PNG for training.png.

Values come from nodes (app/results/records.py reads them into finite numbers or None) and may
be extreme: one node reporting train-loss=1.7e308 made matplotlib's axis arithmetic overflow.
Each axis therefore shows the bulk of its values (`display_window`): a value far out of it is
drawn on the chart's edge as a red triangle pointing where it lies, named in its tooltip and in
the notes under the chart; the value itself stays in metrics.jsonl and the report's tables.

SVG for the report: no script, no external reference (the page's Content-Security-Policy forbids
every request); the figure's ids are prefixed with the chart's name so that several charts on one
page never share one; each data series carries class="mark" and a <title> tooltip.
"""

from __future__ import annotations

import html
import io
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from app.results.records import Round, site_label

PLOTTABLE = 1e100  # beyond this a value is off scale whatever the others are
REACH = 50.0  # a value further than REACH spreads (median absolute deviation, or |median|) from the median is off scale
OFF_SCALE_COLOUR = "#d0021b"
AGGREGATE_COLOUR = "#111111"
BOUND_COLOUR = "#d0021b"
# Phases of a client's round on the server's time axis: (name, from event, to event, colour).
PHASES = (
    ("send", "t_start", "t_sent", "#9aa5b1"),
    ("delivery + ClientApp start", "t_sent", "t_process_start", "#f0b429"),
    ("ClientApp init", "t_process_start", "t_handler_start", "#de911d"),
    ("prepare", "t_handler_start", "t_train_start", "#8bd3c7"),
    ("training", "t_train_start", "t_train_end", "#2f80ed"),
    ("build reply", "t_train_end", "t_reply", "#7b61ff"),
    ("upload + receive", "t_reply", "t_received", "#eb5757"),
    ("wait for others", "t_received", "t_aggregate", "#cbd2d9"),
)
AGGREGATION_COLOUR = "#27ae60"
RC = {"svg.fonttype": "none", "font.family": "sans-serif", "font.sans-serif": ["DejaVu Sans"], "font.size": 9,
      "axes.titlesize": 10, "legend.fontsize": 8}


def display_window(values: Iterable[float], from_zero: bool = False) -> tuple[float, float]:
    """(low, high) of the axis: the range of the values near the bulk, padded."""
    usable = sorted(v for v in values if abs(v) <= PLOTTABLE)
    if not usable:
        return (0.0, 1.0)
    middle = statistics.median(usable)
    reach = REACH * max(statistics.median(abs(v - middle) for v in usable), abs(middle), 1e-9)
    inside = [v for v in usable if abs(v - middle) <= reach] + ([0.0] if from_zero else [])
    low, high = min(inside), max(inside)
    pad = (high - low) * 0.06 or max(abs(high) * 0.1, 1.0)
    return (0.0 if from_zero and low >= 0 else low - pad, high + pad)


def site_colour(partition_id: int | None) -> str:
    import matplotlib

    if partition_id is None:
        return "#828282"
    return matplotlib.colors.to_hex(matplotlib.colormaps["tab20"](partition_id % 20))


def _g(value: float) -> str:
    return f"{value:.4g}"


class Chart:
    """One matplotlib figure and what the SVG needs beyond it: its name, tooltips, off-scale notes."""

    def __init__(self, name: str, width: float, height: float, columns: int = 1) -> None:
        from matplotlib.figure import Figure

        self.name = name
        self.figure = Figure(figsize=(width, height), layout="constrained")
        self.axes = list(self.figure.subplots(1, columns, squeeze=False)[0])
        self.titles: dict[str, str] = {}
        self.off_scale: list[str] = []

    def mark(self, artist: Any, title: str) -> None:
        gid = f"mark-{len(self.titles)}"
        artist.set_gid(gid)
        self.titles[gid] = title

    def points(self, ax: Any, points: list[tuple[float, float, str]], window: tuple[float, float], colour: str,
               label: str, *, line: bool = False, hollow: bool = False, marker: str = "o") -> None:
        """(x, y, what) points of one series on `ax`; those outside `window` on its edge."""
        low, high = window
        inside = [(x, y) for x, y, _ in points if low <= y <= high]
        if inside and line:
            (artist,) = ax.plot(*zip(*inside), marker=marker, color=colour, label=label, linewidth=2, markersize=4)
        elif inside:
            artist = ax.scatter(*zip(*inside), s=22, marker=marker, label=label, zorder=3,
                                facecolors="none" if hollow else colour, edgecolors=colour, linewidths=1.4)
        if inside:
            self.mark(artist, f"{label}: " + ", ".join(f"{what} {_g(y)}" for x, y, what in points if low <= y <= high)[:400])
        elif points:  # all of it off scale: still in the legend
            ax.scatter([], [], s=22, marker=marker, label=label, facecolors="none" if hollow else colour, edgecolors=colour)
        for x, y, what in points:
            if not low <= y <= high:
                self.off_scale.append(f"{label}, {what}: {y:.6g}")
                edge = ax.scatter([x], [high if y > high else low], marker="^" if y > high else "v", s=60,
                                  color=OFF_SCALE_COLOUR, zorder=4, clip_on=False)
                self.mark(edge, f"{label}, {what}: {y:.6g} (off scale)")

    def finish(self, legend_outside: bool = False) -> None:
        for ax in self.axes:
            ax.grid(alpha=0.3)
            handles, labels = ax.get_legend_handles_labels()
            if self.off_scale and ax is self.axes[0]:
                from matplotlib.lines import Line2D

                handles.append(Line2D([], [], marker="^", linestyle="none", color=OFF_SCALE_COLOUR))
                labels.append("off scale, drawn on the edge")
            if handles:
                kwargs = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "borderaxespad": 0} if legend_outside else {}
                columns = 1 + (len(handles) - 1) // 12  # 20 sites fit the height
                ax.legend(handles, labels, ncols=columns, **kwargs)
                if legend_outside and columns > 1:  # and leave the axes their width
                    self.figure.set_figwidth(self.figure.get_figwidth() + 1.8 * (columns - 1))

    def svg(self) -> str:
        import matplotlib

        buffer = io.StringIO()
        with matplotlib.rc_context({**RC, "svg.hashsalt": "fedtune"}):  # the same figure, the same ids
            self.figure.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
        text = buffer.getvalue()
        text = text[text.index("<svg"):]  # no XML declaration or DOCTYPE inside HTML
        text = text.replace("<svg ", f'<svg class="chart" data-chart="{html.escape(self.name)}" role="img" ', 1)
        for gid, title in self.titles.items():
            text = text.replace(f'<g id="{gid}">', f'<g id="{gid}" class="mark"><title>{html.escape(title)}</title>', 1)
        # Every id (matplotlib's figure_1, axes_1, markers, clip paths) and every reference to one
        # prefixed with the chart's name: ids are unique on a page of many charts.
        prefix = f"{self.name}-"
        text = re.sub(r'\bid="([^"]*)"', lambda m: f'id="{prefix}{m.group(1)}"', text)
        return re.sub(r'(href="#|url\(#)', lambda m: m.group(1) + prefix, text)

    def png(self, path: Path) -> None:
        import matplotlib

        with matplotlib.rc_context(RC):
            self.figure.savefig(path, dpi=110, format="png")


def _rounds_axis(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")


def draw_loss(chart: Chart, ax: Any, rounds: list[Round]) -> bool:
    """Per-site dots (one colour and legend entry per site) and the aggregate line."""
    numbered = [r for r in rounds if r.number is not None]
    aggregate = [(r.number, r.train_loss, f"round {r.number}") for r in numbered if r.train_loss is not None]
    by_site: dict[int | None, list[tuple[float, float, str]]] = defaultdict(list)
    for r in numbered:
        for client in r.clients:
            if client.train_loss is not None:
                by_site[client.partition_id].append((r.number, client.train_loss, f"round {r.number}"))
    if not aggregate and not by_site:
        return False
    window = display_window([y for _, y, _ in aggregate] + [y for points in by_site.values() for _, y, _ in points])
    for partition in sorted(by_site, key=lambda p: (p is None, p or 0)):
        chart.points(ax, by_site[partition], window, site_colour(partition), site_label(partition))
    if aggregate:
        chart.points(ax, aggregate, window, AGGREGATE_COLOUR, "aggregate (weighted by examples)", line=True)
    ax.set_ylim(*window)
    _rounds_axis(ax)
    ax.set(ylabel="train loss (response tokens)", title="Training loss per round")
    return True


def draw_communication(chart: Chart, ax: Any, rounds: list[Round]) -> bool:
    points = [(r.number, r.cumulative_mib, f"round {r.number}") for r in rounds
              if r.number is not None and r.cumulative_mib is not None]
    if not points:
        return False
    window = display_window([y for _, y, _ in points], from_zero=True)
    chart.points(ax, points, window, "#27ae60", "cumulative MiB", line=True)
    ax.set_ylim(*window)
    _rounds_axis(ax)
    ax.set(ylabel="MiB (down + up)", title="Cumulative communication")
    return True


def draw_privacy(chart: Chart, ax: Any, rounds: list[Round]) -> bool:
    """The run's epsilon after each round (differential privacy on)."""
    private = [r for r in rounds if r.number is not None and r.dp_epsilon is not None and r.dp_delta is not None]
    if not private:
        return False
    points = [(r.number, r.dp_epsilon, f"round {r.number}") for r in private]
    window = display_window([y for _, y, _ in points], from_zero=True)
    chart.points(ax, points, window, "#8e44ad", "epsilon", line=True)
    ax.set_ylim(*window)
    _rounds_axis(ax)
    ax.set(ylabel=f"epsilon at delta {private[-1].dp_delta:g}", title="Privacy spent (node level)")
    return True


def chart_svg(name: str, draw, rounds: list[Round], legend_outside: bool = False) -> tuple[str, list[str]] | None:
    """(svg, off-scale notes) of a one-axis chart drawn by `draw`, or None when there is nothing to draw."""
    chart = Chart(name, 6.2 if legend_outside else 4.6, 3.3)
    if not draw(chart, chart.axes[0], rounds):
        return None
    chart.finish(legend_outside)
    return chart.svg(), chart.off_scale


def loss_chart(rounds: list[Round]) -> tuple[str, list[str]] | None:
    return chart_svg("loss", draw_loss, rounds, legend_outside=True)


def communication_chart(rounds: list[Round]) -> tuple[str, list[str]] | None:
    return chart_svg("communication", draw_communication, rounds)


def privacy_chart(rounds: list[Round]) -> tuple[str, list[str]] | None:
    return chart_svg("privacy", draw_privacy, rounds)


def draw_norms(chart: Chart, ax: Any, rounds: list[Round]) -> bool:
    """Each counted update's norm (before clipping) per site; clipped ones hollow; the bound per round."""
    numbered = [r for r in rounds if r.number is not None]
    kept: dict[int | None, list[tuple[float, float, str]]] = defaultdict(list)
    clipped: list[tuple[float, float, str]] = []
    for r in numbered:
        for client in r.clients:
            if client.update_norm is None:
                continue
            if client.clipped:
                clipped.append((r.number, client.update_norm, f"{client.site}, round {r.number}"))
            else:
                kept[client.partition_id].append((r.number, client.update_norm, f"round {r.number}"))
    bounds = [(r.number, r.norm_bound, f"round {r.number}") for r in numbered if r.norm_bound is not None]
    if not kept and not clipped:
        return False
    window = display_window([y for points in (*kept.values(), clipped, bounds) for _, y, _ in points], from_zero=True)
    for partition in sorted(kept, key=lambda p: (p is None, p or 0)):
        chart.points(ax, kept[partition], window, site_colour(partition), site_label(partition))
    if clipped:
        chart.points(ax, clipped, window, OFF_SCALE_COLOUR, "clipped to the bound", hollow=True)
    if bounds:
        chart.points(ax, bounds, window, BOUND_COLOUR, "norm bound", line=True, marker="D")
    ax.set_ylim(*window)
    _rounds_axis(ax)
    ax.set(ylabel="update L2 norm (before clipping)", title="Update norms and the bound")
    return True


def norm_chart(rounds: list[Round]) -> tuple[str, list[str]] | None:
    return chart_svg("norms", draw_norms, rounds, legend_outside=True)


def timeline_chart(name: str, number: int, rows: list[tuple[str, dict[str, float]]], aggregation: tuple[float, float] | None,
                   length: float) -> tuple[str, list[str]]:
    """One round on the ServerApp's clock: a bar per phase per site, then the aggregation. Node
    events are already shifted by their clock offset; one outside the round (an offset's error,
    or a node's false clock) is drawn at the round's start or end (the durations table has it)."""

    def at(value: float) -> float:
        return min(max(value, 0.0), length)

    chart = Chart(name, 8.4, 0.9 + 0.3 * (len(rows) + 1))
    ax = chart.axes[0]
    labels = [label for label, _ in rows] + (["ServerApp"] if aggregation else [])
    for i, (label, events) in enumerate(rows):
        for name, start, end, colour in PHASES:
            if start in events and end in events and events[end] >= events[start]:
                left, width = at(events[start]), at(events[end]) - at(events[start])
                bar = ax.barh([i], [max(width, length * 0.002)], left=[left], height=0.7, color=colour)
                chart.mark(bar.patches[0], f"{label}: {name} {events[end] - events[start]:.3f} s")
    if aggregation is not None:
        bar = ax.barh([len(rows)], [max(at(aggregation[1]) - at(aggregation[0]), length * 0.002)], left=[at(aggregation[0])],
                      height=0.7, color=AGGREGATION_COLOUR)
        chart.mark(bar.patches[0], f"aggregation {aggregation[1] - aggregation[0]:.3f} s")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.set_xlim(0.0, length)
    ax.set(xlabel="seconds since the round started", title=f"Round {number}: {length:.1f} s on the ServerApp clock")
    ax.grid(axis="x", alpha=0.3)
    return chart.svg(), chart.off_scale


def gpu_chart(gpus: dict[str, dict[str, float]]) -> tuple[str, list[str]] | None:
    """Per site: memory peak and mean (GiB), mean utilisation (%)."""
    if not gpus:
        return None
    chart = Chart("gpu", 9.0, 1.0 + 0.35 * len(gpus), columns=2)
    memory_ax, util_ax = chart.axes
    sites = list(gpus)
    memory = {s: (g.get("peak_bytes"), g.get("mean_bytes")) for s, g in gpus.items()}
    window = display_window([v / 2**30 for pair in memory.values() for v in pair if v is not None], from_zero=True)
    for i, site in enumerate(sites):
        for offset, value, colour, what in ((-0.2, memory[site][0], "#9b51e0", "peak"), (0.2, memory[site][1], "#bb6bd9", "mean")):
            if value is None:
                continue
            gib = value / 2**30
            shown = min(max(gib, window[0]), window[1])
            bar = memory_ax.barh([i + offset], [shown], height=0.38, color=OFF_SCALE_COLOUR if shown != gib else colour,
                                 label=what if i == 0 else None)
            chart.mark(bar.patches[0], f"{site}: {what} {gib:.4g} GiB" + (" (off scale)" if shown != gib else ""))
            if shown != gib:
                chart.off_scale.append(f"{site}, {what} memory: {gib:.6g} GiB")
        util = gpus[site].get("util_mean")
        if util is not None:
            shown = min(max(util, 0.0), 100.0)
            bar = util_ax.barh([i], [shown], height=0.6, color="#2f80ed" if shown == util else OFF_SCALE_COLOUR)
            chart.mark(bar.patches[0], f"{site}: {util:.4g} % mean utilisation")
            if shown != util:
                chart.off_scale.append(f"{site}, utilisation: {util:.6g} %")
    for ax in chart.axes:
        ax.set_yticks(range(len(sites)), sites)
        ax.set_ylim(len(sites) - 0.5, -0.5)
        ax.grid(axis="x", alpha=0.3)
    memory_ax.set_xlim(*window)
    util_ax.set_xlim(0.0, 100.0)
    memory_ax.set(xlabel="GiB", title="GPU memory: peak, mean")
    util_ax.set(xlabel="%", title="mean GPU utilisation")
    memory_ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return chart.svg(), chart.off_scale

