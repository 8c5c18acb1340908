"""The device trainer: one resident trainer per GPU (and one for the CPU) for every SuperNode on it.

Per-node residents hold one 4-bit base model per SuperNode; an 80 GB GPU holds ~3 of them
beside a training peak, so the seed's 20 nodes on one GPU had to reload the model every client
round. Nodes on one GPU gain nothing from training at once (three time-slicing an H100 took
1.08x the serial time), so one process per device loads the base once and serves the rounds of
all its nodes one at a time, in arrival order: the same TrainerServer, RoundWorker and wire
protocol as the per-node trainer (app/training/trainer_service.py), so the same seed gives the
same adapter. A queued request's deadline starts with its turn (TrainerServer's queue).

Which node is asking is the host's word, not the request's: the launcher (or the Compose
stack's `certs` step) gives each SuperNode a random token in a file only that node can read
(TOKEN_ENV names it in the node's environment) and writes a registry, readable by the trainer
only, that maps each token's SHA-256 to the node's partition-id, num-partitions and data-path.
The trainer trains a request on the partition its token is registered for and ignores the node
config the request carries, so one node cannot have the trainer read another's examples; an
unknown or missing token is refused. Nothing else of a node stays in the trainer between
requests but its tokenised partition (RoundWorker's cache): each reply is the adapter trained
from the global adapter that request sent. The registry holds digests, not tokens; the socket
is still 0600 with the peer's uid checked. Data paths and the run config's reads go through
app/node/read_policy.py as in every trainer (RoundWorker.train).

`fedtune trainer --socket S --registry R` runs one under the per-node trainer's watchdog (a
trainer that dies or hangs is restarted; the rounds it held fall back to in-process training);
`fedtune supernode --device-trainer S --trainer-token F -- ...` runs a SuperNode that uses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

TOKEN_ENV = "FEDTUNE_TRAINER_TOKEN"  # path of this node's token file
TOKEN_BYTES = 32
_DIGEST_HEX = 64


@dataclass(frozen=True)
class Binding:
    """What the host says one node trains on (worker.NodeData's fields, without its imports)."""

    partition_id: int
    num_partitions: int
    data_path: str = ""


def new_token() -> str:
    return secrets.token_hex(TOKEN_BYTES)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def write_token(path: Path, token: str, owner: tuple[int, int] | None = None) -> None:
    from app.deploy.certs import write_private  # here: a ClientApp reading its token needs no cryptography

    write_private(path, (token + "\n").encode(), owner)


def write_registry(path: Path, bindings: dict[str, Binding], owner: tuple[int, int] | None = None) -> None:
    """The registry of `bindings` (token -> node), as token digests."""
    from app.deploy.certs import write_private

    nodes = {token_digest(token): {"partition-id": b.partition_id, "num-partitions": b.num_partitions, "data-path": b.data_path}
             for token, b in bindings.items()}
    write_private(path, (json.dumps({"nodes": nodes}, indent=1) + "\n").encode(), owner)


def issue_tokens(directory: Path, bindings: dict[int, Binding]) -> tuple[Path, dict[int, Path]]:
    """A fresh token per node (file token-<node>) and the registry beside them: (registry, {node: token file})."""
    tokens = {node: new_token() for node in bindings}
    files = {node: directory / f"token-{node}" for node in bindings}
    for node, path in files.items():
        write_token(path, tokens[node])
    registry = directory / "registry.json"
    write_registry(registry, {tokens[node]: binding for node, binding in bindings.items()})
    return registry, files


def read_token(environ=os.environ) -> str | None:
    """This node's token (TOKEN_ENV names its file); None when the node has none (per-node placement)."""
    path = environ.get(TOKEN_ENV)
    if not path:
        return None
    token = Path(path).read_text().strip()
    if len(token) != 2 * TOKEN_BYTES or any(c not in "0123456789abcdef" for c in token):
        raise ValueError(f"{TOKEN_ENV} file {path}: expected {2 * TOKEN_BYTES} hex digits (a token from `fedtune local up` or `fedtune stack`)")
    return token


class RegistryError(ValueError):
    """A registry file that cannot be used; the message names the file and the field."""


class NodeRegistry:
    """Token digest -> the node's Binding, from the file the launcher wrote."""

    def __init__(self, nodes: dict[str, Binding]) -> None:
        self.nodes = nodes

    @classmethod
    def load(cls, path: Path) -> NodeRegistry:
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise RegistryError(f"trainer registry {path}: cannot read it as JSON ({exc})") from None
        entries = raw.get("nodes") if isinstance(raw, dict) else None
        if not isinstance(entries, dict):
            raise RegistryError(f"trainer registry {path}: expected an object with `nodes`: {{sha256 of a token: node}}")
        nodes = {}
        for digest, entry in entries.items():
            where = f"trainer registry {path}: nodes[{str(digest)[:16]}...]"
            if len(digest) != _DIGEST_HEX or any(c not in "0123456789abcdef" for c in digest):
                raise RegistryError(f"{where}: expected a key of {_DIGEST_HEX} hex digits (a token's SHA-256)")
            if not isinstance(entry, dict):
                raise RegistryError(f"{where}: expected an object with partition-id, num-partitions, data-path")
            pid, parts, data = entry.get("partition-id"), entry.get("num-partitions"), entry.get("data-path", "")
            if not (type(pid) is int and type(parts) is int and 0 <= pid < parts):
                raise RegistryError(f"{where}: expected integers 0 <= partition-id < num-partitions, got {pid!r}, {parts!r}")
            if not isinstance(data, str):
                raise RegistryError(f"{where}.data-path: expected a string, got {type(data).__name__}")
            nodes[digest] = Binding(pid, parts, data)
        return cls(nodes)

    def node_for(self, token: object):
        """The worker.NodeData the token is registered for; PermissionError for any other token."""
        from app.node.read_policy import check_node_data_path
        from app.training.worker import NodeData

        if not isinstance(token, str) or not token:
            raise PermissionError("this device trainer serves registered SuperNodes only: the request has no token "
                                  f"(the SuperNode's {TOKEN_ENV})")
        digest = token_digest(token)
        for known, binding in self.nodes.items():
            if hmac.compare_digest(known, digest):
                check_node_data_path(binding.data_path)
                return NodeData(binding.partition_id, binding.num_partitions, binding.data_path)
        raise PermissionError(f"this device trainer does not know this SuperNode's token ({TOKEN_ENV}); "
                              "was it issued by the launch that started the trainer?")


def run_device_trainer(socket_path: str, registry_path: str) -> int:
    """One device trainer under the per-node trainer's watchdog, until SIGTERM or SIGINT."""
    from app.training.trainer_service import _say, _Watchdog

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
