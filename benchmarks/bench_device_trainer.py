"""Device trainer vs non-resident nodes (issue 26): 20 SuperNodes on one GPU, 3 sampled a round.

Each phase is a real `fedtune local up` of the seed profile on the 8B-shaped random model
(bench_multi_gpu.run_federation: its launcher, nvidia-smi poller and metrics reading):

  device       trainer.placement=device: one trainer loads the base once and trains the round's
               clients one at a time
  nonresident  trainer.resident=false: a ClientApp process and a model load per client round
  node         per-node residents (trainer.placement=node), for the CPU comparison; on one GPU the
               plan refuses 20 of them

Per phase: start-up (launch to round 1's start, from metrics.jsonl's t_start), each round's wall
time against the sum of its clients' train-seconds (steady: rounds after the first), the GPU
peak (nvidia-smi samples) against the plan's one base + one training peak, and which trainer ran
each client (trainer_id). Phases may run in separate calls (--phases device, then --phases
nonresident): results merge into --out.

    python benchmarks/bench_device_trainer.py --phases device,nonresident --gpus 0 --out benchmarks/results/device_trainer_h100.json
    python benchmarks/bench_device_trainer.py --tiny --phases device,node --out benchmarks/results/device_trainer_cpu.json
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
sys.path.insert(0, str(ROOT / "benchmarks"))

import round_path  # noqa: E402
from bench_multi_gpu import GIB, _versions, build_model, gpu_inventory, prepare_data, run_federation  # noqa: E402

PHASES = {"device": "trainer.placement=device", "nonresident": "trainer.resident=false", "node": "trainer.placement=node"}


def phase_figures(out: dict, launched: float) -> dict:
    """What the issue asks of a phase, from run_federation's result and the run's metrics.jsonl."""
    records = []
    if out.get("run_dir") and (Path(out["run_dir"]) / "metrics.jsonl").exists():
        records = [json.loads(line) for line in (Path(out["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    rounds = [
        {"round": r["round"], "round_seconds": r["round_seconds"], "sum_train_seconds": sum(c["train_seconds"] for c in r["clients"]),
         "trainer_ids": sorted({c.get("trainer_id") or "?" for c in r["clients"]}), "failures": r["failures"]}
        for r in records
    ]
    for r in rounds:
        r["round_over_train"] = r["round_seconds"] / r["sum_train_seconds"] if r["sum_train_seconds"] else None
    steady = rounds[1:]
    memory = out.get("timeline", {}).get("memory", [])
    return {
        "returncode": out["returncode"],
        "startup_to_round1_seconds": records[0]["t_start"] - launched if records else None,
        "seconds_to_all_online": out.get("seconds_to_all_online"),
        "rounds": rounds,
        "steady_round_seconds": statistics.median([r["round_seconds"] for r in steady]) if steady else None,
        "steady_round_over_train": statistics.median([r["round_over_train"] for r in steady if r["round_over_train"]]) if steady else None,
        "gpu_peak_mib": max((m[1] for m in memory), default=None),
        "steady_gpu_peak_mib": out.get("steady_peak_gpu_mib"),
        "plan_output": out.get("plan_output"),
        "log_dir": out.get("log_dir"),
        "critical_path": round_path.summarize(records),
    }


def planned_device_need(model: str, nodes: int, gpus: list[str]) -> float | None:
    """The plan's figure for device placement on the first GPU: one base + one training peak (GiB)."""
    from app.config import load_settings
    from app.deploy import gpu_plan

    config = {"trainer.placement": "device", **({"model.name": model} if model else {"profile": "tiny"})}
    plan = gpu_plan.make_plan(load_settings(config), nodes, gpus[:1] or ["0"], None)
    return plan.gpus[0].need_bytes / GIB if plan else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "device_trainer.json"))
    parser.add_argument("--work", default="/tmp/fedtune-bench")
    parser.add_argument("--gpus", default="", help="GPU ids (default: none, the CPU)")
    parser.add_argument("--supernodes", type=int, default=20)
    parser.add_argument("--clients", type=int, default=3, help="clients sampled per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--phases", default="device,nonresident", help=f"any of {','.join(PHASES)}")
    parser.add_argument("--timeout", type=float, default=420, help="seconds per federation")
    parser.add_argument("--tiny", action="store_true", help="CPU dry run with the tiny profile")
    args = parser.parse_args()

    work = Path(args.work)
    data = prepare_data(work)
    gpus = [g for g in args.gpus.split(",") if g]
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result = json.loads(out_path.read_text()) if out_path.exists() else {}
    inventory = gpu_inventory()
    result.update(date=time.strftime("%Y-%m-%d"), hardware=", ".join(sorted({g["name"] for g in inventory})) or "cpu",
                  versions=_versions(), profile="tiny" if args.tiny else "bio-medical-llama3-8b", nodes=args.supernodes,
                  clients_per_round=args.clients, rounds=args.rounds)
    if args.tiny:
        model, profile = "", "tiny"
    else:
        model, profile = str(work / "llama-3-8b-random"), "bio-medical-llama3-8b"
        if not (Path(model) / "config.json").exists():
            result["model_build_seconds"] = build_model(Path(model))
    result["planned_device_need_gib"] = planned_device_need(model, args.supernodes, gpus)
    for name in args.phases.split(","):
        launched = time.time()
        out = run_federation(name, args.supernodes, gpus, args.rounds, args.clients, model, data, work / f"results-{name}",
                             profile, args.timeout, PHASES[name])
        result[name] = phase_figures(out, launched)
        out_path.write_text(json.dumps(result, indent=2) + "\n")
    if result.get("device", {}).get("steady_round_seconds") and result.get("nonresident", {}).get("steady_round_seconds"):
        result["nonresident_over_device"] = result["nonresident"]["steady_round_seconds"] / result["device"]["steady_round_seconds"]
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)


def print_table(r: dict) -> None:
    def fmt(value, digits=1):
        return "-" if value is None else f"{value:.{digits}f}"

    print(f"\n{r['hardware']} | {r['profile']} | {r['nodes']} nodes, {r['clients_per_round']} a round | {r['date']}")
    print(f"plan, device placement: {fmt(r.get('planned_device_need_gib'))} GiB per GPU (one base + one training peak)")
    print(f"{'phase':<12} {'rc':>3} {'start-up s':>10} {'steady round s':>14} {'round / train':>13} {'GPU peak GiB':>12}  trainers")
    for name in PHASES:
        if not isinstance(p := r.get(name), dict):
            continue
        peak = p["gpu_peak_mib"] / 1024 if p.get("gpu_peak_mib") else None
        trainers = sorted({t for x in p["rounds"] for t in x["trainer_ids"]})
        print(f"{name:<12} {p['returncode']:>3} {fmt(p['startup_to_round1_seconds']):>10} {fmt(p['steady_round_seconds']):>14} "
              f"{fmt(p['steady_round_over_train'], 2):>13} {fmt(peak):>12}  {', '.join(trainers)}")
    if isinstance(r.get("device"), dict) and r["device"].get("critical_path"):
        print("device placement, where a steady round goes:")
        round_path.print_summary(r["device"]["critical_path"])
    if "nonresident_over_device" in r:
        print(f"steady round, non-resident / device: {r['nonresident_over_device']:.2f}x")


if __name__ == "__main__":
    main()
