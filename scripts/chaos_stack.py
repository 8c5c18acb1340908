#!/usr/bin/env python
"""Chaos run through the Compose stack: the smoke stack (tiny profile, no GPU, TLS and SuperNode
authentication on) while, in every round, a SuperNode container that is training is crashed (its
main process SIGKILLed from the host, so its restart policy brings it back) and, once, the
SuperLink's container likewise. Then every checkpoint is loaded onto the tiny base with PEFT.

Needs the host's root (to signal the containers' processes) and the images built
(docker/build-images.sh --offline). The native counterpart is scripts/chaos.py.

    sudo .venv/bin/python scripts/chaos_stack.py --supernodes 20 --rounds 10 --out benchmarks/results/chaos-stack-20x10.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from app.deploy.compose import UID, render_compose, smoke_spec  # noqa: E402
from app.deploy.smoke import AFTER_RUN, Stack, StackError, _ensure_results_dir  # noqa: E402
from chaos import check_checkpoints, rounds_done  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--supernodes", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--round-timeout", type=float, default=120.0)
    parser.add_argument("--superlink-round", type=int, help="round during which the SuperLink crashes (default: the middle one)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault schedule")
    parser.add_argument("--timeout", type=float, default=5400.0, help="seconds for the whole run")
    parser.add_argument("--out", help="write the report here as JSON")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    superlink_round = args.superlink_round or max(1, args.rounds // 2)
    project = "fedtune-chaos"
    work = Path(tempfile.mkdtemp(prefix="fedtune-chaos-stack-"))
    results = work / "results"
    spec = replace(smoke_spec(args.supernodes, args.rounds, project), run_config=f"strategy.round-timeout={args.round_timeout:g}")
    compose_file = work / "compose.yaml"
    compose_file.write_text(render_compose(spec))
    stack = Stack(compose_file, project, env={"FEDTUNE_RESULTS": str(results)})
    _ensure_results_dir(results, UID)
    stack.down()
    started = time.monotonic()
    deadline = started + args.timeout
    injected, run = [], None
    try:
        services = [s for s in stack.compose("config", "--services", capture=True).stdout.split() if s not in AFTER_RUN]
        stack.compose("up", "--detach", "--quiet-pull", *services, timeout=1200)
        while (run_service := stack.container("run")) is None or (run_service.reload() or run_service.status != "exited"):
            if time.monotonic() > deadline:
                raise StackError(f"timed out after {args.timeout:.0f} s\n" + stack.failure_report(stack.failed_services()))
            run = run or next(results.glob("run-*"), None)
            current = rounds_done(run) + 1 if run else 0
            if not run or current > args.rounds or any(f["round"] == current for f in injected):
                time.sleep(1)
                continue
            time.sleep(rng.uniform(2.0, 10.0))  # somewhere inside the round
            in_round = stack.training()
            if rounds_done(run) + 1 != current or not in_round:
                continue  # the round ended meanwhile, or no node is training yet
            node = rng.choice(in_round)
            stack.crash(node)
            injected.append({"round": current, "fault": "supernode crashed", "node": node, "seconds": round(time.monotonic() - started, 1)})
            print(f"chaos: round {current}: crashed {node}", flush=True)
            if current == superlink_round:
                time.sleep(rng.uniform(0.0, 3.0))
                stack.crash("superlink")
                injected.append({"round": current, "fault": "superlink crashed", "seconds": round(time.monotonic() - started, 1)})
                print(f"chaos: round {current}: crashed the SuperLink", flush=True)
        wall = time.monotonic() - started
        exit_code = stack.container("run").attrs["State"]["ExitCode"]
        restarts = stack.restarts("supernode")
        superlink_restarts = stack.container("superlink").attrs["RestartCount"]
        print(stack.logs("run", tail=40), flush=True)
    finally:
        stack.down()
    summary = json.loads((run / "summary.json").read_text()) if run and (run / "summary.json").exists() else {}
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] if run and (run / "metrics.jsonl").exists() else []
    checkpoints = check_checkpoints(run) if exit_code == 0 else []
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPU cores, no GPU used (tiny profile)",
        "supernodes": args.supernodes,
        "rounds_configured": args.rounds,
        "round_timeout_s": args.round_timeout,
        "run_service_exit_code": exit_code,
        "rounds_completed": summary.get("rounds_completed"),
        "rounds_aggregated": summary.get("rounds_aggregated"),
        "rounds_skipped": summary.get("rounds_skipped"),
        "supernodes_crashed": sum(1 for f in injected if f["fault"] == "supernode crashed"),
        "superlink_crashed": sum(1 for f in injected if f["fault"] == "superlink crashed"),
        "supernode_restarts_by_docker": sum(restarts.values()),
        "superlink_restarts_by_docker": superlink_restarts,
        "replies_lost": summary.get("failures"),
        "replies_received": sum(len(r["clients"]) for r in metrics),
        "rounds_that_lost_a_reply": [r["round"] for r in metrics if r["failures"]],
        "failure_reasons": sorted({f["reason"][:120] for r in metrics for f in r.get("failed", [])}),
        "communication_mib": summary.get("communication_mib"),
        "checkpoints_loaded": len(checkpoints),
        "final_train_loss": summary.get("final_train_loss"),
        "round_seconds": [round(r["round_seconds"], 1) for r in metrics],
        "wall_seconds": round(wall, 1),
        "faults": injected,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "faults"}, indent=2))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(out)
    ok = exit_code == 0 and summary.get("rounds_completed") == args.rounds and len(checkpoints) == args.rounds
    print("chaos run through the stack: " + ("PASSED" if ok else "FAILED"), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
