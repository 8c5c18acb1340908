"""Lost replies, too-few-replies policies and resume, through the real ServerApp `main` with an
in-memory grid (no processes): each node of the grid runs the real ClientApp code in this process,
or a stand-in reply where training itself does not matter."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.proto.node_pb2 import NodeInfo

import app.client_app as client_app
from app import comm, server_app
from app.results.checkpoint import RUN_STATE, CheckpointError, load_adapter_tensors
from app.server_app import RunFailed, TooFewReplies, sample_nodes
from app.training.worker import RoundWorker
from fake_grid import (FAKE_STEP, InMemoryGrid, fake_client, fast_init, initial_state, metrics_of, reply_with, run_main,  # noqa: F401 (fixtures)
                       task_identity, tiny_config)



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
    config = tiny_config(tmp_path, **{"num-server-rounds": rounds})
    full = run_main(InMemoryGrid(NAMES, config, real_training), run_id=11)

    crashed_grid = InMemoryGrid(NAMES, config, real_training, id_base=5000)
    crashed_grid.crash_at_round = 3  # the ServerApp dies during round 3
    with pytest.raises(KeyboardInterrupt):
        run_main(crashed_grid, run_id=12)
    crashed = tmp_path / "run-12"
    assert [r["round"] for r in metrics_of(crashed)] == [1, 2] and not (crashed / "peft_3").exists()

    resumed_grid = InMemoryGrid(NAMES, dict(config, **{"resume-from": str(crashed / "peft_2")}), real_training, id_base=9000)
    resumed = run_main(resumed_grid, run_id=13)

    final, reference = load_adapter_tensors(resumed / f"peft_{rounds}"), load_adapter_tensors(full / f"peft_{rounds}")
    assert final.keys() == reference.keys() and all(np.array_equal(final[k], reference[k]) for k in final)
    assert {r for r, _ in resumed_grid.sent} == {3, 4}  # rounds 1-2 were not trained again
    ours, theirs = metrics_of(resumed), metrics_of(full)
    # Honest training at the tiny profile's learning rates: the default norm bound clips nothing.
    assert all(c["update_scale"] == 1.0 and c["update_norm"] < 0.5 * r["norm_bound"] for r in theirs for c in r["clients"])
    assert [r["round"] for r in ours] == list(range(1, rounds + 1))
    for a, b in zip(ours, theirs, strict=True):  # same LR, same nodes, same budget
        assert a["lr"] == b["lr"] and a["cumulative_mib"] == b["cumulative_mib"]
        assert [c["partition_id"] for c in a["clients"]] == [c["partition_id"] for c in b["clients"]]
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["resumed_from"] == str(crashed / "peft_2") and summary["rounds_completed"] == rounds
    assert json.loads((resumed / f"peft_{rounds}" / RUN_STATE).read_text())["round"] == rounds


def test_lost_replies_aggregate_the_others_and_count_only_moved_bytes(tmp_path, fast_init):
    config = tiny_config(tmp_path, **{"num-server-rounds": 1, "strategy.fraction-train": 1.0})
    faults = {"supernode-1": "drop", "supernode-2": "lost"}
    run = run_main(InMemoryGrid(NAMES, config, fake_client, lambda name, r, a: faults.get(name)), run_id=21)
    [record] = metrics_of(run)
    fmt = client_app.load_settings(config).comm.format
    down = comm.transfer_bytes(comm.shapes_of(fast_init), comm.download_format(fmt))
    up = comm.transfer_bytes(comm.shapes_of(fast_init), fmt)
    assert record["status"] == "aggregated" and record["failures"] == 2
    assert sorted(f["node"] for f in record["failed"]) == ["supernode-1", "supernode-2"]
    assert "round-timeout" in str(record["failed"]) and "Node Unavailable" in str(record["failed"])
    assert sorted(c["partition_id"] for c in record["clients"]) == [0, 3]
    assert record["bytes_down"] == 2 * down and record["bytes_up"] == 2 * up
    assert record["bytes_down_unconfirmed"] == 2 * down
    assert record["cumulative_mib"] * 2**20 == record["bytes_round"] == 2 * (down + up)
    # Weights over the replies that arrived only: partitions 0 and 3 with 10 and 40 examples.
    final = load_adapter_tensors(run / "peft_1")
    key = next(iter(fast_init))
    assert np.allclose(final[key], fast_init[key] + FAKE_STEP * (0 * 10 + 3 * 40) / 50)
    assert json.loads((run / "summary.json").read_text())["failures"] == 2


def test_too_few_replies_are_skipped_never_aggregated(tmp_path, fast_init):
    config = tiny_config(tmp_path, **{"num-server-rounds": 3, "strategy.min-replies": 2, "strategy.on-too-few-replies": "skip"})
    grid = InMemoryGrid(NAMES, config, fake_client, lambda name, r, a: "error" if r == 2 and name != "supernode-0" else None)
    run = run_main(grid, run_id=31)
    records = metrics_of(run)
    assert [r["status"] for r in records] == ["aggregated", "skipped", "aggregated"]
    assert records[1]["attempts"] == 1 and records[1]["train_loss"] is None and records[1]["clients"] == []
    peft1, peft2 = load_adapter_tensors(run / "peft_1"), load_adapter_tensors(run / "peft_2")
    assert all(np.array_equal(peft1[k], peft2[k]) for k in peft1)  # skipped: global adapter unchanged
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds_skipped"] == [2] and summary["rounds_aggregated"] == 2 and summary["final_adapter"]


def test_too_few_replies_are_retried_with_a_new_sample(tmp_path, fast_init):
    config = tiny_config(tmp_path, **{"num-server-rounds": 1, "strategy.min-replies": 2, "strategy.max-retries": 2})
    grid = InMemoryGrid(NAMES, config, fake_client, lambda name, r, a: "drop" if a == 0 else None)
    [record] = metrics_of(run_main(grid, run_id=41))
    assert record["status"] == "aggregated" and record["attempts"] == 2 and record["failures"] == 2
    assert len(record["clients"]) == 2 and len(grid.sent) == 4

    always = InMemoryGrid(NAMES, dict(config, **{"results.dir": str(tmp_path / "b")}), fake_client, lambda *a: "drop")
    with pytest.raises(RunFailed, match="no round aggregated"):  # the run trained nothing: it failed
        run_main(always, run_id=42)
    [record] = metrics_of(tmp_path / "b" / "run-42")
    assert record["status"] == "skipped" and record["attempts"] == 3 and record["failures"] == 6


def test_too_few_replies_can_stop_the_run_resumably(tmp_path, fast_init):
    config = tiny_config(tmp_path, **{"num-server-rounds": 3, "strategy.on-too-few-replies": "fail"})
    grid = InMemoryGrid(NAMES, config, fake_client, lambda name, r, a: "drop" if r == 2 else None)
    with pytest.raises(TooFewReplies, match="strategy.min-replies=1"):
        run_main(grid, run_id=51)
    run = tmp_path / "run-51"
    assert [r["status"] for r in metrics_of(run)] == ["aggregated", "failed"]
    summary = json.loads((run / "summary.json").read_text())
    assert "round 2" in summary["stopped"] and summary["rounds_completed"] == 1 and (run / "peft_1" / RUN_STATE).is_file()


@pytest.fixture
def checkpoint_run(tmp_path, fast_init):
    config = tiny_config(tmp_path, **{"num-server-rounds": 3})
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

    key = next(iter(fast_init))
    save_file({key: np.zeros((3, 4), np.float32)}, str(other / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        resume(other, 75)
    assert "lora_B.weight" in str(info.value) and f"expected {fast_init[key].shape}, found (3, 4)" in str(info.value)


def test_unwritable_results_dir_fails_before_any_node_works(tmp_path, fast_init):
    blocker = tmp_path / "a-file"  # a path under a regular file cannot be created, even by root
    blocker.write_text("")
    grid = InMemoryGrid(NAMES, tiny_config(blocker / "results"), fake_client)
    with pytest.raises(PermissionError, match="results.dir .*a-file/results.*: cannot write"):
        run_main(grid, run_id=81)
    assert grid.sent == []


def test_local_up_refuses_a_mismatched_checkpoint_before_starting(tmp_path, checkpoint_run, capsys):
    from argparse import Namespace

    from app.deploy.launcher import local_up

    _, peft = checkpoint_run
    results = tmp_path / "launch"
    args = Namespace(profile="tiny", rounds=3, data=None, results=str(results), gpus="", supernodes=4, insecure=True, connect_timeout=1.0, resume_from="",
                     run_config=f"resume-from={peft} strategy.fraction-train=0.5 model.lora.peft-lora-r=4")
    assert local_up(args) == 2
    assert "model.lora.peft-lora-r: checkpoint 8, this run 4" in capsys.readouterr().err
    assert not results.exists()  # nothing started, nothing written


def _bad_reply(kind: str):
    """A stand-in client whose reply from supernode-1 is bad in one way; the others are fine."""

    def client(msg: Message, context: Context) -> Message:
        if context.node_config["partition-id"] != 1:
            return fake_client(msg, context)
        good = fake_client(msg, context)
        fmt = client_app.load_settings(dict(context.run_config)).comm.format
        update = comm.decode(good.content["arrays"], good.content["wire"])
        metrics = dict(good.content["metrics"])
        key = next(iter(update))
        if kind == "broadcast-shape":
            update[key] = np.ones((1,), np.float32)
        elif kind == "nan-update":
            update[key] = np.full_like(update[key], np.nan)
        elif kind == "missing-tensor":
            del update[key]
        elif kind == "wrong-format":
            fmt = "float32"
        elif kind == "oversized":
            arrays, wire = comm.encode(update, fmt, comm.UPDATE)
            data = arrays[comm.PACKED_KEY].data + b"\x00" * 4096
            arrays = ArrayRecord({comm.PACKED_KEY: Array(dtype="uint8", shape=(len(data),), stype=comm.RAW_STYPE, data=data)})
            return Message(RecordDict({"arrays": arrays, "wire": wire, "metrics": MetricRecord(metrics)}), reply_to=msg)
        elif kind == "swapped-records":
            arrays, wire = comm.encode(update, fmt, comm.UPDATE)
            return Message(RecordDict({"arrays": wire, "wire": wire, "metrics": MetricRecord(metrics)}), reply_to=msg)
        elif kind == "no-metrics":
            arrays, wire = comm.encode(update, fmt, comm.UPDATE)
            return Message(RecordDict({"arrays": arrays, "wire": wire}), reply_to=msg)
        else:  # a metric: name=value
            name, value = kind.split("=")
            metrics[name] = float(value)
        return reply_with(msg, update, metrics, fmt)

    return client


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("broadcast-shape", "shape [1]"),
        ("nan-update", "non-finite values"),
        ("missing-tensor", "tensors differ: missing"),
        ("wrong-format", "format 'float32', expected"),
        ("oversized", "expected uint8/raw.le of"),
        ("no-metrics", "reply lacks ['metrics']"),
        ("swapped-records", "reply records ['arrays'] are not of the expected kinds"),
        ("num-examples=nan", "metric 'num-examples' is not a finite number"),
        ("num-examples=1e30", "num-examples 1000000000000000019884624838656 exceeds the bound 600"),
        ("num-examples=2.5", "num-examples 2.5 is not a positive integer"),
        ("num-examples=-20", "is not a positive integer"),
        ("train-loss=inf", "metric 'train-loss' is not a finite number"),
    ],
)
def test_a_bad_reply_is_a_failed_node_never_an_aggregate(tmp_path, fast_init, kind, reason):
    config = tiny_config(tmp_path, **{"num-server-rounds": 2, "strategy.fraction-train": 1.0})
    run = run_main(InMemoryGrid(NAMES, config, _bad_reply(kind)), run_id=91)
    records = metrics_of(run)
    assert [r["status"] for r in records] == ["aggregated", "aggregated"]  # the run goes on with the others
    for record in records:
        [failure] = record["failed"]
        assert failure["node"] == "supernode-1" and "refused" in failure["reason"] and reason in failure["reason"], failure
        assert sorted(c["partition_id"] for c in record["clients"]) == [0, 2, 3]
    # Two rounds of updates 0, 2 and 3 weighted by 10, 30 and 40 examples: nothing of node 1.
    final = load_adapter_tensors(run / "peft_2")
    for key, start in fast_init.items():
        assert np.isfinite(final[key]).all() and np.allclose(final[key], start + 2 * FAKE_STEP * (0 * 10 + 2 * 30 + 3 * 40) / 80)


def test_num_examples_bound_is_configurable(tmp_path, fast_init):
    config = tiny_config(tmp_path, **{"num-server-rounds": 1, "strategy.fraction-train": 1.0, "strategy.max-num-examples": 25})
    [record] = metrics_of(run_main(InMemoryGrid(NAMES, config, fake_client), run_id=92))
    assert sorted(c["partition_id"] for c in record["clients"]) == [0, 1]  # 30 and 40 examples exceed 25
    assert all("exceeds the bound 25 (strategy.max-num-examples)" in f["reason"] for f in record["failed"])


def _kind(name: str) -> str:
    return next(k for k in ("lora_magnitude_vector", "lora_A", "lora_B") if k in name)


def round_update_error(tmp_path: Path, real_training, fmt: str, reference: str = "float32") -> dict[str, float]:
    """Relative L2 error, per tensor kind, of the round-2 update (peft_2 - peft_1) of a run in
    `fmt` against the same run in `reference`, at the seed recipe's learning rates exactly."""
    from app.config import with_explicit_keys

    updates = {}
    for run_id, wire in enumerate((reference, fmt), start=101):
        config = with_explicit_keys(tiny_config(tmp_path / wire, **{
            "num-server-rounds": 2, "dataset.num-partitions": 3, "strategy.fraction-train": 1.0,
            "train.learning-rate-max": 5e-5, "train.learning-rate-min": 1e-6, "comm.format": wire,
        }))
        run = run_main(InMemoryGrid(NAMES[:3], config, real_training), run_id=run_id)
        assert client_app.load_settings(config).train.learning_rate_max == 5e-5  # not the profile's 0.1
        assert all(r["clipped"] == 0 for r in metrics_of(run))  # honest at the seed's learning rates
        peft1, peft2 = load_adapter_tensors(run / "peft_1"), load_adapter_tensors(run / "peft_2")
        updates[wire] = {k: peft2[k] - peft1[k] for k in peft1}
    errors: dict[str, list[float]] = {}
    for key, exact in updates[reference].items():
        errors.setdefault(_kind(key), []).append(
            float(np.linalg.norm(updates[fmt][key] - exact)) * float(np.linalg.norm(exact)) ** -1 if np.any(exact) else 0.0
        )
    return {kind: float(np.sqrt(np.mean(np.square(v)))) for kind, v in errors.items()}


