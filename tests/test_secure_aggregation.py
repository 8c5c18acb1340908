"""Secure aggregation (issue 27): the ServerApp learns only the round's weighted sum, exactly the
plain weighted mean up to the grid's rounding; nodes that drop before or after their masked
upload are excluded or recovered; tampered shares, out-of-range inputs and sums beyond what the
nodes can reach are refused; nothing a node keeps secret leaves it."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from scipy import stats

import app.client_app as client_app
from app import comm
from app.aggregation.bounds import recipe_norm_bound
from app.config import ConfigError, load_settings
from app.privacy import ring, secagg_node, secagg_server
from app.privacy.dp import node_noise_std
from app.privacy.secagg_records import RECORD, ProtocolError
from app.server_app import FedTuneProx, sample_nodes
from fake_grid import (FAKE_STEP, InMemoryGrid, as_clientapp, fake_round, fake_secure_client, fast_init, metrics_of, run_main,  # noqa: F401 (fixtures)
                       task_identity, tiny_config)

THREE = [f"supernode-{i}" for i in range(3)]
# The seed adapter's tensors: q_proj (4096 x 4096) and v_proj (1024 x 4096) at r=32 with DoRA, 32 layers.
SEED_KINDS = {"lora_A": [(32, 4096)] * 64, "lora_B": [(4096, 32), (1024, 32)] * 32, "magnitude": [(4096,), (1024,)] * 32}
SEED_PARAMETERS = 13_795_328


def secure_config(tmp_path: Path, **extra) -> dict:
    return tiny_config(tmp_path, **{"dataset.num-partitions": 3, "strategy.fraction-train": 1.0, "privacy.secure-aggregation": True,
                                    "num-server-rounds": 1, **extra})


def expected_mean(names: list[str], master: dict) -> dict:
    """fake_round's example-weighted mean update over the nodes of `names`."""
    parts = [int(n.rsplit("-", 1)[1]) for n in names]
    weights = [10.0 * (p + 1) for p in parts]
    return {k: np.full_like(v, sum(w * FAKE_STEP * p for w, p in zip(weights, parts)) / sum(weights)) for k, v in master.items()}


def saved_update(run: Path, initial: dict, round_number: int = 1) -> dict:
    from safetensors.numpy import load_file

    adapter = load_file(run / f"peft_{round_number}" / "adapter_model.safetensors")
    return {k: adapter[k] - initial[k] for k in initial}


def grid_step(config: dict, initial: dict) -> float:
    """One grid step of the round's weighted sum, divided by the round's total weight (3 nodes)."""
    settings = load_settings(config)
    d = sum(v.size for v in initial.values())
    bound = recipe_norm_bound(settings.train.training_arguments.max_steps, settings.train.learning_rate_max, d)
    weight = FedTuneProx(settings, Path(config["results.dir"])).max_examples
    return ring.coordinate_range(bound, d) / ring.levels(3) * weight / (10 + 20 + 30)


# ------------------------------------------------------------------- the in-memory federation


def test_aggregate_is_the_weighted_mean_within_the_grid(tmp_path, fast_init):
    config = secure_config(tmp_path, **{"num-server-rounds": 2})
    run = run_main(InMemoryGrid(THREE, config, fake_secure_client), run_id=1)
    records = metrics_of(run)
    assert [r["status"] for r in records] == ["aggregated", "aggregated"]
    want = expected_mean(THREE, fast_init)
    got = saved_update(run, fast_init)
    # Stochastic rounding errs by less than one step per node: at most 3 steps of the weighted sum.
    step = grid_step(config, fast_init)
    for key in fast_init:
        assert np.abs(got[key] - want[key]).max() <= 3 * step, key
    record = records[0]
    assert record["clipped"] is None and all(c["update_norm"] is None for c in record["clients"])
    assert sorted(c["partition_id"] for c in record["clients"]) == [0, 1, 2]
    assert {c["trainer_id"] for c in record["clients"]} == {"node:cpu:in-process"}


def test_keys_shares_and_masked_updates_are_counted_apart(tmp_path, fast_init):
    run = run_main(InMemoryGrid(THREE, secure_config(tmp_path), fake_secure_client), run_id=2)
    [record] = metrics_of(run)
    d = sum(v.size for v in fast_init.values())
    assert record["secagg_bytes_masked"] == 3 * 2 * (d + ring.WEIGHT_DIGITS)  # 2 bytes per parameter, 4 digits of weight
    # Keys: 3 x (two 33-byte keys + a 32-byte hash) up; down, both keys of all 3 nodes to each at
    # share-keys, then one key of each with the train message and one with unmask.
    assert record["secagg_bytes_keys"] == 3 * 98 + 3 * 3 * 66 + 2 * 3 * 3 * 33
    # Shares: 9 ciphertexts up (a 124-byte pair of shares per node, its own included, as a 248-byte
    # Fernet token), the same 9 back down at unmask, then 9 shares of 52 bytes up.
    assert record["secagg_bytes_shares"] == 2 * 9 * 248 + 9 * 52
    assert record["bytes_up"] == record["secagg_bytes_masked"] + 3 * 98 + 9 * 248 + 9 * 52
    download = 3 * comm.transfer_bytes(comm.shapes_of(fast_init), comm.download_format(load_settings(secure_config(tmp_path)).comm.format))
    assert record["bytes_down"] == download + 3 * 3 * 66 + 2 * 3 * 3 * 33 + 9 * 248
    assert set(record["secagg_seconds"]) == {"setup", "share-keys", "train", "unmask", "unmask-sum"}


