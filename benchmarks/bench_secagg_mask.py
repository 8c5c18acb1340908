"""A node's masking of its update for secure aggregation (issue 27): `secagg_node.masked_update`
on the seed adapter's shapes (13,795,328 values: DoRA r=32 on q_proj and v_proj of the 32 layers
of Llama-3-8B), in a real session of 3 nodes set up through the protocol's own stages (setup and
the key exchange, so the masks are the real pairwise ones). The update is at the seed's scale (a
round of 6 AdamW steps at lr 5e-5). Times --repeats calls, each in a forked child as a ClientApp
makes it, with and without DP noise; this is the CPU work on the critical path at the end of
every secure round, in the ClientApp process.

    python benchmarks/bench_secagg_mask.py --out benchmarks/results/secagg_mask_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import struct
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flwr.app import ConfigRecord, Context, RecordDict  # noqa: E402

from app.aggregation.bounds import recipe_norm_bound  # noqa: E402
from app.privacy import secagg_node, secagg_server  # noqa: E402
from app.privacy.secagg_records import RECORD  # noqa: E402

LAYERS, HIDDEN, KV, RANK = 32, 4096, 1024, 32
NODES = (101, 202, 303)


def seed_update(rng: np.random.Generator) -> dict[str, np.ndarray]:
    shapes = {"q_A": (RANK, HIDDEN), "q_B": (HIDDEN, RANK), "q_m": (HIDDEN,), "v_A": (RANK, HIDDEN), "v_B": (KV, RANK), "v_m": (KV,)}
    return {f"{layer}.{name}": (rng.standard_normal(shape) * 3e-4).astype(np.float32) for layer in range(LAYERS) for name, shape in shapes.items()}


def session(parameters: int) -> tuple[Context, RecordDict]:
    """Node NODES[0]'s context after setup, and the train message's secure-aggregation record."""
    bound = recipe_norm_bound(6, 5e-5, parameters)
    announced = secagg_server.announcement(list(NODES), 1, parameters, bound, bound, 1698, 3, 0.0)
    contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in NODES}
    keys = {n: secagg_node.setup(RecordDict({RECORD: announced.record()}), contexts[n])[RECORD] for n in NODES}
    peers = ConfigRecord({"session": announced.session, "nodes": [str(n) for n in NODES], "pk_s": [keys[n]["pk_s"] for n in NODES]})
    return contexts[NODES[0]], RecordDict({RECORD: peers})


def once_in_a_fork(update: dict, content: RecordDict, context: Context, noise: float) -> float:
    """One masked_update in a forked child, as a ClientApp runs it (a child of the node's fork
    server, the libraries imported, its heap fresh: a second call in one process reuses freed
    pages and is several times faster than any ClientApp's only call)."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        started = time.perf_counter()
        secagg_node.masked_update(update, 1698, content, context, noise)
        os.write(write, struct.pack("d", time.perf_counter() - started))
        os._exit(0)
    os.close(write)
    seconds = struct.unpack("d", os.read(read, 8))[0]
    os.close(read)
    os.waitpid(child, 0)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="JSON results")
    args = parser.parse_args()
    update = seed_update(np.random.default_rng(0))
    parameters = sum(v.size for v in update.values())
    context, content = session(parameters)
    rows = {}
    for noise in (0.0, 1.0):
        seconds = [once_in_a_fork(update, content, context, noise) for _ in range(args.repeats)]
        rows[f"noise multiplier {noise:g}"] = {"median_seconds": statistics.median(seconds), "seconds": seconds}
    print(f"masked_update of {parameters:,} values, 3-node session, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()})")
    for name, row in rows.items():
        print(f"  {name:<22} median {row['median_seconds']:.3f} s  (runs: {', '.join(f'{s:.3f}' for s in row['seconds'])})")
    if args.out:
        Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "python": platform.python_version(),
                                              "numpy": np.__version__, "parameters": parameters, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
