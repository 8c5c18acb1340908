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
from conftest import docker_missing


def _compose_v2() -> bool:
    return shutil.which("docker") is not None and subprocess.run(
        ["docker", "compose", "version"], capture_output=True).returncode == 0


@pytest.fixture
def needs_compose():
    if not _compose_v2():
        docker_missing("Docker Compose v2 is missing (docker/install-compose.sh)")


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
        assert node["volumes"] == [f"certs-supernode-{i}:/certs:ro", "model-cache:/cache:ro"]
        assert node["depends_on"]["register"]["condition"] == "service_completed_successfully"
    superlink = services["superlink"]
    assert superlink["command"][:len(flower_tls_args("superlink", paths, isolation="process")) + 1] == [
        "flower-superlink", *flower_tls_args("superlink", paths, isolation="process")]
    assert "--health-server-address" in superlink["command"] and "healthcheck" in superlink
    # one host: nothing outside it needs the SuperLink, so nothing is published
    assert not any("ports" in s for s in services.values())
    assert services["serverapp"]["command"][0] == "flower-superexec" and "deploy" not in services["serverapp"]
    run = services["run"]["command"]
    assert run[:2] == ["fedtune", "run"] and run[run.index("--nodes") + 1] == "5"
    assert "dataset.num-partitions=5" in run[run.index("--run-config") + 1]
    certs = services["certs"]["command"]
    assert certs[certs.index("--supernodes") + 1] == "5"
    assert set(spec["volumes"]) == {"certs-issuer", "certs-superlink", "certs-serverapp", "certs-register", "certs-run",
                                    *(f"certs-supernode-{i}" for i in range(5)), "model-cache", "superlink-state"}


def test_secure_aggregation_is_a_setting_of_the_stack():
    from app.config import load_settings, parse_overrides

    run = compose_spec(StackSpec(nodes=5))["services"]["run"]["command"]
    config = run[run.index("--run-config") + 1]
    assert "privacy.secure-aggregation=${FEDTUNE_SECURE_AGGREGATION:-false}" in config
    for value in (True, False):  # what compose substitutes from .env is a valid setting
        substituted = config.replace("${FEDTUNE_SECURE_AGGREGATION:-false}", str(value).lower())
        assert load_settings(parse_overrides(substituted)).privacy.secure_aggregation is value
    # The stack's own run config, when it sets it, decides instead of .env.
    chosen = compose_spec(StackSpec(nodes=5, run_config="privacy.secure-aggregation=true"))["services"]["run"]["command"]
    config = chosen[chosen.index("--run-config") + 1]
    assert "FEDTUNE_SECURE_AGGREGATION" not in config and "privacy.secure-aggregation=true" in config


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
    assert not any("ports" in s for s in spec["services"].values())
    assert spec["name"] == "fedtune-smoke"


def test_generator_rejects_bad_parameters():
    with pytest.raises(ValueError):
        compose_spec(StackSpec(nodes=0))
    with pytest.raises(ValueError):
        compose_spec(StackSpec(gpus=0))
    assert "deploy" not in compose_spec(StackSpec(nodes=1, gpus=0, no_gpu=True))["services"]["supernode-0"]
    with pytest.raises(ValueError, match="only --role superlink"):
        compose_spec(StackSpec(publish="0.0.0.0:9093:9093"))


def _mounted_cert_files(spec: dict, certs_dir: Path) -> dict[str, set[str]]:
    """service -> the certificate files it can read: for a volume, what the `certs` service
    exports into it (run for real into certs_dir); for bind mounts, each file's name."""
    import shlex
    from app.deploy.stack import cmd_certs, register

    services = spec["services"]
    volume_dirs = {}
    if "certs" in services:
        command = services["certs"]["command"]
        volume_dirs = {v.split(":")[0]: certs_dir / "export" / Path(v.split(":")[1]).name
                       for v in services["certs"]["volumes"] if v.split(":")[1].startswith("/export/")}
        for d in volume_dirs.values():
            d.mkdir(parents=True)
        import argparse

        parser = argparse.ArgumentParser()
        register(parser.add_subparsers(dest="command"))
        args = parser.parse_args(["stack", "certs", "--dir", str(certs_dir / "issuer"), *command[5:command.index("--export")],
                                  "--export", str(certs_dir / "export")])
        assert cmd_certs(args) == 0
    seen = {}
    for name, service in services.items():
        files = set()
        for volume in service.get("volumes", []):
            if isinstance(volume, dict):
                assert volume["read_only"] and volume["bind"]["create_host_path"] is False
                files.add(Path(volume["target"]).name)
            elif volume.endswith(":/certs:ro"):
                files |= {p.name for p in volume_dirs[volume.split(":")[0]].iterdir()}
        if files:
            seen[name] = files
    return seen