def test_a_node_lost_after_its_masked_upload_is_recovered(tmp_path, fast_init):
    grid = InMemoryGrid(THREE, secure_config(tmp_path), fake_secure_client)
    grid.stage_fault = lambda name, stage, _round: "drop" if (name, stage) == ("supernode-2", "query.secagg_unmask") else None
    run = run_main(grid, run_id=3)
    [record] = metrics_of(run)
    assert record["status"] == "aggregated"
    assert sorted(c["partition_id"] for c in record["clients"]) == [0, 1, 2]
    assert [f["reason"] for f in record["failed"]] == ["secure aggregation unmask: no reply within 5 s"]
    got, want = saved_update(run, fast_init), expected_mean(THREE, fast_init)
    assert all(np.abs(got[k] - want[k]).max() <= 3 * grid_step(secure_config(tmp_path), fast_init) for k in want)


@pytest.mark.parametrize("stage", ["query.secagg_share_keys", "train"])
def test_a_node_lost_before_its_masked_upload_is_excluded(tmp_path, fast_init, stage):
    grid = InMemoryGrid(THREE, secure_config(tmp_path), fake_secure_client, fault=lambda name, *_: "drop" if name == "supernode-2" and stage == "train" else None)
    grid.stage_fault = lambda name, s, _round: "drop" if (name, s) == ("supernode-2", stage) else None
    run = run_main(grid, run_id=4)
    [record] = metrics_of(run)
    assert record["status"] == "aggregated"
    assert sorted(c["partition_id"] for c in record["clients"]) == [0, 1]
    got, want = saved_update(run, fast_init), expected_mean(THREE[:2], fast_init)
    assert all(np.abs(got[k] - want[k]).max() <= 3 * grid_step(secure_config(tmp_path), fast_init) for k in want)


def test_only_setup_writes_the_node_state(tmp_path, fast_init):
    """Flower pushes a ClientApp's context after its reply, so the next stage may start on the state
    from before: every stage after setup works from what setup wrote and what the message brings."""
    grid = InMemoryGrid(THREE, secure_config(tmp_path, **{"num-server-rounds": 2}), fake_secure_client)
    grid.keeps_state = lambda message_type: message_type == "query.secagg_setup"
    run = run_main(grid, run_id=12)
    assert [(r["status"], r["failed"]) for r in metrics_of(run)] == [("aggregated", [])] * 2
    got, want = saved_update(run, fast_init), expected_mean(THREE, fast_init)
    assert all(np.abs(got[k] - want[k]).max() <= 3 * grid_step(secure_config(tmp_path), fast_init) for k in want)


# ------------------------------------------- round r+1's key stages while round r trains

FIVE = [f"supernode-{i}" for i in range(5)]
# The rounds' samples of 3 from FIVE at the tiny profile's seed: {1, 2, 4}, {1, 3, 4}, {0, 1, 2}.


def five_config(tmp_path: Path, **extra) -> dict:
    return secure_config(tmp_path, **{"dataset.num-partitions": 5, "strategy.fraction-train": 0.5, **extra})


def drawn(grid: InMemoryGrid, config: dict, server_round: int) -> list[str]:
    """Round `server_round`'s first sample, as the ServerApp draws it from the grid's online nodes."""
    nodes = [NodeInfo(node_id=n, name=grid.nodes[n]) for n in grid.online]
    return sorted(n.name for n in sample_nodes(nodes, 3, load_settings(config).seed, server_round, 0))


def round_updates(run: Path, initial: dict, rounds: int) -> list[dict]:
    """Each round's own update (its adapter less the previous one)."""
    totals = [{k: np.zeros_like(v) for k, v in initial.items()}] + [saved_update(run, initial, r) for r in range(1, rounds + 1)]
    return [{k: after[k] - before[k] for k in initial} for before, after in zip(totals, totals[1:])]


def assert_means(run: Path, config: dict, initial: dict, samples: list[list[str]]) -> None:
    step = grid_step(config, initial)
    for got, names in zip(round_updates(run, initial, len(samples)), samples, strict=True):
        want = expected_mean(names, initial)
        assert all(np.abs(got[k] - want[k]).max() <= 3 * step for k in want), names


def pushes(grid: InMemoryGrid, message_type: str) -> list[int]:
    return [r for what, kind, r, _ in grid.events if (what, kind) == ("push", message_type)]


# Keys of a round of 3 (test_keys_shares_and_masked_updates_are_counted_apart): its keys and shares alone.
ROUND_KEYS, ROUND_SHARES = 3 * 98 + 3 * 3 * 66 + 2 * 3 * 3 * 33, 2 * 9 * 248 + 9 * 52


