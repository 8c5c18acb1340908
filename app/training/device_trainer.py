"""The device trainer: one resident trainer per GPU (and one for the CPU) for every SuperNode on it.

Per-node residents hold one 4-bit base model per SuperNode; an 80 GB GPU holds ~3 of them
beside a training peak, so the seed's 20 nodes on one GPU had to reload the model every client
round. Nodes on one GPU gain nothing from training at once (three time-slicing an H100 took
1.08x the serial time), so one process per device loads the base once and serves the rounds of
all its nodes one at a time, in arrival order: the same TrainerServer, RoundWorker and wire
protocol as the per-node trainer (app/training/trainer_service.py), so the same seed gives the
same adapter. A queued request's deadline starts with its turn (TrainerServer's queue).

Which node is asking is the host's word, not the request's: the launcher (or the Compose
stack's `trainer-tokens` step) gives each SuperNode a random token in a file only that node can
read and writes a registry, readable by the trainer only, that maps each token's SHA-256 to the
node's partition-id, num-partitions and data-path (app/training/node_tokens.py). Peer
credentials alone cannot tell the nodes apart: on one host they all run as one user.
The trainer trains a request on the partition its token is registered for and ignores the node
config the request carries, so one node cannot have the trainer read another's examples; an
unknown or missing token is refused. Nothing else of a node stays in the trainer between
requests but its tokenised partition (RoundWorker's cache): each reply is the adapter trained
from the global adapter that request sent. The registry holds digests, not tokens; the socket
is still 0600 with the peer's uid checked. Data paths and the run config's reads go through
app/node/read_policy.py as in every trainer (RoundWorker.train). Under `fedtune local up` every
process runs as the launching user, who can read all token files (and all the data) anyway: there
the token keeps a ClientApp to its own partition; in Compose each token is in a volume that only
its SuperNode's container mounts.

The launcher also names the run in the registry (`preload`): the trainer loads that run's model
as soon as it starts, while the SuperNodes register and connect, so round 1 does not wait for the
load (BENCHMARKS.md, "Device trainer").

`fedtune trainer --socket S --registry R` runs one under the per-node trainer's watchdog (a
trainer that dies or hangs is restarted; the rounds it held fall back to in-process training);
`fedtune supernode --trainer-socket S --trainer-token F -- ...` runs a SuperNode that uses it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

from app.training.node_tokens import NodeRegistry, RegistryError
from app.training.trainer_service import _say, _Watchdog


def run_device_trainer(socket_path: str, registry_path: str) -> int:
    """One device trainer under the per-node trainer's watchdog, until SIGTERM or SIGINT."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    try:
        NodeRegistry.load(Path(registry_path))  # a bad registry fails here, once, not in every restart
    except RegistryError as exc:
        _say(str(exc))
        return 2
    stopping: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda signum, _frame: stopping.append(signum))
    watchdog = _Watchdog(socket_path, registry_path)
    try:
        while not stopping:
            watchdog.check()
            time.sleep(0.5)
    finally:
        watchdog.stop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "trainer",
        help="run a device trainer: one resident base model for every SuperNode on this GPU (or the CPU)",
        description="fedtune trainer --socket PATH --registry FILE: serve the SuperNodes registered in FILE, "
                    "one round at a time, restarting the trainer process if it dies or hangs.",
    )
    parser.add_argument("--socket", required=True, help="Unix socket to serve (its directory is made 0700)")
    parser.add_argument("--registry", required=True, help="token registry written by `fedtune local up` or `fedtune stack`")
    parser.set_defaults(func=lambda args: run_device_trainer(args.socket, args.registry))


if __name__ == "__main__":
    sys.exit(run_device_trainer(sys.argv[1], sys.argv[2]))