def _needs(nodes: int) -> dict[str, set[str]]:
    common = {"ca.crt"}
    return {
        "superlink": common | {"superlink.crt", "superlink.key", "superexec.secret"},
        "serverapp": common | {"superexec.secret"},
        "register": common | {f"supernode-{i}.pub" for i in range(nodes)},
        "run": common,
        **{f"supernode-{i}": common | {f"supernode-{i}.key", f"supernode-{i}-runtime.crt", f"supernode-{i}-runtime.key"}
           for i in range(nodes)},
    }


def test_each_service_holds_only_its_own_certificate_files(tmp_path):
    """One host: the `certs` service (one-shot, the only holder of ca.key) fills one volume per
    service; every long-running service reads exactly what it needs, no more."""
    spec = compose_spec(StackSpec(nodes=3, gpus=1))
    seen = _mounted_cert_files(spec, tmp_path)
    assert seen == _needs(3)
    assert "issuer" not in str([v for n, s in spec["services"].items() if n != "certs" for v in s.get("volumes", [])])
    for name, files in seen.items():
        for f in files:
            mode = (tmp_path / "export" / name / f).stat().st_mode & 0o777
            assert mode == (0o600 if f.endswith((".key", ".secret")) else 0o644), (name, f, oct(mode))


def test_split_services_bind_only_their_own_files():
    coordinator = _mounted_cert_files(compose_spec(StackSpec(role="superlink", nodes=3)), Path("/nonexistent"))
    needs = _needs(3)
    assert coordinator == {"superlink": needs["superlink"], "serverapp": needs["serverapp"], "register": needs["register"],
                           "run": needs["run"], "edge": {"ca.crt", "edge.crt", "edge.key"}}
    site = _mounted_cert_files(compose_spec(StackSpec(role="site", nodes=3)), Path("/nonexistent"))
    p = "${FEDTUNE_PARTITION_ID:?see .env.site.example}"
    assert site == {"supernode": {"ca.crt", f"supernode-{p}.key", f"supernode-{p}-runtime.crt", f"supernode-{p}-runtime.key"}}


def test_only_the_edge_faces_the_sites():
    """At the coordinating site the edge is the one port for the sites (its address must be
    given: no silent all-interfaces default); the SuperLink is on the host's loopback only."""
    services = compose_spec(StackSpec(role="superlink", nodes=3))["services"]
    published = {name: s["ports"] for name, s in services.items() if "ports" in s}
    assert published == {"edge": ["${FEDTUNE_EDGE_PUBLISH:?the address the sites dial, e.g. 10.0.0.5:9093 "
                                  "(.env.superlink.example)}:9093"],
                         "superlink": ["${FEDTUNE_CONTROL_PUBLISH:-127.0.0.1:9094}:9093"]}
    conf = (REPO / "docker" / "edge-nginx.conf").read_text()
    locations = [line.split()[1] for line in conf.splitlines() if line.strip().startswith("location ")]
    assert locations == ["/v1/fleet/", "/"]
    assert "proxy_pass https://superlink:9093/v1/fleet/;" in conf and "proxy_ssl_verify on;" in conf
    assert 'return 403' in conf.split("location / {")[1]


def test_rendered_yaml_round_trips():
    text = render_compose(StackSpec(nodes=4, gpus=2))
    assert "&id" not in text and "*id" not in text  # no YAML aliases
    assert yaml.safe_load(text) == compose_spec(StackSpec(nodes=4, gpus=2))


@pytest.mark.parametrize("name", ["compose.yaml", "compose.smoke.yaml"])
def test_docker_compose_config_accepts_committed_files(name, tmp_path, needs_compose):
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


