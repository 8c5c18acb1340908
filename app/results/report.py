"""`fedtune report RUN_DIR`: report.html and report.md for a run, finished, stopped or resumed.

The figures come from the run's `metrics.jsonl` (one line per round, read tolerantly by
app/results/records.py: what nodes reported may be missing, mistyped or extreme), the run's
`summary.json` (whether it stopped, and why), the evaluation summary (`eval/summary.json`,
written by `fedtune local up` or the stack's `evaluate` service) and its generation files (how
many answers could not be parsed); `config.json` only labels them (profile, model). report.html
is one self-contained file: inline CSS and SVG charts drawn by matplotlib (app/results/charts.py),
no script, and a Content-Security-Policy that forbids every request, so it opens from disk on an
offline machine and cannot call anywhere.

Clocks: the ServerApp's timestamps (t_start, t_sent, t_received, t_end) and each node's
(t_process_start ... t_reply) come from different machines. Durations are measured on one side
only; to draw a node's events on the server's time axis its clock offset is estimated as NTP does,
from the send/receive pairs: with a = t_process_start - t_sent (offset + delivery delay) and
b = t_received - t_reply (upload delay - offset), offset = (a - b) / 2, wrong by at most
(a + b) / 2 plus half the resolution of t_process_start (one kernel clock tick, 10 ms). Of a
node's rounds the one with the smallest bound is used; a pair whose bound comes out negative
cannot come from true clocks and is not used.
"""

from __future__ import annotations

import html
import json
import os
import re
import sys
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.evaluation.extract import VALID
from app.results import charts
from app.results.metrics import read_jsonl
from app.results.records import NODE_EVENTS, Client, Round, integer, number, parse_rounds, site_names, text

BENCHMARKS = ("pubmedqa", "medmcqa", "medqa", "careqa")
# Reported figures to compare with (issues 14 and 24): the seed recipe's, the FlowerTune medical
# leaderboard's best Bio-Medical-Llama-3-8B entry and its best entry overall
# (flower.ai/benchmarks/llm-leaderboard/medical). Communication in MiB: the leaderboard's "GB"
# read as 1000 of its "MB", which are bytes / 2**20.
REFERENCES = (
    ("seed recipe (reported)", {"pubmedqa": 0.6960, "medmcqa": 0.5912, "medqa": 0.6394, "careqa": 0.5318}, 3000.96),
    ("leaderboard best, Bio-Medical-Llama-3-8B",
     {"pubmedqa": 0.7040, "medmcqa": 0.6093, "medqa": 0.6582, "careqa": 0.5536}, 1.6 * 1000),
    ("leaderboard best overall, Llama3.1-Aloe-Beta-8B",
     {"pubmedqa": 0.7480, "medmcqa": 0.5539, "medqa": 0.5931, "careqa": 0.6479}, 2.0 * 1000),
)
EVAL_SUMMARY = Path("eval") / "summary.json"
CSP = "default-src 'none'; style-src 'unsafe-inline'"
# t_process_start comes from the kernel's process start time, counted in clock ticks (1/100 s):
# the estimate is within half a tick of the truth (app/client_app.py's _process_start_time).
NODE_START_RESOLUTION = 0.005
TIMELINE_ROUNDS = 24  # more rounds than this: the first and last half of them get a timeline
# Durations measured on one clock each (no alignment needed): (name, from event, to event).
DURATIONS = (
    ("server: sent to received", "t_sent", "t_received"),
    ("node: process start to reply", "t_process_start", "t_reply"),
    ("node: ClientApp init", "t_process_start", "t_handler_start"),
    ("of it: start and pull of the message", "t_process_start", "t_pulled"),
    ("node: prepare", "t_handler_start", "t_train_start"),
    ("of it: waits for its trainer", "t_handler_start", "t_turn_start"),
    ("node: training", "t_train_start", "t_train_end"),
    ("trainer: after training", "t_train_end", "t_turn_end"),
    ("node: build reply", "t_train_end", "t_reply"),
)


