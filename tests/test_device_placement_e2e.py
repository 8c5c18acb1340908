"""trainer.placement=device end to end: real `fedtune local up` federations on the CPU (issue 26)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from safetensors.numpy import load_file

from app.training.trainer_service import TrainerUnavailable, call_trainer

NODES, ROUNDS = 20, 2


def _launch(results: Path, nodes: int, rounds: int, run_config: str, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "app.cli", "local", "up", "--profile", "tiny", "--supernodes", str(nodes),
                             "--rounds", str(rounds), "--no-eval", "--results", str(results), "--run-config", run_config, *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _trainer_processes(results: Path) -> list[psutil.Process]:
    """This launch's trainer processes (`trainer_service serve`), found by their FLWR_HOME."""
    found = []
    for proc in psutil.process_iter():
        try:
            cmdline = proc.cmdline()
            if "app.training.trainer_service" in cmdline and "serve" in cmdline and proc.status() != psutil.STATUS_ZOMBIE \
                    and proc.environ().get("FLWR_HOME", "").startswith(str(results)):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _follow(proc: subprocess.Popen, on_line=None, timeout: float = 900) -> str:
    lines, deadline = [], time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line)
        if on_line is not None:
            on_line(line)
        assert time.monotonic() < deadline, "".join(lines)
    proc.wait(timeout=120)
    return "".join(lines)


def _rounds(results: Path) -> list[dict]:
    [run] = results.glob("run-*")
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def federations(tmp_path_factory):
    """The same 20-node tiny federation, once per placement: (returncode, output, results,
    trainer processes seen once the run was submitted, their command lines)."""
    out = {}
    for placement in ("node", "device"):
        results = tmp_path_factory.mktemp(placement)
        # TLS and registered nodes (the default): the ServerApp samples nodes by their registered
        # names, so both federations train the same partitions each round.
        proc = _launch(results, NODES, ROUNDS, f"trainer.placement={placement}")
        seen: list[list[str]] = []

        def count(line, results=results, seen=seen):
            if "submitted" in line:
                seen.extend(p.cmdline() for p in _trainer_processes(results))

        output = _follow(proc, count)
        print(output)
        out[placement] = (proc.returncode, output, results, seen)
    return out


def test_device_placement_ends_with_the_adapter_of_node_placement(federations):
    adapters, losses = {}, {}
    for placement, (code, output, results, _) in federations.items():
        assert code == 0, output
        [run] = results.glob("run-*")
        adapters[placement] = load_file(run / f"peft_{ROUNDS}" / "adapter_model.safetensors")
        losses[placement] = [r["train_loss"] for r in _rounds(results)]
    assert adapters["node"].keys() == adapters["device"].keys()
    assert all(np.array_equal(adapters["node"][k], adapters["device"][k]) for k in adapters["node"])  # bit for bit
    assert losses["node"] == losses["device"] and len(losses["node"]) == ROUNDS
    sampled = {p: [[c["partition_id"] for c in r["clients"]] for r in _rounds(results)] for p, (_, _, results, _) in federations.items()}
    assert sampled["node"] == sampled["device"]


def test_device_placement_starts_one_trainer_and_loads_the_model_once(federations):
    _, _, node_results, node_trainers = federations["node"]
    _, output, device_results, device_trainers = federations["device"]
    assert len(node_trainers) == NODES and len(device_trainers) == 1
    assert output.count(": loading tiny") == 1 and "trainer-cpu: loaded tiny in" in output
    [device_log_dir] = device_results.glob(".local/*/logs")
    assert [p.name for p in device_log_dir.glob("trainer-*.log")] == ["trainer-cpu.log"]
    device_clients = [c for r in _rounds(device_results) for c in r["clients"]]
    [trainer] = {c["trainer_id"] for c in device_clients}
    assert trainer.startswith("device:cpu:") and trainer.rsplit(":", 1)[1].isdigit() and all(c["resident"] for c in device_clients)
    node_clients = [c for r in _rounds(node_results) for c in r["clients"]]
    by_partition = {c["partition_id"]: c["trainer_id"] for c in node_clients}
    assert all(t.startswith("node:cpu:") for t in by_partition.values())
    assert len(set(by_partition.values())) == len(by_partition)  # each node its own trainer
    [run] = device_results.glob("run-*")
    assert f"| {trainer} | {len(device_clients)} |" in (run / "report.md").read_text()


def test_device_trainers_and_their_tokens_are_gone_after_the_launch(federations):
    _, _, results, [cmdline] = federations["device"]
    assert _trainer_processes(results) == []
    registry = Path(cmdline[-1])
    assert registry.name == "registry.json" and not registry.parent.parent.exists()
    leaked = [p for p in results.rglob("*") if p.name.startswith(("token-", "registry"))]
    assert leaked == []


def test_a_trainer_killed_mid_round_falls_back_and_is_replaced(tmp_path):
    """SIGKILL the device trainer while it serves a round: its queued and running requests train
    in-process, no round fails, the watchdog starts a new trainer and later rounds use it."""
    rounds = 5
    # Trainings long enough that the round's requests queue: with warm ClientApp starts (the fork
    # server) the tiny profile's 4 steps could end before the next node's request arrived.
    proc = _launch(tmp_path, 3, rounds, "trainer.placement=device strategy.fraction-train=1.0 train.training-arguments.max-steps=40",
                   "--insecure")
    killed: list[int] = []

    def kill_when_busy(line):
        if killed or not line.startswith("round   1:"):
            return
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            for trainer in _trainer_processes(tmp_path):
                try:
                    health, _ = call_trainer(trainer.cmdline()[-2], {"op": "ping"}, None, 5.0, 5.0)
                except (TrainerUnavailable, psutil.Error):
                    continue
                if health["busy_seconds"] > 0 and health["waiting"] > 0:  # one training, more queued
                    trainer.send_signal(signal.SIGKILL)
                    killed.append(trainer.pid)
                    return
            time.sleep(0.05)

    output = _follow(proc, kill_when_busy)
    assert proc.returncode == 0 and killed, output
    records = _rounds(tmp_path)
    assert [r["round"] for r in records] == list(range(1, rounds + 1)) and all(r["failures"] == 0 for r in records)
    ids = [[c["trainer_id"] for c in r["clients"]] for r in records]
    fell_back = [c for r in records for c in r["clients"] if c["trainer_id"] == "device:cpu:in-process"]
    assert len(fell_back) >= 2 and not any(c["resident"] for c in fell_back), ids  # the running one and those queued
    first, last = set(ids[0]), set(ids[-1])
    assert first == {f"device:cpu:{killed[0]}"}, ids
    [new] = last
    assert new.startswith("device:cpu:") and new != f"device:cpu:{killed[0]}" and new.rsplit(":", 1)[1].isdigit(), ids
    [log] = tmp_path.glob(".local/*/logs/trainer-cpu.log")
    assert "resident trainer exited with code -9; restarting it" in log.read_text()
