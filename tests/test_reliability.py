"""Lost replies, too-few-replies policies and resume, through the real ServerApp `main` with an
in-memory grid (no processes): each node of the grid runs the real ClientApp code in this process,
or a stand-in reply where training itself does not matter."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.supercore.task_identity import TaskIdentity

import app.client_app as client_app
from app import comm, server_app
from app.checkpoint import RUN_STATE, CheckpointError, load_adapter_tensors
from app.server_app import TooFewReplies, sample_nodes
from app.worker import RoundWorker

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

    def get_nodes(self):
        # SuperLink order is arbitrary: the ServerApp must not depend on it.
        return random.sample([NodeInfo(node_id=n, name=name) for n, name in self.nodes.items()], len(self.nodes))

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # as the SuperLink does on push
            node = msg.metadata.dst_node_id
            context = Context(run_id=1, node_id=node, node_config={"partition-id": self.partition[node], "num-partitions": len(self.nodes)},
                              state=RecordDict(), run_config=self.run_config)
            if msg.metadata.message_type == "query.init":
                replies.append(client_app.initial_adapter(msg, context))
                continue
            server_round = int(msg.content["config"]["server-round"])
            if server_round == self.crash_at_round:
                raise KeyboardInterrupt("ServerApp killed")
            attempt = self.attempts[server_round] = self.attempts.get(server_round, -1) + (msg is messages[0])
            self.sent.append((server_round, self.nodes[node]))
            fault = self.fault(self.nodes[node], server_round, attempt)
            if fault == "drop":
                continue
            if fault == "lost":
                replies.append(create_message_error_unavailable_res_message(msg.metadata, "node_unavail"))
            elif fault == "error":
                replies.append(Message(Error(code=2, reason="ClientApp raised"), reply_to=msg))
            else:
                replies.append(self.client(msg, context))
        return replies


def fake_client(msg: Message, context: Context) -> Message:
    """A reply without training: the global adapter plus the partition id, 10 * (p + 1) examples."""
    p = int(context.node_config["partition-id"])
    state = {k: v + p for k, v in comm.decode(msg.content["arrays"]).items()}
    metrics = {"partition-id": float(p), "train-loss": 1.0 + p, "proximal-term": 0.0, "num-examples": 10.0 * (p + 1),
               "train-seconds": 0.0, "clientapp-seconds": 0.0, "model-load-seconds": 0.0, "resident": 0.0}
    return Message(RecordDict({"arrays": comm.encode(state, "bfloat16"), "metrics": MetricRecord(metrics)}), reply_to=msg)


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK, 0


@pytest.fixture
def fast_init(monkeypatch):
    """A small adapter from query.init without building a model."""
    state = {"base_model.model.layer.lora_A.weight": np.zeros((2, 4), np.float32), "base_model.model.layer.lora_B.weight": np.ones((4, 2), np.float32)}

    def initial_adapter(msg, context):
        return Message(RecordDict({"arrays": comm.encode(state, "float32")}), reply_to=msg)

    monkeypatch.setattr(client_app, "initial_adapter", initial_adapter)
    return state


def run_main(grid: InMemoryGrid, run_id: int) -> Path:
    server_app.main(grid, Context(run_id=run_id, node_id=SUPERLINK, node_config={}, state=RecordDict(), run_config=grid.run_config))
    return Path(grid.run_config["results.dir"]) / f"run-{run_id}"


def _config(tmp_path: Path, **extra) -> dict:
    return {"profile": "tiny", "results.dir": str(tmp_path), "dataset.num-partitions": 4, "strategy.fraction-train": 0.5,
            "strategy.round-timeout": 5.0, **extra}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


NAMES = [f"supernode-{i}" for i in range(4)]


def test_sample_depends_only_on_seed_round_attempt_and_names():
    nodes = [NodeInfo(node_id=100 + i, name=f"supernode-{i}") for i in range(6)]
    renumbered = [NodeInfo(node_id=900 - i, name=f"supernode-{i}") for i in range(6)]  # a new launch: new ids
    first = [n.name for n in sample_nodes(random.sample(nodes, 6), 3, 42, 5, 0)]
    random.seed(123)  # the global generator's history must not matter
    assert [n.name for n in sample_nodes(renumbered[::-1], 3, 42, 5, 0)] == first
    others = {tuple(n.name for n in sample_nodes(nodes, 3, 42, r, a)) for r in range(1, 6) for a in range(2)}
    assert len(others) > 3  # rounds and retries draw different nodes


@pytest.fixture
def real_training(monkeypatch):
    """The real ClientApp in this process, one warm RoundWorker per partition (the resident path's
    results equal the in-process path's: tests/test_resident.py)."""
    workers: dict[int, RoundWorker] = {}

    def client(msg, context):
        p = int(context.node_config["partition-id"])
        monkeypatch.setattr(client_app, "RoundWorker", lambda: workers.setdefault(p, RoundWorker()))
        return client_app.train(msg, context)

    monkeypatch.setenv("FEDTUNE_TRAINER__RESIDENT", "false")
    return client


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, real_training):
    rounds = 4
    config = _config(tmp_path, **{"num-server-rounds": rounds})
    full = run_main(InMemoryGrid(NAMES, config, real_training), run_id=11)

    crashed_grid = InMemoryGrid(NAMES, config, real_training, id_base=5000)
    crashed_grid.crash_at_round = 3  # the ServerApp dies during round 3
    with pytest.raises(KeyboardInterrupt):
        run_main(crashed_grid, run_id=12)
    crashed = tmp_path / "run-12"
    assert [r["round"] for r in _metrics(crashed)] == [1, 2] and not (crashed / "peft_3").exists()

    resumed_grid = InMemoryGrid(NAMES, dict(config, **{"resume-from": str(crashed / "peft_2")}), real_training, id_base=9000)
    resumed = run_main(resumed_grid, run_id=13)

    final, reference = load_adapter_tensors(resumed / f"peft_{rounds}"), load_adapter_tensors(full / f"peft_{rounds}")
    assert final.keys() == reference.keys() and all(np.array_equal(final[k], reference[k]) for k in final)
    assert {r for r, _ in resumed_grid.sent} == {3, 4}  # rounds 1-2 were not trained again
    ours, theirs = _metrics(resumed), _metrics(full)
    assert [r["round"] for r in ours] == list(range(1, rounds + 1))
    for a, b in zip(ours, theirs, strict=True):  # same LR, same nodes, same budget
        assert a["lr"] == b["lr"] and a["cumulative_mib"] == b["cumulative_mib"]
        assert [c["partition_id"] for c in a["clients"]] == [c["partition_id"] for c in b["clients"]]
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["resumed_from"] == str(crashed / "peft_2") and summary["rounds_completed"] == rounds
    assert json.loads((resumed / f"peft_{rounds}" / RUN_STATE).read_text())["round"] == rounds