@dataclass
class RunData:
    run_dir: Path
    rounds: list[Round]
    evaluation: dict[str, Any] | None
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] | None = None  # the run's summary.json (None: the run has not finished, or died)
    unreadable: list[str] = field(default_factory=list)  # files that were there but could not be read


def _json_object(path: Path, unreadable: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        unreadable.append(f"{path.name}: {exc}")
        return None
    if not isinstance(value, dict):
        unreadable.append(f"{path.name}: expected a JSON object, found {type(value).__name__}")
        return None
    return value


def load_run(run_dir: Path) -> RunData:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics}: no such file (is {run_dir} a run directory, results/run-<id>?)")
    unreadable: list[str] = []
    return RunData(
        run_dir,
        parse_rounds(read_jsonl(metrics)),
        _json_object(run_dir / EVAL_SUMMARY, unreadable),
        _json_object(run_dir / "config.json", unreadable) or {},
        _json_object(run_dir / "summary.json", unreadable),
        unreadable,
    )


# ------------------------------------------------------------------------------ figures


def communication_mib(rounds: list[Round]) -> float | None:
    return next((r.cumulative_mib for r in reversed(rounds) if r.cumulative_mib is not None), None)


def _mean(values: list[float]) -> float:
    """A mean that cannot overflow (statistics.fmean's fsum raises on 1e308 + 1e308)."""
    return sum(v / len(values) for v in values)


def aggregated_rounds(data: RunData) -> int:
    """summary.json's count when it has one, else the metrics lines'."""
    counted = integer((data.summary or {}).get("rounds_aggregated"), 2**31)
    return counted if counted is not None else sum(r.aggregated for r in data.rounds)


def results_table(data: RunData) -> list[dict[str, Any]]:
    """Rows of the comparison: this run, then the references; accuracies None when not measured."""
    ev = data.evaluation or {}
    raw = ev.get("accuracies") if isinstance(ev.get("accuracies"), dict) else {}
    this = {name: number(raw.get(name)) for name in BENCHMARKS}
    # Said in the row itself, so the numbers are never read as the recipe's: the 8B-shaped benchmark
    # model has random weights too, and is not the tiny one.
    notes = [n for n, on in (("untrained adapter", aggregated_rounds(data) == 0),
                             ("tiny model", _profile(data) == "tiny"),
                             ("random weights", ev.get("random_weights") is True),
                             ("not the leaderboard's dataset", _off_leaderboard_dataset(data))) if on]
    complete = None not in this.values()
    rows = [{"label": "this run" + (f" ({', '.join(notes)})" if notes else ""),
             "accuracies": this, "average": number(ev.get("average")) if complete else None,
             "communication_mib": communication_mib(data.rounds)}]
    for label, reference, comm_mib in REFERENCES:
        rows.append({"label": label, "accuracies": reference, "average": _mean(list(reference.values())),
                     "communication_mib": comm_mib})
    return rows


def _is_parsed(row: dict[str, Any]) -> bool:
    """An answer the extraction could read (a-e, yes, no), or one that matched the gold as it
    stood (a generated "maybe")."""
    return row.get("correct") is True or row.get("pred") in VALID


def unparsed_answers(data: RunData) -> dict[str, tuple[int, int]]:
    """Per benchmark: (answers that could not be parsed, answers), counted in the benchmark's
    newest generation file under eval/ (fedtune eval's `generation_<benchmark>_<run>.jsonl`)."""
    eval_dir = data.run_dir / "eval"
    counts = {}
    for name in BENCHMARKS:
        files = sorted(eval_dir.rglob(f"generation_{name}_*.jsonl"), key=lambda p: p.stat().st_mtime) if eval_dir.is_dir() else []
        if files:
            rows = read_jsonl(files[-1])
            counts[name] = (sum(not _is_parsed(r) for r in rows), len(rows))
    return counts


def mostly_unparsed(counts: dict[str, tuple[int, int]]) -> list[str]:
    return [name for name, (bad, total) in counts.items() if total and bad * 2 > total]


