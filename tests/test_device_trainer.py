"""The device trainer: one trainer for many SuperNodes, each held to its own partition by its token."""

import json
import os
import stat
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from app.training.node_tokens import TOKEN_ENV, Binding, NodeRegistry, RegistryError, issue_tokens, read_token, token_digest
from app.training.trainer_service import SOCKET_ENV, TrainerServer, call_trainer
from app.training.worker import NodeData, RoundWorker, TrainRequest

PARTITIONS = 20
RUN_CONFIG = {"profile": "tiny", "dataset.num-partitions": PARTITIONS}


def _rows(n: int, tag: str) -> str:
    return "".join(json.dumps({"input": f"{tag} question {i}?", "output": f"{tag} answer {i}."}) + "\n" for i in range(n))


@pytest.fixture
def device(tmp_path, monkeypatch):
    """A device trainer for two nodes: node 0 (partition 3, its own 7-row file) and node 1
    (partition 5, its own 11-row file). Yields (server, [token files], [data files])."""
    from app.node.read_policy import READ_DIRS_ENV

    data = tmp_path / "data"
    data.mkdir()
    files = [data / "site-a.jsonl", data / "site-b.jsonl"]
    files[0].write_text(_rows(7, "a"))
    files[1].write_text(_rows(11, "b"))
    monkeypatch.setenv(READ_DIRS_ENV, str(data))
    bindings = {0: Binding(3, PARTITIONS, str(files[0])), 1: Binding(5, PARTITIONS, str(files[1]))}
    registry, tokens = issue_tokens(tmp_path / "trainer", bindings)
    server = TrainerServer(tmp_path / "trainer" / "gpu0.sock", "device", NodeRegistry.load(registry))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, tokens, files
    server.stop()
    thread.join(timeout=5)


def _train(server, token_file, claimed: NodeData, adapter):
    header = {"op": "train", "run_config": RUN_CONFIG, "node": vars(claimed), "server_round": 1, "lr": 5e-5, "proximal_mu": 1.0,
              "token": read_token({TOKEN_ENV: str(token_file)})}
    return call_trainer(str(server.path), header, adapter, 5.0, 600.0)


def test_a_node_trains_on_its_own_examples_whatever_its_request_claims(device):
    server, tokens, files = device
    initial = RoundWorker().initial_adapter(RUN_CONFIG)
    # Node 0 claims node 1's partition and file: the trainer trains node 0's.
    reply, adapter = _train(server, tokens[0], NodeData(5, PARTITIONS, str(files[1])), initial)
    assert reply["metrics"]["num-examples"] == 7
    own, metrics = RoundWorker().train(TrainRequest(RUN_CONFIG, NodeData(3, PARTITIONS, str(files[0])), 1, 5e-5, 1.0), initial)
    assert reply["metrics"]["train-loss"] == metrics["train-loss"]
    assert all(np.array_equal(adapter[k], own[k]) for k in own)
    reply, _ = _train(server, tokens[1], NodeData(3, PARTITIONS, str(files[0])), initial)  # and node 1 gets its own
    assert reply["metrics"]["num-examples"] == 11
    assert reply["trainer_id"] == f"device:cpu:{os.getpid()}"


def test_requests_without_a_registered_token_are_refused(device, tmp_path):
    server, _, files = device
    initial = RoundWorker().initial_adapter(RUN_CONFIG)
    header = {"op": "train", "run_config": RUN_CONFIG, "node": vars(NodeData(3, PARTITIONS, str(files[0]))), "server_round": 1,
              "lr": 5e-5, "proximal_mu": 1.0}
    with pytest.raises(RuntimeError, match="the request has no token"):
        call_trainer(str(server.path), header, initial, 5.0, 600.0)
    with pytest.raises(RuntimeError, match="does not know this SuperNode's token"):
        call_trainer(str(server.path), dict(header, token="0" * 64), initial, 5.0, 600.0)
    with pytest.raises(RuntimeError, match="does not know"):
        call_trainer(str(server.path), {"op": "init", "run_config": RUN_CONFIG, "token": "f" * 64}, None, 5.0, 600.0)


