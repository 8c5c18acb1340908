#!/usr/bin/env python
"""Chaos run: `fedtune local up --profile tiny` while a random SuperNode is killed (SIGKILL, its
whole process tree, as a machine dies) in every round and the SuperLink once.

The run must finish, every checkpoint must load onto the tiny base with PEFT, and the report
(printed, and written as JSON with --out) gives the faults injected and those the run saw.

    .venv/bin/python scripts/chaos.py --supernodes 20 --rounds 20 --out benchmarks/results/chaos.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def component(results: Path, home_name: str, command: str) -> list[psutil.Process]:
    """Live processes of one launched component, by the FLWR_HOME the launcher gave it."""
    found = []
    for proc in psutil.process_iter():
        try:
            home = proc.environ().get("FLWR_HOME", "")
            if home.startswith(str(results)) and Path(home).name == home_name and proc.status() != psutil.STATUS_ZOMBIE:
                if command in " ".join(proc.cmdline()):
                    found.append(proc)
        except psutil.Error:
            continue
    return found


def kill(processes: list[psutil.Process]) -> int:
    for proc in processes:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.Error:
            continue
    return len(processes)


def rounds_done(run: Path | None) -> int:
    path = run / "metrics.jsonl" if run else None
    return len(path.read_text().splitlines()) if path and path.exists() else 0


def check_checkpoints(run: Path) -> list[str]:
    """Every peft_N loads onto the tiny base with PEFT and gives finite outputs."""
    import torch
    from peft import PeftModel

    from app.results.checkpoint import load_adapter_tensors
    from app.training.model import load_base_model

    loaded = []
    for path in sorted(run.glob("peft_*"), key=lambda p: int(p.name.split("_")[1])):
        load_adapter_tensors(path)
        model = PeftModel.from_pretrained(load_base_model("tiny", 0), str(path))
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all(), path
        loaded.append(path.name)
    return loaded


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--supernodes", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--round-timeout", type=float, default=60.0)
    parser.add_argument("--superlink-kill-round", type=int, help="round during which the SuperLink is killed (default: the middle one)")
    parser.add_argument("--results", default="", help="results directory (default: a fresh temporary one)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault schedule")
    parser.add_argument("--out", help="write the report here as JSON")
    parser.add_argument("--insecure", action="store_true", help="pass --insecure to the launcher")
    args = parser.parse_args()

    import tempfile

    rng = random.Random(args.seed)
    results = Path(args.results or tempfile.mkdtemp(prefix="fedtune-chaos-")).resolve()
    superlink_round = args.superlink_kill_round or max(1, args.rounds // 2)
    command = [sys.executable, "-m", "app.cli", "local", "up", "--profile", "tiny", "--supernodes", str(args.supernodes),
               "--rounds", str(args.rounds), "--results", str(results),
               "--run-config", f"strategy.round-timeout={args.round_timeout}", *(["--insecure"] if args.insecure else [])]
    started = time.monotonic()
    launcher = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines: list[str] = []

    def pump():
        for line in launcher.stdout:
            lines.append(line)
            print(line, end="", flush=True)

    threading.Thread(target=pump, daemon=True).start()
    run, injected = None, []
    while launcher.poll() is None:
        if run is None:
            submitted = next((ln for ln in lines if "submitted; results in" in ln), None)
            run = Path(submitted.split("results in ")[1].strip()) if submitted else None
            time.sleep(0.5)
            continue
        current = rounds_done(run) + 1  # the round in progress
        if current > args.rounds or any(f["round"] == current for f in injected):
            time.sleep(0.5)
            continue
        time.sleep(rng.uniform(2.0, 10.0))  # somewhere inside the round
        if rounds_done(run) + 1 != current:
            continue  # the round ended meanwhile: pick a moment in the next one
        alive = [i for i in range(args.supernodes) if component(results, f"node-{i}", "flower-supernode")]
        if not alive:
            continue
        node = rng.choice(alive)  # not one the launcher is still bringing back
        killed = kill(component(results, f"node-{node}", ""))
        injected.append({"round": current, "fault": "supernode killed", "node": f"supernode-{node}", "processes": killed,
                         "seconds": round(time.monotonic() - started, 1)})
        print(f"chaos: round {current}: killed supernode-{node} ({killed} processes)", flush=True)
        if current == superlink_round:
            time.sleep(rng.uniform(0.0, 3.0))
            killed = kill(component(results, "flwr-home", "flower-superlink"))
            injected.append({"round": current, "fault": "superlink killed", "processes": killed,
                             "seconds": round(time.monotonic() - started, 1)})
            print(f"chaos: round {current}: killed the SuperLink ({killed} processes)", flush=True)
    wall = time.monotonic() - started
    output = "".join(lines)
    summary = json.loads((run / "summary.json").read_text()) if run and (run / "summary.json").exists() else {}
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] if run and (run / "metrics.jsonl").exists() else []
    checkpoints = check_checkpoints(run) if launcher.returncode == 0 else []
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {'no GPU' if not _has_gpu() else 'GPU'}",
        "supernodes": args.supernodes,
        "rounds_configured": args.rounds,
        "round_timeout_s": args.round_timeout,
        "launcher_exit_code": launcher.returncode,
        "rounds_completed": summary.get("rounds_completed"),
        "rounds_aggregated": summary.get("rounds_aggregated"),
        "rounds_skipped": summary.get("rounds_skipped"),
        "supernodes_killed": sum(1 for f in injected if f["fault"] == "supernode killed"),
        "superlink_killed": sum(1 for f in injected if f["fault"] == "superlink killed"),
        "restarts_by_launcher": output.count(" restarted (restart "),
        "replies_lost": summary.get("failures"),
        "replies_received": sum(len(r["clients"]) for r in metrics),
        "failure_reasons": sorted({f["reason"].split(":")[0] if f["reason"].startswith("error") else "no reply within round-timeout"
                                   for r in metrics for f in r.get("failed", [])}),
        "communication_mib": summary.get("communication_mib"),
        "unconfirmed_download_mib": sum(r.get("bytes_down_unconfirmed", 0) for r in metrics) / 2**20,
        "checkpoints_loaded": len(checkpoints),
        "final_train_loss": summary.get("final_train_loss"),
        "wall_seconds": round(wall, 1),
        "faults": injected,
        "run_dir": str(run),
    }
    print(json.dumps({k: v for k, v in report.items() if k != "faults"}, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    ok = launcher.returncode == 0 and summary.get("rounds_completed") == args.rounds and len(checkpoints) == args.rounds
    print("chaos run: " + ("PASSED" if ok else "FAILED"), flush=True)
    return 0 if ok else 1


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