@dataclass(frozen=True)
class ClockOffset:
    offset: float  # node clock - server clock, seconds
    bound: float  # |error| <= bound, never negative
    round: int | None  # the round whose send/receive pair gave it


def clock_offsets(rounds: list[Round]) -> dict[int, ClockOffset]:
    best: dict[int, ClockOffset] = {}
    for record in rounds:
        for client in record.clients:
            stamps = [client.events.get(k) for k in ("t_sent", "t_process_start", "t_reply", "t_received")]
            if None in stamps or client.node_id is None:
                continue
            sent, process_start, reply, received = stamps
            a, b = process_start - sent, received - reply
            offset, bound = (a - b) / 2, (a + b) / 2 + NODE_START_RESOLUTION
            if not (abs(offset) <= charts.PLOTTABLE and 0 <= bound <= charts.PLOTTABLE):
                continue  # false clocks (or overflow): no alignment from this pair
            candidate = ClockOffset(offset, bound, record.number)
            if client.node_id not in best or candidate.bound < best[client.node_id].bound:
                best[client.node_id] = candidate
    return best


def timed_nodes(rounds: list[Round]) -> set[int]:
    """Nodes that sent their own timestamps (whether or not they could be aligned)."""
    return {c.node_id for r in rounds for c in r.clients if c.node_id is not None and "t_process_start" in c.events}


def round_timeline(record: Round, offsets: dict[int, ClockOffset]) -> tuple[float, list[tuple[str, dict[str, float]]], tuple[float, float] | None]:
    """Seconds since the round's t_start, on the server's clock: (length, [(site, events)],
    aggregation (start, end) or None). Node events are shifted by the node's estimated offset;
    events that are not finite numbers are left out."""
    origin = record.t_start
    if origin is None:
        return 0.0, [], None

    def since(value: float | None) -> float | None:
        return None if value is None or not abs(value - origin) <= charts.PLOTTABLE else value - origin

    aggregation = None
    if record.t_end is not None and record.aggregate_seconds is not None:
        end, start = since(record.t_end), since(record.t_end - record.aggregate_seconds)
        aggregation = (start, end) if start is not None and end is not None and start <= end else None
    rows = []
    for client in sorted(record.clients, key=lambda c: (c.partition_id is None, c.partition_id or 0)):
        shift = offsets[client.node_id].offset if client.node_id in offsets else None
        events = {"t_start": 0.0}
        for key in ("t_sent", "t_received"):
            if (value := since(client.events.get(key))) is not None:
                events[key] = value
        if shift is not None:
            for key in NODE_EVENTS:
                if key in client.events and (value := since(client.events[key] - shift)) is not None:
                    events[key] = value
        if aggregation is not None:
            events["t_aggregate"] = aggregation[0]
        rows.append((client.site, events))
    # The round's length on the server's own stamps only: a node's clock cannot stretch it.
    server = [v for v in (since(record.t_end), *(e.get(k) for _, e in rows for k in ("t_sent", "t_received"))) if v is not None]
    length = charts.display_window(server + [0.0], from_zero=True)[1] if server else 1.0
    return length, rows, aggregation


def phase_durations(client: Client) -> dict[str, float | None]:
    def span(first: float | None, last: float | None) -> float | None:
        return last - first if first is not None and last is not None else None

    return {name: span(client.events.get(a), client.events.get(b)) for name, a, b in DURATIONS}


def gpu_by_site(rounds: list[Round]) -> dict[str, dict[str, float | None]]:
    """Per site (partition): peak of the rounds' peaks, mean of their means, mean utilisation;
    a figure no round of the site reported is None."""
    per_site: dict[tuple[bool, int], list[Client]] = defaultdict(list)
    for record in rounds:
        for client in record.clients:
            if client.gpu.get("gpu_samples"):
                per_site[(client.partition_id is None, client.partition_id or 0)].append(client)

    def of(clients: list[Client], key: str) -> list[float]:
        return [c.gpu[key] for c in clients if key in c.gpu]

    return {
        clients[0].site: {
            "peak_bytes": max(of(clients, "gpu_mem_peak_bytes"), default=None),
            "mean_bytes": _mean(values) if (values := of(clients, "gpu_mem_mean_bytes")) else None,
            "util_mean": _mean(values) if (values := of(clients, "gpu_util_mean")) else None,
            "rounds": len(clients),
            "samples": sum(v / 1 for v in of(clients, "gpu_samples")),
        }
        for _, clients in sorted(per_site.items())
    }


