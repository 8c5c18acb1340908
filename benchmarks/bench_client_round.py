"""Client-round benchmark: a fresh ClientApp process per round vs the resident trainer.

Runs the seed profile's code path (4-bit base, DoRA r=32 on q/v, paged AdamW 8-bit, gradient
checkpointing, bf16 + tf32, 6 steps of 16 x 512 tokens) on a Llama-3-8B-shaped model with random
weights, saved locally first (the GPU machine has no hub). Each client round is a new OS process
that calls the real `app.client_app.train` with a Flower Message, exactly like Flower 1.42's
per-message `flwr-clientapp` process; the clock runs from process spawn to exit.

    python benchmarks/bench_client_round.py --out benchmarks/results/client_round.json
    python benchmarks/bench_client_round.py --tiny   # CPU dry run of the same path
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build_random_llama(directory: Path) -> None:
    """Llama-3-8B shapes, random seeded bf16 weights, the tiny tokenizer (ids < 128256)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from app.training.model import LLAMA3_8B_SHAPE
    from app.training.tiny import tiny_model_dir

    if (directory / "config.json").exists():
        return
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir())
    config = LlamaConfig(**LLAMA3_8B_SHAPE, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    staging = directory.with_name(directory.name + ".tmp")
    model.save_pretrained(staging, max_shard_size="5GB")
    tokenizer.save_pretrained(staging)
    from app.evaluation.run_eval import RANDOM_WEIGHTS_MARKER

    (staging / RANDOM_WEIGHTS_MARKER).write_text("random seeded weights (benchmarks/bench_client_round.py)\n")  # reports say so
    del model
    staging.rename(directory)


def write_long_flashcards(path: Path, rows: int = 800) -> None:
    """Flashcards whose prompt + response fill the whole 512-token window."""
    from app.training.tiny import synthetic_flashcards

    cards = synthetic_flashcards(rows)
    with open(path, "w") as handle:
        for card in cards:
            card = dict(card, output=" ".join([card["output"]] * 40))
            handle.write(json.dumps(card) + "\n")


def client_round(args) -> None:
    """One ClientApp round in this (fresh) process, as Flower's per-message process does it."""
    started = time.perf_counter()
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from app import client_app, comm
    from app.results.checkpoint import load_adapter_tensors

    run_config = json.loads(Path(args.run_config_file).read_text())
    adapter = load_adapter_tensors(Path(args.adapter))
    fmt = client_app.load_settings(run_config).comm.format
    arrays, wire = comm.encode(adapter, comm.download_format(fmt), comm.WEIGHTS)
    config = ConfigRecord({"server-round": args.server_round, "lr": 5e-5, "proximal-mu": 1.0})
    content = RecordDict({"arrays": arrays, "wire": wire, "config": config})
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # set by flwr-clientapp in a real run
    message = Message(content=content, dst_node_id=1, message_type="train")
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 20}, state=RecordDict(), run_config=run_config)
    imported = time.perf_counter() - started
    reply = client_app.train(message, context)
    metrics = dict(reply.content["metrics"])
    metrics["import-seconds"] = imported
    metrics["bytes-up"] = comm.record_bytes(reply.content["arrays"])
    metrics["bytes-down"] = comm.record_bytes(content["arrays"])
    Path(args.metrics_out).write_text(json.dumps(metrics))


def spawn_round(work: Path, server_round: int, env: dict[str, str]) -> dict:
    out = work / f"round-{server_round}-{time.monotonic_ns()}.json"
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, __file__, "--client-round", "--run-config-file", str(work / "run_config.json"),
         "--adapter", str(work / "adapter"), "--server-round", str(server_round), "--metrics-out", str(out)],
        env=env, check=True,
    )
    metrics = json.loads(out.read_text())
    metrics["process-seconds"] = time.perf_counter() - started
    return metrics