def test_split_files_are_accepted_and_a_site_needs_its_address_and_partition(tmp_path, needs_compose):
    coordinator = _compose_config("compose.superlink.yaml", tmp_path, FEDTUNE_CERTS_DIR="/srv/certs",
                                  FEDTUNE_EDGE_PUBLISH="10.0.0.5:9093")
    assert coordinator.returncode == 0, coordinator.stderr
    services = json.loads(coordinator.stdout)["services"]
    assert set(services) == {"superlink", "edge", "register", "serverapp", "run"}
    assert services["superlink"]["volumes"][0]["source"] == "/srv/certs/ca.crt"
    assert [p["host_ip"] for p in services["superlink"]["ports"]] == ["127.0.0.1"]
    assert [(p["host_ip"], p["published"]) for p in services["edge"]["ports"]] == [("10.0.0.5", "9093")]
    unset = _compose_config("compose.superlink.yaml", tmp_path, FEDTUNE_CERTS_DIR="/srv/certs")
    assert unset.returncode != 0 and "FEDTUNE_EDGE_PUBLISH" in unset.stderr

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


def test_device_placement_gives_each_gpu_a_trainer_and_each_node_only_its_own_token():
    spec = StackSpec(nodes=20, gpus=8, placement="device")
    services = compose_spec(spec)["services"]
    trainers = sorted(name for name in services if name.startswith("trainer-") and name != "trainer-tokens")
    assert trainers == [f"trainer-{g}" for g in range(8)]
    for g in range(8):
        trainer = services[f"trainer-{g}"]
        assert trainer["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == [str(g)]
        assert f"trainer-registry-{g}:/trainer-registry:ro" in trainer["volumes"] and trainer["network_mode"] == "none"
    for i in range(20):
        node = services[f"supernode-{i}"]
        gpu = i % 8
        tokens = [v for v in node["volumes"] if v.startswith("trainer-token-")]
        assert tokens == [f"trainer-token-{i}:/trainer-token:ro"]  # its own token, no other
        assert f"trainer-socket-{gpu}:/run/fedtune-trainer" in node["volumes"]
        assert not any(v.startswith("trainer-registry") for v in node["volumes"])
        assert node["command"][:7] == ["fedtune", "supernode", "--trainer-socket", "/run/fedtune-trainer/trainer.sock",
                                       "--trainer-token", "/trainer-token/token", "--"]
        assert f"trainer-{gpu}" in node["depends_on"]
    registries = [v for name, s in services.items() if name != "trainer-tokens" for v in s.get("volumes", []) if "registry" in str(v)]
    assert len(registries) == 8  # each mounted by its trainer alone
    assert "trainer.placement=device" in " ".join(services["run"]["command"])
    assert "--placement device" in spec.command_line()
    node_spec = compose_spec(StackSpec(nodes=20, gpus=8))["services"]
    assert not any(name.startswith("trainer") for name in node_spec)
    assert node_spec["supernode-0"]["command"][2] == "--"
    with pytest.raises(ValueError, match="--placement 'device': expected node, or device with --role all"):
        compose_spec(StackSpec(role="site", placement="device"))


def test_trainer_tokens_fill_each_volume_with_its_own_files(tmp_path, capsys):
    import stat
    import types

    from app.deploy.stack import cmd_trainer_tokens
    from app.training.node_tokens import NodeRegistry, read_token

    args = types.SimpleNamespace(export=str(tmp_path), devices="0,1,0", partitions=3, owner=None)
    assert cmd_trainer_tokens(args) == 0
    tokens = [read_token({"FEDTUNE_TRAINER_TOKEN": str(tmp_path / f"trainer-token-{i}" / "token")}) for i in range(3)]
    registries = {g: NodeRegistry.load(tmp_path / f"trainer-registry-{g}" / "registry.json") for g in "01"}
    assert [registries["0"].node_for(tokens[i]).partition_id for i in (0, 2)] == [0, 2]
    assert registries["1"].node_for(tokens[1]).partition_id == 1
    with pytest.raises(PermissionError):
        registries["1"].node_for(tokens[0])  # a node of GPU 0 is unknown to GPU 1's trainer
    assert stat.S_IMODE((tmp_path / "trainer-socket-0").stat().st_mode) == 0o700
    assert cmd_trainer_tokens(types.SimpleNamespace(export=str(tmp_path), devices="0,,1", partitions=3, owner=None)) == 2
    assert "--devices '0,,1': expected one device per SuperNode" in capsys.readouterr().err