def test_lost_replies_aggregate_the_others_and_count_only_moved_bytes(tmp_path, fast_init):
    config = _config(tmp_path, **{"num-server-rounds": 1, "strategy.fraction-train": 1.0})
    faults = {"supernode-1": "drop", "supernode-2": "lost"}
    run = run_main(InMemoryGrid(NAMES, config, fake_client, lambda name, r, a: faults.get(name)), run_id=21)
    [record] = _metrics(run)
    per_transfer = comm.record_bytes(comm.encode(fast_init, "bfloat16"))
    assert record["status"] == "aggregated" and record["failures"] == 2
    assert sorted(f["node"] for f in record["failed"]) == ["supernode-1", "supernode-2"]
    assert "round-timeout" in str(record["failed"]) and "Node Unavailable" in str(record["failed"])
    assert sorted(c["partition_id"] for c in record["clients"]) == [0, 3]
    assert record["bytes_down"] == record["bytes_up"] == 2 * per_transfer
    assert record["bytes_down_unconfirmed"] == 2 * per_transfer
    assert record["cumulative_mib"] * 2**20 == record["bytes_round"] == 4 * per_transfer
    # Weights over the replies that arrived only: partitions 0 and 3 with 10 and 40 examples.
    final = load_adapter_tensors(run / "peft_1")
    key = next(iter(fast_init))
    assert np.allclose(final[key], fast_init[key] + (0 * 10 + 3 * 40) / 50)
    assert json.loads((run / "summary.json").read_text())["failures"] == 2


