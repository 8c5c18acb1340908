"""The ClientApp's start with and without the node's fork server (app/node/clientapp_forkserver.py).

Runs `fedtune local up --profile tiny` with FEDTUNE_CLIENTAPP_FORKSERVER=0 and =1 alternately
(`--repeats` runs each) and reads, for every client of every round in metrics.jsonl, the report's
"node: ClientApp init": t_process_start (the `flwr-clientapp` process flwr started: the shim) ->
t_handler_start, both on the node's clock. Also "node: process start to reply" for the whole node
side. The 1-minute load average is recorded before and after each run.

    python benchmarks/bench_clientapp_start.py --out benchmarks/results/clientapp_start_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(forkserver: bool, nodes: int, rounds: int) -> dict:
    env = dict(os.environ, FEDTUNE_CLIENTAPP_FORKSERVER="1" if forkserver else "0", PYTHONUNBUFFERED="1")
    with tempfile.TemporaryDirectory(prefix="bench-clientapp-start-") as results:
        load_before = os.getloadavg()[0]
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "app.cli", "local", "up", "--profile", "tiny", "--supernodes", str(nodes),
                               "--rounds", str(rounds), "--no-eval", "--results", results,
                               "--run-config", "strategy.fraction-train=1.0"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise SystemExit(f"fedtune local up failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        [metrics] = Path(results).glob("run-*/metrics.jsonl")
        clients = [c for line in metrics.read_text().splitlines() for c in json.loads(line)["clients"]]
        logs = "".join(p.read_text(errors="replace") for p in Path(results).glob(".local/*/logs/supernode-*.log"))
    return {
        "forkserver": forkserver,
        "seconds": time.monotonic() - started,
        "load_1min_before": load_before,
        "load_1min_after": os.getloadavg()[0],
        "clientapp_init": [c["t_handler_start"] - c["t_process_start"] for c in clients],
        "process_start_to_reply": [c["t_reply"] - c["t_process_start"] for c in clients],
        "fallbacks": logs.count("ClientApp fork server unavailable"),
    }


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s [{min(values):.2f}-{max(values):.2f}] (n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    runs = []
    for _ in range(args.repeats):
        for forkserver in (False, True):
            runs.append(run(forkserver, args.nodes, args.rounds))
            r = runs[-1]
            print(f"forkserver={'on ' if forkserver else 'off'}  ClientApp init {summary(r['clientapp_init'])}  "
                  f"process start to reply {summary(r['process_start_to_reply'])}  load {r['load_1min_before']:.1f} -> "
                  f"{r['load_1min_after']:.1f}  fallbacks {r['fallbacks']}", flush=True)
    result = {"nodes": args.nodes, "rounds": args.rounds, "host_cpus": os.cpu_count(), "python": sys.version.split()[0],
              "date": time.strftime("%Y-%m-%d"), "runs": runs}
    for forkserver in (False, True):
        mine = [r for r in runs if r["forkserver"] is forkserver]
        init = [v for r in mine for v in r["clientapp_init"]]
        reply = [v for r in mine for v in r["process_start_to_reply"]]
        result[f"forkserver_{'on' if forkserver else 'off'}"] = {"clientapp_init_median": statistics.median(init),
                                                                 "process_start_to_reply_median": statistics.median(reply)}
        print(f"all, forkserver={'on ' if forkserver else 'off'}: ClientApp init {summary(init)}; process start to reply {summary(reply)}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