def test_the_next_rounds_key_stages_run_while_a_round_trains(tmp_path, fast_init):
    config = five_config(tmp_path, **{"num-server-rounds": 3})
    grid = InMemoryGrid(FIVE, config, fake_secure_client)
    samples = [drawn(grid, config, r) for r in (1, 2, 3)]
    # A node that round r+1 does not sample trains round r slowly: round r+1's key stages can end first.
    grid.train_seconds = lambda name, r: 2.0 if r < 3 and name not in samples[r] else 0.1
    run = run_main(grid, run_id=20)
    records = metrics_of(run)
    assert [(r["status"], r["failed"], r["secagg_prepared"]) for r in records] == [("aggregated", [], False), ("aggregated", [], True), ("aggregated", [], True)]
    assert [sorted(f"supernode-{c['partition_id']}" for c in r["clients"]) for r in records] == samples
    assert_means(run, config, fast_init, samples)
    for r in (1, 2):
        last_update = max(i for i, e in enumerate(grid.events) if e[:3] == ("reply", "train", r))
        shares = [i for i, e in enumerate(grid.events) if e[:3] == ("reply", "query.secagg_share_keys", r + 1)]
        assert len(shares) == 3 and max(shares) < last_update  # all of round r+1's shares were in before round r's last update
        seconds = records[r]["secagg_seconds"]  # as measured, waiting behind round r's train included
        assert records[r]["secagg_hidden_seconds"] == pytest.approx(seconds["setup"] + seconds["share-keys"], abs=0.05)  # all of it
    assert pushes(grid, "query.secagg_setup") == [1] * 3 + [2] * 3 + [3] * 3  # each round's keys once, none for a round 4
    # Each round's line counts its own keys and shares, prepared during the previous round or not.
    assert [(r["secagg_bytes_keys"], r["secagg_bytes_shares"]) for r in records] == [(ROUND_KEYS, ROUND_SHARES)] * 3


def test_the_last_round_prepares_nothing(tmp_path, fast_init):
    grid = InMemoryGrid(THREE, secure_config(tmp_path, **{"num-server-rounds": 2}), fake_secure_client)
    records = metrics_of(run_main(grid, run_id=21))
    assert [r["secagg_prepared"] for r in records] == [False, True]
    assert pushes(grid, "query.secagg_setup") == [1, 1, 1, 2, 2, 2]


def test_a_node_of_two_rounds_keeps_both_sessions_and_unmasks_each(tmp_path, fast_init):
    config = five_config(tmp_path, **{"num-server-rounds": 2})
    grid = InMemoryGrid(FIVE, config, fake_secure_client)
    samples = [drawn(grid, config, r) for r in (1, 2)]
    both = sorted(set(samples[0]) & set(samples[1]))  # supernode-1 and -4
    grid.train_seconds = lambda name, r: 2.0 if r == 1 and name not in samples[1] else 0.1  # round 1's unmask comes after round 2's setup
    held = {}
    setup = client_app.secagg_setup

    def recording(msg, context):
        reply = setup(msg, context)
        sessions = [k.removeprefix(secagg_node.ANNOUNCED) for k in context.state if k.startswith(secagg_node.ANNOUNCED)]
        held[grid.nodes[context.node_id], msg.content[RECORD]["server_round"]] = sorted(
            context.state[secagg_node.ANNOUNCED + s]["server_round"] for s in sessions)
        return reply

    import fake_grid

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(fake_grid.SECAGG_HANDLERS, "query.secagg_setup", recording)
        run = run_main(grid, run_id=22)
    assert {name: held[name, 2] for name in both} == {name: [1, 2] for name in both}  # round 1's session was still there
    records = metrics_of(run)
    assert [(r["status"], r["failed"], r["secagg_prepared"]) for r in records] == [("aggregated", [], False), ("aggregated", [], True)]
    assert_means(run, config, fast_init, samples)
    unmasked = [(r, name) for what, kind, r, name in grid.events if (what, kind) == ("reply", "query.secagg_unmask")]
    assert sorted(unmasked) == [(r + 1, name) for r in (0, 1) for name in samples[r]]  # both nodes answered both unmasks
    # Each session ended where it was unmasked: no node holds one.
    assert not [key for state in grid.states.values() for key in state]


def test_setup_drops_the_sessions_of_rounds_before_the_previous_one():
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    for server_round in (1, 2, 3):
        announced = secagg_server.announcement([5, 6, 7], server_round, 100, 1.0, 1.0, 10, 1, 0.0)
        secagg_node.setup(RecordDict({RECORD: announced.record()}), context)
    rounds = sorted(context.state[k]["server_round"] for k in context.state if k.startswith(secagg_node.ANNOUNCED))
    assert rounds == [2, 3] and len(context.state) == 4  # round 2's may still be unmasked; its secrets with it


