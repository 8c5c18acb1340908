"""Training-step benchmark: where a 16 x 512-token step of the seed recipe spends its time.

Loads the random Llama-3-8B-shaped model once (4-bit, DoRA r=32 on q/v) and times
`app.training.train.train_round` with gradient checkpointing on every layer, on every second layer,
and off, without autocast, and with the fused (Liger) kernels; then profiles the last. Needs the model directory made by bench_client_round.py.

    python benchmarks/bench_step.py --model /tmp/fedtune-bench/llama-3-8b-random --out results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def set_checkpointing(model, every: int) -> None:
    """Checkpoint every `every`-th decoder layer (0 = none)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = bool(every) and index % every == 0


def main() -> None:
    import torch

    from app.config import load_settings
    from app.training.data import build_examples, load_partition_rows, round_batches
    from app.training.model import apply_fused_kernels, build_peft_model, load_tokenizer
    from app.training.train import train_round

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()

    settings = load_settings({"model.name": args.model, "dataset.path": args.data})
    tokenizer = load_tokenizer(args.model)
    examples = build_examples(load_partition_rows("", args.data, 0, 1), tokenizer, 512)
    model = build_peft_model(settings.model, seed=0)
    train_args = settings.train.training_arguments.model_copy(update={"max_steps": args.steps})

    def run(label: str) -> dict:
        torch.cuda.reset_peak_memory_stats()
        batches = round_batches(examples, batch_size=16, steps=args.steps, seed=0, pad_token_id=tokenizer.pad_token_id)
        result = train_round(model, batches, args=train_args, lr=1e-5, proximal_mu=1.0)
        row = {
            "variant": label,
            "steady_step_seconds": statistics.median(result.step_seconds[1:]),
            "tokens_per_step": result.tokens / result.steps,
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30,
        }
        print(f"{label:<34} step {row['steady_step_seconds']:.3f} s  peak {row['peak_gpu_gib']:.1f} GiB", flush=True)
        return row

    rows = []
    for every, label in ((1, "checkpoint every layer (recipe)"), (2, "checkpoint every 2nd layer"), (0, "no checkpointing")):
        set_checkpointing(model, every)
        try:
            rows.append(run(label))
        except torch.OutOfMemoryError:
            print(f"{label}: out of memory", flush=True)
            rows.append({"variant": label, "oom": True})
        torch.cuda.empty_cache()

    set_checkpointing(model, 1)
    plain_args = train_args
    train_args = plain_args.model_copy(update={"bf16": False})
    rows.append(run("recipe without autocast"))
    train_args = plain_args
    apply_fused_kernels(model.get_base_model())  # what `use-liger-kernel = true` does
    rows.append(run("recipe + Liger RMSNorm/SwiGLU/RoPE (default)"))
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        batches = round_batches(examples, batch_size=16, steps=2, seed=1, pad_token_id=tokenizer.pad_token_id)
        train_round(model, batches, args=train_args.model_copy(update={"max_steps": 2}), lr=1e-5, proximal_mu=1.0)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    print(table)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(), "rows": rows, "profile_top": table}, indent=2))


if __name__ == "__main__":
    main()