def test_a_registered_data_path_outside_the_read_dirs_is_refused(device, tmp_path, monkeypatch):
    from app.node.read_policy import READ_DIRS_ENV

    server, tokens, _ = device
    monkeypatch.setenv(READ_DIRS_ENV, str(tmp_path / "elsewhere"))
    with pytest.raises(RuntimeError, match="node data-path .* is outside the directories this node may read"):
        _train(server, tokens[0], NodeData(3, PARTITIONS), RoundWorker().initial_adapter(RUN_CONFIG))


def test_tokens_are_private_and_the_registry_holds_only_their_digests(tmp_path):
    registry, tokens = issue_tokens(tmp_path / "t", {i: Binding(i, 3) for i in range(3)})
    assert sorted(p.name for p in tokens.values()) == ["token-0", "token-1", "token-2"]
    tokens = list(tokens.values())
    texts = [path.read_text().strip() for path in tokens]
    assert len(set(texts)) == 3 and all(len(t) == 64 for t in texts)
    for path in (registry, *tokens):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "t").stat().st_mode) == 0o700
    raw = registry.read_text()
    assert not any(t in raw for t in texts)
    loaded = NodeRegistry.load(registry)
    assert {loaded.node_for(t).partition_id for t in texts} == {0, 1, 2}
    assert set(loaded.nodes) == {token_digest(t) for t in texts}


def test_a_bad_token_file_is_named(tmp_path):
    path = tmp_path / "token"
    path.write_text("not-a-token\n")
    with pytest.raises(ValueError, match=f"{TOKEN_ENV} file {path}: expected 64 hex digits"):
        read_token({TOKEN_ENV: str(path)})
    assert read_token({}) is None


@pytest.mark.parametrize("content, field", [
    ("not json", "cannot read it as JSON"),
    ("[]", "expected an object with `nodes`"),
    (json.dumps({"nodes": {"abc": {}}}), "expected a key of 64 hex digits"),
    (json.dumps({"nodes": {"a" * 64: {"partition-id": 20, "num-partitions": 20}}}), "0 <= partition-id < num-partitions"),
    (json.dumps({"nodes": {"a" * 64: {"partition-id": 1, "num-partitions": 20, "data-path": 3}}}), "data-path: expected a string"),
    (json.dumps({"nodes": {}, "preload": "profile=tiny"}), "preload: expected a run config object, got str"),
])
def test_a_bad_registry_names_the_file_and_field(tmp_path, content, field):
    path = tmp_path / "registry.json"
    path.write_text(content)
    with pytest.raises(RegistryError, match=f"trainer registry {path}.*{field}"):
        NodeRegistry.load(path)


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=70),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=70), inner, max_size=3), max_leaves=12)


@given(nodes=st.dictionaries(st.text(alphabet="0123456789abcdef", min_size=63, max_size=65) | st.text(max_size=5), _JSON, max_size=4))
@hsettings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_registry_loads_or_is_refused_with_a_registry_error(tmp_path, nodes):
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"nodes": nodes}))
    try:
        loaded = NodeRegistry.load(path)
    except RegistryError as exc:
        assert str(path) in str(exc)
        return
    for binding in loaded.nodes.values():
        assert 0 <= binding.partition_id < binding.num_partitions and isinstance(binding.data_path, str)