@pytest.mark.parametrize("stage, name", [("query.secagg_setup", "setup"), ("query.secagg_share_keys", "share-keys")])
def test_a_node_lost_in_the_prepared_key_stages_is_excluded(tmp_path, fast_init, stage, name):
    config = five_config(tmp_path, **{"num-server-rounds": 2})
    grid = InMemoryGrid(FIVE, config, fake_secure_client)
    samples = [drawn(grid, config, r) for r in (1, 2)]
    lost = "supernode-3"  # sampled in round 2 only
    grid.stage_fault = lambda node, s, r: "drop" if (node, s, r) == (lost, stage, 2) else None
    run = run_main(grid, run_id=23)
    records = metrics_of(run)
    assert [(r["status"], r["secagg_prepared"]) for r in records] == [("aggregated", False), ("aggregated", True)]
    # Not the 10 s it may wait while round 1 still trains: a stage's 5 s once round 2 has started, as an inline one.
    assert [(f["node"], f["reason"]) for f in records[1]["failed"]] == [(lost, f"secure aggregation {name}: no reply within 5 s of round 2's start")]
    kept = [n for n in samples[1] if n != lost]
    assert sorted(f"supernode-{c['partition_id']}" for c in records[1]["clients"]) == kept
    assert_means(run, config, fast_init, [samples[0], kept])


def test_prepared_key_stages_for_another_sample_are_dropped_and_run_inline(tmp_path, fast_init):
    config = five_config(tmp_path, **{"num-server-rounds": 2})
    grid = InMemoryGrid(FIVE, config, fake_secure_client)
    gone = next(n for n, name in grid.nodes.items() if name == "supernode-0")  # in neither round's sample
    push = grid.push_messages

    def leave_after_preparing(messages):
        ids = push(messages)
        if pushes(grid, "query.secagg_setup").count(2) == 3:  # round 2's key stages are under way
            grid.online.discard(gone)
        return ids

    grid.push_messages = leave_after_preparing
    samples, prepared = [drawn(grid, config, 1)], drawn(grid, config, 2)
    grid.online.discard(gone)
    samples.append(drawn(grid, config, 2))
    grid.online.add(gone)
    assert samples[1] != prepared
    run = run_main(grid, run_id=24)
    records = metrics_of(run)
    assert [(r["status"], r["failed"], r["secagg_prepared"]) for r in records] == [("aggregated", [], False), ("aggregated", [], False)]
    assert pushes(grid, "query.secagg_setup") == [1] * 3 + [2] * 6  # prepared for one sample, run again for the other
    assert sorted(f"supernode-{c['partition_id']}" for c in records[1]["clients"]) == samples[1]
    assert_means(run, config, fast_init, samples)


def test_prepared_key_stages_below_the_threshold_run_again_inline(tmp_path, fast_init):
    config = five_config(tmp_path, **{"num-server-rounds": 2, "strategy.round-timeout": 2.0})
    grid = InMemoryGrid(FIVE, config, fake_secure_client)
    samples = [drawn(grid, config, r) for r in (1, 2)]
    dropped = set()

    def once(node, stage, r):  # two of round 2's nodes miss the prepared share-keys, not the inline one
        if (stage, r) == ("query.secagg_share_keys", 2) and node != samples[1][0] and node not in dropped:
            dropped.add(node)
            return "drop"
        return None

    grid.stage_fault = once
    run = run_main(grid, run_id=25)
    records = metrics_of(run)
    assert [(r["status"], r["failed"], r["secagg_prepared"]) for r in records] == [("aggregated", [], False), ("aggregated", [], False)]
    assert pushes(grid, "query.secagg_setup") == [1] * 3 + [2] * 6
    assert_means(run, config, fast_init, samples)
    # The unused preparation moved bytes too: 3 setup replies, 3 x 2 keys forwarded, one node's 3 encrypted shares.
    assert records[1]["secagg_bytes_keys"] == ROUND_KEYS + 3 * 98 + 3 * 3 * 66
    assert records[1]["secagg_bytes_shares"] == ROUND_SHARES + 3 * 248


def test_below_the_threshold_the_round_follows_the_policy(tmp_path, fast_init):
    grid = InMemoryGrid(THREE, secure_config(tmp_path, **{"strategy.on-too-few-replies": "skip"}), fake_secure_client)
    grid.stage_fault = lambda name, stage, _round: "drop" if name != "supernode-0" and stage == "query.secagg_setup" else None
    with pytest.raises(Exception, match="no round aggregated"):
        run_main(grid, run_id=5)
    [record] = metrics_of(Path(grid.run_config["results.dir"]) / "run-5")
    assert record["status"] == "skipped"
    assert record["skip_reason"] == "secure aggregation: 1 node(s) answered setup, the threshold is 2"


class Tamper:
    """A grid hook that flips one byte of the first `count` ciphertexts brought back to supernode-0 at unmask."""

    def __init__(self, grid: InMemoryGrid, count: int) -> None:
        self.count, self.push = count, grid.push_messages
        self.target = next(n for n, name in grid.nodes.items() if name == "supernode-0")
        grid.push_messages = self

    def __call__(self, messages):
        for msg in messages:
            record = msg.content.get(RECORD) if msg.metadata.message_type == "query.secagg_unmask" else None
            if record is not None and msg.metadata.dst_node_id == self.target:
                texts = list(record["ciphertexts"])
                for i in range(min(self.count, len(texts))):
                    texts[i] = texts[i][:-5] + bytes([texts[i][-5] ^ 1]) + texts[i][-4:]
                record["ciphertexts"] = texts
        return self.push(messages)


