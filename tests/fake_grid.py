"""An in-memory stand-in for Flower's Grid that runs each node's ClientApp code in this process,
for tests that drive the real ServerApp (`main`, `FedTuneProx`) without processes."""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.supercore.task_identity import TaskIdentity

import app.client_app as client_app
from app import comm, server_app
from app.privacy import secagg_node

SUPERLINK = 1  # Flower's SUPERLINK_NODE_ID: the sender of errors the SuperLink makes up


class InMemoryGrid:
    """The part of Flower's Grid the ServerApp uses. `fault(node_name, round, attempt)` returns
    None (reply normally), "drop" (no reply: killed or timed out), "lost" (the SuperLink reports
    the node unavailable) or "error" (the ClientApp raised)."""

    def __init__(self, names: list[str], run_config: dict, client: Callable, fault: Callable = lambda *a: None, id_base: int = 1000):
        self.nodes = {id_base + 7 * i: name for i, name in enumerate(names)}
        self.partition = {node: int(name.rsplit("-", 1)[1]) for node, name in self.nodes.items()}
        self.run_config, self.client, self.fault = run_config, client, fault
        self.attempts: dict[int, int] = {}
        self.sent: list[tuple[int, str]] = []  # (round, node name) of every train message
        self.crash_at_round: int | None = None
        self.replies: dict[str, Message] = {}  # pushed messages' replies, by message id
        self.states: dict[int, RecordDict] = {}  # each node's context state, kept across messages as a SuperNode does
        # (node name, message type) -> None or "drop", for secure aggregation's key stages
        self.stage_fault: Callable = lambda *a: None
        # message type -> whether what its ClientApp writes to the context state is kept (Flower
        # pushes the context after the reply: the next message's process may not see it)
        self.keeps_state: Callable = lambda message_type: True

    def get_nodes(self):
        # SuperLink order is arbitrary: the ServerApp must not depend on it.
        return random.sample([NodeInfo(node_id=n, name=name) for n, name in self.nodes.items()], len(self.nodes))

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        """Runs each node's ClientApp at once; its reply waits for `pull_messages`."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # as the SuperLink does on push
            ids.append(msg.object_id)
            if (reply := self._reply(msg, first=msg is messages[0])) is not None:
                self.replies[msg.object_id] = reply
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def _reply(self, msg: Message, first: bool) -> Message | None:
        node = msg.metadata.dst_node_id
        state = self.states.setdefault(node, RecordDict())
        context = Context(run_id=1, node_id=node, node_config={"partition-id": self.partition[node], "num-partitions": len(self.nodes)},
                          state=state if self.keeps_state(msg.metadata.message_type) else copy.deepcopy(state), run_config=self.run_config)
        if msg.metadata.message_type == "query.init":
            return client_app.initial_adapter(msg, context)
        if handler := SECAGG_HANDLERS.get(msg.metadata.message_type):
            if self.stage_fault(self.nodes[node], msg.metadata.message_type) == "drop":
                return None
            return as_clientapp(handler, msg, context)
        server_round = int(msg.content["config"]["server-round"])
        if server_round == self.crash_at_round:
            raise KeyboardInterrupt("ServerApp killed")
        attempt = self.attempts[server_round] = self.attempts.get(server_round, -1) + first
        self.sent.append((server_round, self.nodes[node]))
        fault = self.fault(self.nodes[node], server_round, attempt)
        if fault == "drop":
            return None
        if fault == "lost":
            return create_message_error_unavailable_res_message(msg.metadata, "node_unavail")
        if fault == "error":
            return Message(Error(code=2, reason="ClientApp raised"), reply_to=msg)
        return self.client(msg, context)


def as_clientapp(handler: Callable, msg: Message, context: Context) -> Message:
    """`handler`'s reply, or the error reply a SuperNode sends when its ClientApp raises."""
    try:
        return handler(msg, context)
    except Exception as exc:  # noqa: BLE001 - as a SuperNode reports it
        return Message(Error(code=2, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)


SECAGG_HANDLERS = {"query.secagg_setup": client_app.secagg_setup, "query.secagg_share_keys": client_app.secagg_share_keys,
                   "query.secagg_unmask": client_app.secagg_unmask}

# The fake update's step per partition id: small enough that the default norm bound clips nothing.
FAKE_STEP = 0.01


def initial_state() -> dict[str, np.ndarray]:
    """A small adapter shaped like the tiny profile's (DoRA, r=8 on q_proj and v_proj) for a 4-wide model."""
    state = {}
    for module, rows in (("q_proj", 4), ("v_proj", 2)):
        prefix = f"base_model.model.model.layers.0.self_attn.{module}"
        state[f"{prefix}.lora_A.weight"] = np.full((8, 4), 0.5, np.float32)
        state[f"{prefix}.lora_B.weight"] = np.zeros((rows, 8), np.float32)
        state[f"{prefix}.lora_magnitude_vector"] = np.ones(rows, np.float32)
    return state


def fake_round(msg: Message, context: Context) -> tuple[dict, dict]:
    """An update of FAKE_STEP x the partition id p everywhere and metrics claiming 10 * (p + 1) examples."""
    p = int(context.node_config["partition-id"])
    update = {k: np.full_like(v, FAKE_STEP * p) for k, v in comm.decode(msg.content["arrays"], msg.content["wire"]).items()}
    metrics = {"partition-id": float(p), "train-loss": 1.0 + p, "proximal-term": 0.0, "num-examples": 10.0 * (p + 1),
               "train-seconds": 0.0, "clientapp-seconds": 0.0, "model-load-seconds": 0.0, "resident": 0.0}
    return update, metrics


def fake_client(msg: Message, context: Context) -> Message:
    """A reply without training (fake_round's)."""
    update, metrics = fake_round(msg, context)
    return reply_with(msg, update, metrics, client_app.load_settings(dict(context.run_config)).comm.format)


def fake_secure_client(msg: Message, context: Context) -> Message:
    """fake_round's update and metrics, masked for secure aggregation as the ClientApp does."""
    update, metrics = fake_round(msg, context)
    noise = client_app.load_settings(dict(context.run_config)).privacy.noise_multiplier
    arrays = secagg_node.masked_update(update, metrics["num-examples"], msg.content, context, noise)
    trainer = ConfigRecord({comm.TRAINER_ID_KEY: "node:cpu:in-process"})  # as the ClientApp sends it
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics), comm.TRAINER_RECORD: trainer}), reply_to=msg)


