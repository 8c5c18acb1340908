"""Which SuperNode asks a device trainer: per-node tokens and the registry the host writes.

The launcher (or the Compose stack's `trainer-tokens` step) gives each SuperNode a random token
in a file only that node reads (TOKEN_ENV names it in the node's environment) and writes, for each
device trainer, a registry that only the trainer reads: SHA-256 of each token -> the node's
partition-id, num-partitions and data-path. The registry holds digests, never the tokens; a token
is compared in constant time. Why a token and not the request's own node config: see
app/training/device_trainer.py.
"""

from __future__ import annotations



import hashlib
import hmac
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

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


def write_registry(path: Path, bindings: dict[str, Binding], owner: tuple[int, int] | None = None,
                   preload: dict | None = None) -> None:
    """The registry of `bindings` (token -> node), as token digests; `preload`: the run config
    whose model the trainer loads as soon as it starts (the launcher knows the run already)."""
    from app.deploy.certs import write_private

    nodes = {token_digest(token): {"partition-id": b.partition_id, "num-partitions": b.num_partitions, "data-path": b.data_path}
             for token, b in bindings.items()}
    content = {"nodes": nodes, **({"preload": preload} if preload is not None else {})}
    write_private(path, (json.dumps(content, indent=1) + "\n").encode(), owner)


def issue_tokens(directory: Path, bindings: dict[int, Binding], preload: dict | None = None) -> tuple[Path, dict[int, Path]]:
    """A fresh token per node (file token-<node>) and the registry beside them: (registry, {node: token file})."""
    tokens = {node: new_token() for node in bindings}
    files = {node: directory / f"token-{node}" for node in bindings}
    for node, path in files.items():
        write_token(path, tokens[node])
    registry = directory / "registry.json"
    write_registry(registry, {tokens[node]: binding for node, binding in bindings.items()}, preload=preload)
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


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when the file is replaced (temp + rename: a new inode) or rewritten."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class RegistryError(ValueError):
    """A registry file that cannot be used; the message names the file and the field."""


class NodeRegistry:
    """Token digest -> the node's Binding, from the file the launcher wrote. A file rewritten
    later (a Compose `up` reissues the tokens while a trainer container keeps running) is read
    again before the next lookup; one that cannot be read then leaves the last good one."""

    def __init__(self, nodes: dict[str, Binding], preload: dict | None = None, path: Path | None = None) -> None:
        self.nodes, self.preload, self.path = nodes, preload, path
        self._stamp = _stamp(path) if path is not None else None

    def _refresh(self) -> None:
        if self.path is None or (stamp := _stamp(self.path)) == self._stamp:
            return
        try:
            fresh = NodeRegistry.load(self.path)
        except RegistryError as exc:
            log.warning("%s; keeping the registry read before", exc)
            return
        self.nodes, self._stamp = fresh.nodes, stamp

    @classmethod
    def load(cls, path: Path) -> NodeRegistry:
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise RegistryError(f"trainer registry {path}: cannot read it as JSON ({exc})") from None
        entries = raw.get("nodes") if isinstance(raw, dict) else None
        if not isinstance(entries, dict):
            raise RegistryError(f"trainer registry {path}: expected an object with `nodes`: {{sha256 of a token: node}}")
        preload = raw.get("preload")
        if preload is not None and not isinstance(preload, dict):
            raise RegistryError(f"trainer registry {path}: preload: expected a run config object, got {type(preload).__name__}")
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
        return cls(nodes, preload, path)

    def node_for(self, token: object):
        """The worker.NodeData the token is registered for; PermissionError for any other token."""
        from app.node.read_policy import check_node_data_path
        from app.training.worker import NodeData

        if not isinstance(token, str) or not token:
            raise PermissionError("this device trainer serves registered SuperNodes only: the request has no token "
                                  f"(the SuperNode's {TOKEN_ENV})")
        self._refresh()
        digest = token_digest(token)
        for known, binding in self.nodes.items():
            if hmac.compare_digest(known, digest):
                check_node_data_path(binding.data_path)
                return NodeData(binding.partition_id, binding.num_partitions, binding.data_path)
        raise PermissionError(f"this device trainer does not know this SuperNode's token ({TOKEN_ENV}); "
                              "was it issued by the launch that started the trainer?")
