"""The Compose stack on the real Docker engine (docker SDK): images, a healthy SuperLink, and the
whole smoke stack (20 SuperNodes, 2 rounds, tiny profile, no GPU).

Skipped where no Docker engine or no Docker Compose v2 answers, and failed instead with
FEDTUNE_REQUIRE_DOCKER=1 (.ci/run). Missing or stale images are
(re)built first with `docker/build-images.sh --offline` (cached layers: seconds when only app/
changed; the first build takes several minutes and downloads about 3 GB of wheels); set
FEDTUNE_STACK_NO_BUILD=1 to use the images as they are.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from app.deploy.compose import REPO, UID, app_image, edge_image, render_compose, smoke_spec, superlink_image
from app.deploy.smoke import Stack, smoke
from conftest import docker_missing

try:
    import docker
except ImportError:
    docker = None


def _engine():
    if docker is None:
        return None
    try:
        client = docker.from_env(timeout=30)
        client.ping()
        return client
    except Exception:  # noqa: BLE001 - no engine, no socket, no permission
        return None


CLIENT = _engine()
COMPOSE = CLIENT is not None and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
NODES = 20


@pytest.fixture(scope="module", autouse=True)
def engine():
    if not COMPOSE:
        docker_missing("no Docker engine, docker SDK or Docker Compose v2 (docker/install-compose.sh)")


@pytest.fixture(scope="module")
def images():
    if os.environ.get("FEDTUNE_STACK_NO_BUILD") != "1":
        done = subprocess.run([str(REPO / "docker" / "build-images.sh"), "--offline"], capture_output=True, text=True, timeout=3600)
        assert done.returncode == 0, f"image build failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return {"app": CLIENT.images.get(app_image()), "superlink": CLIENT.images.get(superlink_image()),
            "edge": CLIENT.images.get(edge_image())}


# HTTP(S) requests made from inside a container: argv host port ca then "SCHEME METHOD PATH" each;
# prints {spec: [status, body]} or {spec: ["refused", error]}. POSTs carry an empty protobuf
# body, which is a valid Control API ListRunsRequest.
PROBE = r"""
import http.client, json, ssl, sys
host, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
out = {}
for spec in sys.argv[4:]:
    scheme, method, path = spec.split()
    try:
        if scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=15, context=ssl.create_default_context(cafile=ca))
        else:
            conn = http.client.HTTPConnection(host, port, timeout=15)
        conn.request(method, path, body=b"" if method == "POST" else None,
                     headers={"Content-Type": "application/protobuf"} if method == "POST" else {})
        reply = conn.getresponse()
        out[spec] = [reply.status, reply.read()[:200].decode(errors="replace")]
    except (OSError, http.client.HTTPException) as exc:
        out[spec] = ["refused", f"{type(exc).__name__}: {exc}"]
