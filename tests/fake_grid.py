"""An in-memory stand-in for Flower's Grid that runs each node's ClientApp code in this process,
for tests that drive the real ServerApp (`main`, `FedTuneProx`) without processes."""

from __future__ import annotations

import collections
import contextlib
import copy
import json
import random
import threading
import time
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
from app.privacy.secagg_records import RECORD

SUPERLINK = 1  # Flower's SUPERLINK_NODE_ID: the sender of errors the SuperLink makes up


class InMemoryGrid:
    """The part of Flower's Grid the ServerApp uses, with a SuperNode's order: each node handles its
    messages one at a time, in the order pushed, and its context state is written back, whole,
    after its reply. `fault(node_name, round, attempt)` returns None (reply normally), "drop" (no
    reply: killed or timed out), "lost" (the SuperLink reports the node unavailable) or "error"
    (the ClientApp raised); `train_seconds(node_name, round)` is how long a node trains (its reply
    and its next message wait that long)."""

    def __init__(self, names: list[str], run_config: dict, client: Callable, fault: Callable = lambda *a: None, id_base: int = 1000):
        self.nodes = {id_base + 7 * i: name for i, name in enumerate(names)}
        self.partition = {node: int(name.rsplit("-", 1)[1]) for node, name in self.nodes.items()}
        self.run_config, self.client, self.fault = run_config, client, fault
        self.online = set(self.nodes)  # the nodes get_nodes lists; one taken out answers nothing more
        self.attempts: dict[int, int] = {}
        self.sent: list[tuple[int, str]] = []  # (round, node name) of every train message
        self.crash_at_round: int | None = None
        self.states: dict[int, RecordDict] = {}  # each node's context state, kept across messages as a SuperNode does
        # (node name, message type, round) -> None or "drop", for secure aggregation's key stages
        self.stage_fault: Callable = lambda *a: None
        # message type -> whether what its ClientApp writes to the context state is kept (Flower
        # pushes the context after the reply: the next message's process may not see it)
        self.keeps_state: Callable = lambda message_type: True
        self.train_seconds: Callable = lambda name, server_round: 0.0
        # ("push" or "reply" (pulled by the ServerApp), message type, round, node name), in the order they happened
        self.events: list[tuple[str, str, int, str]] = []
        self.queues: dict[int, collections.deque] = {node: collections.deque() for node in self.nodes}
        self.free_at = dict.fromkeys(self.nodes, 0.0)  # when each node is done with its last message (monotonic s)
        self.replies: dict[str, tuple[float, Message, tuple]] = {}  # by message id: when it may be pulled, the reply, its event
        self.rounds: dict[str, int] = {}  # each announced session's round
        self._calls = threading.Lock()

    @contextlib.contextmanager
    def _one_call(self):
        """Flower's Grid is not made for two threads: the ServerApp must take turns on it."""
        if not self._calls.acquire(blocking=False):
            raise AssertionError("two Grid calls at once")
        try:
            yield
        finally:
            self._calls.release()

    def get_nodes(self):
        with self._one_call():
            # SuperLink order is arbitrary: the ServerApp must not depend on it.
            return random.sample([NodeInfo(node_id=n, name=self.nodes[n]) for n in self.online], len(self.online))

    def get_node_ids(self):
        with self._one_call():
            return list(self.online)

    def push_messages(self, messages):
        """Queues each message for its node; a node's ClientApp runs when the node is free."""
        with self._one_call():
            ids, attempt = [], None
            for msg in messages:
                msg.metadata.__dict__["_message_id"] = msg.object_id  # as the SuperLink does on push
                ids.append(msg.object_id)
                node, server_round = msg.metadata.dst_node_id, self._round(msg)
                if msg.metadata.message_type == "train":
                    if server_round == self.crash_at_round:
                        raise KeyboardInterrupt("ServerApp killed")
                    if attempt is None:
                        attempt = self.attempts[server_round] = self.attempts.get(server_round, -1) + 1
                    self.sent.append((server_round, self.nodes[node]))
                self.events.append(("push", msg.metadata.message_type, server_round, self.nodes[node]))
                self.queues[node].append((msg, attempt, time.monotonic()))
            self._advance()
            return ids

    def pull_messages(self, message_ids):
        with self._one_call():
            self._advance()
            now, got = time.monotonic(), []
            for i in message_ids:
                if i in self.replies and self.replies[i][0] <= now:
                    _, reply, event = self.replies.pop(i)
                    got.append(reply)
                    self.events.append(("reply", *event))
            return got

    def _round(self, msg: Message) -> int:
        record = msg.content.get(RECORD) if msg.content is not None else None
        if msg.metadata.message_type == "train":
            return int(msg.content["config"]["server-round"])
        if msg.metadata.message_type == "query.secagg_setup":
            self.rounds[record["session"]] = int(record["server_round"])
        return self.rounds.get(record["session"], 0) if record is not None else 0

    def _advance(self) -> None:
        """Each free node takes its next message; its reply can be pulled once it is done."""
        now = time.monotonic()
        for node, queue in self.queues.items():
            while queue and self.free_at[node] <= now:
                msg, attempt, pushed = queue.popleft()
                start = max(self.free_at[node], pushed)
                server_round, name = self._round(msg), self.nodes[node]
                self.free_at[node] = start + (self.train_seconds(name, server_round) if msg.metadata.message_type == "train" else 0.0)
                if node in self.online and (reply := self._reply(msg, attempt)) is not None:
                    self.replies[msg.object_id] = (self.free_at[node], reply, (msg.metadata.message_type, server_round, name))

    def _reply(self, msg: Message, attempt: int | None) -> Message | None:
        """The node's reply (None: no reply), its ClientApp run on a copy of its context state,
        written back after the reply when `keeps_state` says so."""
        node = msg.metadata.dst_node_id
        context = Context(run_id=1, node_id=node, node_config={"partition-id": self.partition[node], "num-partitions": len(self.nodes)},
                          state=copy.deepcopy(self.states.get(node, RecordDict())), run_config=self.run_config)
        reply = self._answer(msg, attempt, context)
        if self.keeps_state(msg.metadata.message_type):
            self.states[node] = context.state
        return reply

    def _answer(self, msg: Message, attempt: int | None, context: Context) -> Message | None:
        name = self.nodes[msg.metadata.dst_node_id]
        if msg.metadata.message_type == "query.init":
            return client_app.initial_adapter(msg, context)
        if handler := SECAGG_HANDLERS.get(msg.metadata.message_type):
            if self.stage_fault(name, msg.metadata.message_type, self._round(msg)) == "drop":
                return None
            return as_clientapp(handler, msg, context)
        fault = self.fault(name, int(msg.content["config"]["server-round"]), attempt)
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
