"""The Compose stack on the real Docker engine (docker SDK): images, a healthy SuperLink, and the
whole smoke stack (20 SuperNodes, 2 rounds, tiny profile, no GPU).

Skipped where no Docker engine or no Docker Compose v2 answers. Missing or stale images are
(re)built first with `docker/build-images.sh --offline` (cached layers: seconds when only app/
changed; the first build takes several minutes and downloads about 3 GB of wheels); set
FEDTUNE_STACK_NO_BUILD=1 to use the images as they are.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from app.deploy.compose import REPO, UID, app_image, render_compose, smoke_spec, superlink_image
from app.deploy.smoke import Stack, smoke

docker = pytest.importorskip("docker")


def _engine():
    try:
        client = docker.from_env(timeout=30)
        client.ping()
        return client
    except Exception:  # noqa: BLE001 - no engine, no socket, no permission: skip
        return None


CLIENT = _engine()
COMPOSE = CLIENT is not None and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
pytestmark = pytest.mark.skipif(not COMPOSE, reason="needs a Docker engine and Docker Compose v2 (docker/install-compose.sh)")
NODES = 20


@pytest.fixture(scope="module")
def images():
    if os.environ.get("FEDTUNE_STACK_NO_BUILD") != "1":
        done = subprocess.run([str(REPO / "docker" / "build-images.sh"), "--offline"], capture_output=True, text=True, timeout=3600)
        assert done.returncode == 0, f"image build failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return {"app": CLIENT.images.get(app_image()), "superlink": CLIENT.images.get(superlink_image())}


def test_images_run_as_non_root_and_carry_no_secret(images):
    for image in images.values():
        config = image.attrs["Config"]
        assert config["User"] == f"{UID}:{UID}"
        assert not config.get("Volumes"), "an image VOLUME would leave anonymous volumes behind"
        assert not any(k.startswith(("HF_TOKEN", "FLWR_SECRET")) for k in (e.split("=")[0] for e in config.get("Env") or []))
    for name, image in images.items():
        listing = CLIENT.containers.run(
            image.id, ["sh", "-c", "find / -xdev \\( -name '*.key' -o -name '*.secret' -o -name 'ca.crt' \\) "
                       "-not -path '/proc/*' -not -path '*/site-packages/*' 2>/dev/null; ls -A /certs"],
            remove=True, network_mode="none").decode()
        assert listing.strip() == "", f"{name} image holds key material: {listing}"
    # the SuperLink image is flwr alone: no torch
    out = CLIENT.containers.run(images["superlink"].id, ["python", "-c", "import importlib.util as u; print(u.find_spec('torch'))"],
                                remove=True, network_mode="none").decode().strip()
    assert out == "None"
    assert images["superlink"].attrs["Size"] < images["app"].attrs["Size"] / 5


def _compose_file(tmp_path: Path, project: str, nodes: int = NODES) -> Path:
    path = tmp_path / "compose.yaml"
    path.write_text(render_compose(smoke_spec(nodes=nodes, project=project)))
    return path


def test_superlink_comes_up_healthy_with_tls(images, tmp_path):
    project = "fedtune-test-superlink"
    stack = Stack(_compose_file(tmp_path, project, nodes=2), project, env={"FEDTUNE_RESULTS": str(tmp_path)})
    stack.down()
    try:
        stack.compose("up", "--detach", "superlink", capture=True, timeout=300)
        deadline = time.monotonic() + 120
        while True:
            container = stack.container("superlink")
            container.reload()
            health = container.attrs["State"].get("Health", {}).get("Status")
            if health == "healthy":
                break
            assert container.status == "running", stack.logs("superlink")
            assert time.monotonic() < deadline, f"superlink not healthy ({health}):\n{stack.logs('superlink')}"
            time.sleep(2)
        assert stack.container("certs").attrs["State"]["ExitCode"] == 0
        ports = container.attrs["NetworkSettings"]["Ports"]
        assert list(ports) == ["9093/tcp"] and ports["9093/tcp"][0]["HostIp"] == "127.0.0.1"
        uids = {row[0] for row in container.top(ps_args="-o uid,pid,comm")["Processes"]}
        assert uids == {str(UID)}
        log = stack.logs("superlink", tail=200)
        assert "https://" in log, log  # TLS on the one port
        # plaintext is refused on the published port
        host_port = ports["9093/tcp"][0]["HostPort"]
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", int(host_port), timeout=5)
        with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
            conn.request("GET", "/health")
            status = conn.getresponse().status
            raise ConnectionError(f"plain HTTP answered {status}") if status == 200 else http.client.HTTPException(status)
    finally:
        stack.down()
    assert stack.leftovers() == {"containers": [], "networks": [], "volumes": []}


def test_smoke_stack_runs_two_rounds_with_twenty_supernodes(images, tmp_path):
    results = tmp_path / "results"
    seen: dict = {}

    def check(stack: Stack) -> None:
        nodes = stack.containers_by_role("supernode")
        seen["nodes"] = sorted(c.labels["com.docker.compose.service"] for c in nodes)
        seen["restarts"] = {c.name: c.attrs["RestartCount"] for c in nodes}
        seen["configured_users"] = {c.attrs["Config"]["User"] for c in nodes}

    result = smoke(nodes=NODES, rounds=2, results=results, project="fedtune-test-smoke", check=check)

    assert result.run_exit_code == 0
    assert f"SuperNodes online: {NODES}/{NODES}" in result.log
    assert seen["nodes"] == sorted(f"supernode-{i}" for i in range(NODES))
    # a node may restart while 20 start at once on 2 cores (Stack.failed_services); each came back
    assert all(n <= 15 for n in seen["restarts"].values()), seen["restarts"]
    # every SuperNode's processes ran as the unprivileged user (host view, `docker top`)
    node_uids = {u for service, uids in result.users.items() if service.startswith("supernode-") for u in uids}
    assert len([s for s in result.users if s.startswith("supernode-")]) == NODES
    assert node_uids == {str(UID)} and seen["configured_users"] == {f"{UID}:{UID}"}

    assert len(result.run_dirs) == 1, result.run_dirs
    run_dir = result.run_dirs[0]
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["failures"] == 0 for r in rounds)
    adapter = run_dir / "peft_2"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()

    from peft import PeftModel

    from app.model import load_base_model

    model = PeftModel.from_pretrained(load_base_model("tiny", quantization=0), str(adapter))
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0

    # the evaluate and report services: the tiny model's four accuracies, labelled as such
    evaluation = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert set(evaluation["accuracies"]) == {"pubmedqa", "medmcqa", "medqa", "careqa"}
    assert evaluation["peft_path"].endswith("peft_2") and evaluation["random_weights"] is True
    this_run = next(line for line in (run_dir / "report.md").read_text().splitlines() if line.startswith("| this run"))
    assert "tiny model, random weights" in this_run and "n/a" not in this_run
    assert 'data-chart="loss"' in (run_dir / "report.html").read_text()

    assert result.leftovers == {"containers": [], "networks": [], "volumes": []}
    assert not CLIENT.volumes.list(filters={"dangling": True, "label": "com.docker.compose.project=fedtune-test-smoke"})


def _as_app_user(command: list[str], volumes: dict[str, str]) -> str:
    """Run `command` in the app image as its unprivileged user, no network (files it writes are
    owned by that user, as docs/docker.md tells operators to make them)."""
    return CLIENT.containers.run(app_image(), command, volumes={src: {"bind": dst, "mode": "rw"} for src, dst in volumes.items()},
                                 remove=True, network_mode="none").decode()


def test_two_hosts_reach_the_superlink_only_by_its_tls_name(images, tmp_path):
    """The split deployment: the coordinating side (compose.superlink.yaml) and two sites
    (compose.site.yaml, one SuperNode each), each its own compose project on its own Docker
    network. A site reaches the SuperLink only through the published port, by the name in its
    certificate (resolved to the host, as DNS would at a real site), holding only ca.crt and its
    own key files; a tiny run of 2 rounds completes."""
    import socket

    from app.deploy.compose import StackSpec, compose_spec

    tls_name, sites = "superlink.fedtune.test", 2
    certs, results = tmp_path / "certs", tmp_path / "results"
    for d in (certs, results):
        d.mkdir()
        d.chmod(0o777)  # written by the containers' user
    # the coordinator's own services dial the SuperLink by its service name, the sites by tls_name
    _as_app_user(["fedtune", "certs", "init", "--dir", "/certs", "--san", "superlink", "--san", tls_name,
                  "--supernodes", str(sites)], {str(certs): "/certs"})
    # the host as the sites' containers see it (`host-gateway`, docker0's address): the SuperLink
    # port is published there only, so nothing outside this machine can reach it
    gateway = CLIENT.containers.run(app_image(), ["getent", "hosts", "host.docker.internal"], remove=True,
                                    extra_hosts={"host.docker.internal": "host-gateway"}).decode().split()[0]
    with socket.socket() as s:
        s.bind((gateway, 0))
        port = s.getsockname()[1]

    coordinator = StackSpec(role="superlink", nodes=sites, profile="tiny", no_gpu=True, rounds=2,
                            name="fedtune-test-coordinator", publish=f"{gateway}:{port}:9093")
    coordinator_file = tmp_path / "compose.superlink.yaml"
    coordinator_file.write_text(render_compose(coordinator))
    stacks = [Stack(coordinator_file, coordinator.name, env={"FEDTUNE_CERTS_DIR": str(certs), "FEDTUNE_RESULTS": str(results)})]
    for i in range(sites):
        site_certs = tmp_path / f"site-{i}"
        site_certs.mkdir()
        site_certs.chmod(0o777)
        _as_app_user(["sh", "-c", f"cp /certs/ca.crt /certs/supernode-{i}.key /certs/supernode-{i}-runtime.* /site/"],
                     {str(certs): "/certs", str(site_certs): "/site"})
        site = compose_spec(StackSpec(role="site", nodes=sites, profile="tiny", no_gpu=True, name=f"fedtune-test-site-{i}"))
        site["services"]["supernode"]["extra_hosts"] = [f"{tls_name}:host-gateway"]
        site_file = tmp_path / f"compose.site-{i}.yaml"
        site_file.write_text(yaml.safe_dump(site))
        stacks.append(Stack(site_file, site["name"], env={
            "FEDTUNE_SUPERLINK_ADDRESS": f"{tls_name}:{port}", "FEDTUNE_PARTITION_ID": str(i),
            "FEDTUNE_NUM_PARTITIONS": str(sites), "FEDTUNE_CERTS_DIR": str(site_certs)}))
    coordinator_stack = stacks[0]
    for stack in stacks:
        stack.down()
    try:
        for stack in stacks:
            stack.compose("up", "--detach", capture=True, timeout=600)
        deadline = time.monotonic() + 900
        while (run := coordinator_stack.container("run")) is None or run.status != "exited":
            failed = [f for stack in stacks for f in stack.failed_services() if f[0] != "run"]
            assert not failed, "\n".join(stack.failure_report(failed) for stack in stacks)
            assert time.monotonic() < deadline, coordinator_stack.failure_report([])
            time.sleep(2)
            if run is not None:
                run.reload()
        log = run.logs().decode(errors="replace")
        assert run.attrs["State"]["ExitCode"] == 0, coordinator_stack.failure_report([]) + "\n".join(s.logs("supernode") for s in stacks[1:])
        assert f"SuperNodes online: {sites}/{sites}" in log and "finished:completed" in log
        for stack in stacks[1:]:
            node = stack.container("supernode")
            # separate networks: the coordinator's service name does not resolve at a site
            lookup = node.exec_run(["python", "-c", "import socket; socket.gethostbyname('superlink')"])
            assert lookup.exit_code != 0
            assert node.exec_run(["ls", "/certs"]).output.decode().split().count("ca.key") == 0
            assert set(node.attrs["NetworkSettings"]["Networks"]) == {f"{stack.project}_default"}
    finally:
        for stack in stacks:
            stack.down()
    run_dirs = list(results.glob("run-*"))
    assert len(run_dirs) == 1
    rounds = [json.loads(line) for line in (run_dirs[0] / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2] and all(r["failures"] == 0 for r in rounds)
    for stack in stacks:
        assert stack.leftovers() == {"containers": [], "networks": [], "volumes": []}