print(json.dumps(out))
"""


def _probe(container, host: str, port: int, *specs: str) -> dict[str, list]:
    done = container.exec_run(["python", "-c", PROBE, host, str(port), "/certs/ca.crt", *specs])
    assert done.exit_code == 0, done.output.decode(errors="replace")
    return json.loads(done.output.decode().strip().splitlines()[-1])


def _probe_in_network(network: str, certs_volume: str, host: str, port: int, *specs: str) -> dict[str, list]:
    output = CLIENT.containers.run(app_image(), ["python", "-c", PROBE, host, str(port), "/certs/ca.crt", *specs],
                                   network=network, volumes={certs_volume: {"bind": "/certs", "mode": "ro"}}, remove=True)
    return json.loads(output.decode().strip().splitlines()[-1])


# every certificate, key or secret a container's user can read, outside the installed software
# and the system's public trust store
READABLE_SECRETS = (
    "find / \\( -path /proc -o -path /sys -o -path /dev -o -path /usr -o -path /opt/venv -o -path /etc/ssl/certs \\) -prune -o -type f "
    "\\( -name '*.key' -o -name '*.secret' -o -name '*.crt' -o -name '*.pub' -o -name '*.pem' \\) "
    "-readable -print 2>/dev/null"
)


def _readable_secrets(container) -> set[str]:
    done = container.exec_run(["sh", "-c", READABLE_SECRETS])
    return set(done.output.decode().split())


def _needs(service: str) -> set[str]:
    """What each service may read under /certs (app.deploy.certs.service_files)."""
    if service.startswith("supernode-"):
        i = service.removeprefix("supernode-")
        return {"/certs/ca.crt", f"/certs/supernode-{i}.key", f"/certs/supernode-{i}-runtime.crt", f"/certs/supernode-{i}-runtime.key"}
    return {"superlink": {"/certs/ca.crt", "/certs/superlink.crt", "/certs/superlink.key", "/certs/superexec.secret"},
            "edge": {"/certs/ca.crt", "/certs/edge.crt", "/certs/edge.key"},
            "serverapp": {"/certs/ca.crt", "/certs/superexec.secret"},
            "run": {"/certs/ca.crt"}}[service]


def test_images_run_as_non_root_and_carry_no_secret(images):
    for image in images.values():
        config = image.attrs["Config"]
        assert config["User"] == f"{UID}:{UID}"
        assert not config.get("Volumes"), "an image VOLUME would leave anonymous volumes behind"
        assert not any(k.startswith(("HF_TOKEN", "FLWR_SECRET")) for k in (e.split("=")[0] for e in config.get("Env") or []))
    for name, image in images.items():
        listing = CLIENT.containers.run(
            image.id, ["sh", "-c", "find / -xdev \\( -name '*.key' -o -name '*.secret' -o -name 'ca.crt' -o -name 'edge.crt' \\) "
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
        # one host: nothing is published, nothing outside the host reaches the SuperLink
        assert not any(container.attrs["NetworkSettings"]["Ports"].values()), container.attrs["NetworkSettings"]["Ports"]
        uids = {row[0] for row in container.top(ps_args="-o uid,pid,comm")["Processes"]}
        assert uids == {str(UID)}
        log = stack.logs("superlink", tail=200)
        assert "https://" in log, log  # TLS on the one port
        # from the stack's network: TLS answers (the probe can tell), plaintext gets no HTTP answer
        seen = _probe_in_network(f"{project}_default", f"{project}_certs-run", "superlink", 9093,
                                 "https GET /health", "http GET /health", "http POST /v1/control/list-runs")
        assert seen["https GET /health"][0] == 200, seen
        assert seen["http GET /health"][0] == "refused", seen
        assert seen["http POST /v1/control/list-runs"][0] == "refused", seen
        # SuperNode authentication, as the running SuperLink has it: its own command line, and a
        # SuperNode whose key was never registered is refused at activation
        assert "--enable-supernode-auth" in container.attrs["Args"], container.attrs["Args"]
        stranger = CLIENT.containers.run(
            app_image(), ["sh", "-c", "fedtune certs init --dir /tmp/c --supernodes 1 >/dev/null && "
                          "flower-supernode --root-certificates /certs/ca.crt --auth-supernode-private-key "
                          "/tmp/c/supernode-0.key --superlink superlink:9093 --max-retries 1 --max-wait-time 20 2>&1"],
            network=f"{project}_default", volumes={f"{project}_certs-run": {"bind": "/certs", "mode": "ro"}},
            detach=True)
        try:
            assert stranger.wait(timeout=120)["StatusCode"] != 0
            assert "Failed to activate SuperNode" in stranger.logs().decode(errors="replace"), stranger.logs().decode()
        finally:
            stranger.remove(force=True)
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
        seen["readable"] = {c.labels["com.docker.compose.service"]: _readable_secrets(c)
                            for c in stack.containers() if c.status == "running"}

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
    # each running container can read exactly its own certificate files: ca.key in none of them
    # (the one-shot `certs` service has exited), node keys only in their own node
    assert set(seen["readable"]) == {"superlink", "serverapp", *(f"supernode-{i}" for i in range(NODES))}
    assert seen["readable"] == {service: _needs(service) for service in seen["readable"]}

    assert len(result.run_dirs) == 1, result.run_dirs
    run_dir = result.run_dirs[0]
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["failures"] == 0 for r in rounds)
    adapter = run_dir / "peft_2"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()

    from peft import PeftModel

    from app.training.model import load_base_model

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


def test_two_hosts_reach_the_superlink_only_through_the_edge(images, tmp_path):
    """The split deployment: the coordinating side (compose.superlink.yaml) and two sites
    (compose.site.yaml, one SuperNode each), each its own compose project on its own Docker
    network. A site reaches the coordinator only through the edge's published port, by the name in
    its certificate (resolved to the host, as DNS would at a real site), holding only ca.crt and
    its own key files. A tiny run of 2 rounds completes through the edge, while the Control and
    Runtime APIs are refused from the sites' side and the SuperLink's own port is not reachable."""
    import socket

    from app.deploy.compose import StackSpec, compose_spec

    tls_name, sites = "superlink.fedtune.test", 2
    certs, results = tmp_path / "certs", tmp_path / "results"

    def host(command: str) -> None:  # a step of docs/docker.md run on the host, as root (sudo there)
        done = subprocess.run(["sh", "-c", command], capture_output=True, text=True)
        assert done.returncode == 0, f"{command}: {done.stderr}"

    # docs/docker.md, "Across machines", step 1 (coordinator), as written: the coordinator's own
    # services dial the SuperLink by its service name, the sites dial the edge by tls_name
    host(f"install -d -o {UID} -g {UID} -m 0700 {certs} && install -d -o {UID} -g {UID} -m 0755 {results}")
    _as_app_user(["fedtune", "certs", "init", "--dir", "/certs", "--san", "superlink", "--san", tls_name,
                  "--supernodes", "0"], {str(certs): "/certs"})
    host(f"cat {certs}/ca.crt > {tmp_path}/ca.crt")
    site_dirs = []
    for i in range(sites):  # step 2, at each site: its own keys; only the .pub goes out, only ca.crt comes in
        site_dir = tmp_path / f"site-{i}"
        host(f"install -d -o {UID} -g {UID} -m 0700 {site_dir}")
        _as_app_user(["fedtune", "certs", "site-init", "--dir", "/certs", "--index", str(i)], {str(site_dir): "/certs"})
        host(f"cat {site_dir}/supernode-{i}.pub > {tmp_path}/supernode-{i}.pub "
             f"&& install -o {UID} -g {UID} -m 0644 {tmp_path}/ca.crt {site_dir}/ca.crt")
        # step 3, at the coordinator: register the site's public key
        host(f"install -o {UID} -g {UID} -m 0644 {tmp_path}/supernode-{i}.pub {certs}/supernode-{i}.pub")
        site_dirs.append(site_dir)
    # private keys stayed where they were made
    assert not list(certs.glob("supernode-*.key")) and not list(certs.glob("supernode-*-runtime.*"))
    for i, site_dir in enumerate(site_dirs):
        assert sorted(p.name for p in site_dir.iterdir()) == [
            "ca.crt", f"supernode-{i}-runtime.crt", f"supernode-{i}-runtime.key", f"supernode-{i}.key", f"supernode-{i}.pub"]
    # the host as the sites' containers see it (`host-gateway`, docker0's address): the edge's
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
    stacks = [Stack(coordinator_file, coordinator.name, env={
        "FEDTUNE_CERTS_DIR": str(certs), "FEDTUNE_RESULTS": str(results), "FEDTUNE_CONTROL_PUBLISH": "127.0.0.1:"})]
    for i, site_certs in enumerate(site_dirs):
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

        superlink = coordinator_stack.container("superlink")
        ports = superlink.attrs["NetworkSettings"]["Ports"]["9093/tcp"]
        assert [p["HostIp"] for p in ports] == ["127.0.0.1"], ports  # the operator's host only
        control_port = int(ports[0]["HostPort"])
        [edge_port] = coordinator_stack.container("edge").attrs["NetworkSettings"]["Ports"]["9093/tcp"]
        assert (edge_port["HostIp"], edge_port["HostPort"]) == (gateway, str(port))
        calls = ("https POST /v1/control/list-runs", "https POST /v1/control/start-run",
                 "https POST /v1/runtime/pull-app-inputs", "https POST /v1/fleet/get-run",
                 "https POST /v1/fleet/../control/list-runs", "https POST /v1/fleet/%2e%2e/control/list-runs")
        # the same calls on the coordinator's own network reach the SuperLink (Control answers)
        inside = _probe_in_network(f"{coordinator.name}_default", str(certs), "superlink", 9093, *calls[:2])
        assert inside["https POST /v1/control/list-runs"][0] == 200, inside
        refused = "fedtune edge: only the Fleet API"
        for stack in stacks[1:]:
            node = stack.container("supernode")
            # separate networks: the coordinator's service name does not resolve at a site
            lookup = node.exec_run(["python", "-c", "import socket; socket.gethostbyname('superlink')"])
            assert lookup.exit_code != 0
            assert set(node.attrs["NetworkSettings"]["Networks"]) == {f"{stack.project}_default"}
            through_edge = _probe(node, tls_name, port, *calls)
            for call in calls:
                if "/v1/fleet/get-run" in call:  # the Fleet API is forwarded: the SuperLink answers
                    assert refused not in through_edge[call][1] and through_edge[call][0] != "refused", through_edge
                else:
                    assert through_edge[call] == [403, refused + " (/v1/fleet/) is served here\n"], (call, through_edge)
            # the SuperLink's own port is on the coordinator's loopback: not reachable from a site
            direct = _probe(node, tls_name, control_port, "https POST /v1/control/list-runs")
            assert direct["https POST /v1/control/list-runs"][0] == "refused", direct
            assert _readable_secrets(node) == {"/certs/ca.crt", f"/certs/supernode-{stack.env['FEDTUNE_PARTITION_ID']}.key",
                                               *(f"/certs/supernode-{stack.env['FEDTUNE_PARTITION_ID']}-runtime.{x}" for x in ("crt", "key"))}
        for service in ("superlink", "serverapp", "edge"):
            assert _readable_secrets(coordinator_stack.container(service)) == _needs(service), service
    finally:
        for stack in stacks:
            stack.down()
    run_dirs = list(results.glob("run-*"))
    assert len(run_dirs) == 1
    rounds = [json.loads(line) for line in (run_dirs[0] / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2] and all(r["failures"] == 0 for r in rounds)
    # written by uid 10001, readable by the host user who loads them
    for path in [run_dirs[0], *run_dirs[0].rglob("*")]:
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path
    for stack in stacks:
        assert stack.leftovers() == {"containers": [], "networks": [], "volumes": []}


def test_smoke_stack_runs_with_secure_aggregation(images, tmp_path):
    """FEDTUNE_SECURE_AGGREGATION=true (as from .env) turns secure aggregation on for the whole stack."""
    result = smoke(nodes=6, rounds=2, results=tmp_path / "results", project="fedtune-test-smoke-secure", secure_aggregation=True)
    assert result.run_exit_code == 0, result.log
    [run_dir] = result.run_dirs
    assert json.loads((run_dir / "config.json").read_text())["privacy.secure-aggregation"] is True
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rounds] == ["aggregated", "aggregated"]
    for record in rounds:
        assert record["failures"] == 0 and len(record["clients"]) == 3
        assert record["secagg_bytes_masked"] == sum(c["bytes_up"] for c in record["clients"]) > 0
        assert record["secagg_bytes_keys"] > 0 and record["secagg_bytes_shares"] > 0
    assert result.leftovers == {"containers": [], "networks": [], "volumes": []}
