"""Communication precision benchmark: does a bfloat16 wire change training? (issue 8)

Runs the tiny profile's federation in one process with the app's own pieces — `RoundWorker`
(the ClientApp's training), `comm.encode/decode` on every transfer in both directions,
`weighted_average` and `cosine_lr` (the ServerApp's) — for 10 rounds, 3 of 20 partitions a
round sampled with a fixed seed, once per `comm.dtype`. The transport is left out on purpose:
with real processes, Flower's random node ids change which partitions are sampled between two
runs, which would swamp a 1 % comparison. Reports bytes, final training loss and the final
adapter's loss on held-out flashcards (same facts, unseen rows).

    python benchmarks/bench_comm.py --out benchmarks/results/comm_tiny.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ROUNDS, NODES, PER_ROUND, HELD_OUT = 10, 20, 3, 240


def held_out_loss(settings, adapter) -> float:
    import torch

    from app.data import build_examples, round_batches
    from app.model import build_peft_model, load_adapter_state, load_tokenizer
    from app.tiny import NUM_FLASHCARDS, synthetic_flashcards
    from app.train import response_loss

    tokenizer = load_tokenizer(settings.model.name)
    unseen = synthetic_flashcards(NUM_FLASHCARDS + HELD_OUT)[NUM_FLASHCARDS:]  # same generator, later rows
    rows = [{"instruction": r["input"], "response": r["output"]} for r in unseen]
    examples = build_examples(rows, tokenizer, settings.train.seq_length)
    model = build_peft_model(settings.model, seed=settings.seed)
    load_adapter_state(model, {k: torch.from_numpy(v) for k, v in adapter.items()})
    model.eval()
    batches = round_batches(examples, batch_size=len(examples), steps=1, seed=0, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        return float(response_loss(model, next(batches)))


def federate(dtype: str, run_config: dict) -> dict:
    from app import comm
    from app.config import load_settings
    from app.server_app import cosine_lr, weighted_average
    from app.worker import NodeData, RoundWorker, TrainRequest

    settings = load_settings(run_config)
    worker = RoundWorker()
    adapter = worker.initial_adapter(run_config)
    sampler = random.Random(settings.seed)
    total_bytes, losses = 0, []
    for server_round in range(1, ROUNDS + 1):
        lr = cosine_lr(server_round, ROUNDS, settings.train.learning_rate_max, settings.train.learning_rate_min)
        down = comm.encode(adapter, dtype)
        received = comm.decode(down)
        states, weights, round_losses = [], [], []
        for partition in sampler.sample(range(NODES), PER_ROUND):
            request = TrainRequest(run_config, NodeData(partition, NODES), server_round, lr, settings.strategy.proximal_mu)
            trained, metrics = worker.train(request, received)
            up = comm.encode(trained, dtype)
            total_bytes += comm.record_bytes(down) + comm.record_bytes(up)
            states.append(comm.decode(up))
            weights.append(metrics["num-examples"])
            round_losses.append(metrics["train-loss"])
        adapter = weighted_average(states, weights)
        losses.append(sum(l * w for l, w in zip(round_losses, weights)) / sum(weights))
    return {
        "comm_dtype": dtype,
        "communication_mib": total_bytes / 2**20,
        "train_loss_by_round": losses,
        "final_train_loss": losses[-1],
        "held_out_loss": held_out_loss(settings, adapter),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "comm_tiny.json"))
    args = parser.parse_args()
    run_config = {"profile": "tiny", "num-server-rounds": ROUNDS, "dataset.num-partitions": NODES}
    rows = [federate(dtype, run_config) for dtype in ("float32", "bfloat16")]
    base = rows[0]
    for row in rows:
        row["train_loss_rel_diff"] = abs(row["final_train_loss"] - base["final_train_loss"]) / base["final_train_loss"]
        row["held_out_rel_diff"] = abs(row["held_out_loss"] - base["held_out_loss"]) / base["held_out_loss"]
        row["offered"] = row["train_loss_rel_diff"] < 0.01 and row["held_out_rel_diff"] < 0.01
    import torch

    result = {"date": time.strftime("%Y-%m-%d"), "device": platform.machine() + " CPU", "torch": torch.__version__, "rows": rows}
    print(f"{'comm.dtype':<10} {'MiB':>8} {'final train loss':>17} {'held-out loss':>14} {'rel. diff (train / held-out)':>30}")
    for row in rows:
        print(f"{row['comm_dtype']:<10} {row['communication_mib']:8.3f} {row['final_train_loss']:17.5f} {row['held_out_loss']:14.5f}"
              f" {row['train_loss_rel_diff']:14.5%} / {row['held_out_rel_diff']:.5%}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
