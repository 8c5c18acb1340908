"""Communication precision benchmark: what each wire format keeps of a round's update (issue 12).

At the seed recipe's learning rates (5e-5 falling to 1e-6, explicit keys, not the tiny profile's
0.1), with the app's own pieces: `RoundWorker` (the ClientApp's training), `comm.round_trip` for
every transfer in both directions exactly as app/comm.py sends it (weights down in the format's
download dtype, the round's update up), and `apply_mean_update`/`cosine_lr` (the ServerApp's).
`weights-bfloat16` is the old wire for comparison: full weights rounded to bfloat16 both ways.

CPU (default): the tiny profile's federation in one process, 10 rounds, 3 of 20 partitions a round
sampled with a fixed seed, once per format. For each round, per tensor kind (DoRA magnitude,
lora_A, lora_B), the relative L2 error of the round's update of the global adapter against
float32's, plus bytes, final train loss and held-out loss. (In one process on purpose: with real
processes Flower's random node ids change which partitions are sampled between two runs.)

GPU (`--gpu-round`): a Llama-3-8B-shaped model with random weights (4-bit, seed profile, 16 x 512
token windows), one client round per format from an adapter trained one round, at round 2's and
round 10's learning rates; per kind, the relative error of the uploaded update against float32's,
and bytes per transfer.

    python benchmarks/bench_comm.py --out benchmarks/results/comm_tiny_seed_lr.json
    python benchmarks/bench_comm.py --gpu-round --out benchmarks/results/comm_gpu_round_h200.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

ROUNDS, NODES, PER_ROUND, HELD_OUT = 10, 20, 3, 240
OLD_WIRE = "weights-bfloat16"
FORMATS = ("float32", "bfloat16", "int8-block64", "int8-block256", OLD_WIRE)
KINDS = ("lora_magnitude_vector", "lora_A", "lora_B")
SEED_LRS = {"train.learning-rate-max": 5e-5, "train.learning-rate-min": 1e-6}


def kind_errors(update: dict, exact: dict) -> dict[str, float]:
    """Relative L2 error of `update` against `exact`, per tensor kind (all tensors of a kind)."""
    out = {}
    for kind in KINDS:
        keys = [k for k in exact if kind in k]
        num = sum(float(np.sum((update[k] - exact[k]) ** 2)) for k in keys)
        den = sum(float(np.sum(exact[k] ** 2)) for k in keys)
        out[kind] = (num / den) ** 0.5 if den else 0.0
    return out


def transmit(fmt: str, received: dict, trained: dict, master: dict) -> dict:
    """How the ServerApp's float32 master moves for a node that trained `received` into `trained`."""
    from app import comm

    if fmt == OLD_WIRE:  # full weights rounded, averaged into the new master
        return {k: comm.round_trip(trained[k], "bfloat16") - master[k] for k in trained}
    return {k: comm.round_trip(trained[k] - received[k], fmt) for k in trained}


def download(fmt: str, master: dict) -> dict:
    from app import comm

    wire = "bfloat16" if fmt == OLD_WIRE else comm.download_format(fmt)
    return {k: comm.round_trip(v, wire) for k, v in master.items()}


def transfer_bytes(fmt: str, shapes: dict) -> tuple[int, int]:
    from app import comm

    if fmt == OLD_WIRE:
        return comm.transfer_bytes(shapes, "bfloat16"), comm.transfer_bytes(shapes, "bfloat16")
    return comm.transfer_bytes(shapes, comm.download_format(fmt)), comm.transfer_bytes(shapes, fmt)


def held_out_loss(settings, adapter) -> float:
    import torch

    from app.training.data import build_examples, round_batches
    from app.training.model import build_peft_model, load_adapter_state, load_tokenizer
    from app.training.tiny import NUM_FLASHCARDS, synthetic_flashcards
    from app.training.train import response_loss

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


def federate(fmt: str, run_config: dict, worker) -> dict:
    from app import comm
    from app.config import load_settings
    from app.aggregation.aggregate import apply_mean_update
    from app.server_app import cosine_lr
    from app.training.worker import NodeData, TrainRequest

    settings = load_settings(run_config)
    master = worker.initial_adapter(run_config)
    down_bytes, up_bytes = transfer_bytes(fmt, comm.shapes_of(master))
    sampler = random.Random(settings.seed)
    total_bytes, losses, round_updates = 0, [], []
    for server_round in range(1, ROUNDS + 1):
        lr = cosine_lr(server_round, ROUNDS, settings.train.learning_rate_max, settings.train.learning_rate_min)
        received = download(fmt, master)
        updates, weights, round_losses = [], [], []
        for partition in sampler.sample(range(NODES), PER_ROUND):
            request = TrainRequest(run_config, NodeData(partition, NODES), server_round, lr, settings.strategy.proximal_mu)
            trained, metrics = worker.train(request, received)
            updates.append(transmit(fmt, received, trained, master))
            weights.append(metrics["num-examples"])
            round_losses.append(metrics["train-loss"])
            total_bytes += down_bytes + up_bytes
        new_master = apply_mean_update(master, updates, weights)
        round_updates.append({k: new_master[k] - master[k] for k in master})
        master = new_master
        losses.append(sum(l * w for l, w in zip(round_losses, weights)) / sum(weights))
    return {
        "format": fmt,
        "bytes_per_transfer": {"down": down_bytes, "up": up_bytes},
        "communication_mib": total_bytes / 2**20,
        "train_loss_by_round": losses,
        "final_train_loss": losses[-1],
        "held_out_loss": held_out_loss(settings, master),
        "_round_updates": round_updates,
    }


