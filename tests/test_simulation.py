"""`flwr run .`, FlowerTune's own command: the same app as a local Flower simulation (issue 25).

The real path a FlowerTune user takes: `flwr run .` in the project starts flwr's managed local
SuperLink, which runs the ServerApp and 20 simulated SuperNodes (Ray workers) on this machine.
FLWR_HOME and the SuperLink's port are the test's own; every process that carries this FLWR_HOME
is stopped at the end (flwr leaves its SuperLink running by design).
"""

import json
import os
import re
import subprocess
import sys
import time
import tomllib
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pytest

from app.aggregation.bounds import recipe_norm_bound, round_norm_bound
from app.config import load_settings
from app.deploy.launcher import free_port
from app.training import data
from app.training.worker import MODEL_LOG_PREFIX, NodeData, RoundWorker, TrainRequest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent  # flwr and the flower-superlink it starts, as `pip install -e ".[simulation]"` put them
NODES, ROUNDS = 20, 2  # FlowerTune's num-supernodes; 2 Ray workers (one CPU each) on 2 cores


def _flwr_home_processes(home: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("FLWR_HOME") == str(home):
                found.append(proc)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def flwr_run(tmp: Path, run_config: str, *federation_config: str) -> tuple[str, dict, Path, float]:
    """`flwr run . --stream` as a user types it, with this test's FLWR_HOME and ports: its output,
    `flwr ls`'s runs, the results directory and the seconds it took. Stops the SuperLink after."""
    home, results = tmp / "flwr-home", tmp / "results"
    env = dict(
        os.environ,
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        FLWR_HOME=str(home),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
        # The venv already holds the app's dependencies (README, "Coming from FlowerTune").
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        RAY_DEDUP_LOGS="0",  # every worker's model-load line, not one per cluster
    )
    started = time.perf_counter()
    try:
        run = subprocess.run([str(VENV_BIN / "flwr"), "run", ".", "--stream", "--run-config", f"{run_config} results.dir='{results}'", *federation_config],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        seconds = time.perf_counter() - started
        listed = subprocess.run([str(VENV_BIN / "flwr"), "ls", "--format", "json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    finally:
        left = _flwr_home_processes(home)
        for proc in left:
            proc.kill()
        psutil.wait_procs(left, timeout=30)
    assert not _flwr_home_processes(home)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-5000:]  # flwr run exits 0 whatever the run does: `flwr ls` says
    return output, json.loads(listed.stdout), results, seconds


@pytest.fixture(scope="module")
def simulation(tmp_path_factory):
    output, listed, results, seconds = flwr_run(
        tmp_path_factory.mktemp("simulation"), f"profile='tiny' num-server-rounds={ROUNDS}",
        "--federation-config", f"num-supernodes={NODES} client-resources-num-cpus=1",
    )
    print(f"flwr run . ({NODES} simulated SuperNodes, {ROUNDS} rounds): {seconds:.1f} s")
    return output, listed, results


def test_flwr_run_trains_and_saves_the_adapter(simulation):
    output, listed, results = simulation
    run_id = re.search(r"Successfully started run (\d+)", output).group(1)
    (run,) = [r for r in listed["runs"] if r["run-id"] == run_id]
    assert run["status"] == "finished:completed", run
    assert f"({NODES} simulated SuperNodes)" in output
    run_dir = results / f"run-{run_id}"
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["status"], r["failures"]) for r in rounds] == [(n, "aggregated", 0) for n in range(1, ROUNDS + 1)]
    assert (run_dir / f"peft_{ROUNDS}" / "adapter_model.safetensors").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped"] is None and summary["rounds_aggregated"] == ROUNDS


def test_every_node_trains_its_own_partition_of_the_simulation(simulation):
    _, listed, results = simulation
    (run_dir,) = results.iterdir()
    clients = [c for line in (run_dir / "metrics.jsonl").read_text().splitlines() for c in json.loads(line)["clients"]]
    assert len(clients) >= 2 * ROUNDS  # fraction-train of 20 nodes
    assert all(0 <= c["partition_id"] < NODES for c in clients)
    assert len({c["partition_id"] for c in clients}) > 1
    assert all(c["num_examples"] > 0 for c in clients)


def test_the_serverapp_checks_and_norm_bound_hold(simulation):
    _, _, results = simulation
    (run_dir,) = results.iterdir()
    settings = load_settings(json.loads((run_dir / "config.json").read_text()))
    parameters = json.loads((run_dir / "summary.json").read_text())["adapter_parameters"]
    for record in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        norms = [c["update_norm"] for c in record["clients"]]
        recipe = recipe_norm_bound(settings.train.training_arguments.max_steps, record["lr"], parameters)
        assert record["norm_bound"] == pytest.approx(round_norm_bound(0.0, recipe, 0.0, norms))
        for client in record["clients"]:
            assert 0 < client["update_scale"] <= 1
            assert client["update_norm"] * client["update_scale"] <= record["norm_bound"] * (1 + 1e-6)
            assert client["resident"] is False  # no trainer socket in a simulation: in-process


def test_each_ray_worker_loads_the_base_model_once(simulation):
    """One Ray worker runs the ClientApp for many simulated nodes and rounds: one load each."""
    output, _, _ = simulation
    loads = Counter(re.findall(rf"\(ClientAppActor pid=(\d+)\)\S* {MODEL_LOG_PREFIX}loading ", output))
    assert loads and set(loads.values()) == {1}, loads


def test_ci_installs_the_simulation_extra():
    """CI installs `.[test]`: it must bring flwr's simulation engine (Ray) at the pinned flwr."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert extras["simulation"] == ["flwr[simulation]==1.42.0"]
    assert "flwr==1.42.0" in project["dependencies"]
    assert set(extras["simulation"]) <= set(extras["test"])


def test_a_worker_serving_many_nodes_trains_each_as_a_fresh_one_would(monkeypatch):
    """A simulation worker keeps one model for all its nodes and each node's partition: a node's
    round must not depend on which nodes the worker trained before, and no partition is read twice."""
    run_config = {"profile": "tiny", "dataset.num-partitions": NODES}
    shared = RoundWorker()
    initial = shared.initial_adapter(run_config)
    reads, load_partition = Counter(), data.load_partition
    monkeypatch.setattr(data, "load_partition", lambda *a, **k: (reads.update([a[2]]), load_partition(*a, **k))[1])
    for partition, shared_reads_expected in ((3, 1), (7, 1), (3, 0)):
        request = TrainRequest(run_config, NodeData(partition, NODES), 1, 0.05, 0.01)
        before = reads.total()
        state, metrics = shared.train(request, initial)
        shared_reads = reads.total() - before
        fresh_state, fresh_metrics = RoundWorker().train(request, initial)
        assert metrics["train-loss"] == fresh_metrics["train-loss"]
        assert all(np.array_equal(state[k], fresh_state[k]) for k in state)
        assert shared_reads == shared_reads_expected


def test_a_simulated_nodes_error_is_its_clientapps_message():
    """flwr's simulation reports a ClientApp's exception as Ray's traceback around it (built here as
    flwr 1.42's vce_api does); the ServerApp records the message, which says what to change."""
    import traceback

    from flwr.clientapp.client_app import ClientAppException
    from ray.exceptions import RayTaskError

    from app.aggregation.replies import error_reason

    message = "node config num-partitions=2 disagrees with the run's dataset.num-partitions=20"
    try:
        try:
            raise ValueError(message)
        except ValueError as exc:
            raise ClientAppException(str(exc)) from exc
    except ClientAppException as exc:
        ray_error = RayTaskError("ClientAppActor.run", traceback.format_exc(), exc).as_instanceof_cause()
    reason = str(type(ray_error)) + ":<'" + str(ray_error) + "'>"
    assert error_reason(reason) == message
    assert error_reason("<class 'ValueError'>:<'" + message + "'>") == "<class 'ValueError'>:<'" + message + "'>"  # a deployed node's


def test_flwr_run_without_the_federation_size_fails_saying_what_to_pass(tmp_path):
    """flwr 1.42's default simulation has 2 nodes, the recipe 20 partitions: the run fails, and
    the reason in metrics.jsonl and `flwr ls` says what to pass."""
    output, listed, results, seconds = flwr_run(tmp_path, "profile='tiny' num-server-rounds=1 strategy.max-retries=0")
    print(f"flwr run . with flwr's 2 default nodes: {seconds:.1f} s")
    (run,) = listed["runs"]
    assert run["status"] == "finished:failed" and "no round aggregated" in run["status-details"], run
    (run_dir,) = results.iterdir()
    (record,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert record["status"] == "skipped" and record["failed"]
    hint = "disagrees with the run's dataset.num-partitions=20 (a `flwr run .` simulation has one partition per simulated SuperNode: " \
           '--federation-config "num-supernodes=20")'
    assert all(f["reason"].startswith("error 2: node config num-partitions=2 ") and f["reason"].endswith(hint) for f in record["failed"]), record["failed"]