def test_too_few_replies_are_skipped_never_aggregated(tmp_path, fast_init):
    config = _config(tmp_path, **{"num-server-rounds": 3, "strategy.min-replies": 2, "strategy.on-too-few-replies": "skip"})
    grid = InMemoryGrid(NAMES, config, fake_client, lambda name, r, a: "error" if r == 2 and name != "supernode-0" else None)
    run = run_main(grid, run_id=31)
    records = _metrics(run)
    assert [r["status"] for r in records] == ["aggregated", "skipped", "aggregated"]
    assert records[1]["attempts"] == 1 and records[1]["train_loss"] is None and records[1]["clients"] == []
    peft1, peft2 = load_adapter_tensors(run / "peft_1"), load_adapter_tensors(run / "peft_2")
    assert all(np.array_equal(peft1[k], peft2[k]) for k in peft1)  # skipped: global adapter unchanged
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds_skipped"] == [2] and summary["rounds_aggregated"] == 2 and summary["final_adapter"]


def test_too_few_replies_are_retried_with_a_new_sample(tmp_path, fast_init):
    config = _config(tmp_path, **{"num-server-rounds": 1, "strategy.min-replies": 2, "strategy.max-retries": 2})
    grid = InMemoryGrid(NAMES, config, fake_client, lambda name, r, a: "drop" if a == 0 else None)
    [record] = _metrics(run_main(grid, run_id=41))
    assert record["status"] == "aggregated" and record["attempts"] == 2 and record["failures"] == 2
    assert len(record["clients"]) == 2 and len(grid.sent) == 4

    always = InMemoryGrid(NAMES, dict(config, **{"results.dir": str(tmp_path / "b")}), fake_client, lambda *a: "drop")
    [record] = _metrics(run_main(always, run_id=42))
    assert record["status"] == "skipped" and record["attempts"] == 3 and record["failures"] == 6


def test_too_few_replies_can_stop_the_run_resumably(tmp_path, fast_init):
    config = _config(tmp_path, **{"num-server-rounds": 3, "strategy.on-too-few-replies": "fail"})
    grid = InMemoryGrid(NAMES, config, fake_client, lambda name, r, a: "drop" if r == 2 else None)
    with pytest.raises(TooFewReplies, match="strategy.min-replies=1"):
        run_main(grid, run_id=51)
    run = tmp_path / "run-51"
    assert [r["status"] for r in _metrics(run)] == ["aggregated", "failed"]
    summary = json.loads((run / "summary.json").read_text())
    assert "round 2" in summary["stopped"] and summary["rounds_completed"] == 1 and (run / "peft_1" / RUN_STATE).is_file()


@pytest.fixture
def checkpoint_run(tmp_path, fast_init):
    config = _config(tmp_path, **{"num-server-rounds": 3})
    grid = InMemoryGrid(NAMES, config, fake_client)
    grid.crash_at_round = 2
    with pytest.raises(KeyboardInterrupt):
        run_main(grid, run_id=61)
    return config, tmp_path / "run-61" / "peft_1"


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"model.lora.peft-lora-r": 4}, "model.lora.peft-lora-r: checkpoint 8, this run 4"),
        ({"num-server-rounds": 5}, "num-server-rounds: checkpoint 3, this run 5"),
        ({"model.name": "other"}, "model.name: checkpoint 'tiny', this run 'other'"),
    ],
)
def test_resume_refuses_a_different_run(checkpoint_run, fast_init, change, fragment):
    config, peft = checkpoint_run
    grid = InMemoryGrid(NAMES, dict(config, **change, **{"resume-from": str(peft)}), fake_client)
    with pytest.raises(CheckpointError, match="differs in") as info:
        run_main(grid, run_id=62)
    assert fragment in str(info.value) and grid.sent == []