def plain_loop_step(run_config: dict, steps: int = 4) -> float:
    """Median step time of the textbook loop (`model(**batch).loss`, full-vocabulary logits)."""
    import torch

    from app.config import load_settings
    from app.training.data import build_examples, load_partition_rows, round_batches
    from app.training.model import build_peft_model, load_tokenizer

    settings = load_settings(run_config)
    model = build_peft_model(settings.model, seed=0)
    tokenizer = load_tokenizer(settings.model.name)
    rows = load_partition_rows("", settings.dataset.path, 0, 20)
    examples = build_examples(rows, tokenizer, settings.train.seq_length)
    params = [p for p in model.parameters() if p.requires_grad]
    import bitsandbytes as bnb

    optimizer = bnb.optim.PagedAdamW8bit(params, lr=1e-5)
    times = []
    model.train()
    for batch in round_batches(examples, batch_size=16, steps=steps, seed=0, pad_token_id=tokenizer.pad_token_id):
        t0 = time.perf_counter()
        batch = {k: v.cuda() for k, v in batch.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        loss.item()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "client_round.json"))
    parser.add_argument("--work", default="/tmp/fedtune-bench")
    parser.add_argument("--tiny", action="store_true", help="CPU dry run with the tiny profile")
    parser.add_argument("--fresh-rounds", type=int, default=2)
    parser.add_argument("--resident-rounds", type=int, default=3)
    parser.add_argument("--client-round", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-config-file", help=argparse.SUPPRESS)
    parser.add_argument("--adapter", help=argparse.SUPPRESS)
    parser.add_argument("--server-round", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--metrics-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client_round:
        return client_round(args)

    from app.results.checkpoint import load_adapter_tensors, save_adapter
    from app.config import load_settings
    from app.training.trainer_service import SOCKET_ENV
    from app.training.worker import RoundWorker

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "long_flashcards.jsonl"
    write_long_flashcards(data)
    if args.tiny:
        run_config = {"profile": "tiny", "dataset.path": str(data)}
    else:
        t0 = time.perf_counter()
        build_random_llama(work / "llama-3-8b-random")
        print(f"random 8B-shaped model ready in {time.perf_counter() - t0:.0f} s", flush=True)
        run_config = {"model.name": str(work / "llama-3-8b-random"), "dataset.path": str(data)}
    settings = load_settings(run_config)
    (work / "run_config.json").write_text(json.dumps(settings.flat()))
    initial = RoundWorker().initial_adapter(settings.flat())
    save_adapter(work / "adapter", initial, settings.model)
    del initial
    import torch

    torch.cuda.empty_cache() if torch.cuda.is_available() else None

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop(SOCKET_ENV, None)
    fresh = []
    for i in range(args.fresh_rounds):
        fresh.append(spawn_round(work, i + 1, env))
        print(f"fresh-process round {i + 1}: {fresh[-1]['process-seconds']:.1f} s", flush=True)

    socket_path = work / "trainer" / "trainer.sock"
    server = subprocess.Popen(
        [sys.executable, "-c", f"from pathlib import Path; from app.training.trainer_service import TrainerServer; TrainerServer(Path({str(socket_path)!r})).serve_forever()"],
        cwd=ROOT, env=env,
    )
    try:
        while not socket_path.exists():
            time.sleep(0.2)
        resident_env = dict(env, **{SOCKET_ENV: str(socket_path)})
        warmup = spawn_round(work, 1, resident_env)
        print(f"resident warm-up round (loads the model once): {warmup['process-seconds']:.1f} s", flush=True)
        resident = []
        for i in range(args.resident_rounds):
            resident.append(spawn_round(work, i + 2, resident_env))
            print(f"resident round {i + 2}: {resident[-1]['process-seconds']:.1f} s", flush=True)
    finally:
        server.terminate()
        server.wait()
    plain = None if args.tiny else plain_loop_step(settings.flat())

    median = lambda rows, key: statistics.median(r[key] for r in rows)  # noqa: E731
    fresh_s, resident_s = median(fresh, "process-seconds"), median(resident, "process-seconds")
    steady = median(resident, "steady-step-seconds")
    tokens_per_step = resident[0]["tokens"] / settings.train.training_arguments.max_steps
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "versions": _versions(),
        "profile": settings.profile,
        "fresh_round_seconds": fresh_s,
        "resident_round_seconds": resident_s,
        "resident_over_fresh": resident_s / fresh_s,
        "fresh_breakdown": {k: median(fresh, k) for k in ("import-seconds", "model-load-seconds", "train-seconds", "clientapp-seconds")},
        "resident_warmup_round_seconds": warmup["process-seconds"],
        "steady_step_seconds": steady,
        "tokens_per_step": tokens_per_step,
        "tokens_per_second": tokens_per_step / steady,
        "plain_loop_step_seconds": plain,
        "peak_gpu_gib": max(r.get("peak-gpu-bytes", 0) for r in fresh + resident) / 2**30,
        "bytes_per_transfer": resident[0]["bytes-up"],
        "adapter_parameters": sum(t.size for t in load_adapter_tensors(work / "adapter").values()),
        "train_loss_by_round": [r["train-loss"] for r in resident],
    }
    print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if not args.tiny:
        shutil.rmtree(work / "adapter", ignore_errors=True)


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    names = ["torch", "transformers", "peft", "bitsandbytes", "flwr"]
    return {n: version(n) for n in names} | {"python": platform.python_version()}


def print_table(r: dict) -> None:
    rows = [
        ("fresh-process client round (s)", f"{r['fresh_round_seconds']:.2f}"),
        ("resident-trainer client round (s)", f"{r['resident_round_seconds']:.2f}"),
        ("resident / fresh", f"{r['resident_over_fresh']:.3f}"),
        ("steady step (s)", f"{r['steady_step_seconds']:.3f}"),
        ("tokens / step", f"{r['tokens_per_step']:.0f}"),
        ("tokens / s", f"{r['tokens_per_second']:.0f}"),
        ("plain-loop step (s)", "-" if r["plain_loop_step_seconds"] is None else f"{r['plain_loop_step_seconds']:.3f}"),
        ("peak GPU memory (GiB)", f"{r['peak_gpu_gib']:.2f}"),
        ("bytes per transfer", f"{r['bytes_per_transfer']:,}"),
        ("adapter parameters", f"{r['adapter_parameters']:,}"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"\n{r['device']} | {r['versions']} | {r['date']}")
    for key, value in rows:
        print(f"{key:<{width}}  {value:>14}")


if __name__ == "__main__":
    main()
