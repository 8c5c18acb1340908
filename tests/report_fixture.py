"""A run directory in the metrics contract's shape (metrics.jsonl, eval/summary.json, config.json),
for the report tests: 2 rounds x 3 SuperNodes whose clocks run 5 s ahead of, at and 3 s behind
the ServerApp's, each with GPU samples."""

from __future__ import annotations

import json
from pathlib import Path

# node id (flwr's are 64-bit: the report must name them as sites) -> node clock - server clock, seconds
NODE_CLOCK_OFFSETS = {17373721801637452078: 5.0, 4611686018427387904: 0.0, 12297829382473034410: -3.0}
DELIVERY, UPLOAD = 0.2, 0.1  # one-way delays (s) in the fixture: the estimate's error is (0.2 - 0.1) / 2
ACCURACIES = {"pubmedqa": 0.25, "medmcqa": 0.5, "medqa": 0.125, "careqa": 0.375}
MIB = 2**20


def client_record(node: int, partition: int, t_sent: float, train_seconds: float, loss: float) -> dict:
    off = NODE_CLOCK_OFFSETS[node]
    process_start = t_sent + DELIVERY + off
    reply = process_start + 0.5 + 0.3 + train_seconds + 0.1
    return {
        "node_id": node, "partition_id": partition, "train_loss": loss, "proximal_term": 0.01,
        "num_examples": 100, "train_seconds": train_seconds, "clientapp_seconds": reply - process_start,
        "model_load_seconds": 0.0, "resident": True, "bytes_up": 4 * MIB,
        "t_sent": t_sent, "t_received": reply - off + UPLOAD,
        "t_process_start": process_start, "t_handler_start": process_start + 0.5,
        "t_train_start": process_start + 0.8, "t_train_end": process_start + 0.8 + train_seconds, "t_reply": reply,
        "gpu_mem_peak_bytes": (10 + partition) * 2**30, "gpu_mem_mean_bytes": (8 + partition) * 2**30,
        "gpu_util_mean": 30.0 * (partition + 1), "gpu_samples": 20.0,
    }


def make_run(root: Path, *, with_eval: bool = True, rounds: int = 2) -> Path:
    run_dir = root / "run-42"
    run_dir.mkdir(parents=True)
    lines, cumulative = [], 0
    for number in range(1, rounds + 1):
        t_start = 1_800_000_000.0 + 100 * number
        clients = [client_record(node, i, t_start + 0.05 * (i + 1), 2.0 + i, 2.0 / number + 0.1 * i)
                   for i, node in enumerate(NODE_CLOCK_OFFSETS)]
        t_end = max(c["t_received"] - 0 for c in clients) + 0.4
        cumulative += 24 * MIB
        lines.append({
            "round": number, "lr": 5e-5, "status": "aggregated", "attempts": 1,
            "train_loss": 2.0 / number + 0.1, "clients": clients, "failures": 0, "failed": [],
            "bytes_down": 12 * MIB, "bytes_up": 12 * MIB, "bytes_round": 24 * MIB, "cumulative_mib": cumulative / MIB,
            "round_seconds": t_end - t_start, "t_start": t_start, "t_end": t_end, "aggregate_seconds": 0.3,
            "comm_format": "bfloat16",
        })
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (run_dir / "config.json").write_text(json.dumps({"profile": "tiny", "model.name": "tiny", "num-server-rounds": rounds}))
    if with_eval:
        (run_dir / "eval").mkdir()
        (run_dir / "eval" / "summary.json").write_text(json.dumps({
            "accuracies": ACCURACIES, "average": sum(ACCURACIES.values()) / 4, "mode": "fast", "limit": 8,
            "base_model": "tiny", "peft_path": str(run_dir / f"peft_{rounds}"), "profile": "tiny", "random_weights": True,
        }))
    return run_dir
