"""Docker Compose stack figures (issue 3): image sizes, `up` to all SuperNodes online, idle memory.

Runs the CPU smoke stack (`fedtune stack smoke`: tiny profile, N SuperNodes, 2 rounds, no GPU)
with the images as built (`docker/build-images.sh --offline` first), then prints a table and
writes JSON. Idle memory is read per SuperNode container when the run service first sees all N
online, before any round: the cgroup's anonymous memory (`total_rss`; what the processes
themselves hold) and `docker stats`' figure (usage less inactive page cache).

    python benchmarks/bench_stack.py --out benchmarks/results/stack_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def image_sizes(client) -> dict[str, float]:
    from app.deploy.compose import app_image, superlink_image

    return {name: round(client.images.get(name).attrs["Size"] / 1e9, 2) for name in (app_image(), superlink_image())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import docker

    from app.deploy.smoke import smoke

    client = docker.from_env()
    results = Path(tempfile.mkdtemp(prefix="fedtune-bench-stack-"))
    os.chmod(results, 0o777)
    load_before = os.getloadavg()[0]
    result = smoke(nodes=args.nodes, rounds=2, results=results, project="fedtune-bench-stack")
    idle = {kind: sorted(m[kind] for m in result.idle_memory_mib.values()) for kind in ("stats", "anonymous")}
    row = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores {platform.machine()}, no GPU; Docker "
                   + client.version()["Version"] + ", " + subprocess.run(["docker", "compose", "version", "--short"],
                                                                          capture_output=True, text=True).stdout.strip(),
        "load_average_before": round(load_before, 2),
        "images_gb": image_sizes(client),
        "supernodes": args.nodes,
        "up_to_all_supernodes_online_s": round(result.up_seconds, 1),
        "phases_s": result.phases,
        "two_rounds_total_s": round(result.total_seconds, 1),
        "idle_supernode_mib": {kind: {"median": round(statistics.median(v), 1), "max": round(v[-1], 1)}
                               for kind, v in idle.items()},
        "supernode_restarts": result.supernode_restarts,
        "supernode_uids": sorted({u for s, us in result.users.items() if s.startswith("supernode-") for u in us}),
        "leftovers": result.leftovers,
    }
    print(f"{'images':<36} " + ", ".join(f"{k} {v} GB" for k, v in row["images_gb"].items()))
    print(f"{'up -> all SuperNodes online':<36} {row['up_to_all_supernodes_online_s']} s ({args.nodes} nodes)")
    print(f"{'up -> 2 rounds done -> down':<36} {row['two_rounds_total_s']} s")
    print(f"{'idle SuperNode, docker stats':<36} median {row['idle_supernode_mib']['stats']['median']} MiB")
    print(f"{'idle SuperNode, anonymous memory':<36} median {row['idle_supernode_mib']['anonymous']['median']} MiB")
    if args.out:
        args.out.write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