def test_a_tampered_share_is_dropped_and_the_threshold_still_reconstructs(tmp_path, fast_init):
    grid = InMemoryGrid(THREE, secure_config(tmp_path), fake_secure_client)
    Tamper(grid, count=1)
    run = run_main(grid, run_id=6)
    [record] = metrics_of(run)
    assert record["status"] == "aggregated" and record["failed"] == []  # supernode-0 answered unmask with the shares it could open
    got, want = saved_update(run, fast_init), expected_mean(THREE, fast_init)
    assert all(np.abs(got[k] - want[k]).max() <= 3 * grid_step(secure_config(tmp_path), fast_init) for k in want)


def test_tampered_shares_below_the_threshold_refuse_the_round(tmp_path, fast_init):
    # supernode-2 drops after its upload: its seed needs 2 shares, supernode-0's copy is tampered.
    grid = InMemoryGrid(THREE, secure_config(tmp_path, **{"strategy.on-too-few-replies": "skip"}), fake_secure_client)
    grid.stage_fault = lambda name, stage, _round: "drop" if (name, stage) == ("supernode-2", "query.secagg_unmask") else None
    Tamper(grid, count=2)
    with pytest.raises(Exception, match="no round aggregated"):
        run_main(grid, run_id=7)
    [record] = metrics_of(Path(grid.run_config["results.dir"]) / "run-7")
    assert record["status"] == "skipped"
    assert "share(s), the threshold is 2" in record["skip_reason"]


def test_a_wrong_share_in_an_unmask_reply_is_outvoted(tmp_path, fast_init):
    grid = InMemoryGrid(THREE, secure_config(tmp_path), fake_secure_client)
    unmask = client_app.secagg_unmask

    def lying(msg, context):
        reply = unmask(msg, context)
        if grid.nodes[context.node_id] == "supernode-0":  # the lowest id: its shares are in the first subsets tried
            record = reply.content[RECORD]
            record["shares"] = [s[:10] + bytes([s[10] ^ 0xFF]) + s[11:] for s in record["shares"]]
        return reply

    import fake_grid

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(fake_grid.SECAGG_HANDLERS, "query.secagg_unmask", lying)
        run = run_main(grid, run_id=8)
    [record] = metrics_of(run)
    assert record["status"] == "aggregated"
    got, want = saved_update(run, fast_init), expected_mean(THREE, fast_init)
    assert all(np.abs(got[k] - want[k]).max() <= 3 * grid_step(secure_config(tmp_path), fast_init) for k in want)


def hostile_masked(make_arrays):
    """A client whose supernode-1 replies with `make_arrays(honest_arrays)` instead of its masked input."""

    def client(msg: Message, context: Context) -> Message:
        honest = fake_secure_client(msg, context)
        if context.node_config["partition-id"] != 1:
            return honest
        return Message(RecordDict({"arrays": make_arrays(honest.content["arrays"]), "metrics": honest.content["metrics"]}), reply_to=msg)

    return client


def wide_elements(arrays: ArrayRecord) -> ArrayRecord:
    values = np.frombuffer(arrays["masked"].data, np.uint16).astype(np.uint32) + 70_000
    return ArrayRecord({"masked": Array(dtype="uint32", shape=values.shape, stype="raw.le", data=values.tobytes())})