def _off_leaderboard_dataset(data: RunData) -> bool:
    """Trained on another dataset than FlowerTune's fixed one (`static.dataset.name`); the tiny
    profile says so already."""
    config = data.config
    fixed = text(config.get("static.dataset.name"))
    if _profile(data) == "tiny" or fixed is None:
        return False
    return text(config.get("dataset.name")) != fixed or bool(text(config.get("dataset.path")))


def _profile(data: RunData) -> str:
    ev = data.evaluation or {}
    return text(ev.get("profile")) or text(data.config.get("profile")) or "unknown"


def run_facts(data: RunData) -> dict[str, str]:
    ev = data.evaluation or {}
    configured = integer(data.config.get("num-server-rounds"), 2**31)
    limit = integer(ev.get("limit"), 2**31)
    formats = sorted({r.comm_format for r in data.rounds if r.comm_format})
    return {
        "run": data.run_dir.name,
        "profile": _profile(data),
        "model": text(ev.get("base_model")) or text(data.config.get("model.name")) or "unknown",
        "random weights": "yes (the scores are those of a model with random weights, not the recipe's)"
                          if ev.get("random_weights") is True else "no",
        "adapter evaluated": text(ev.get("peft_path")) or "none",
        "evaluation": (f"{text(ev.get('mode')) or '?'} path" + (f", first {limit} questions per benchmark" if limit else ", full benchmarks"))
                      if ev else "not run (fedtune eval --peft-path <run>/peft_N --output-dir <run>/eval)",
        "rounds": f"{sum(r.aggregated for r in data.rounds)} aggregated of {len(data.rounds)} recorded"
                  + (f" (configured {configured})" if configured is not None else ""),
        "wire format": ", ".join(formats) or "not recorded",
        "differential privacy": privacy_fact(data.rounds),
        "run summary": "summary.json" if data.summary is not None else "none yet (the run has not finished, or its ServerApp died)",
    }


def privacy_fact(rounds: list[Round]) -> str:
    """The run's (epsilon, delta) after its last recorded round, and what it means."""
    last = next((r for r in reversed(rounds) if r.dp_delta is not None), None)
    if last is None:
        return "off (privacy.noise-multiplier = 0): no privacy guarantee"
    if last.dp_epsilon is None:
        return f"no guarantee: a round went out without noise (delta {last.dp_delta:g})"
    return (f"epsilon {last.dp_epsilon:.3g} at delta {last.dp_delta:g} after round {_round(last.number)}; node level (one node's whole "
            "round update), no amplification by sampling assumed (the seeded sample is public)")


def run_warnings(data: RunData) -> list[str]:
    """What a reader must know before any figure: the run failed, stopped, trained nothing, or
    its evaluation could not read the answers."""
    summary = data.summary or {}
    warnings = []
    status = text(summary.get("status"), 40)
    if status and status not in ("completed", "finished"):
        warnings.append(f"The run ended with status {status}.")
    if stopped := text(summary.get("stopped")):
        warnings.append(f"The run stopped before its last round: {stopped}")
    reasons = [r for r in map(text, summary.get("failure_reasons") if isinstance(summary.get("failure_reasons"), list) else []) if r]
    warnings += [f"Failure: {reason}" for reason in reasons[:20]]
    if len(reasons) > 20:
        warnings.append(f"... and {len(reasons) - 20} more failure reasons in summary.json")
    if aggregated_rounds(data) == 0:
        warnings.append("No round aggregated: the adapter is untrained (the initial one, which leaves the base model "
                        "unchanged)" + ("; the accuracies below are the base model's." if data.evaluation else "."))
    counts = unparsed_answers(data)
    if mostly := mostly_unparsed(counts):
        warnings.append("Most answers could not be parsed (" + ", ".join(f"{n}: {counts[n][0]} of {counts[n][1]}" for n in mostly)
                        + "): those accuracies measure the answer format, not medical knowledge.")
    warnings += [f"Could not read {problem}" for problem in data.unreadable]
    return warnings