@pytest.mark.parametrize("fmt", ["bfloat16", "int8-block64"])
def test_narrow_wire_keeps_the_round_update_at_the_seed_learning_rates(tmp_path, real_training, fmt):
    """Issue 12's check: weights rounded to bfloat16 both ways erased the DoRA magnitude's
    update entirely (100 % error) and lora_A's almost (99.5 %); updates on the wire keep all."""
    errors = round_update_error(tmp_path, real_training, fmt)
    assert set(errors) == {"lora_magnitude_vector", "lora_A", "lora_B"}
    assert all(error < 0.10 for error in errors.values()), errors


def test_every_server_wait_has_a_deadline_and_says_what_it_waited_for(tmp_path, fast_init, monkeypatch):
    monkeypatch.setattr(server_app, "NODE_WAIT_SECONDS", 0.5)
    with pytest.raises(server_app.NodesUnavailable, match=r"initial adapter: 0 SuperNode\(s\) online after 0.5 s, 1 needed"):
        run_main(InMemoryGrid([], tiny_config(tmp_path), fake_client), run_id=111)

    silent = InMemoryGrid(NAMES, tiny_config(tmp_path, **{"strategy.round-timeout": 1.0}), fake_client)
    silent.push_messages = lambda messages: [m.object_id for m in messages]  # nodes that never answer
    with pytest.raises(server_app.NodesUnavailable, match=r"no SuperNode returned the initial adapter within 1 s .*no reply"):
        run_main(silent, run_id=112)

    class Vanishing(InMemoryGrid):  # every node leaves once the initial adapter has arrived
        initialised = False

        def get_nodes(self):
            return [] if self.initialised else super().get_nodes()

        def pull_messages(self, message_ids):
            replies = super().pull_messages(message_ids)
            self.initialised = self.initialised or bool(replies)
            return replies

    with pytest.raises(server_app.NodesUnavailable, match=r"round 1: 0 SuperNode\(s\) online after 0.5 s, 1 needed"):
        run_main(Vanishing(NAMES, tiny_config(tmp_path), fake_client), run_id=113)
    assert json.loads((tmp_path / "run-113" / "summary.json").read_text())["stopped"].startswith("round 1: 0 SuperNode")


