"""The compose generator (app/deploy/stack.py): committed files equal its output; parameters; Compose accepts it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from app.deploy.certs import CertPaths, flower_tls_args
from app.deploy.compose import COMMITTED, REPO, StackSpec, compose_spec, render_compose, smoke_spec


def _compose_v2() -> bool:
    return shutil.which("docker") is not None and subprocess.run(
        ["docker", "compose", "version"], capture_output=True).returncode == 0


needs_compose = pytest.mark.skipif(not _compose_v2(), reason="Docker Compose v2 missing (docker/install-compose.sh)")


@pytest.mark.parametrize("name", sorted(COMMITTED))
def test_committed_compose_files_equal_generator_output(name):
    assert (REPO / name).read_text() == render_compose(COMMITTED[name]), \
        f"{name} is stale: regenerate it with the command in its first line"


def test_generator_nodes_gpus_and_flags():
    spec = compose_spec(StackSpec(nodes=5, gpus=3))
    services = spec["services"]
    nodes = [s for s in services if s.startswith("supernode-")]
    assert nodes == [f"supernode-{i}" for i in range(5)]
    paths = CertPaths(Path("/certs"), 5)
    for i in range(5):
        node = services[f"supernode-{i}"]
        devices = node["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "device_ids": [str(i % 3)], "capabilities": ["gpu"]}]
        command = node["command"]
        assert command[:3] == ["fedtune", "supernode", "--"]
        assert command[3:3 + len(flower_tls_args("supernode", paths, i))] == flower_tls_args("supernode", paths, i)
        assert command[-2:] == ["--node-config", f"partition-id={i} num-partitions=5"]
        assert "--isolation" in command and command[command.index("--isolation") + 1] == "subprocess"
        assert node["restart"] == "on-failure"
        assert "model-cache:/cache:ro" in node["volumes"] and "certs:/certs:ro" in node["volumes"]
        assert node["depends_on"]["register"]["condition"] == "service_completed_successfully"
    superlink = services["superlink"]
    assert superlink["command"][:len(flower_tls_args("superlink", paths, isolation="process")) + 1] == [
        "flower-superlink", *flower_tls_args("superlink", paths, isolation="process")]
    assert "--health-server-address" in superlink["command"] and "healthcheck" in superlink
    assert superlink["ports"] == ["${FEDTUNE_SUPERLINK_PUBLISH:-9093}:9093"]  # one port: Fleet + Control
    assert not any("ports" in s for name, s in services.items() if name != "superlink")
    assert services["serverapp"]["command"][0] == "flower-superexec" and "deploy" not in services["serverapp"]
    run = services["run"]["command"]
    assert run[:2] == ["fedtune", "run"] and run[run.index("--nodes") + 1] == "5"
    assert "dataset.num-partitions=5" in run[run.index("--run-config") + 1]
    assert services["certs"]["command"][-2:] == ["--supernodes", "5"]
    assert set(spec["volumes"]) == {"certs", "model-cache", "superlink-state"}


def test_evaluate_and_report_follow_a_successful_run_and_end_the_stack():
    spec = compose_spec(StackSpec(nodes=5, gpus=3, eval_limit=100))
    services = spec["services"]
    assert list(services)[-3:] == ["run", "evaluate", "report"]
    # `run` waits for the model download before its wait for the SuperNodes starts
    assert services["run"]["depends_on"]["model-cache"] == {"condition": "service_completed_successfully"}
    evaluate, report = services["evaluate"], services["report"]
    assert evaluate["depends_on"] == {"run": {"condition": "service_completed_successfully"}}
    assert report["depends_on"] == {"evaluate": {"condition": "service_completed_successfully"}}
    command = evaluate["command"]
    assert command[:4] == ["fedtune", "eval-run", "--latest", "/results"]
    assert command[command.index("--gpus") + 1] == "0,1,2" and command[command.index("--limit") + 1] == "100"
    assert command[command.index("--data-dir") + 1] == "/cache/fedtune/eval" and "--exact" not in command
    assert evaluate["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["0", "1", "2"]
    assert "model-cache:/cache:ro" in evaluate["volumes"] and evaluate["network_mode"] == "none"
    assert report["command"] == ["fedtune", "report", "--latest", "/results"]
    # only the last one is attached: `up --exit-code-from report` ends when the table exists
    assert [name for name, s in services.items() if s.get("attach", True)] == ["report"]
    assert render_compose(StackSpec()).splitlines()[1] == "# Start: docker compose up --exit-code-from report"
    assert "--exact" in compose_spec(StackSpec(eval_exact=True))["services"]["evaluate"]["command"]
    smoke = compose_spec(smoke_spec(nodes=3))["services"]["evaluate"]
    assert smoke["command"] == ["fedtune", "eval-run", "--latest", "/results"] and "deploy" not in smoke  # tiny: its own files
    coordinator = compose_spec(StackSpec(role="superlink"))["services"]
    assert "evaluate" not in coordinator and [n for n, s in coordinator.items() if s.get("attach", True)] == ["run"]


def test_generator_no_gpu_smoke_variant():
    spec = compose_spec(smoke_spec(nodes=3, rounds=2))
    assert not any("deploy" in s for s in spec["services"].values())
    run = spec["services"]["run"]["command"]
    assert run[run.index("--profile") + 1] == "tiny" and run[run.index("--rounds") + 1] == "2"
    assert spec["services"]["superlink"]["ports"] == ["127.0.0.1::9093"]
    assert spec["name"] == "fedtune-smoke"


def test_generator_rejects_bad_parameters():
    with pytest.raises(ValueError):
        compose_spec(StackSpec(nodes=0))
    with pytest.raises(ValueError):
        compose_spec(StackSpec(gpus=0))
    assert "deploy" not in compose_spec(StackSpec(nodes=1, gpus=0, no_gpu=True))["services"]["supernode-0"]


def test_rendered_yaml_round_trips():
    text = render_compose(StackSpec(nodes=4, gpus=2))
    assert "&id" not in text and "*id" not in text  # no YAML aliases
    assert yaml.safe_load(text) == compose_spec(StackSpec(nodes=4, gpus=2))


@needs_compose
@pytest.mark.parametrize("name", ["compose.yaml", "compose.smoke.yaml"])
def test_docker_compose_config_accepts_committed_files(name, tmp_path):
    done = subprocess.run(
        ["docker", "compose", "--env-file", "/dev/null", "-f", str(REPO / name), "--project-directory", str(REPO),
         "config", "--format", "json"],
        capture_output=True, text=True, env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr
    config = json.loads(done.stdout)
    nodes = [s for s in config["services"] if s.startswith("supernode-")]
    assert len(nodes) == 20
    gpu = name == "compose.yaml"
    for i in range(20):
        node = config["services"][f"supernode-{i}"]
        assert node["command"][-1] == f"partition-id={i} num-partitions=20"
        if gpu:
            assert node["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == [str(i % 8)]
        else:
            assert "deploy" not in node
    assert config["services"]["serverapp"]["volumes"][1]["source"] == str(REPO / "results")
    assert config["services"]["report"]["depends_on"]["evaluate"]["condition"] == "service_completed_successfully"


def _compose_config(name: str, home: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["docker", "compose", "--env-file", "/dev/null", "-f", str(REPO / name), "--project-directory", str(REPO),
         "config", "--format", "json"],
        capture_output=True, text=True, env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), **env},
    )


@needs_compose
def test_split_files_are_accepted_and_a_site_needs_its_address_and_partition(tmp_path):
    coordinator = _compose_config("compose.superlink.yaml", tmp_path, FEDTUNE_CERTS_DIR="/srv/certs")
    assert coordinator.returncode == 0, coordinator.stderr
    services = json.loads(coordinator.stdout)["services"]
    assert set(services) == {"superlink", "register", "serverapp", "run"}
    assert services["superlink"]["volumes"][0]["source"] == "/srv/certs"

    site = _compose_config("compose.site.yaml", tmp_path, FEDTUNE_SUPERLINK_ADDRESS="superlink.example.org:9093",
                           FEDTUNE_PARTITION_ID="7", FEDTUNE_GPU="3")
    assert site.returncode == 0, site.stderr
    node = json.loads(site.stdout)["services"]["supernode"]
    command = node["command"]
    assert command[command.index("--superlink") + 1] == "superlink.example.org:9093"
    assert command[command.index("--auth-supernode-private-key") + 1] == "/certs/supernode-7.key"
    assert command[-1] == "partition-id=7 num-partitions=20"
    assert node["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["3"]

    missing = _compose_config("compose.site.yaml", tmp_path, FEDTUNE_SUPERLINK_ADDRESS="superlink.example.org:9093")
    assert missing.returncode != 0 and "FEDTUNE_PARTITION_ID" in missing.stderr


def test_a_download_in_progress_shows_in_the_logs(tmp_path, capsys):
    import time

    from app.deploy.stack import download_progress

    with download_progress(tmp_path, "model x", every=0.05):
        for i in range(4):
            (tmp_path / f"blob-{i}.incomplete").write_bytes(b"\0" * 2**20)
            time.sleep(0.08)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("model x: ")]
    assert len(lines) >= 2 and lines[-1].startswith("model x: 4 MiB downloaded"), lines  # progress, then the total
