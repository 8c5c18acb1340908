"""`fedtune stack`: the Docker Compose deployment, generated from one definition.

    fedtune stack compose --nodes 20 --gpus 8 > compose.yaml          # what `docker compose up` runs
    fedtune stack compose --profile tiny --no-gpu --rounds 2 --name fedtune-smoke > compose.smoke.yaml
    fedtune stack smoke                                              # CPU smoke run of the whole stack

The stack (see docs/docker.md):

    certs        one-shot: CA, SuperLink certificate, SuperExec secret, one key pair per SuperNode,
                 created in the `certs` volume when missing (`fedtune stack certs`, app.certs)
    model-cache  one-shot: the profile's base model and data into the `model-cache` volume, once;
                 every SuperNode mounts it read-only (`fedtune stack cache`)
    superlink    flower-superlink, TLS + SuperNode authentication, state in the `superlink-state`
                 volume, healthcheck; publishes its one port (Fleet, Control and Runtime API)
    register     one-shot: registers each SuperNode's public key over the Control API
    serverapp    flower-superexec running the ServerApp (FedProx) for the SuperLink; CPU only
    supernode-i  `fedtune supernode -- flower-supernode ...`, partition i of N, GPU i mod G
    run          one-shot: `fedtune run` submits the run, follows it and exits with its status

Commands used inside the containers (`certs`, `register`, `cache`) live here too, so that the
compose file and what it runs have one definition; TLS flags come from app.certs.flower_tls_args.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CERTS = "/certs"  # paths inside the containers
CACHE = "/cache"
RESULTS = "/results"
STATE = "/state"
PORT = 9093  # the SuperLink's one HTTPS port: Fleet, Control and Runtime (ServerAppIo) APIs
SUPERLINK = f"superlink:{PORT}"
HEALTH = "127.0.0.1:9098"  # --health-server-address (plaintext gRPC): container-local only
DEFAULT_NODES = 20
DEFAULT_GPUS = 8
DEFAULT_BASE_IMAGE = "python:3.11-slim-bookworm"
OFFLINE_BASE_IMAGE = "fedtune-base:bookworm-py3.11"  # docker/build-offline-base.sh
UID = 10001  # the images' default unprivileged user (build arg FEDTUNE_UID)
FEDERATION = "fedtune"


class StackError(RuntimeError):
    """The stack failed; the message says which service and includes its logs."""


# ---------------------------------------------------------------------------- versions and images


def project_version() -> str:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def flwr_version() -> str:
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d.split("==", 1)[1] for d in deps if d.startswith("flwr=="))


def app_image() -> str:
    return f"fedtune-app:{project_version()}"


def superlink_image() -> str:
    return f"fedtune-superlink:flwr-{flwr_version()}"


def _build(dockerfile: str) -> dict[str, Any]:
    return {
        "context": ".",
        "dockerfile": f"docker/{dockerfile}",
        "args": {
            "BASE_IMAGE": f"${{FEDTUNE_BASE_IMAGE:-{DEFAULT_BASE_IMAGE}}}",
            "PIP_OFFLINE": "${FEDTUNE_PIP_OFFLINE:-0}",
            "FEDTUNE_UID": f"${{FEDTUNE_UID:-{UID}}}",
            "FEDTUNE_GID": f"${{FEDTUNE_GID:-{UID}}}",
        },
    }


# ---------------------------------------------------------------------------- the generator


@dataclass(frozen=True)
class StackSpec:
    nodes: int = DEFAULT_NODES
    gpus: int = DEFAULT_GPUS
    profile: str = "bio-medical-llama3-8b"
    no_gpu: bool = False
    rounds: int | None = None
    run_config: str = ""
    name: str = "fedtune"
    publish: str = f"${{FEDTUNE_SUPERLINK_PUBLISH:-{PORT}}}:{PORT}"  # host side of the SuperLink port

    def command_line(self) -> str:
        parts = ["fedtune stack compose", f"--nodes {self.nodes}"]
        parts.append("--no-gpu" if self.no_gpu else f"--gpus {self.gpus}")
        parts.append(f"--profile {self.profile}")
        if self.rounds is not None:
            parts.append(f"--rounds {self.rounds}")
        if self.run_config:
            parts.append(f"--run-config '{self.run_config}'")
        if self.name != "fedtune":
            parts.append(f"--name {self.name}")
        if self.publish != StackSpec.publish:
            parts.append(f"--publish '{self.publish}'")
        return " ".join(parts)


def smoke_spec(nodes: int = DEFAULT_NODES, rounds: int = 2, project: str = "fedtune-smoke") -> StackSpec:
    """The CPU smoke variant (compose.smoke.yaml): tiny profile, no GPU reservations, SuperLink
    port published on a random loopback port only."""
    return StackSpec(nodes=nodes, profile="tiny", no_gpu=True, rounds=rounds, name=project, publish=f"127.0.0.1::{PORT}")


def dataset_file(name: str, cache: str = f"{CACHE}/fedtune") -> str:
    """Where `fedtune stack cache` exports a hub dataset's train split for the SuperNodes
    (`cache` is FEDTUNE_CACHE, /cache/fedtune in the images)."""
    return f"{cache}/datasets/{name.replace('/', '__')}.jsonl"


def _run_config(spec: StackSpec) -> str:
    """The `run` service's --run-config: the user's overrides plus what the stack itself implies."""
    from app.config import load_settings, parse_overrides

    user = parse_overrides(spec.run_config)
    settings = load_settings({"profile": spec.profile, **user})
    extra: list[str] = []
    if settings.dataset.num_partitions != spec.nodes and "dataset.num-partitions" not in user:
        extra.append(f"dataset.num-partitions={spec.nodes}")
    if settings.dataset.name != "tiny" and not settings.dataset.path:
        # nodes read the hub dataset as exported into the read-only cache (same rows, same order)
        extra.append(f"dataset.path='\"{dataset_file(settings.dataset.name)}\"'")
    return " ".join([*extra, spec.run_config.strip()]).strip()


def compose_spec(spec: StackSpec) -> dict[str, Any]:
    """The compose file as a dict: every service, volume and flag of the stack."""
    from app.certs import CertPaths, flower_tls_args

    if spec.nodes < 1 or (not spec.no_gpu and spec.gpus < 1):
        raise ValueError("--nodes and --gpus must be at least 1")
    paths = CertPaths(Path(CERTS), spec.nodes)
    app, superlink = f"${{FEDTUNE_APP_IMAGE:-{app_image()}}}", f"${{FEDTUNE_SUPERLINK_IMAGE:-{superlink_image()}}}"
    results = f"${{FEDTUNE_RESULTS:-./results}}:{RESULTS}"
    done = {"condition": "service_completed_successfully"}
    services: dict[str, Any] = {}

    services["certs"] = {
        "image": app,
        "build": _build("app.Dockerfile"),
        "command": ["fedtune", "stack", "certs", "--dir", CERTS, "--san", "superlink", "--supernodes", str(spec.nodes)],
        "network_mode": "none",
        "volumes": [f"certs:{CERTS}"],
    }
    services["model-cache"] = {
        "image": app,
        "command": ["fedtune", "stack", "cache", "--profile", spec.profile, "--run-config", spec.run_config],
        "environment": {"HF_TOKEN": "${HF_TOKEN:-}", "HF_HUB_OFFLINE": "${HF_HUB_OFFLINE:-0}"},
        "volumes": [f"model-cache:{CACHE}"],
    }
    services["superlink"] = {
        "image": superlink,
        "build": _build("superlink.Dockerfile"),
        "command": [
            "flower-superlink", *flower_tls_args("superlink", paths, isolation="process"),
            "--host", "0.0.0.0", "--port", str(PORT), "--database", f"{STATE}/state.db",
            "--disable-runtime-dependency-installation", "--health-server-address", HEALTH,
        ],
        "depends_on": {"certs": done},
        "ports": [spec.publish],
        "volumes": [f"certs:{CERTS}:ro", f"superlink-state:{STATE}"],
        "healthcheck": {
            "test": ["CMD", "fedtune-healthcheck", "--https", f"https://127.0.0.1:{PORT}/health", "--ca",
                     str(paths.ca_cert), "--grpc", HEALTH],
            "interval": "5s", "timeout": "5s", "retries": 12, "start_period": "30s",
        },
        "init": True,
        "restart": "unless-stopped",
    }
    services["register"] = {
        "image": app,
        "command": ["fedtune", "stack", "register", "--superlink", SUPERLINK, "--certs", CERTS, "--nodes", str(spec.nodes)],
        "depends_on": {"superlink": {"condition": "service_healthy"}},
        "volumes": [f"certs:{CERTS}:ro"],
    }
    services["serverapp"] = {
        "image": app,
        "command": ["flower-superexec", *flower_tls_args("superexec-serverapp", paths), "--runtime-api-address", SUPERLINK],
        "depends_on": {"superlink": {"condition": "service_healthy"}},
        "volumes": [f"certs:{CERTS}:ro", results],
        "init": True,
        # a SuperExec whose secret is refused exits with status 0: `on-failure` would not restart it
        "restart": "unless-stopped",
    }
    for i in range(spec.nodes):
        node: dict[str, Any] = {
            "image": app,
            "command": [
                "fedtune", "supernode", "--", *flower_tls_args("supernode", paths, i),
                "--superlink", SUPERLINK, "--node-config", f"partition-id={i} num-partitions={spec.nodes}",
            ],
            "depends_on": {"register": done, "model-cache": done},
            "environment": {
                "HF_HUB_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                **({"OMP_NUM_THREADS": "1"} if spec.no_gpu else {}),
            },
            "labels": {"fedtune.role": "supernode", "fedtune.partition-id": str(i)},
            "volumes": [f"certs:{CERTS}:ro", f"model-cache:{CACHE}:ro"],
            "init": True,
            "restart": "on-failure",
        }
        if not spec.no_gpu:
            node["deploy"] = {"resources": {"reservations": {"devices": [
                {"driver": "nvidia", "device_ids": [str(i % spec.gpus)], "capabilities": ["gpu"]},
            ]}}}
        services[f"supernode-{i}"] = node
    run_command = [
        "fedtune", "run", "--superlink", SUPERLINK, "--nodes", str(spec.nodes), "--profile", spec.profile,
        "--root-certificates", str(paths.ca_cert), "--results", RESULTS,
    ]
    if spec.rounds is not None:
        run_command += ["--rounds", str(spec.rounds)]
    run_config = _run_config(spec)
    if run_config:
        run_command += ["--run-config", run_config]
    services["run"] = {
        "image": app,
        "command": run_command,
        "depends_on": {"register": done, "serverapp": {"condition": "service_started"}},
        "volumes": [f"certs:{CERTS}:ro", results],
    }
    for name, service in services.items():
        if name != "run":
            # Only `run` is attached: `docker compose up --exit-code-from run` then ends when the run
            # does, not when a one-shot service completes or a SuperNode restarts (attached
            # containers' exits abort the whole stack). Their logs: `docker compose logs SERVICE`.
            service["attach"] = False
    return {
        "name": spec.name,
        "services": services,
        "volumes": {"certs": {}, "model-cache": {}, "superlink-state": {}},
    }


def _dumper():
    import yaml

    class Dumper(yaml.SafeDumper):
        """No &anchors/*aliases; short lists of scalars (commands, ports) on one line."""

        def ignore_aliases(self, data: Any) -> bool:
            return True

    def represent_list(dumper, data):
        flow = all(isinstance(x, (str, int, float, bool)) for x in data)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)

    Dumper.add_representer(list, represent_list)
    return Dumper


def render_compose(spec: StackSpec) -> str:
    import yaml

    header = (
        f"# Generated by `{spec.command_line()}` (app/stack.py).\n"
        "# Do not edit: change the generator and regenerate; tests/test_stack.py checks the two agree.\n"
        "# Settings (.env, see .env.example): FEDTUNE_BASE_IMAGE, FEDTUNE_PIP_OFFLINE, FEDTUNE_UID/GID,\n"
        "# FEDTUNE_RESULTS, FEDTUNE_SUPERLINK_PUBLISH, FEDTUNE_APP_IMAGE, FEDTUNE_SUPERLINK_IMAGE, HF_TOKEN.\n"
    )
    return header + yaml.dump(compose_spec(spec), Dumper=_dumper(), sort_keys=False, default_flow_style=False, width=100)


# ---------------------------------------------------------------------------- in-container commands


def cmd_certs(args) -> int:
    """Create what is missing in the certs volume; keep what exists and is valid."""
    from app.certs import CertError, ensure_certs

    try:
        paths = ensure_certs(Path(args.dir), args.san or ["superlink"], num_supernodes=args.supernodes)
    except CertError as exc:
        print(f"fedtune: {exc}", file=sys.stderr)
        return 2
    print(f"certificates ready in {paths.directory} (CA, SuperLink, SuperExec secret, {args.supernodes} SuperNode keys)")
    return 0


def _register_keys_in_process(paths, nodes: int, deadline: float, out=sys.stdout) -> None:
    """What `flwr supernode register` does, for all keys over one Control API client: one Python
    start instead of one per node (20 CLI starts cost half a minute of CPU on a small host).
    Uses flwr 1.42's CLI internals; ImportError makes the caller fall back to the CLI."""
    import click
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.cli.utils import flwr_cli_exc_handler, init_http_client_from_connection
    from flwr.proto.control_pb2 import RegisterNodeRequest  # pylint: disable=E0611

    client = None
    try:
        for i in range(nodes):
            key = try_load_public_key(paths.supernode_pub(i))
            while True:
                try:
                    if client is None:
                        client = init_http_client_from_connection(read_superlink_connection(FEDERATION))
                    with flwr_cli_exc_handler():
                        reply = client.RegisterNode(request=RegisterNodeRequest(public_key=key, name=f"supernode-{i}"))
                    print(f"supernode-{i}: registered (node id {reply.node_id})", file=out, flush=True)
                    break
                except click.ClickException as exc:
                    if "already in use" in exc.message:
                        print(f"supernode-{i}: already registered", file=out, flush=True)
                        break
                    if time.monotonic() > deadline:
                        raise StackError(f"could not register supernode-{i}: {exc.message}") from None
                    if client is not None:
                        client.close()
                        client = None
                    time.sleep(2)
    finally:
        if client is not None:
            client.close()


def cmd_register(args) -> int:
    """Register SuperNode keys 0..N-1 with the SuperLink; a key it already knows is fine."""
    from app.certs import CertPaths, flwr_cli_config, register_supernode_command

    paths = CertPaths(Path(args.certs), args.nodes)
    home = Path(tempfile.mkdtemp(prefix="fedtune-register-"))
    (home / "config.toml").write_text(flwr_cli_config(paths, args.superlink, FEDERATION))
    os.environ.update(FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0")
    deadline = time.monotonic() + args.timeout
    try:
        _register_keys_in_process(paths, args.nodes, deadline)
        return 0
    except ImportError as exc:  # another flwr version: one `flwr supernode register` per key
        print(f"flwr internals unavailable ({exc}); using the flwr CLI", file=sys.stderr)
    except StackError as exc:
        print(f"fedtune: {exc}", file=sys.stderr)
        return 1
    for i in range(args.nodes):
        while True:
            done = subprocess.run(register_supernode_command(paths, i, FEDERATION), capture_output=True, text=True)
            output = done.stdout + done.stderr
            if done.returncode == 0 or "already in use" in output:
                print(f"supernode-{i}: registered" + (" (already)" if done.returncode else ""), flush=True)
                break
            if time.monotonic() > deadline:
                print(f"fedtune: could not register supernode-{i}: {output[-1500:]}", file=sys.stderr)
                return 1
            time.sleep(2)
    return 0


def cmd_cache(args) -> int:
    """Fill the shared cache once: the base model (HF hub cache) and the data SuperNodes read."""
    from app.config import ConfigError, load_settings, parse_overrides

    try:
        settings = load_settings({"profile": args.profile, **parse_overrides(args.run_config)})
    except ConfigError as exc:
        print(f"fedtune: {exc}", file=sys.stderr)
        return 2
    if settings.model.name == "tiny" or settings.dataset.name == "tiny":
        from app.tiny import tiny_dataset_path, tiny_model_dir

        print(f"tiny model: {tiny_model_dir()}\ntiny data: {tiny_dataset_path()}", flush=True)
    if settings.model.name != "tiny" and not Path(settings.model.name).exists():
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            settings.model.name,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"],
        )
        print(f"model {settings.model.name}: {path}", flush=True)
    if settings.dataset.name != "tiny" and not settings.dataset.path:
        target = Path(dataset_file(settings.dataset.name, os.environ.get("FEDTUNE_CACHE", f"{CACHE}/fedtune")))
        if not target.exists():
            import datasets

            train = datasets.load_dataset(settings.dataset.name, split="train")
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".tmp")
            train.to_json(str(tmp), lines=True, force_ascii=False)
            tmp.rename(target)
        print(f"dataset {settings.dataset.name}: {target}", flush=True)
    return 0


# ---------------------------------------------------------------------------- driving a stack (host side)


def compose_command() -> list[str]:
    """`docker compose` (v2); a clear error when only the old docker-compose 1.x is there."""
    if shutil.which("docker") is None:
        raise StackError("docker is not installed")
    done = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if done.returncode != 0:
        raise StackError("Docker Compose v2 (`docker compose`) is missing: run docker/install-compose.sh")
    return ["docker", "compose"]


@dataclass
class Stack:
    """One compose project, driven with `docker compose` and inspected with the docker SDK."""

    compose_file: Path
    project: str
    env: dict[str, str] = field(default_factory=dict)
    out: Any = sys.stdout

    def __post_init__(self) -> None:
        import docker

        self.client = docker.from_env(timeout=120)
        self.base = [*compose_command(), "-p", self.project, "-f", str(self.compose_file), "--project-directory", str(REPO)]

    def compose(self, *args: str, check: bool = True, capture: bool = False, timeout: float | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [*self.base, *args], env={**os.environ, **self.env}, text=True, timeout=timeout,
            capture_output=capture, stdout=None if capture else self.out, stderr=None if capture else subprocess.STDOUT,
        )
        if check and done.returncode != 0:
            raise StackError(f"`docker compose {' '.join(args)}` failed ({done.returncode})"
                             + (f": {done.stdout[-3000:]}{done.stderr[-3000:]}" if capture else ""))
        return done

    def containers(self, service: str | None = None) -> list:
        labels = [f"com.docker.compose.project={self.project}"]
        if service:
            labels.append(f"com.docker.compose.service={service}")
        return self.client.containers.list(all=True, filters={"label": labels})

    def container(self, service: str):
        found = self.containers(service)
        return found[0] if found else None

    def containers_by_role(self, role: str) -> list:
        labels = [f"com.docker.compose.project={self.project}", f"fedtune.role={role}"]
        return self.client.containers.list(all=True, filters={"label": labels})

    def logs(self, service: str, tail: int = 80) -> str:
        container = self.container(service)
        if container is None:
            return f"(no container for {service})"
        return container.logs(tail=tail, timestamps=False).decode(errors="replace")

    def leftovers(self) -> dict[str, list[str]]:
        """Containers, networks and volumes still labelled with this project."""
        label = {"label": f"com.docker.compose.project={self.project}"}
        return {
            "containers": [c.name for c in self.client.containers.list(all=True, filters=label)],
            "networks": [n.name for n in self.client.networks.list(filters=label)],
            "volumes": [v.name for v in self.client.volumes.list(filters=label)],
        }

    def down(self) -> None:
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", check=False, capture=True, timeout=600)

    def failed_services(self) -> list[tuple[str, str]]:
        """(service, reason) for every container that exited non-zero or keeps restarting."""
        bad = []
        for c in self.containers():
            service = c.labels.get("com.docker.compose.service", c.name)
            state = c.attrs["State"]
            if state["Status"] == "exited" and state["ExitCode"] != 0:
                bad.append((service, f"exited with code {state['ExitCode']}"))
            elif state.get("Restarting") or c.attrs.get("RestartCount", 0) > 0:
                bad.append((service, f"restarted {c.attrs.get('RestartCount', 0)} time(s)"))
        return sorted(bad)

    def failure_report(self, failed: list[tuple[str, str]]) -> str:
        services = [s for s, _ in failed] or ["run"]
        if "run" not in services:
            services.append("run")
        parts = [f"failing: {', '.join(f'{s} ({why})' for s, why in failed) or 'none exited; see run'}"]
        for service in services[:4]:
            parts.append(f"----- logs of {service} (last 80 lines) -----\n{self.logs(service)}")
        return "\n".join(parts)

    def phases(self, since: float) -> dict[str, float]:
        """Seconds from `since` (a time.time()) to each step of the start-up, from container state."""

        def at(stamp: str | None) -> float | None:
            if not stamp or stamp.startswith("0001-"):
                return None
            from datetime import datetime

            head, _, frac = stamp.rstrip("Z").partition(".")
            return datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}+00:00").timestamp() - since

        marks: dict[str, float] = {}
        nodes = []
        for c in self.containers():
            service, state = c.labels.get("com.docker.compose.service", c.name), c.attrs["State"]
            if service in ("certs", "model-cache", "register") and at(state.get("FinishedAt")) is not None:
                marks[f"{service} done"] = at(state["FinishedAt"])
            if service == "superlink":
                marks["superlink started"] = at(state.get("StartedAt"))
            if service == "register":
                # Compose starts `register` once the SuperLink's healthcheck passes (Docker keeps
                # only the last five health probes, so the first success is not on record).
                marks["superlink healthy (register started)"] = at(state.get("StartedAt"))
            if service.startswith("supernode-"):
                nodes.append(at(state.get("StartedAt")))
        if nodes and None not in nodes:
            marks["first supernode started"], marks["last supernode started"] = min(nodes), max(nodes)
        return {k: round(v, 1) for k, v in sorted(marks.items(), key=lambda kv: kv[1]) if v is not None}

    def memory_mib(self, containers: list) -> dict[str, float]:
        """Memory as `docker stats` shows it (usage less inactive page cache), per container, in MiB."""
        sizes: dict[str, float] = {}

        def one(c) -> None:
            stats = c.stats(stream=False)
            mem = stats.get("memory_stats", {})
            detail = mem.get("stats", {})
            cache = detail.get("total_inactive_file", detail.get("inactive_file", 0))
            sizes[c.labels.get("com.docker.compose.service", c.name)] = (mem.get("usage", 0) - cache) / 2**20

        threads = [threading.Thread(target=one, args=(c,)) for c in containers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sizes


@dataclass
class SmokeResult:
    run_exit_code: int
    up_seconds: float  # `up` until the run service saw every SuperNode online
    total_seconds: float
    results_dir: Path
    run_dirs: list[Path]
    idle_memory_mib: dict[str, float]
    users: dict[str, set[str]]  # service -> uids its processes ran as (host view, `docker top`)
    leftovers: dict[str, list[str]]
    log: str = ""
    phases: dict[str, float] = field(default_factory=dict)  # seconds after `up` (see Stack.phases)


def _ensure_results_dir(path: Path, uid: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid == uid:
        return
    if os.geteuid() == 0:
        os.chown(path, uid, uid)
        return
    if st.st_mode & 0o002:
        return
    raise StackError(f"{path} must be writable by the containers' uid {uid}: `sudo chown {uid} {path}`, "
                     f"or build the images with FEDTUNE_UID=$(id -u) (see docs/docker.md)")


def _image_uid(stack: Stack, image: str) -> int:
    import docker

    try:
        user = stack.client.images.get(image).attrs["Config"].get("User") or "0"
    except docker.errors.ImageNotFound:
        return int(os.environ.get("FEDTUNE_UID", UID))
    return int(user.split(":")[0]) if user.split(":")[0].isdigit() else UID


def smoke(
    nodes: int = DEFAULT_NODES, rounds: int = 2, results: Path | None = None, project: str = "fedtune-smoke",
    timeout: float = 1200.0, build: bool = False, keep: bool = False, check=None, out=sys.stdout,
) -> SmokeResult:
    """Bring the stack up with the tiny profile and no GPU, run `rounds` rounds, tear it down.

    `check(stack)` (tests) runs while the finished stack is still up. Raises StackError with the
    failing service's logs if anything fails; the stack is torn down either way unless `keep`.
    """
    spec = smoke_spec(nodes, rounds, project)
    work = Path(tempfile.mkdtemp(prefix="fedtune-stack-"))
    compose_file = work / "compose.smoke.yaml"
    compose_file.write_text(render_compose(spec))
    results = Path(results or REPO / "results").resolve()
    stack = Stack(compose_file, project, env={"FEDTUNE_RESULTS": str(results)}, out=out)
    _ensure_results_dir(results, _image_uid(stack, app_image()))
    before = {p.name for p in results.glob("run-*")}
    stack.down()  # leftovers of an earlier, interrupted smoke run
    started, wall = time.monotonic(), time.time()
    up_seconds, idle, run, phases = None, {}, None, {}
    try:
        if build:
            stack.compose("build")
        stack.compose("up", "--detach", "--quiet-pull", timeout=timeout)
        deadline = started + timeout
        seen = ""
        while True:
            failed = [f for f in stack.failed_services() if f[0] != "run"]
            if failed:
                raise StackError(stack.failure_report(failed))
            run = stack.container("run")
            if run is not None:
                run.reload()
                log = run.logs().decode(errors="replace")
                for line in log[len(seen):].splitlines():
                    print(f"run | {line}", file=out, flush=True)
                seen = log
                if up_seconds is None and f"SuperNodes online: {nodes}/{nodes}" in log:
                    up_seconds = time.monotonic() - started
                    idle = stack.memory_mib(stack.containers_by_role("supernode"))
                if run.status == "exited":
                    break
            if time.monotonic() > deadline:
                raise StackError(f"timed out after {timeout:.0f} s\n" + stack.failure_report(stack.failed_services()))
            time.sleep(1)
        code = run.attrs["State"]["ExitCode"]
        if code != 0:
            raise StackError(f"the run service exited with code {code}\n" + stack.failure_report(stack.failed_services()))
        users = {
            c.labels["com.docker.compose.service"]: {row[0] for row in c.top(ps_args="-o uid,pid,comm")["Processes"]}
            for c in stack.containers() if c.status == "running"
        }
        phases = stack.phases(wall)
        if up_seconds is not None:
            phases["all supernodes online (seen by run)"] = round(up_seconds, 1)
        if check is not None:
            check(stack)
        total = time.monotonic() - started
    finally:
        if not keep:
            stack.down()
            shutil.rmtree(work, ignore_errors=True)
    run_dirs = sorted(p for p in results.glob("run-*") if p.name not in before)
    return SmokeResult(code, up_seconds or float("nan"), total, results, run_dirs, idle, users, stack.leftovers(), seen, phases)


# ---------------------------------------------------------------------------- CLI


def _env_default(name: str, default: int) -> int:
    """An integer from the environment or ./.env (FEDTUNE_NODES, FEDTUNE_GPUS), else `default`."""
    if name in os.environ:
        return int(os.environ[name])
    env_file = Path(".env")
    if env_file.is_file():
        for line in env_file.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == name and value.strip():
                return int(value.strip().strip("'\""))
    return default


def cmd_compose(args) -> int:
    spec = StackSpec(
        nodes=args.nodes if args.nodes is not None else _env_default("FEDTUNE_NODES", DEFAULT_NODES),
        gpus=args.gpus if args.gpus is not None else _env_default("FEDTUNE_GPUS", DEFAULT_GPUS),
        profile=args.profile, no_gpu=args.no_gpu, rounds=args.rounds, run_config=args.run_config, name=args.name,
        publish=args.publish or StackSpec.publish,
    )
    try:
        sys.stdout.write(render_compose(spec))
    except Exception as exc:  # config errors name the key
        print(f"fedtune: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_smoke(args) -> int:
    try:
        result = smoke(nodes=args.nodes, rounds=args.rounds, results=Path(args.results) if args.results else None,
                       project=args.project, timeout=args.timeout, build=args.build, keep=args.keep)
    except StackError as exc:
        print(f"fedtune stack smoke FAILED: {exc}", file=sys.stderr)
        return 1
    idle = sorted(result.idle_memory_mib.values())
    print(json.dumps({
        "run_exit_code": result.run_exit_code,
        "up_to_all_supernodes_online_s": round(result.up_seconds, 1),
        "total_s": round(result.total_seconds, 1),
        "phases_s": result.phases,
        "run_dirs": [str(p) for p in result.run_dirs],
        "idle_supernode_memory_mib": {"min": round(idle[0], 1), "median": round(idle[len(idle) // 2], 1),
                                      "max": round(idle[-1], 1)} if idle else None,
        "supernode_uids": sorted({u for s, us in result.users.items() if s.startswith("supernode-") for u in us}),
        "leftovers": result.leftovers,
    }, indent=2))
    return 0 if not any(result.leftovers.values()) or args.keep else 1


def register(subparsers) -> None:
    stack = subparsers.add_parser("stack", help="the Docker Compose stack (generator, smoke run, in-container steps)")
    sub = stack.add_subparsers(dest="stack_command", required=True)

    comp = sub.add_parser("compose", help="print the compose file (compose.yaml)")
    comp.add_argument("--nodes", type=int, help=f"SuperNodes (default FEDTUNE_NODES from env/.env, else {DEFAULT_NODES})")
    comp.add_argument("--gpus", type=int, help=f"GPUs; node i gets GPU i mod G (default FEDTUNE_GPUS, else {DEFAULT_GPUS})")
    comp.add_argument("--profile", default="bio-medical-llama3-8b", help="configuration profile (bio-medical-llama3-8b | tiny)")
    comp.add_argument("--no-gpu", action="store_true", help="no GPU reservations (CPU hosts)")
    comp.add_argument("--rounds", type=int, help="num-server-rounds for the run service")
    comp.add_argument("--run-config", default="", help='extra run config, "key=value ..."')
    comp.add_argument("--name", default="fedtune", help="compose project name")
    comp.add_argument("--publish", help=f"ports entry of the SuperLink (default {StackSpec.publish!r})")
    comp.set_defaults(func=cmd_compose)

    sm = sub.add_parser("smoke", help="CPU smoke run: the stack with the tiny profile, N SuperNodes, R rounds; then down")
    sm.add_argument("--nodes", type=int, default=DEFAULT_NODES)
    sm.add_argument("--rounds", type=int, default=2)
    sm.add_argument("--results", help="results directory (default ./results)")
    sm.add_argument("--project", default="fedtune-smoke")
    sm.add_argument("--timeout", type=float, default=1200.0)
    sm.add_argument("--build", action="store_true", help="(re)build the images first")
    sm.add_argument("--keep", action="store_true", help="leave the stack up (tear down with docker compose -p PROJECT down -v)")
    sm.set_defaults(func=cmd_smoke)

    ce = sub.add_parser("certs", help="(in the certs service) create missing certificates and keys, keep valid ones")
    ce.add_argument("--dir", default=CERTS)
    ce.add_argument("--san", action="append", default=[])
    ce.add_argument("--supernodes", type=int, default=DEFAULT_NODES)
    ce.set_defaults(func=cmd_certs)

    rg = sub.add_parser("register", help="(in the register service) register SuperNode keys with the SuperLink")
    rg.add_argument("--superlink", default=SUPERLINK)
    rg.add_argument("--certs", default=CERTS)
    rg.add_argument("--nodes", type=int, default=DEFAULT_NODES)
    rg.add_argument("--timeout", type=float, default=300.0)
    rg.set_defaults(func=cmd_register)

    ca = sub.add_parser("cache", help="(in the model-cache service) download the base model and data once")
    ca.add_argument("--profile", default="bio-medical-llama3-8b")
    ca.add_argument("--run-config", default="")
    ca.set_defaults(func=cmd_cache)