def test_the_clientapp_sends_its_token_and_the_reply_names_the_trainer(device, monkeypatch):
    """Through the ClientApp: node 0's round, run by the device trainer, comes back to the
    ServerApp naming that trainer; the ServerApp keeps a well-formed trainer id only."""
    import app.client_app as client_app
    from app.aggregation.replies import check_reply, reply_trainer_id
    from app import comm
    from app.config import load_settings
    from tests.test_resident import _train_message

    server, tokens, _ = device
    initial = RoundWorker().initial_adapter(RUN_CONFIG)
    monkeypatch.setenv(SOCKET_ENV, str(server.path))
    monkeypatch.setenv(TOKEN_ENV, str(tokens[0]))
    msg, context = _train_message(initial)
    reply = client_app.train(msg, context)
    check_reply(reply, comm.shapes_of(initial), load_settings(RUN_CONFIG).comm.format, 600)
    assert reply.content["metrics"]["num-examples"] == 7 and reply.content["metrics"]["resident"] == 1.0
    assert reply_trainer_id(reply) == server.trainer_id
    monkeypatch.setenv(SOCKET_ENV, str(server.path) + ".gone")  # trainer unreachable: the ClientApp trains itself
    reply = client_app.train(*_train_message(initial))
    assert reply_trainer_id(reply) == f"node:cpu:in-process"


@pytest.mark.parametrize("record", [
    {"trainer-id": "device:gpu0:123\n<script>"}, {"trainer-id": "x" * 500}, {"trainer-id": 7},
    {"trainer-id": "device:gpu0:1", "more": "x"}, {"other": "device:gpu0:1"}, None,
])
def test_a_malformed_trainer_id_is_dropped(record):
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from app.aggregation.replies import reply_trainer_id

    content = {"metrics": MetricRecord({"resident": 1.0})}
    if record is not None:
        content["trainer"] = ConfigRecord(record)
    msg = Message(RecordDict(content), dst_node_id=7, message_type="train")
    assert reply_trainer_id(msg) is None
    msg = Message(RecordDict(dict(content, trainer=ConfigRecord({"trainer-id": "device:gpu0:123"}))), dst_node_id=7, message_type="train")
    assert reply_trainer_id(msg) == "device:gpu0:123"


def test_a_preloaded_trainer_serves_its_first_request_without_loading(tmp_path, capfd):
    """The launcher names the run in the registry: the trainer loads its model at start, and a
    request that comes meanwhile waits its turn instead of loading a second time."""
    registry, tokens = issue_tokens(tmp_path / "t", {0: Binding(3, PARTITIONS)}, preload=RUN_CONFIG)
    loaded = NodeRegistry.load(registry)
    assert loaded.preload == RUN_CONFIG
    server = TrainerServer(tmp_path / "t" / "s.sock", "device", loaded)
    server.preload(loaded.preload)
    assert server._busy is not None  # loading, before any request
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        token = read_token({TOKEN_ENV: str(tokens[0])})
        _, adapter = call_trainer(str(server.path), {"op": "init", "run_config": RUN_CONFIG, "token": token}, None, 5.0, 600.0)
        reference = RoundWorker().initial_adapter(RUN_CONFIG)
        assert all(np.array_equal(adapter[k], reference[k]) for k in reference)
        assert capfd.readouterr().err.count("fedtune-model loading tiny") == 2  # the trainer's once, the reference's
    finally:
        server.stop()
        thread.join(timeout=5)


def test_reissued_tokens_are_honoured_by_a_running_trainer(tmp_path):
    """`docker compose up` again reissues every token while a trainer container may keep running."""
    registry, tokens = issue_tokens(tmp_path / "t", {0: Binding(3, PARTITIONS)})
    loaded = NodeRegistry.load(registry)
    old = read_token({TOKEN_ENV: str(tokens[0])})
    assert loaded.node_for(old).partition_id == 3
    issue_tokens(tmp_path / "t", {0: Binding(3, PARTITIONS)})
    new = read_token({TOKEN_ENV: str(tokens[0])})
    assert loaded.node_for(new).partition_id == 3
    with pytest.raises(PermissionError):
        loaded.node_for(old)
    registry.write_text("{broken")  # a bad rewrite keeps the last good registry
    assert loaded.node_for(new).partition_id == 3