def node_label(node_id: int | None, name: str | None, names: dict[int, str]) -> str:
    if node_id is not None and node_id in names:
        return names[node_id]
    return f"node {name}" if name else f"node {node_id}" if node_id is not None else "node ?"


def influence_rows(rounds: list[Round]) -> list[dict[str, Any]]:
    """Per round with bounded updates or failed replies: the bound, the clipped updates, the
    refused or failed replies and why (each distinct reason once, with its count)."""
    names = site_names(rounds)
    rows = []
    for r in rounds:
        clipped = [c.site for c in r.clients if c.clipped]
        has_norms = r.norm_bound is not None or r.clipped is not None or any(c.update_norm is not None for c in r.clients)
        if not (has_norms or r.failed):
            continue
        reasons = Counter(f"{node_label(f.node_id, f.node, names)}: {f.reason}" for f in r.failed)
        rows.append({
            "round": r.number, "bound": r.norm_bound, "counted": len(r.clients),
            "clipped": r.clipped if r.clipped is not None else (len(clipped) if has_norms else None),
            "clipped_sites": clipped, "failed": len(r.failed),
            "reasons": [f"{reason}" + (f" (x{n})" if n > 1 else "") for reason, n in reasons.items()],
        })
    return rows


def trainer_rows(rounds: list[Round]) -> list[list[str]]:
    """Per trainer (placement:device:process, app/training/trainer_service.py trainer_id): the
    client rounds it ran and the sites they came from; rounds from before trainer ids: `unknown`."""
    runs: dict[str, list[Client]] = defaultdict(list)
    for r in rounds:
        for c in r.clients:
            runs[c.trainer_id or "unknown"].append(c)
    rows = []
    for trainer, clients in sorted(runs.items()):
        sites = sorted({c.partition_id for c in clients if c.partition_id is not None})
        rows.append([trainer, str(len(clients)), ", ".join(str(p) for p in sites) or "?"])
    return rows


# ------------------------------------------------------------------------------ markdown


