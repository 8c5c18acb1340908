"""Run outputs: one metrics.jsonl line per round, summary.json, and a loss/communication plot."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MIB = 1024**2
PLOT_NAME = "training.png"


def _umask() -> int:
    """The process's umask, read without changing it (os.umask would, racing other threads)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    return 0o022


def share_like_new_files(path: Path, directory: bool = False) -> None:
    """Give a file or directory made by tempfile (always 0600 / 0700) the mode a plain open() or
    mkdir() would have under the caller's umask (0644 / 0755 by default), so that whoever may
    read the results directory can load what is in it (README: `PeftModel.from_pretrained`)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a+b") as handle:
        # A line cut short by a crash or a full disk: start on a fresh line, so only that record is lost.
        end = handle.seek(0, os.SEEK_END)
        torn = end > 0 and os.pread(handle.fileno(), 1, end - 1) != b"\n"
        handle.write((("\n" if torn else "") + json.dumps(record) + "\n").encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())


@dataclass
class JsonlChunk:
    records: list[dict[str, Any]]
    end: int  # byte offset after the last complete line: where the next read starts
    bad: list[str]  # "path line N: why" for each complete line that is not a JSON object
    lines: int  # complete lines read (for numbering the next chunk's lines)


def read_jsonl_from(path: Path, offset: int = 0, first_line: int = 1) -> JsonlChunk:
    """The complete lines of `path` from byte `offset` on. A last line without its newline is
    still being written (or was cut short by a crash): it is left for the next read, not parsed.
    Complete lines that are not JSON objects are skipped and named in `bad`."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read()
    complete = data[: data.rfind(b"\n") + 1]
    records, bad = [], []
    lines = complete.splitlines()
    for number, line in enumerate(lines, first_line):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:  # also bad UTF-8
            bad.append(f"{path} line {number}: not JSON ({exc})")
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad.append(f"{path} line {number}: expected a JSON object, found {type(record).__name__}")
    return JsonlChunk(records, offset + len(complete), bad, len(lines))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete, readable record; skipped lines are counted in a warning naming them."""
    chunk = read_jsonl_from(path)
    unfinished = os.path.getsize(path) > chunk.end
    if chunk.bad or unfinished:
        log.warning(
            "%s: skipped %d unreadable line(s)%s: %s", path, len(chunk.bad) + unfinished,
            " (the last one unfinished: cut short by a crash?)" if unfinished else "", "; ".join(chunk.bad) or "-",
        )
    return chunk.records


def write_json_atomic(path: Path, data: Any) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp", encoding="utf-8") as tmp:
        json.dump(data, tmp, indent=2)
        tmp.flush()
        os.fsync(tmp.fileno())
    share_like_new_files(Path(tmp.name))
    os.replace(tmp.name, path)


def plot_run(rounds: list[dict[str, Any]], path: Path) -> None:
    """Training loss (aggregate and per site) and cumulative communication per round, as the
    report draws them: values a node sent are read tolerantly and extreme ones drawn on the edge."""
    from app.results.charts import Chart, draw_communication, draw_loss
    from app.results.records import parse_rounds

    parsed = parse_rounds(rounds)
    chart = Chart("training", 12, 4, columns=2)
    loss_ax, comm_ax = chart.axes
    draw_loss(chart, loss_ax, parsed)
    draw_communication(chart, comm_ax, parsed)
    chart.finish(legend_outside=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".png") as tmp:
        chart.png(Path(tmp.name))
    share_like_new_files(Path(tmp.name))
    os.replace(tmp.name, path)
