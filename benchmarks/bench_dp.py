"""Differential privacy's price on the tiny profile (issue 27 item 5): final train loss and held-out
loss next to (epsilon, delta) for a few noise multipliers.

The real ServerApp (`server_app.main`: central noise, norm bound, accountant) drives the real
ClientApp code in this process through the in-memory grid of the tests (tests/fake_grid.py), as
tests/test_reliability.py does: the tiny profile's 20 partitions, 15 % (3 nodes) a round, 10
rounds, trainer.resident=false (each node trains in-process, one warm RoundWorker per partition).
Real processes (`fedtune local up --profile tiny`) would run the same code and add minutes of
Flower start-up per run on the 2 shared cores this was measured on.

    python benchmarks/bench_dp.py --out benchmarks/results/dp_tiny.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

ROUNDS, NODES = 10, 20
NOISE_MULTIPLIERS = (0.0, 0.1, 0.5, 1.0)
DELTA = 1e-5


def federate(noise_multiplier: float, results: Path, run_id: int, extra: dict) -> dict:
    from flwr.supercore.task_identity import TaskIdentity

    import app.client_app as client_app
    from app.config import load_settings
    from app.results.checkpoint import load_adapter_tensors
    from app.training.worker import RoundWorker
    from bench_comm import held_out_loss
    from fake_grid import SUPERLINK, InMemoryGrid, metrics_of, run_main

    workers: dict[int, RoundWorker] = {}

    def client(msg, context):
        p = int(context.node_config["partition-id"])
        client_app.RoundWorker = lambda: workers.setdefault(p, RoundWorker())
        return client_app.train(msg, context)

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK, 0
    config = {"profile": "tiny", "results.dir": str(results), "num-server-rounds": ROUNDS, "dataset.num-partitions": NODES,
              "strategy.round-timeout": 600.0, "privacy.noise-multiplier": noise_multiplier, "privacy.delta": DELTA, **extra}
    started = time.perf_counter()
    run = run_main(InMemoryGrid([f"supernode-{i}" for i in range(NODES)], config, client), run_id=run_id)
    rounds, summary = metrics_of(run), json.loads((run / "summary.json").read_text())
    return {
        "noise_multiplier": noise_multiplier, **extra,
        "epsilon": summary["privacy"]["epsilon"], "delta": DELTA if noise_multiplier > 0 else None,
        "final_train_loss": summary["final_train_loss"], "first_round_train_loss": rounds[0]["train_loss"],
        "held_out_loss": held_out_loss(load_settings(config), load_adapter_tensors(run / f"peft_{ROUNDS}")),
        "rounds_aggregated": summary["rounds_aggregated"], "norm_bound_round_1": rounds[0]["norm_bound"],
        "noise_std_per_value_round_1": rounds[0].get("dp_noise_std"),
        "largest_update_norm": max(c["update_norm"] for r in rounds for c in r["clients"]),
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dp_tiny.json"))
    parser.add_argument("--bound", type=float, action="append", default=[],
                        help="also run every noise multiplier > 0 with this strategy.update-norm-bound")
    args = parser.parse_args()
    os.environ["FEDTUNE_TRAINER__RESIDENT"] = "false"
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    import torch

    runs = [(z, {}) for z in NOISE_MULTIPLIERS] + [(z, {"strategy.update-norm-bound": b}) for b in args.bound for z in NOISE_MULTIPLIERS if z > 0]
    rows = []
    with tempfile.TemporaryDirectory() as results:
        for run_id, (z, extra) in enumerate(runs, 1):
            rows.append(federate(z, Path(results), run_id, extra))
            print(json.dumps(rows[-1]), flush=True)
    result = {"rows": rows, "rounds": ROUNDS, "nodes": NODES, "nodes_per_round": 3, "profile": "tiny",
              "date": time.strftime("%Y-%m-%d"), "device": platform.machine() + " CPU", "cores": os.cpu_count(),
              "torch": torch.__version__, "python": platform.python_version()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