def _fmt(value: float | int | None, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if abs(value) < 1e9 else f"{value:.4g}"


def _round(number_: int | None) -> str:
    return "?" if number_ is None else str(number_)


MARKDOWN_SPECIAL = re.compile(r"([\\\[\]<>|])")  # escapes, links and images, HTML, table cells


def _md(cell: str) -> str:
    """Text that may come from a node (a failure reason) as literal Markdown: no table cell
    split by "|", and no image, link or HTML that a Markdown viewer would load."""
    return MARKDOWN_SPECIAL.sub(r"\\\1", cell)


def _parsed_cells(counts: dict[str, tuple[int, int]]) -> list[str]:
    return [f"{counts[n][0]} of {counts[n][1]}" if n in counts else "n/a" for n in BENCHMARKS]


def render_markdown(data: RunData) -> str:
    lines = [f"# FlowerTune medical: {data.run_dir.name}", ""]
    lines += [f"> **Warning:** {_md(w)}" for w in run_warnings(data)]
    lines += [""] if lines[-1] != "" else []
    lines += [f"- {key}: {value}" for key, value in run_facts(data).items()] + [""]
    lines += ["## Accuracy and communication", "",
              "| | " + " | ".join(BENCHMARKS) + " | average | communication (MiB) |",
              "| --- " * (len(BENCHMARKS) + 3) + "|"]
    table = results_table(data)
    counts = unparsed_answers(data)
    for i, row in enumerate(table):
        cells = [_fmt(row["accuracies"][name]) for name in BENCHMARKS]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {_fmt(row['average'])} | {_fmt(row['communication_mib'], 2)} |")
        if i == 0 and counts:
            lines.append("| answers not parsed (this run) | " + " | ".join(_parsed_cells(counts)) + " | | |")
    lines += ["", _communication_note(), ""]
    lines += ["## Rounds", "", "| round | status | train loss | clients (site: loss) | MiB this round | cumulative MiB | round s | aggregation s |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in data.rounds:
        clients = ", ".join(f"{c.site}: {_fmt(c.train_loss)}" for c in r.clients)
        lines.append(f"| {_round(r.number)} | {_md(r.status)} | {_fmt(r.train_loss)} | {clients} | "
                     f"{_fmt(None if r.bytes_round is None else r.bytes_round / 2**20, 2)} | {_fmt(r.cumulative_mib, 2)} | "
                     f"{_fmt(r.round_seconds, 1)} | {_fmt(r.aggregate_seconds, 3)} |")
    lines += ["", "## Bounded updates, clipped and refused replies", ""]
    influence = influence_rows(data.rounds)
    if influence:
        lines += ["| round | norm bound | updates counted | clipped | refused or failed | why |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {_round(row['round'])} | {_fmt(row['bound'], 3)} | {row['counted']} | {_clipped_cell(row)} | {row['failed']} | "
                  f"{_md('; '.join(row['reasons'])) or '-'} |" for row in influence]
    else:
        lines.append(_no_influence_note())
    offsets = clock_offsets(data.rounds)
    lines += ["", "## Where the time went", "", "Durations, each measured on one clock (seconds):", "",
              "| round | site | " + " | ".join(name for name, _, _ in DURATIONS) + " |", "| --- " * (2 + len(DURATIONS)) + "|"]
    for r in data.rounds:
        for c in r.clients:
            lines.append(f"| {_round(r.number)} | {c.site} | " + " | ".join(_fmt(v, 2) for v in phase_durations(c).values()) + " |")
    lines += ["", "Trainers (placement:device:process; `in-process`: the ClientApp trained itself):", "",
              "| trainer | client rounds | sites |", "| --- | --- | --- |"]
    lines += [f"| {' | '.join(_md(cell) for cell in row)} |" for row in trainer_rows(data.rounds)]
    lines += ["", _alignment_note(), "", "| site | offset (node - server), s | bound, s | from round |", "| --- | --- | --- | --- |"]
    lines += [" | ".join(["", *row, ""]).strip() for row in _offset_rows(data.rounds, offsets)]
    lines += ["", "## GPU use per site (while training)", ""]
    gpus = gpu_by_site(data.rounds)
    if gpus:
        lines += ["| site | peak memory (GiB) | mean memory (GiB) | mean utilisation (%) | rounds | samples |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {' | '.join(_gpu_cells(site, g))} |" for site, g in gpus.items()]
    else:
        lines.append("No GPU samples: the nodes trained without a GPU (or without NVML).")
    return "\n".join(lines) + "\n"


def _clipped_cell(row: dict[str, Any]) -> str:
    if row["clipped"] is None:
        return "n/a"
    return str(row["clipped"]) + (f" ({', '.join(row['clipped_sites'])})" if row["clipped_sites"] else "")


def _no_influence_note() -> str:
    return ("No update norms recorded (metrics from before bounded updates) and no refused or failed replies.")


def _gpu_cells(site: str, g: dict[str, float | None]) -> list[str]:
    gib = [None if g[k] is None else g[k] / 2**30 for k in ("peak_bytes", "mean_bytes")]
    return [site, _fmt(gib[0], 2), _fmt(gib[1], 2), _fmt(g["util_mean"], 1), str(g["rounds"]), _fmt(g["samples"], 0)]


def _offset_rows(rounds: list[Round], offsets: dict[int, ClockOffset]) -> list[list[str]]:
    names = site_names(rounds)
    rows = [(node_label(node, None, names), [f"{o.offset:+.3f}", f"±{o.bound:.3f}", _round(o.round)]) for node, o in offsets.items()]
    rows += [(node_label(node, None, names), ["unknown", "inconsistent timestamps", "-"])
             for node in timed_nodes(rounds) - set(offsets)]
    return [[label, *cells] for label, cells in sorted(rows, key=lambda row: _label_order(row[0]))]


def _label_order(label: str) -> tuple[int, str]:
    tail = label.rsplit(" ", 1)[-1]
    return (0 if label.startswith("site ") and tail.isdigit() else 1, f"{int(tail):012d}" if tail.isdigit() else label)


def _communication_note() -> str:
    return ("MiB: payload bytes of the arrays sent to and received from the sampled clients, / 2^20 (FlowerTune calls "
            "this unit MB). The leaderboard lists its entries as 1.6 GB and 2.0 GB, shown here as 1600 and 2000 MiB.")


def _alignment_note() -> str:
    return ("Node clocks are aligned to the ServerApp's per node, NTP-style, from the round with the tightest "
            "send/receive pair: offset = ((t_process_start - t_sent) - (t_received - t_reply)) / 2, wrong by at most "
            "((t_process_start - t_sent) + (t_received - t_reply)) / 2 plus 0.005 s (half a tick of the node's process start time).")


# ------------------------------------------------------------------------------ HTML

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#1f2933;padding:0 16px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #e4e7eb}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #d9e2ec;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}tr.this td{font-weight:600;background:#f0f4f8}
tr.parsed td{color:#52606d;font-style:italic}tr.warning td{background:#fff3c4;color:#8d2b0b;text-align:left}
td.why{text-align:left;max-width:520px}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 16px}dt{color:#52606d}dd{margin:0}
.charts{display:flex;flex-wrap:wrap;gap:16px}.note{color:#52606d;max-width:900px}
.alert{border:2px solid #d0021b;background:#fff5f5;padding:8px 14px;margin:12px 0;max-width:900px}.alert p{margin:4px 0}
svg.chart{max-width:100%;height:auto}figure{margin:0}
.legend span{display:inline-block;margin-right:14px}.legend i{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:-1px}
"""


def _table(header: list[str], rows: list[list[str]], classes: list[str] | None = None, wrap_last: bool = False) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    why = ' class="why"'
    body = "".join(
        f'<tr class="{classes[i] if classes else ""}">'
        + "".join(f"<td{why if wrap_last and j == len(row) - 1 else ''}>{html.escape(c)}</td>" for j, c in enumerate(row))
        + "</tr>"
        for i, row in enumerate(rows))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _with_notes(chart: tuple[str, list[str]] | None) -> str:
    if chart is None:
        return ""
    svg, off_scale = chart
    notes = (f'<p class="note">Off scale, drawn on the chart\'s edge: {html.escape("; ".join(off_scale[:10]))}'
             + (f" and {len(off_scale) - 10} more" if len(off_scale) > 10 else "") + "</p>") if off_scale else ""
    return f"<figure>{svg}{notes}</figure>"


def _timeline_rounds(rounds: list[Round]) -> tuple[list[Round], int]:
    timed = [r for r in rounds if r.t_start is not None and r.number is not None and r.clients]
    if len(timed) <= TIMELINE_ROUNDS:
        return timed, 0
    half = TIMELINE_ROUNDS // 2
    return timed[:half] + timed[-half:], len(timed) - TIMELINE_ROUNDS


def render_html(data: RunData) -> str:
    e = html.escape
    warnings = run_warnings(data)
    alert = ('<div class="alert">' + "".join(f"<p><strong>Warning:</strong> {e(w)}</p>" for w in warnings) + "</div>") if warnings else ""
    facts = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in run_facts(data).items())
    table_rows = results_table(data)
    counts = unparsed_answers(data)
    rows = [[r["label"], *(_fmt(r["accuracies"][n]) for n in BENCHMARKS), _fmt(r["average"]), _fmt(r["communication_mib"], 2)]
            for r in table_rows]
    classes = ["this", *[""] * (len(table_rows) - 1)]
    if counts:
        rows.insert(1, ["answers not parsed (this run)", *_parsed_cells(counts), "", ""])
        classes.insert(1, "parsed")
    results = _table(["", *BENCHMARKS, "average", "communication (MiB)"], rows, classes)
    if mostly := mostly_unparsed(counts):
        warning = (f"Most answers to {', '.join(mostly)} could not be parsed as an answer (a-e, yes, no): "
                   "their accuracy measures the answer format, not medical knowledge.")
        parsed_row_end = results.index("</tr>", results.index('<tr class="parsed">')) + len("</tr>")  # right under the counts
        results = (results[:parsed_row_end] + f'<tr class="warning"><td colspan="{len(BENCHMARKS) + 3}">{e(warning)}</td></tr>'
                   + results[parsed_row_end:])
    offsets = clock_offsets(data.rounds)
    training = "".join(_with_notes(c) for c in (charts.loss_chart(data.rounds), charts.communication_chart(data.rounds), charts.privacy_chart(data.rounds)))
    shown, omitted = _timeline_rounds(data.rounds)
    timelines = []
    for i, r in enumerate(shown):
        length, rows_, aggregation = round_timeline(r, offsets)
        # One chart per round; a round number written twice (a damaged file) still gets its own ids.
        name = f"timeline-{r.number}" + (f"-{i}" if any(o.number == r.number for o in shown[:i]) else "")
        if rows_:
            timelines.append(_with_notes(charts.timeline_chart(name, r.number, rows_, aggregation, length)))
    legend = "".join(f'<span><i style="background:{c}"></i>{e(n)}</span>' for n, _, _, c in charts.PHASES)
    legend += f'<span><i style="background:{charts.AGGREGATION_COLOUR}"></i>aggregation (ServerApp)</span>'
    offset_table = _table(["site", "offset (node − server), s", "bound, s", "from round"], _offset_rows(data.rounds, offsets))
    omitted_note = (f'<p class="note">{omitted} rounds in the middle are left out here; report.md has every round\'s durations.</p>'
                    if omitted else "")
    timeline_section = (f'<p class="legend">{legend}</p>' + "".join(timelines) + omitted_note
                        + f'<p class="note">{e(_alignment_note())}</p>' + offset_table
                        if timelines else '<p class="note">This run\'s metrics.jsonl has no per-message timestamps.</p>')
    trainers = (f'<p class="note">Trainers (placement:device:process; in-process: the ClientApp trained itself)</p>'
                + _table(["trainer", "client rounds", "sites"], trainer_rows(data.rounds)))
    influence = influence_rows(data.rounds)
    influence_section = (_with_notes(charts.norm_chart(data.rounds)) + _table(
        ["round", "norm bound", "updates counted", "clipped", "refused or failed", "why"],
        [[_round(r["round"]), _fmt(r["bound"], 3), str(r["counted"]), _clipped_cell(r), str(r["failed"]), "; ".join(r["reasons"]) or "-"]
         for r in influence], wrap_last=True)) if influence else f'<p class="note">{e(_no_influence_note())}</p>'
    gpus = gpu_by_site(data.rounds)
    gpu_section = (_with_notes(charts.gpu_chart(gpus)) + _table(
        ["site", "peak memory (GiB)", "mean memory (GiB)", "mean utilisation (%)", "rounds", "samples"],
        [_gpu_cells(s, g) for s, g in gpus.items()])) if gpus else '<p class="note">No GPU samples: the nodes trained without a GPU (or without NVML).</p>'
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<title>fedtune report: {e(data.run_dir.name)}</title><style>{STYLE}</style></head>
<body>
<h1>FlowerTune medical: {e(data.run_dir.name)}</h1>
{alert}
<dl>{facts}</dl>
<h2>Accuracy and communication</h2>
{results}
<p class="note">{e(_communication_note())}</p>
<h2>Training</h2>
<div class="charts">{training}</div>
<h2>Bounded updates, clipped and refused replies</h2>
{influence_section}
<h2>Where the time went, per round and SuperNode</h2>
{timeline_section}
{trainers}
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
    except OSError as exc:  # no such run, an unreadable metrics.jsonl, a full disk
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