def test_a_superlink_restart_during_push_or_pull_fails_the_attempt_not_the_run(tmp_path, fast_init):
    """Seen with a SuperLink killed mid-run: Flower's push raised ObjectPushError ("the push
    session may have expired") out of the ServerApp and ended the run."""
    from flwr.supercore.inflatable.inflatable_utils import ObjectPushError

    import httpx

    class Restarting(InMemoryGrid):
        train_pushes = pulls = 0

        def push_messages(self, messages):
            if messages[0].metadata.message_type == "train":
                self.train_pushes += 1
                if self.train_pushes == 1:
                    raise ObjectPushError("object-1", 1, "session-1")
            return super().push_messages(messages)

        def pull_messages(self, message_ids):
            self.pulls += 1
            if self.pulls == 2:
                raise httpx.ConnectError("connection refused")
            return super().pull_messages(message_ids)

    config = tiny_config(tmp_path, **{"num-server-rounds": 1, "strategy.max-retries": 2})
    [record] = metrics_of(run_main(Restarting(NAMES, config, fake_client), run_id=121))
    assert record["status"] == "aggregated" and record["attempts"] == 2
    assert all(f["attempt"] == 0 and "not delivered (ObjectPushError" in f["reason"] for f in record["failed"])


def test_resume_after_a_crash_that_cut_a_metrics_line_short(checkpoint_run, fast_init, caplog):
    config, peft = checkpoint_run
    metrics = peft.parent / "metrics.jsonl"
    with open(metrics, "a") as handle:
        handle.write('{"round": 2, "status": "aggr')  # killed while writing round 2's line
    run = run_main(InMemoryGrid(NAMES, dict(config, **{"resume-from": str(peft)}), fake_client), run_id=93)
    assert [r["round"] for r in metrics_of(run)] == [1, 2, 3]
    assert json.loads((run / "summary.json").read_text())["rounds_completed"] == 3
    assert f"{metrics}: skipped 1 unreadable line(s) (the last one unfinished" in caplog.text


def test_resume_from_latest_picks_the_checkpoint_saved_last(checkpoint_run, tmp_path):
    """`--resume-from latest` (the compose stack's FEDTUNE_RESUME_FROM=latest) resolves to the
    newest checkpoint under the results directory, checked like any other resume-from."""
    from app.deploy.launcher import check_resume

    config, peft = checkpoint_run
    older = peft.parent.parent / "run-60" / "peft_2"
    older.parent.mkdir()
    shutil.copytree(peft, older)
    os.utime(older / RUN_STATE, (1, 1))  # saved long before peft_1 of run-61
    run_config = dict(config, **{"resume-from": "latest"})
    assert check_resume(run_config, tmp_path) is None and run_config["resume-from"] == str(peft.resolve())

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no checkpoint under" in check_resume(dict(config, **{"resume-from": "latest"}), empty)
    assert check_resume(dict(config), tmp_path) is None  # no resume-from: a new run