def test_resume_names_what_is_wrong_with_the_checkpoint(checkpoint_run, fast_init):
    config, peft = checkpoint_run

    def resume(path, run_id):
        return run_main(InMemoryGrid(NAMES, dict(config, **{"resume-from": str(path)}), fake_client), run_id=run_id)

    bad = peft.parent / "peft_bad"
    shutil.copytree(peft, bad)
    config_path = bad / "adapter_config.json"
    config_path.write_text(json.dumps(dict(json.loads(config_path.read_text()), r=16, target_modules=["k_proj"])))
    with pytest.raises(CheckpointError) as info:
        resume(bad, 71)
    assert "r: expected 8, found 16" in str(info.value) and "target_modules: expected ['q_proj', 'v_proj'], found ['k_proj']" in str(info.value)

    shutil.rmtree(bad)
    shutil.copytree(peft, bad)
    (bad / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="adapter_model.safetensors: not a readable safetensors file"):
        resume(bad, 72)

    (bad / RUN_STATE).unlink()
    with pytest.raises(CheckpointError, match=f"no {RUN_STATE}"):
        resume(bad, 73)
    with pytest.raises(CheckpointError, match="not a directory"):
        resume(peft.parent / "peft_9", 74)

    other = peft.parent / "peft_other"  # same run, but tensors the nodes do not have
    shutil.copytree(peft, other)
    from safetensors.numpy import save_file

    save_file({"base_model.model.layer.lora_A.weight": np.zeros((3, 4), np.float32)}, str(other / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        resume(other, 75)
    assert "lora_B.weight" in str(info.value) and "expected (2, 4), found (3, 4)" in str(info.value)


def test_unwritable_results_dir_fails_before_any_node_works(tmp_path, fast_init):
    blocker = tmp_path / "a-file"  # a path under a regular file cannot be created, even by root
    blocker.write_text("")
    grid = InMemoryGrid(NAMES, _config(blocker / "results"), fake_client)
    with pytest.raises(PermissionError, match="results.dir .*a-file/results.*: cannot write"):
        run_main(grid, run_id=81)
    assert grid.sent == []


def test_local_up_refuses_a_mismatched_checkpoint_before_starting(tmp_path, checkpoint_run, capsys):
    from argparse import Namespace

    from app.deploy.launcher import local_up

    _, peft = checkpoint_run
    results = tmp_path / "launch"
    args = Namespace(profile="tiny", rounds=3, data=None, results=str(results), gpus="", supernodes=4, insecure=True, connect_timeout=1.0,
                     run_config=f"resume-from={peft} strategy.fraction-train=0.5 model.lora.peft-lora-r=4")
    assert local_up(args) == 2
    assert "model.lora.peft-lora-r: checkpoint 8, this run 4" in capsys.readouterr().err
    assert not results.exists()  # nothing started, nothing written


def test_resume_after_a_crash_that_cut_a_metrics_line_short(checkpoint_run, fast_init, caplog):
    config, peft = checkpoint_run
    metrics = peft.parent / "metrics.jsonl"
    with open(metrics, "a") as handle:
        handle.write('{"round": 2, "status": "aggr')  # killed while writing round 2's line
    run = run_main(InMemoryGrid(NAMES, dict(config, **{"resume-from": str(peft)}), fake_client), run_id=91)
    assert [r["round"] for r in _metrics(run)] == [1, 2, 3]
    assert json.loads((run / "summary.json").read_text())["rounds_completed"] == 3
    assert f"{metrics}: skipped 1 unreadable line(s) (the last one unfinished" in caplog.text
