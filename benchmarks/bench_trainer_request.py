"""Where a device trainer's time goes between two clients' trainings (issue 26).

One `RoundWorker` (what a device trainer runs) on the seed profile: the 8B-shaped random model on
the GPU, or the tiny profile on the CPU. It times the parts of a request that are not the training
loop, the adapter state's old path (PEFT's state-dict walk over the whole 4-bit model) against
the cached parameter map, and back-to-back requests with the cached GPU memory given back after
each (as before) and kept while clients wait (as now).

    python benchmarks/bench_trainer_request.py --out benchmarks/results/trainer_request_h100.json
    python benchmarks/bench_trainer_request.py --tiny
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def timed(fn, repeats: int = 3) -> float:
    """Median seconds of `repeats` calls."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def requests(worker, run_config: dict, adapter: dict, count: int, release: bool) -> list[dict]:
    from app.training.worker import NodeData, TrainRequest

    rows = []
    for i in range(count):
        request = TrainRequest(run_config=run_config, node=NodeData(i % 3, 20), server_round=2, lr=5e-5, proximal_mu=1.0)
        _, m = worker.train(request, adapter, release_memory=release or i == count - 1)
        rows.append({"train_seconds": m["train-seconds"], "turn_seconds": m["t-turn-end"] - m["t-turn-start"],
                     "before_training": m["t-train-start"] - m["t-turn-start"], "after_training": m["t-turn-end"] - m["t-train-end"],
                     "steady_step_seconds": m["steady-step-seconds"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="")
    parser.add_argument("--work", default="/tmp/fedtune-bench")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--requests", type=int, default=4, help="back-to-back requests per mode")
    args = parser.parse_args()

    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from app.config import load_settings
    from app.node.read_policy import READ_DIRS_ENV
    from app.training import worker as worker_module
    from app.training.gpu_monitor import GpuMonitor
    from app.training.model import adapter_parameters, adapter_state
    from bench_client_round import build_random_llama, write_long_flashcards
    from bench_multi_gpu import _versions

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault(READ_DIRS_ENV, str(work))  # the site's read policy: the model and data are here
    data = work / "long_flashcards.jsonl"
    if not data.exists():
        write_long_flashcards(data)
    if args.tiny:
        run_config = load_settings({"profile": "tiny", "dataset.path": str(data)}).flat()
    else:
        build_random_llama(work / "llama-3-8b-random")
        run_config = load_settings({"model.name": str(work / "llama-3-8b-random"), "dataset.path": str(data)}).flat()
    worker = worker_module.RoundWorker()
    adapter = worker.initial_adapter(run_config)
    model = worker._model
    state = {k: torch.from_numpy(v) for k, v in adapter.items()}
    parts = {
        "peft_get_state_dict": timed(lambda: get_peft_model_state_dict(model)),
        "peft_set_state_dict": timed(lambda: set_peft_model_state_dict(model, state)),
        "adapter_parameters_cached": timed(lambda: adapter_parameters(model)),
        "adapter_state_to_cpu": timed(lambda: adapter_state(model)),
        "gc_collect": timed(gc.collect),
        "gpu_monitor_open_close": timed(lambda: GpuMonitor().__enter__().__exit__(None, None, None)),
    }
    for name, seconds in parts.items():
        print(f"{name:28s} {seconds * 1000:9.1f} ms", flush=True)
    modes = {}
    for mode, release in (("release_each", True), ("keep_while_waiting", False)):
        requests(worker, run_config, adapter, 1, True)  # warm-up (first batches, kernels)
        modes[mode] = rows = requests(worker, run_config, adapter, args.requests, release)
        for r in rows:
            print(f"{mode:20s} " + "  ".join(f"{k} {v:.3f}" for k, v in r.items()), flush=True)
    result = {
        "date": time.strftime("%Y-%m-%d"), "hardware": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "versions": _versions(), "profile": "tiny" if args.tiny else "seed (8B-shaped random)", "parts_seconds": parts, "requests": modes,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