def test_a_preload_that_fails_leaves_the_trainer_serving(tmp_path, caplog):
    server = TrainerServer(tmp_path / "s.sock", "device", NodeRegistry({}))
    server.preload({"profile": "tiny", "train.seq-length": -1})  # refused by the configuration
    deadline = time.monotonic() + 30
    while server._queue and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not server._queue and server._busy is None
    assert "preloading the model failed; the first request loads it" in caplog.text
    server.stop()


def test_a_supernode_of_a_device_trainer_starts_no_trainer_and_passes_its_token(tmp_path, monkeypatch):
    from app.training.trainer_service import run_supernode

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "flower-supernode"
    # The fake SuperNode reports what its ClientApps would inherit, and which processes run beside it.
    fake.write_text(f'#!/bin/sh\necho "${SOCKET_ENV} ${TOKEN_ENV}" > {tmp_path}/env\nps -o args= --ppid $PPID > {tmp_path}/siblings\nexit 0\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    socket_path, token = tmp_path / "device" / "trainer.sock", tmp_path / "token-3"
    assert run_supernode(["--insecure"], str(socket_path), str(token)) == 0
    assert (tmp_path / "env").read_text().split() == [str(socket_path), str(token)]
    assert "trainer_service serve" not in (tmp_path / "siblings").read_text()  # the device's trainer is not this node's
    assert run_supernode(["--insecure"], None, str(token)) == 2  # a token without the device trainer's socket


class _RecordingWorker:
    def __init__(self):
        self.calls = []

    def train(self, request, tensors, release_memory=True):
        self.calls.append(("train", release_memory))
        return {}, {"train-loss": 1.0}

    def release_memory(self):
        self.calls.append(("release", None))


def test_the_trainer_gives_its_cached_gpu_memory_back_after_replying_and_only_when_nobody_waits(tmp_path):
    """Giving the activations' memory back after every client and allocating it again for the
    next was part of a device round's gaps, and releasing before the reply delayed the round's
    last update: a trainer releases after its reply, when no request is queued."""
    server = TrainerServer(tmp_path / "t.sock", "device")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server._worker = worker = _RecordingWorker()
    header = {"op": "train", "run_config": RUN_CONFIG, "node": vars(NodeData(0, PARTITIONS)), "server_round": 1, "lr": 5e-5, "proximal_mu": 1.0}
    blocker = object()
    with server._turns:
        server._queue.append(blocker)  # a request running: the next one waits behind it
    replies = []
    client = threading.Thread(target=lambda: replies.append(call_trainer(str(server.path), header, None, 5.0, 60.0)))
    client.start()
    time.sleep(0.5)
    server._leave_queue(blocker)
    client.join(timeout=10)
    deadline = time.monotonic() + 5
    while len(worker.calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.stop()
    assert replies and replies[0][0]["metrics"] == {"train-loss": 1.0}
    assert worker.calls == [("train", False), ("release", None)]
    with server._turns:
        server._queue.append(blocker)
    server._release_when_idle()  # a request in the queue: its training reuses the memory
    assert worker.calls == [("train", False), ("release", None)]


def test_a_request_s_turn_brackets_its_training_and_memory_is_released_only_when_asked(monkeypatch):
    from app.training import worker as worker_module

    released = []
    monkeypatch.setattr(worker_module, "_release_cached_memory", lambda: released.append(True))
    worker = RoundWorker()
    initial = worker.initial_adapter(RUN_CONFIG)
    released.clear()  # loading the model gives its transient buffers back
    for release in (False, True):
        _, m = worker.train(TrainRequest(RUN_CONFIG, NodeData(3, PARTITIONS), 1, 5e-5, 1.0), initial, release_memory=release)
        assert m["t-turn-start"] <= m["t-train-start"] < m["t-train-end"] <= m["t-turn-end"]
    assert released == [True]