def reply_with(msg: Message, update: dict, metrics: dict, fmt: str) -> Message:
    arrays, wire = comm.encode(update, fmt, comm.UPDATE)
    return Message(RecordDict({"arrays": arrays, "wire": wire, "metrics": MetricRecord(metrics)}), reply_to=msg)


def run_main(grid: InMemoryGrid, run_id: int) -> Path:
    """The real ServerApp `main` over `grid`; returns the run's results directory."""
    server_app.main(grid, Context(run_id=run_id, node_id=SUPERLINK, node_config={}, state=RecordDict(), run_config=grid.run_config))
    return Path(grid.run_config["results.dir"]) / f"run-{run_id}"


def tiny_config(tmp_path: Path, **extra) -> dict:
    return {"profile": "tiny", "results.dir": str(tmp_path), "dataset.num-partitions": 4, "strategy.fraction-train": 0.5,
            "strategy.round-timeout": 5.0, **extra}


def metrics_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# Fixtures of the modules that drive the ServerApp through this grid (imported there by name).
@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK, 0


@pytest.fixture
def fast_init(monkeypatch):
    """Every node answers query.init with the same small tiny-shaped adapter, built without a model."""
    state = initial_state()

    def initial_adapter(msg, context):
        arrays, wire = comm.encode(state, "float32", comm.WEIGHTS)
        return Message(RecordDict({"arrays": arrays, "wire": wire}), reply_to=msg)

    monkeypatch.setattr(client_app, "initial_adapter", initial_adapter)
    return state