def short_input(arrays: ArrayRecord) -> ArrayRecord:
    data = arrays["masked"].data[:-2]
    return ArrayRecord({"masked": Array(dtype="uint16", shape=(len(data) // 2,), stype="raw.le", data=data)})


@pytest.mark.parametrize("make_arrays, reason", [(wide_elements, "expected uint16 ring elements"), (short_input, "expected uint16 ring elements")])
def test_an_out_of_range_masked_input_is_refused_and_its_node_excluded(tmp_path, fast_init, make_arrays, reason):
    run = run_main(InMemoryGrid(THREE, secure_config(tmp_path), hostile_masked(make_arrays)), run_id=9)
    [record] = metrics_of(run)
    assert record["status"] == "aggregated"
    assert sorted(c["partition_id"] for c in record["clients"]) == [0, 2]
    [failure] = record["failed"]
    assert failure["node"] == "supernode-1" and "secure aggregation train: refused: masked input" in failure["reason"] and reason in failure["reason"]
    got, want = saved_update(run, fast_init), expected_mean([THREE[0], THREE[2]], fast_init)
    assert all(np.abs(got[k] - want[k]).max() <= 3 * grid_step(secure_config(tmp_path), fast_init) for k in want)


@contextlib.contextmanager
def unclipped():
    """The node's clipping switched off (a hostile node's code)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(secagg_node, "clip_scale", lambda norm, bound: 1.0)
        yield


def test_a_sum_beyond_what_the_nodes_can_reach_is_refused(tmp_path, fast_init):
    def client(msg, context):
        if context.node_config["partition-id"] != 1:
            return fake_secure_client(msg, context)
        update, metrics = fake_round(msg, context)
        huge = {k: np.full_like(v, 1e3) for k, v in update.items()}  # every coordinate at the grid's edge
        with unclipped():
            arrays = secagg_node.masked_update(huge, metrics["num-examples"], msg.content, context, 0.0)
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)

    config = secure_config(tmp_path, **{"strategy.on-too-few-replies": "skip", "strategy.update-norm-bound": 0.05})
    with pytest.raises(Exception, match="no round aggregated"):
        run_main(InMemoryGrid(THREE, config, client), run_id=10)
    [record] = metrics_of(Path(config["results.dir"]) / "run-10")
    assert record["status"] == "skipped" and "the unmasked sum has norm" in record["skip_reason"]


def test_a_node_with_a_non_finite_update_sends_nothing_and_is_excluded(tmp_path, fast_init):
    def client(msg, context):
        if context.node_config["partition-id"] != 1:
            return fake_secure_client(msg, context)
        update, metrics = fake_round(msg, context)
        update = {k: np.full_like(v, np.nan) for k, v in update.items()}
        return Message(RecordDict({"arrays": secagg_node.masked_update(update, 20.0, msg.content, context, 0.0)}), reply_to=msg)

    grid = InMemoryGrid(THREE, secure_config(tmp_path), client)
    grid.client = lambda msg, context: as_clientapp(client, msg, context)
    run = run_main(grid, run_id=13)
    [record] = metrics_of(run)
    assert record["status"] == "aggregated" and sorted(c["partition_id"] for c in record["clients"]) == [0, 2]
    assert "not finite" in record["failed"][0]["reason"]
    got, want = saved_update(run, fast_init), expected_mean([THREE[0], THREE[2]], fast_init)
    assert all(np.abs(got[k] - want[k]).max() <= 3 * grid_step(secure_config(tmp_path), fast_init) for k in want)


def test_a_masked_weight_unlike_the_claimed_one_is_refused(tmp_path, fast_init):
    def client(msg, context):
        if context.node_config["partition-id"] != 1:
            return fake_secure_client(msg, context)
        update, metrics = fake_round(msg, context)
        arrays = secagg_node.masked_update(update, metrics["num-examples"] + 5, msg.content, context, 0.0)
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)

    config = secure_config(tmp_path, **{"strategy.on-too-few-replies": "skip"})
    with pytest.raises(Exception, match="no round aggregated"):
        run_main(InMemoryGrid(THREE, config, client), run_id=11)
    [record] = metrics_of(Path(config["results.dir"]) / "run-11")
    assert "the masked total weight 65 differs from the replies' num-examples (60)" in record["skip_reason"]


# ------------------------------------------------------- what the ServerApp sees, what stays on the nodes


def one_attempt(tmp_path, master, client, **extra):
    """One secure attempt of round 1 through the real FedTuneProx over an in-memory grid; the
    grid, the attempt and every reply the ServerApp pulled."""
    config = secure_config(tmp_path, **extra)
    grid = InMemoryGrid(THREE, config, client)
    pulled = []
    pull = grid.pull_messages
    grid.pull_messages = lambda ids: pulled.extend(got := pull(ids)) or got
    strategy = FedTuneProx(load_settings(config), tmp_path)
    messages, names = strategy.configure_round(1, master, grid, 0)
    return grid, strategy._secure_attempt(grid, 1, master, messages, names), pulled


def test_masked_inputs_are_uniform_over_the_ring_and_uncorrelated_with_the_updates(tmp_path):
    master = {"x": np.zeros(65_536, np.float32)}
    quantized = {}

    def client(msg, context):
        # An update that is far from uniform: a ramp of one sign.
        update = {"x": np.linspace(0, 0.5, 65_536, dtype=np.float32) * (1 + int(context.node_config["partition-id"]))}
        with pytest.MonkeyPatch.context() as patch:
            quantize = ring.quantize
            patch.setattr(ring, "quantize", lambda *a, **k: quantized.setdefault(context.node_id, quantize(*a, **k)))
            arrays = secagg_node.masked_update(update, 10.0, msg.content, context, 0.0)
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(fake_round(msg, context)[1] | {"num-examples": 10.0})}), reply_to=msg)

    grid, attempt, pulled = one_attempt(tmp_path, master, client)
    masked = [np.frombuffer(r.content["arrays"]["masked"].data, np.uint16) for r in pulled if r.metadata.message_type == "train"]
    assert len(masked) == 3 and attempt.total is not None
    for node, vector in zip(sorted(quantized), masked, strict=False):
        values = vector[:65_536].astype(np.float64)
        # Uniform over the ring: a chi-square over 256 bins of the high byte, a KS test over all 2^16 values.
        counts = np.bincount(vector[:65_536] >> 8, minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-4
        assert stats.kstest(values / 65_536, "uniform").pvalue > 1e-4
        for other in quantized.values():  # uncorrelated with any node's quantized update
            assert abs(np.corrcoef(values, other[:65_536].view(np.int16))[0, 1]) < 0.03
    # While the quantized updates themselves are anything but uniform.
    assert stats.kstest(next(iter(quantized.values()))[:65_536] / 65_536, "uniform").pvalue < 1e-10


def test_no_secret_of_a_node_leaves_it(tmp_path, fast_init):
    secrets_seen = {}
    setup = client_app.secagg_setup

    def recording(msg, context):
        reply = setup(msg, context)
        secrets_seen[context.node_id] = dict(context.state[secagg_node.SECRETS + msg.content[RECORD]["session"]])
        return reply

    import fake_grid

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(fake_grid.SECAGG_HANDLERS, "query.secagg_setup", recording)
        grid, attempt, pulled = one_attempt(tmp_path, fast_init, fake_secure_client)
    assert attempt.total is not None and len(secrets_seen) == 3
    sent = b"".join(v for r in pulled for rec in r.content.config_records.values() for value in rec.values()
                    for v in (value if isinstance(value, list) else [value]) if isinstance(v, bytes))
    sent += b"".join(a.data for r in pulled for rec in r.content.array_records.values() for a in rec.values())
    for held in secrets_seen.values():
        for key in ("enc-key", "mask-key", "seed"):
            assert held[key] not in sent
    # The session ends on every node that answered unmask: nothing left to ask for twice.
    assert not [key for state in grid.states.values() for key in state if key.startswith(secagg_node.SECRETS)]


def test_a_node_answers_unmask_once(tmp_path, fast_init):
    asks = []
    unmask = client_app.secagg_unmask

    def recording(msg, context):
        asks.append((msg, context))
        return unmask(msg, context)

    import fake_grid

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(fake_grid.SECAGG_HANDLERS, "query.secagg_unmask", recording)
        one_attempt(tmp_path, fast_init, fake_secure_client)
    msg, context = asks[0]
    record = msg.content[RECORD]
    # Asked again with the lists swapped (to get the other secret): the session is gone.
    again = RecordDict({RECORD: ConfigRecord({**record, "survivors": record["survivors"][:1], "dropped": record["survivors"][1:]})})
    with pytest.raises(ProtocolError, match="no secure-aggregation session"):
        secagg_node.unmask(again, context)


def test_a_node_refuses_a_threshold_of_half_or_less(tmp_path):
    announced = secagg_server.announcement([5, 6, 7, 8], 1, 100, 1.0, 1.0, 10, 1, 0.0)
    record = announced.record()
    record["threshold"] = 2
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(ProtocolError, match="threshold 2 for 4 nodes, expected 3..4"):
        secagg_node.setup(RecordDict({RECORD: record}), context)
    assert not list(context.state)


def test_nodes_add_their_share_of_the_dp_noise(tmp_path):
    d = 65_536
    master = {"x": np.zeros(d, np.float32)}

    def client(msg, context):
        update, metrics = {"x": np.full(d, 1e-3, np.float32)}, fake_round(msg, context)[1]
        arrays = secagg_node.masked_update(update, metrics["num-examples"], msg.content, context, 0.5)
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)

    _, attempt, _ = one_attempt(tmp_path, master, client, **{"privacy.noise-multiplier": 0.5})
    a = attempt.announced
    mean = secagg_server.mean_update(attempt, {"x": (d,)}, 60.0, 0.5)["x"]
    expected_std = node_noise_std(0.5, a.norm_bound, a.max_weight, a.min_nodes) * math.sqrt(3) / 60
    assert np.std(mean - 1e-3) == pytest.approx(expected_std, rel=0.05)
    assert abs(float(np.mean(mean)) - 1e-3) < 5 * expected_std / math.sqrt(d)


# ------------------------------------------------------------- the grid at the seed recipe's scale


def seed_updates(lr: float, rng: np.random.Generator, nodes: int = 3) -> list[dict[str, list[np.ndarray]]]:
    """Updates shaped like the seed adapter's, AdamW-like: each value a few steps of about lr,
    a direction shared by the nodes (IID partitions) plus each node's own."""
    shared = {kind: [rng.normal(0, 1.5 * lr, s).astype(np.float32) for s in shapes] for kind, shapes in SEED_KINDS.items()}
    return [{kind: [v + rng.normal(0, 1.5 * lr, v.shape).astype(np.float32) for v in values] for kind, values in shared.items()} for _ in range(nodes)]


@pytest.mark.parametrize("lr", [5e-5, 1e-6])
def test_at_the_seed_scale_the_grid_keeps_each_tensor_kind_within_2_percent(lr):
    assert sum(math.prod(s) for shapes in SEED_KINDS.values() for s in shapes) == SEED_PARAMETERS
    rng = np.random.default_rng(27)
    updates = seed_updates(lr, rng)
    weights, max_weight = [1698, 1698, 1697], 1698  # 20 IID partitions of the 33,955 flashcards
    bound = recipe_norm_bound(6, lr, SEED_PARAMETERS)
    value_range = ring.coordinate_range(bound, SEED_PARAMETERS)
    levels = ring.levels(3)
    for kind in SEED_KINDS:
        flat = [np.concatenate([v.ravel() for v in u[kind]]).astype(np.float64) for u in updates]
        plain = sum(w * f for w, f in zip(weights, flat)) / sum(weights)
        total = sum(ring.quantize(w / max_weight * f, value_range, levels, rng) for w, f in zip(weights, flat)).astype(np.uint16)
        secure = ring.dequantize_sum(total, value_range, levels) * max_weight / sum(weights)
        error = np.linalg.norm(secure - plain) / np.linalg.norm(plain)
        assert error < 0.02, (kind, error)
        assert abs(np.mean(secure - plain)) < 1e-3 * np.abs(plain).mean()  # stochastic rounding is unbiased


def test_upload_is_two_bytes_per_parameter_of_the_seed_adapter():
    # 16 nodes a round still sum without overflow at 12-bit values.
    assert ring.levels(16) == 2047 and 16 * 2047 <= 2**15 - 1
    assert (SEED_PARAMETERS + ring.WEIGHT_DIGITS) * ring.RING_DTYPE.itemsize <= 2 * SEED_PARAMETERS + 8


def test_n_nodes_at_the_grid_edge_sum_without_overflow():
    rng = np.random.default_rng(1)
    for nodes in (3, 16, ring.MAX_ROUND_NODES):
        levels = ring.levels(nodes)
        edge = np.array([1.0, -1.0, 0.999, -0.999])
        total = sum(ring.quantize(edge, 1.0, levels, rng) for _ in range(nodes)).astype(np.uint16)
        assert np.allclose(ring.dequantize_sum(total, 1.0, levels), nodes * edge, atol=nodes / levels)
        digits = sum(ring.weight_digits(2**32 - 1) for _ in range(nodes)).astype(np.uint16)
        assert ring.digits_total(digits.view(np.int16)) == nodes * (2**32 - 1)


def test_values_beyond_the_range_land_on_the_grid_edge_and_never_wrap():
    levels = ring.levels(3)
    beyond = np.array([5.0, -5.0, 1e30, -3.4e38, 1.0, -1.0])
    assert ring.quantize(beyond, 1.0, levels, np.random.default_rng(0)).view(np.int16).tolist() == [levels, -levels] * 3


def test_quantize_scales_and_noises_every_value_of_every_array_in_its_pass():
    rng, levels = np.random.default_rng(3), ring.levels(3)
    # Two arrays read as one vector, across the chunks' edges.
    values = [np.full(3 * ring.CHUNK + 5, 0.1, np.float32), np.full(ring.CHUNK + 7, -0.2, np.float32)]
    got = ring.quantize(values, 1.0, levels, rng, scale=0.5, noise_std=0.01).view(np.int16) / levels
    first, second = got[:values[0].size], got[values[0].size:]
    assert got.size == sum(v.size for v in values)
    assert first.mean() == pytest.approx(0.05, abs=2e-4) and second.mean() == pytest.approx(-0.1, abs=2e-4)
    assert first.std() == pytest.approx(0.01, rel=0.03) and second.std() == pytest.approx(0.01, rel=0.03)
    assert ring.quantize(values, 1.0, levels, rng, scale=0.5).view(np.int16)[-1] / levels == pytest.approx(-0.1, abs=1 / levels)


def test_stochastic_rounding_keeps_values_below_half_a_step():
    rng = np.random.default_rng(2)
    small = np.full(200_000, 0.3 / ring.levels(3))  # 0.3 of a grid step of range 1
    total = sum(ring.quantize(small, 1.0, ring.levels(3), rng) for _ in range(3)).astype(np.uint16)
    assert ring.dequantize_sum(total, 1.0, ring.levels(3)).mean() == pytest.approx(3 * small[0], rel=0.02)


# ------------------------------------------------------------------------- configuration


def test_secure_aggregation_refuses_the_median_bound():
    with pytest.raises(ConfigError, match="update-norm-median-multiple must be 0 with privacy.secure-aggregation"):
        load_settings({"privacy.secure-aggregation": True, "strategy.update-norm-median-multiple": 2.0})


def test_secure_aggregation_needs_a_bound_on_the_weight(tmp_path):
    settings = load_settings({"privacy.secure-aggregation": True, "dataset.path": str(tmp_path / "own.jsonl")})
    with pytest.raises(ConfigError, match="set strategy.max-num-examples"):
        FedTuneProx(settings, tmp_path)


def test_a_secure_round_with_dp_accounts_the_noise_of_its_guaranteed_shares(tmp_path, fast_init):
    from app.privacy.accountant import PrivacyLedger

    config = secure_config(tmp_path, **{"privacy.noise-multiplier": 0.5})
    run = run_main(InMemoryGrid(THREE, config, fake_secure_client), run_id=31)
    [record] = metrics_of(run)
    # Each of the 3 nodes added noise for min_nodes = 2 shares; only 2 are counted, so the round
    # carries the configured multiplier, no more.
    assert record["dp_spent"] is True and record["dp_noise_shares"] == 2
    assert record["dp_noise_multiplier"] == pytest.approx(0.5)
    assert record["dp_epsilon"] == pytest.approx(PrivacyLedger(1e-5, [0.5]).epsilon())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["privacy"]["epsilon"] == pytest.approx(record["dp_epsilon"])