def cpu_federation() -> dict:
    from app.config import with_explicit_keys
    from app.training.worker import RoundWorker

    run_config = with_explicit_keys({"profile": "tiny", "num-server-rounds": ROUNDS, "dataset.num-partitions": NODES, **SEED_LRS})
    worker = RoundWorker()
    rows = []
    for fmt in FORMATS:
        started = time.perf_counter()
        rows.append(federate(fmt, run_config, worker))
        print(f"{fmt}: {time.perf_counter() - started:.0f} s", flush=True)
    exact = rows[0]["_round_updates"]
    for row in rows:
        per_round = [kind_errors(u, e) for u, e in zip(row.pop("_round_updates"), exact, strict=True)]
        row["update_error_by_round"] = per_round
        row["update_error_round2"] = per_round[1]
        row["update_error_worst"] = {k: max(r[k] for r in per_round) for k in KINDS}
        row["passes_10pct"] = all(v < 0.10 for v in row["update_error_worst"].values())
    print(f"\n{'format':<17} {'MiB down+up /transfer':>22} {'MiB total':>10} {'train loss':>11} {'held-out':>9}   worst round-update error (magnitude / A / B)")
    for row in rows:
        b, e = row["bytes_per_transfer"], row["update_error_worst"]
        print(f"{row['format']:<17} {b['down'] / 2**20:10.3f} + {b['up'] / 2**20:8.3f} {row['communication_mib']:10.3f} {row['final_train_loss']:11.5f}"
              f" {row['held_out_loss']:9.5f}   {e['lora_magnitude_vector']:7.2%} / {e['lora_A']:7.2%} / {e['lora_B']:7.2%}")
    return {"mode": "tiny federation, seed learning rates", "rounds": ROUNDS, "nodes": NODES, "per_round": PER_ROUND, "run_config": run_config, "rows": rows}


def gpu_round(work: Path) -> dict:
    from bench_client_round import build_random_llama, write_long_flashcards

    from app import comm
    from app.config import load_settings, with_explicit_keys
    from app.server_app import cosine_lr
    from app.training.worker import NodeData, RoundWorker, TrainRequest

    work.mkdir(parents=True, exist_ok=True)
    model_dir, data = work / "llama3-8b-random", work / "flashcards-512.jsonl"
    started = time.perf_counter()
    build_random_llama(model_dir)
    write_long_flashcards(data)
    run_config = with_explicit_keys({"model.name": str(model_dir), "dataset.path": str(data), **SEED_LRS})
    settings = load_settings(run_config)
    worker = RoundWorker()
    node = NodeData(0, settings.dataset.num_partitions)

    def train(server_round: int, start: dict) -> dict:
        lr = cosine_lr(server_round, settings.num_server_rounds, settings.train.learning_rate_max, settings.train.learning_rate_min)
        trained, metrics = worker.train(TrainRequest(run_config, node, server_round, lr, settings.strategy.proximal_mu), start)
        print(f"  round {server_round} (lr {lr:.3g}): {metrics['train-seconds']:.1f} s training", flush=True)
        return trained

    w0 = worker.initial_adapter(run_config)
    w1 = train(1, w0)  # a trained start: lora_B is no longer zero
    print(f"model and first round: {time.perf_counter() - started:.0f} s", flush=True)
    shapes = comm.shapes_of(w1)
    cases = []
    for server_round in (2, settings.num_server_rounds):
        exact = {k: v - w1[k] for k, v in train(server_round, w1).items()}
        narrow_start = download("bfloat16", w1)
        narrow_trained = train(server_round, narrow_start)
        case = {"round": server_round, "update_norm": {k: float(v) for k, v in _kind_norms(exact).items()}, "formats": {}}
        for fmt in FORMATS:
            received, trained = (w1, None) if fmt == "float32" else (narrow_start, narrow_trained)
            update = exact if fmt == "float32" else transmit(fmt, received, trained, w1)
            down, up = transfer_bytes(fmt, shapes)
            case["formats"][fmt] = {"update_error": kind_errors(update, exact), "bytes_down": down, "bytes_up": up}
        cases.append(case)
    print(f"\n{'format':<17} {'MiB down':>9} {'MiB up':>8}   update error, round 2 | round 10 (magnitude / A / B)")
    for fmt in FORMATS:
        cells = [c["formats"][fmt] for c in cases]
        errs = " | ".join(" / ".join(f"{c['update_error'][k]:7.2%}" for k in KINDS) for c in cells)
        print(f"{fmt:<17} {cells[0]['bytes_down'] / 2**20:9.3f} {cells[0]['bytes_up'] / 2**20:8.3f}   {errs}")
    return {"mode": "one seed-shaped client round (random Llama-3-8B shapes, 4-bit)", "run_config": run_config, "cases": cases}


def _kind_norms(state: dict) -> dict[str, float]:
    return {kind: float(np.sqrt(sum(float(np.sum(v**2)) for k, v in state.items() if kind in k))) for kind in KINDS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "comm_tiny_seed_lr.json"))
    parser.add_argument("--gpu-round", action="store_true", help="one seed-shaped client round per format on the GPU")
    parser.add_argument("--work", default="/tmp/fedtune-bench")
    args = parser.parse_args()
    import torch

    result = gpu_round(Path(args.work)) if args.gpu_round else cpu_federation()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.machine() + " CPU"
    result |= {"date": time.strftime("%Y-%m-%d"), "device": device, "torch": torch.__version__, "python": platform.python_version()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
