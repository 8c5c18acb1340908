"""Secure aggregation's cost (issue 27, item 5): the same run with and without
privacy.secure-aggregation, one after the other in one call, through `fedtune local up` (real
processes: SuperLink, ServerApp, 3 SuperNodes, a ClientApp process per message). Steady rounds
(round 2 on: round 1 loads the model) are compared; the target is secure <= 1.3x plain.

    # CPU, here: the tiny profile, 3 nodes, 3 rounds each
    python benchmarks/bench_secagg.py --mode tiny
    # On the GPU machine, after `. benchmarks/device_setup.sh` (builds the random 8B-shaped model
    # and the 512-token flashcards under $WORK like gpu_transport_runs.sh): seed profile, 3 nodes
    # sharing GPU 0, 4 rounds each, ~400 s in all
    python benchmarks/bench_secagg.py --mode gpu --json $OUT/secagg_gpu.json

Prints a table (steady round seconds, the secure stages' seconds, bytes up per round) and writes
the JSON (default benchmarks/results/secagg_<mode>.json); each run's metrics.jsonl lines are kept in it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NODES = 3


def gpu_inputs(work: Path) -> tuple[list[str], str]:
    """`local up` arguments and run config of the seed recipe on the random 8B-shaped model (built once under `work`)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    sys.path.insert(0, str(REPO))
    from bench_client_round import build_random_llama, write_long_flashcards

    work.mkdir(parents=True, exist_ok=True)
    model, data = work / "llama-3-8b-random", work / "flashcards-512.jsonl"
    if not model.exists():
        build_random_llama(model)
    if not data.exists():
        write_long_flashcards(data)
    rows = sum(1 for line in data.read_text().splitlines() if line.strip())
    # A file of the site's own is no dataset the ServerApp knows: secure aggregation needs the weight bound.
    config = f'model.name="{model}" strategy.max-num-examples={math.ceil(rows / NODES)}'
    return ["--gpus", "0", "--data", str(data)], config


def run(mode: str, secure: bool, rounds: int, results: Path, extra: list[str], extra_config: str, timeout: float) -> dict:
    config = f"strategy.fraction-train=1.0 privacy.secure-aggregation={'true' if secure else 'false'} {extra_config}".strip()
    profile = ["--profile", "tiny"] if mode == "tiny" else []
    command = [sys.executable, "-m", "app.cli", "local", "up", *profile, "--supernodes", str(NODES), "--rounds", str(rounds),
               "--results", str(results), "--no-eval", "--run-config", config, *extra]
    started = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"), cwd=REPO)
    wall = time.perf_counter() - started
    runs = sorted(results.glob("run-*"), key=lambda p: p.stat().st_mtime)
    if done.returncode != 0 or not runs:
        raise SystemExit(f"{'secure' if secure else 'plain'} run failed ({done.returncode}):\n{done.stdout[-4000:]}")
    records = [json.loads(line) for line in (runs[-1] / "metrics.jsonl").read_text().splitlines()]
    steady = [r["round_seconds"] for r in records[1:] if r["status"] == "aggregated"]
    stages: dict[str, list[float]] = {}
    for r in records[1:]:
        for stage, seconds in r.get("secagg_seconds", {}).items():
            stages.setdefault(stage, []).append(seconds)
    return {
        "secure": secure, "wall_seconds": wall, "statuses": [r["status"] for r in records],
        "steady_round_seconds": steady, "steady_median": statistics.median(steady) if steady else None,
        "stage_median_seconds": {k: statistics.median(v) for k, v in stages.items()},
        "node_mask_median_seconds": statistics.median(c.get("secagg_mask_seconds", 0.0) for r in records for c in r["clients"]),
        # Setup and share-keys of a prepared round ran during the previous one: their stage seconds include that wait.
        "prepared_rounds": sum(bool(r.get("secagg_prepared")) for r in records),
        "hidden_median_seconds": statistics.median(r.get("secagg_hidden_seconds", 0.0) for r in records[1:]) if secure and len(records) > 1 else None,
        "bytes_up_per_round": statistics.median(r["bytes_up"] for r in records),
        "bytes_down_per_round": statistics.median(r["bytes_down"] for r in records),
        "secagg_bytes": {k: records[-1].get(f"secagg_bytes_{k}") for k in ("keys", "shares", "masked")},
        "metrics": records,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["tiny", "gpu"], default="tiny")
    parser.add_argument("--rounds", type=int, help="rounds per run (tiny 3, gpu 4)")
    parser.add_argument("--work", default=os.environ.get("WORK", "/tmp/fedtune-bench"), help="gpu: where the model and data are built")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    parser.add_argument("--json", help="output (default benchmarks/results/secagg_<mode>.json)")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.mode == "tiny" else 4)
    extra, extra_config = gpu_inputs(Path(args.work)) if args.mode == "gpu" else ([], "")
    results = Path(tempfile.mkdtemp(prefix="fedtune-secagg-"))
    out = {"mode": args.mode, "nodes": NODES, "rounds": rounds, "runs": {}}
    for secure in (False, True):  # plain first: a model cache warmed by it favours the secure run, if anything
        name = "secure" if secure else "plain"
        out["runs"][name] = run(args.mode, secure, rounds, results / name, extra, extra_config, args.timeout)
    plain, secure = out["runs"]["plain"], out["runs"]["secure"]
    out["steady_ratio"] = secure["steady_median"] / plain["steady_median"] if plain["steady_median"] and secure["steady_median"] else None
    out["upload_ratio"] = secure["bytes_up_per_round"] / plain["bytes_up_per_round"]
    print(f"{'run':8} {'steady round s (median)':>24} {'bytes up/round':>15} {'statuses'}")
    for name, r in out["runs"].items():
        print(f"{name:8} {r['steady_median'] or float('nan'):24.2f} {r['bytes_up_per_round']:15,.0f} {' '.join(r['statuses'])}")
    print("secure stages (median s):", ", ".join(f"{k} {v:.2f}" for k, v in secure["stage_median_seconds"].items()),
          f"; a node's masking {secure['node_mask_median_seconds']:.2f}")
    print(f"key stages prepared during the previous round: {secure['prepared_rounds']} round(s), hidden {secure['hidden_median_seconds'] or 0.0:.2f} s (median)")
    print(f"steady secure / plain: {out['steady_ratio']:.2f}x (target <= 1.3x); upload {out['upload_ratio']:.2f}x")
    path = Path(args.json) if args.json else REPO / "benchmarks" / "results" / f"secagg_{args.mode}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
