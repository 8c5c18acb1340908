"""Where a round's wall time goes when its clients train one after another (a device trainer).

From one metrics.jsonl round record (every process on one host: one clock): the head, from the
round's start to its first training (the ServerApp's send, delivery and ClientApp start, the
ClientApp's init, its request reaching the trainer, the trainer's preparation), the gaps between
consecutive trainings, and the tail, from the last training's end to the round's end (the
trainer's finish, the reply built, uploaded and received, aggregation).

    python benchmarks/round_path.py RUN_DIR/metrics.jsonl
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HEAD = (("send", "t_start", "t_sent"), ("delivery + ClientApp start", "t_sent", "t_process_start"),
        ("ClientApp start + pull", "t_process_start", "t_pulled"), ("bundle check + app load", "t_pulled", "t_handler_start"),
        ("to the trainer", "t_handler_start", "t_turn_start"),
        ("trainer: before training", "t_turn_start", "t_train_start"))
TAIL = (("trainer: after training", "t_train_end", "t_turn_end"), ("node: reply built", "t_turn_end", "t_reply"),
        ("upload + receive", "t_reply", "t_received"), ("wait + aggregate", "t_received", "t_end"))


def round_path(record: dict) -> dict | None:
    clients = sorted((c for c in record.get("clients", []) if c.get("t_train_start")), key=lambda c: c["t_train_start"])
    if not clients:
        return None
    first, last = clients[0], clients[-1]

    def span(client: dict, a: str, b: str) -> float | None:
        x, y = {**record, **client}.get(a), {**record, **client}.get(b)
        return y - x if x is not None and y is not None else None

    gaps = [b["t_train_start"] - a["t_train_end"] for a, b in zip(clients, clients[1:])]
    training = sum(c["t_train_end"] - c["t_train_start"] for c in clients)
    return {
        "round": record["round"], "round_seconds": record["round_seconds"], "training": training,
        "head": {name: span(first, a, b) for name, a, b in HEAD}, "gaps": gaps,
        "tail": {name: span(last, a, b) for name, a, b in TAIL},
    }


def summarize(records: list[dict]) -> dict:
    """Medians over the steady rounds (all but the first)."""
    paths = [p for r in records[1:] if (p := round_path(r))]
    if not paths:
        return {}

    def median(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    clients = [c for r in records[1:] for c in r.get("clients", [])]
    return {
        "rounds": len(paths), "round_seconds": median(p["round_seconds"] for p in paths), "training": median(p["training"] for p in paths),
        "forked_clientapps": sum(c.get("clientapp_forked", 0) for c in clients), "clientapps": len(clients),
        "head": {k: median(p["head"][k] for p in paths) for k in paths[0]["head"]},
        "gaps_sum": median(sum(p["gaps"]) for p in paths),
        "tail": {k: median(p["tail"][k] for p in paths) for k in paths[0]["tail"]},
    }


def print_summary(s: dict) -> None:
    if not s:
        print("no steady round with training timestamps")
        return
    print(f"steady rounds: {s['rounds']}, median round {s['round_seconds']:.2f} s, its trainings {s['training']:.2f} s; "
          f"{s.get('forked_clientapps', 0):.0f} of {s.get('clientapps', 0)} ClientApps forked warm by their node's fork server")
    for part in ("head", "tail"):
        for name, value in s[part].items():
            print(f"  {part} {name:<28} {'-' if value is None else f'{value:6.2f}'} s")
        if part == "head":
            overlap = "  (negative: the trainings overlapped, e.g. per-node trainers)" if s["gaps_sum"] < 0 else ""
            print(f"  between trainings (sum)           {s['gaps_sum']:6.2f} s{overlap}")


if __name__ == "__main__":
    lines = Path(sys.argv[1]).read_text().splitlines()
    print_summary(summarize([json.loads(line) for line in lines if line.strip()]))
