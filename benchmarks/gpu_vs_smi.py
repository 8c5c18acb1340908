#!/usr/bin/env python
"""The report's GPU figures against nvidia-smi's, sampled beside the run (benchmarks/gpu_alone_run.sh).

For every client round in `<run>/metrics.jsonl`: the resident trainer's own NVML figures while it
trained (mean utilisation, peak and mean memory) against the nvidia-smi samples taken in the same
window [t_train_start, t_train_end] (nvidia-smi's timestamps are the host's local time; pass
--smi-utc-offset if that is not UTC). Prints a table and exits 1 if any figure differs by more
than --tolerance (relative).

    python benchmarks/gpu_vs_smi.py benchmarks/results/h200_local_up_alone --json OUT.json
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

MIB = 2**20


def read_smi(path: Path, utc_offset_hours: float) -> list[tuple[float, float, float]]:
    """(epoch seconds, memory used bytes, utilisation %) per sample of
    `nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader,nounits`."""
    tz = timezone(timedelta(hours=utc_offset_hours))
    samples = []
    with path.open(newline="") as f:
        for row in csv.reader(f):
            if len(row) != 3:
                continue  # a line cut short when the sampler was stopped
            try:
                stamp = datetime.strptime(row[0].strip(), "%Y/%m/%d %H:%M:%S.%f").replace(tzinfo=tz).timestamp()
                samples.append((stamp, float(row[1]) * MIB, float(row[2])))
            except ValueError:
                continue
    return samples


def compare(run_dir: Path, smi: list[tuple[float, float, float]]) -> list[dict]:
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for client in record["clients"]:
            start, end = client.get("t_train_start"), client.get("t_train_end")
            if start is None or end is None or "gpu_util_mean" not in client:
                continue
            window = [s for s in smi if start <= s[0] <= end]
            if not window:
                continue
            smi_util = sum(s[2] for s in window) / len(window)
            smi_peak = max(s[1] for s in window)
            smi_mean = sum(s[1] for s in window) / len(window)
            rows.append({
                "round": record["round"], "partition": client.get("partition_id"), "seconds": end - start,
                "samples": {"report": int(client.get("gpu_samples", 0)), "nvidia-smi": len(window)},
                "util_mean": {"report": client["gpu_util_mean"], "nvidia-smi": smi_util},
                "mem_peak_mib": {"report": client["gpu_mem_peak_bytes"] / MIB, "nvidia-smi": smi_peak / MIB},
                "mem_mean_mib": {"report": client["gpu_mem_mean_bytes"] / MIB, "nvidia-smi": smi_mean / MIB},
            })
    return rows


def relative(pair: dict) -> float:
    return abs(pair["report"] - pair["nvidia-smi"]) / max(abs(pair["nvidia-smi"]), 1e-9)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run directory holding metrics.jsonl")
    parser.add_argument("--smi", type=Path, help="nvidia-smi samples (default: RUN_DIR/nvidia-smi.csv)")
    parser.add_argument("--smi-utc-offset", type=float, default=0.0, help="hours nvidia-smi's clock is ahead of UTC")
    parser.add_argument("--tolerance", type=float, default=0.10)
    parser.add_argument("--json", type=Path, help="write the comparison here")
    args = parser.parse_args()

    rows = compare(args.run_dir, read_smi(args.smi or args.run_dir / "nvidia-smi.csv", args.smi_utc_offset))
    if not rows:
        print(f"{args.run_dir}: no client round with GPU figures overlaps the nvidia-smi samples", file=sys.stderr)
        return 1
    worst = 0.0
    print("| round | node | train s | samples (report / smi) | util % report / smi | peak MiB report / smi | mean MiB report / smi | worst diff |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        diff = max(relative(r[k]) for k in ("util_mean", "mem_peak_mib", "mem_mean_mib"))
        r["worst_relative_diff"] = diff
        worst = max(worst, diff)
        print(f"| {r['round']} | {r['partition']} | {r['seconds']:.1f} | {r['samples']['report']} / {r['samples']['nvidia-smi']} "
              f"| {r['util_mean']['report']:.1f} / {r['util_mean']['nvidia-smi']:.1f} "
              f"| {r['mem_peak_mib']['report']:.0f} / {r['mem_peak_mib']['nvidia-smi']:.0f} "
              f"| {r['mem_mean_mib']['report']:.0f} / {r['mem_mean_mib']['nvidia-smi']:.0f} | {diff:.1%} |")
    ok = worst <= args.tolerance
    print(f"worst relative difference {worst:.1%}: {'within' if ok else 'OUTSIDE'} {args.tolerance:.0%}")
    if args.json:
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps({"tolerance": args.tolerance, "worst": worst, "rows": rows}, indent=2) + "\n")
        tmp.replace(args.json)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
