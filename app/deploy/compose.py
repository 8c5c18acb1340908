"""The Docker Compose files, generated from one definition (`fedtune stack compose`).

Three shapes of the same services:

    all        compose.yaml: one host runs everything and publishes no port; the one-shot `certs`
               service issues the certificates and copies each service its own files into that
               service's volume; the smoke variant is this with the tiny profile, no GPU
    superlink  compose.superlink.yaml: the coordinating site (SuperLink, edge, register, ServerApp,
               run); only the edge, which forwards the Fleet API alone, faces the sites
    site       compose.site.yaml: one hospital's SuperNode, talking to the coordinator's edge by
               its TLS name; which partition, key and GPU come from the site's .env

In the split shapes the certificates are a host directory (FEDTUNE_CERTS_DIR) and each service
bind-mounts only its own files from it (app.deploy.certs.service_files), certs/README.md.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.config import ASSIGNED_GPU_ENV
from app.node.flwr_patches import GPU_POLL_SECONDS, POLL_ENV

REPO = Path(__file__).resolve().parents[2]
CERTS = "/certs"  # paths inside the containers
CACHE = "/cache"
RESULTS = "/results"
STATE = "/state"
PORT = 9093  # the SuperLink's one HTTPS port: Fleet, Control and Runtime (ServerAppIo) APIs; the edge's too
ISSUER = "/issuer"  # the `certs` service: the issuer's directory (ca.key), in no other container
EXPORT = "/export"  # the `certs` service: each service's certificate volume, at EXPORT/<service>
SUPERLINK = f"superlink:{PORT}"
HEALTH = "127.0.0.1:9098"  # --health-server-address (plaintext gRPC): container-local only
DEFAULT_NODES = 20
DEFAULT_GPUS = 8
DEFAULT_BASE_IMAGE = "python:3.11-slim-bookworm"
DEFAULT_EDGE_BASE_IMAGE = "debian:bookworm-slim"  # nginx-light from Debian is added unless already there
UID = 10001  # the images' default unprivileged user (build arg FEDTUNE_UID)
ROLES = ("all", "superlink", "site")
# a site's SuperNode: set in its .env (compose stops with this message when one is missing)
SITE_PARTITION = "${FEDTUNE_PARTITION_ID:?see .env.site.example}"
SITE_SUPERLINK = "${FEDTUNE_SUPERLINK_ADDRESS:?see .env.site.example}"
# the coordinator's edge: the only port the sites reach; no default, the operator names the interface
EDGE_PUBLISH = f"${{FEDTUNE_EDGE_PUBLISH:?the address the sites dial, e.g. 10.0.0.5:{PORT} (.env.superlink.example)}}:{PORT}"
# the SuperLink itself, at the coordinator: the host's loopback only (an operator's `flwr` CLI)
CONTROL_PUBLISH = f"${{FEDTUNE_CONTROL_PUBLISH:-127.0.0.1:9094}}:{PORT}"


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def app_image() -> str:
    return f"fedtune-app:{_pyproject()['project']['version']}"


def edge_image() -> str:
    return f"fedtune-edge:{_pyproject()['project']['version']}"


def superlink_image() -> str:
    flwr = next(d for d in _pyproject()["project"]["dependencies"] if d.startswith("flwr=="))
    return f"fedtune-superlink:flwr-{flwr.split('==', 1)[1]}"


@dataclass(frozen=True)
class StackSpec:
    nodes: int = DEFAULT_NODES  # federation size (site role: the num-partitions default)
    gpus: int = DEFAULT_GPUS
    profile: str = "bio-medical-llama3-8b"
    no_gpu: bool = False
    rounds: int | None = None
    run_config: str = ""
    name: str = "fedtune"
    publish: str = EDGE_PUBLISH  # the edge's ports entry (role superlink); the all-in-one stack publishes nothing
    role: str = "all"
    eval_exact: bool = False  # the evaluate service: the reference loop instead of the fast path
    eval_limit: int | None = None  # the evaluate service: first N questions of each benchmark
    placement: str = "node"  # trainer.placement: "device" adds a trainer service per GPU (all-in-one stack only)

    def command_line(self) -> str:
        parts = ["fedtune stack compose"]
        if self.role != "all":
            parts.append(f"--role {self.role}")
        parts.append(f"--nodes {self.nodes}")
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
        if self.eval_exact:
            parts.append("--eval-exact")
        if self.eval_limit is not None:
            parts.append(f"--eval-limit {self.eval_limit}")
        if self.placement != "node":
            parts.append(f"--placement {self.placement}")
        return " ".join(parts)


def smoke_spec(nodes: int = DEFAULT_NODES, rounds: int = 2, project: str = "fedtune-smoke") -> StackSpec:
    """The CPU smoke variant (compose.smoke.yaml): tiny profile, no GPU reservations."""
    return StackSpec(nodes=nodes, profile="tiny", no_gpu=True, rounds=rounds, name=project)


def dataset_file(name: str, cache: str = f"{CACHE}/fedtune") -> str:
    """Where `fedtune stack cache` exports a hub dataset's train split for the SuperNodes
    (`cache` is FEDTUNE_CACHE, /cache/fedtune in the images)."""
    return f"{cache}/datasets/{name.replace('/', '__')}.jsonl"


def eval_data_dir(cache: str = f"{CACHE}/fedtune") -> str:
    """Where `fedtune stack cache` exports the four benchmarks (source schema, one jsonl each)."""
    return f"{cache}/eval"


# ---------------------------------------------------------------------------- memory limits

# Every service has a memory limit (issue 24): a hostile site's replies or a runaway process stop
# at its own container instead of taking the host. Sized per role from what each holds, with
# headroom; swap is not allowed past the limit (memswap_limit = mem_limit). An operator raises one
# in .env (FEDTUNE_MEM_<ROLE>, e.g. FEDTUNE_MEM_SUPERNODE=16g) without regenerating the file.
MEMORY_SEED = {
    # a 4-bit 8B base is ~5.5 GiB of host RAM while it loads (safetensors read, then quantized
    # on the GPU); the ClientApp process and its copies of the adapter (~50 MiB each) come on top
    "supernode": "12g",
    "trainer": "12g",  # a device trainer loads the base like a SuperNode's own trainer, once for all its nodes
    "trainer-tokens": "256m",
    # 20 replies of up to one float32 adapter each (~55 MiB for the seed's LoRA), their decoded
    # copies, the global adapter, checkpoints and the report's charts, with torch imported
    "serverapp": "8g",
    # Flower keeps every pushed object (20 replies and 20 copies of the global adapter per round)
    # in memory until the ServerApp pulls it
    "superlink": "4g",
    "edge": "256m",  # nginx, request buffering off: at most one ~6 MiB body per connection
    "certs": "256m",
    "register": "512m",  # one flwr Control API client
    "run": "1g",  # `fedtune run` and its `flwr` CLI calls
    # hub downloads stream to disk; `datasets` exports the train split (tens of MB) in memory
    "model-cache": "4g",
    # one `fedtune eval` process per GPU, each loading the 8B base (bf16, ~16 GiB while it loads)
    "evaluate-per-gpu": 20,  # GiB, times the stack's GPUs
    "report": "1g",  # matplotlib charts of one run
}
# The tiny profile (the smoke stack, CPU): a 64-wide model; importing torch, transformers and peft
# is most of each process. Peaks measured on a 2-round tiny `fedtune local up` (RSS of each
# process tree, 2026-12-06): SuperNode 1.66 GiB (trainer 1.1 of it), ServerApp's SuperExec
# 1.28 GiB, SuperLink 166 MiB, `fedtune eval-run` 1.18 GiB, `fedtune stack cache` 37 MiB.
MEMORY_TINY = {
    "supernode": "3g",
    "trainer": "3g",
    "trainer-tokens": "256m",
    "serverapp": "3g",
    "superlink": "1g",
    "edge": "256m",
    "certs": "256m",
    "register": "512m",
    "run": "512m",
    "model-cache": "1g",
    "evaluate-per-gpu": 3,
    "report": "1g",
}


def _memory_table(spec: StackSpec) -> dict[str, Any]:
    from app.config import load_settings, parse_overrides

    settings = load_settings({"profile": spec.profile, **parse_overrides(spec.run_config)})
    return MEMORY_TINY if settings.model.name == "tiny" else MEMORY_SEED


def memory_limit(spec: StackSpec, role: str) -> str:
    """The mem_limit of one service role: FEDTUNE_MEM_<ROLE> from .env, else the profile's size."""
    table = _memory_table(spec)
    if role == "evaluate":
        size = f"{table['evaluate-per-gpu'] * (1 if spec.no_gpu else spec.gpus)}g"
    else:
        size = table[role]
    return f"${{FEDTUNE_MEM_{role.upper().replace('-', '_')}:-{size}}}"


def _with_memory_limits(spec: StackSpec, services: dict[str, Any]) -> None:
    for name, service in services.items():
        role = "supernode" if name.startswith("supernode") else "trainer" if name.startswith("trainer-") and name != "trainer-tokens" else name
        service["mem_limit"] = service["memswap_limit"] = memory_limit(spec, role)


def _run_config(spec: StackSpec) -> str:
    """The `run` service's --run-config: the user's overrides plus what the stack itself implies."""
    from app.config import load_settings, parse_overrides

    user = parse_overrides(spec.run_config)
    settings = load_settings({"profile": spec.profile, **user})
    extra: list[str] = []
    if settings.dataset.num_partitions != spec.nodes and "dataset.num-partitions" not in user:
        extra.append(f"dataset.num-partitions={spec.nodes}")
    if settings.trainer.placement != spec.placement and "trainer.placement" not in user:
        extra.append(f"trainer.placement={spec.placement}")  # the nodes' own fallback says which placement it stood in for
    if settings.dataset.name != "tiny" and not settings.dataset.path:
        # nodes read the hub dataset as exported into the read-only cache (same rows, same order)
        extra.append(f"dataset.path='\"{dataset_file(settings.dataset.name)}\"'")
    return " ".join([*extra, spec.run_config.strip()]).strip()


# ---------------------------------------------------------------------------- services


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


def _edge_build() -> dict[str, Any]:
    return {
        "context": ".",
        "dockerfile": "docker/edge.Dockerfile",
        "args": {
            "BASE_IMAGE": f"${{FEDTUNE_EDGE_BASE_IMAGE:-{DEFAULT_EDGE_BASE_IMAGE}}}",
            "FEDTUNE_UID": f"${{FEDTUNE_UID:-{UID}}}",
            "FEDTUNE_GID": f"${{FEDTUNE_GID:-{UID}}}",
        },
    }


APP = f"${{FEDTUNE_APP_IMAGE:-{app_image()}}}"
EDGE_IMAGE = f"${{FEDTUNE_EDGE_IMAGE:-{edge_image()}}}"
SUPERLINK_IMAGE = f"${{FEDTUNE_SUPERLINK_IMAGE:-{superlink_image()}}}"
RESULTS_MOUNT = f"${{FEDTUNE_RESULTS:-./results}}:{RESULTS}"
DONE = {"condition": "service_completed_successfully"}


def _certs_volume(service: str, index: int | None = None) -> str:
    """The named volume holding one service's certificate files (all on one host)."""
    return f"certs-supernode-{index}" if service == "supernode" else f"certs-{service}"


def _certs_holders(spec: StackSpec) -> list[tuple[str, int | None]]:
    """(service, node index) of every service the all-in-one stack gives certificate files."""
    return [("superlink", None), ("serverapp", None), ("register", None), ("run", None),
            *(("supernode", i) for i in range(spec.nodes))]


def _certs_mounts(spec: StackSpec, paths, service: str, index: int | str | None = None) -> list[Any]:
    """Read-only, and only `service`'s own files (app.deploy.certs.service_files): its own volume,
    filled by the `certs` service (all on one host), or each file bind-mounted from the host
    directory (split; a missing file is an error, not an empty directory Docker makes up)."""
    from app.deploy.certs import service_files

    if spec.role == "all":
        return [f"{_certs_volume(service, index)}:{CERTS}:ro"]
    source = "${FEDTUNE_CERTS_DIR:-./certs/generated}"
    return [{"type": "bind", "source": f"{source}/{path.name}", "target": str(path), "read_only": True,
             "bind": {"create_host_path": False}} for path in service_files(service, paths, index)]


def _certs_service(spec: StackSpec) -> dict[str, Any]:
    """Issues the certificates (ca.key stays in its `certs-issuer` volume, mounted nowhere else)
    and copies each service its own files. It runs as root, without network, with only the
    capabilities to write into volumes that Docker may already have given to the containers'
    user (DAC_OVERRIDE) and to hand each copy to that user (CHOWN)."""
    holders = _certs_holders(spec)
    return {
        "image": APP,
        "build": _build("app.Dockerfile"),
        "command": ["fedtune", "stack", "certs", "--dir", ISSUER, "--san", "superlink", "--supernodes", str(spec.nodes),
                    "--export", EXPORT, "--owner", f"${{FEDTUNE_UID:-{UID}}}:${{FEDTUNE_GID:-{UID}}}"],
        "network_mode": "none",
        "user": "0:0",
        "cap_drop": ["ALL"],
        "cap_add": ["CHOWN", "DAC_OVERRIDE"],
        "volumes": [f"certs-issuer:{ISSUER}",
                    *(f"{_certs_volume(s, i)}:{EXPORT}/{_certs_volume(s, i).removeprefix('certs-')}" for s, i in holders)],
    }


# Device placement (app/training/device_trainer.py): per device a trainer service with its
# registry volume (mounted in no SuperNode) and a socket volume shared with the SuperNodes of that
# device; per SuperNode a token volume mounted in that node alone. `trainer-tokens` fills them.
TRAINER_SOCKET_DIR = "/run/fedtune-trainer"
TRAINER_REGISTRY_DIR = "/trainer-registry"
TRAINER_TOKEN_DIR = "/trainer-token"
REGISTRY_FILE, TOKEN_FILE, SOCKET_FILE = "registry.json", "token", "trainer.sock"


def trainer_volume(kind: str, key: int | str) -> str:
    """`trainer-socket-<device>`, `trainer-registry-<device>` or `trainer-token-<node>`."""
    return f"trainer-{kind}-{key}"


def node_devices(spec: StackSpec) -> list[str]:
    """The device of each SuperNode: `cpu`, or its GPU (i mod G), as the SuperNodes are placed."""
    return ["cpu" if spec.no_gpu else str(i % spec.gpus) for i in range(spec.nodes)]


def _trainer_volumes(spec: StackSpec) -> list[str]:
    devices = list(dict.fromkeys(node_devices(spec)))
    return ([trainer_volume(k, d) for d in devices for k in ("socket", "registry")]
            + [trainer_volume("token", i) for i in range(spec.nodes)])


def _trainer_tokens_service(spec: StackSpec) -> dict[str, Any]:
    """One-shot, like `certs`: a fresh token per SuperNode into its own volume, each device's
    registry (token digests -> partition) into the volume only that device's trainer mounts,
    and the socket volumes handed to the containers' user (0700)."""
    return {
        "image": APP,
        "command": ["fedtune", "stack", "trainer-tokens", "--export", EXPORT, "--devices", ",".join(node_devices(spec)),
                    "--partitions", str(spec.nodes), "--owner", f"${{FEDTUNE_UID:-{UID}}}:${{FEDTUNE_GID:-{UID}}}"],
        "network_mode": "none",
        "user": "0:0",
        "cap_drop": ["ALL"],
        "cap_add": ["CHOWN", "DAC_OVERRIDE", "FOWNER"],
        "volumes": [f"{v}:{EXPORT}/{v}" for v in _trainer_volumes(spec)],
    }


def _trainer_service(spec: StackSpec, device: str) -> dict[str, Any]:
    service: dict[str, Any] = {
        "image": APP,
        "command": ["fedtune", "trainer", "--socket", f"{TRAINER_SOCKET_DIR}/{SOCKET_FILE}",
                    "--registry", f"{TRAINER_REGISTRY_DIR}/{REGISTRY_FILE}"],
        "depends_on": {"model-cache": DONE, "trainer-tokens": DONE},
        "environment": {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        "labels": {"fedtune.role": "trainer", "fedtune.device": device},
        "volumes": [f"{trainer_volume('socket', device)}:{TRAINER_SOCKET_DIR}",
                    f"{trainer_volume('registry', device)}:{TRAINER_REGISTRY_DIR}:ro", f"model-cache:{CACHE}:ro"],
        "network_mode": "none",  # it serves a Unix socket only
        "init": True,
        "restart": "unless-stopped",
    }
    if device != "cpu":
        service["deploy"] = _gpu_devices([device])
        service["environment"][ASSIGNED_GPU_ENV] = device
    return service


def _model_cache_service(spec: StackSpec) -> dict[str, Any]:
    service = {
        "image": APP,
        "command": ["fedtune", "stack", "cache", "--profile", spec.profile, "--run-config", spec.run_config],
        "environment": {"HF_TOKEN": "${HF_TOKEN:-}", "HF_HUB_OFFLINE": "${HF_HUB_OFFLINE:-0}"},
        "volumes": [f"model-cache:{CACHE}"],
    }
    if spec.role == "site":
        service["build"] = _build("app.Dockerfile")
    return service


def _superlink_service(spec: StackSpec, paths) -> dict[str, Any]:
    from app.deploy.certs import flower_tls_args

    service = {
        "image": SUPERLINK_IMAGE,
        "build": _build("superlink.Dockerfile"),
        "command": [
            "flower-superlink", *flower_tls_args("superlink", paths, isolation="process"),
            "--host", "0.0.0.0", "--port", str(PORT), "--database", f"{STATE}/state.db",
            "--disable-runtime-dependency-installation", "--health-server-address", HEALTH,
        ],
        "volumes": [*_certs_mounts(spec, paths, "superlink"), f"superlink-state:{STATE}"],
        "healthcheck": {
            "test": ["CMD", "fedtune-healthcheck", "--https", f"https://127.0.0.1:{PORT}/health", "--ca",
                     str(paths.ca_cert), "--grpc", HEALTH],
            "interval": "5s", "timeout": "5s", "retries": 12, "start_period": "30s",
        },
        "init": True,
        "restart": "unless-stopped",
        # 4x a SuperNode's CPU weight: when many nodes start at once on a small host, the
        # coordinator must still answer their activations within their timeout
        "cpu_shares": 4096,
    }
    if spec.role == "all":
        service["depends_on"] = {"certs": DONE}
    else:  # the operator's flwr CLI on the coordinator's host; the sites use the edge
        service["ports"] = [CONTROL_PUBLISH]
    return service


def _edge_service(spec: StackSpec, paths) -> dict[str, Any]:
    """The coordinator's face to the sites: nginx terminating TLS (edge.crt) and forwarding
    /v1/fleet/ to the SuperLink, verified against ca.crt; the Control and Runtime APIs, which
    flwr 1.42 serves on the same port without client authentication, are refused (403)."""
    return {
        "image": EDGE_IMAGE,
        "build": _edge_build(),
        "depends_on": {"superlink": {"condition": "service_healthy"}},
        "ports": [spec.publish],
        "volumes": _certs_mounts(spec, paths, "edge"),
        "read_only": True,
        "tmpfs": ["/tmp"],
        "restart": "unless-stopped",
    }


def _register_service(spec: StackSpec, paths) -> dict[str, Any]:
    return {
        "image": APP,
        "command": ["fedtune", "stack", "register", "--superlink", SUPERLINK, "--certs", CERTS, "--nodes", str(spec.nodes)],
        "depends_on": {"superlink": {"condition": "service_healthy"}},
        "volumes": _certs_mounts(spec, paths, "register"),
    }


def _serverapp_service(spec: StackSpec, paths) -> dict[str, Any]:
    from app.deploy.certs import flower_tls_args
    from app.deploy.launcher import FLOWER_SETTINGS

    return {
        "image": APP,
        "command": ["flower-superexec", *flower_tls_args("superexec-serverapp", paths), "--runtime-api-address", SUPERLINK],
        "environment": dict(FLOWER_SETTINGS),  # the same Flower settings as `fedtune local up`
        "depends_on": {"superlink": {"condition": "service_healthy"}},
        "volumes": [*_certs_mounts(spec, paths, "serverapp"), RESULTS_MOUNT],
        "init": True,
        # a SuperExec whose secret is refused exits with status 0: `on-failure` would not restart it
        "restart": "unless-stopped",
    }


def _supernode_service(spec: StackSpec, paths, index: int | str, superlink: str, partitions: int | str,
                       gpu: str | None) -> dict[str, Any]:
    from app.deploy.certs import flower_tls_args

    node: dict[str, Any] = {
        "image": APP,
        "command": [
            "fedtune", "supernode", "--", *flower_tls_args("supernode", paths, index),
            "--superlink", superlink, "--node-config", f"partition-id={index} num-partitions={partitions}",
        ],
        "depends_on": {"model-cache": DONE, **({"register": DONE} if spec.role == "all" else {})},
        "environment": {
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            **({"OMP_NUM_THREADS": "1"} if spec.no_gpu else {}),
        },
        "labels": {"fedtune.role": "supernode", "fedtune.partition-id": str(index)},
        "volumes": [*_certs_mounts(spec, paths, "supernode", index), f"model-cache:{CACHE}:ro"],
        "init": True,
        "restart": "on-failure",
    }
    if spec.placement == "device" and isinstance(index, int):  # the trainer of its device, with its own token
        device = node_devices(spec)[index]
        node["command"][2:2] = ["--trainer-socket", f"{TRAINER_SOCKET_DIR}/{SOCKET_FILE}",
                                "--trainer-token", f"{TRAINER_TOKEN_DIR}/{TOKEN_FILE}"]
        node["volumes"] += [f"{trainer_volume('socket', device)}:{TRAINER_SOCKET_DIR}",
                            f"{trainer_volume('token', index)}:{TRAINER_TOKEN_DIR}:ro"]
        node["depends_on"][f"trainer-{device}"] = {"condition": "service_started"}
    if gpu is not None:
        node["deploy"] = _gpu_devices([gpu])
        node["environment"][ASSIGNED_GPU_ENV] = gpu  # a node that finds no GPU then says so (app.training.model)
        # A shorter idle poll (app/node/flwr_patches.py); set empty in .env for Flower's own 3 s.
        node["environment"][POLL_ENV] = f"${{{POLL_ENV}-{GPU_POLL_SECONDS}}}"
    return node


# Secure aggregation (app/privacy/) on or off from .env, unless the stack's run config sets it.
SECURE_AGGREGATION = "privacy.secure-aggregation=${FEDTUNE_SECURE_AGGREGATION:-false}"


def _secure_aggregation_setting(spec: StackSpec) -> str:
    from app.config import parse_overrides

    return "" if "privacy.secure-aggregation" in parse_overrides(spec.run_config) else SECURE_AGGREGATION


def _run_service(spec: StackSpec, paths) -> dict[str, Any]:
    from app.deploy.launcher import PENDING_TIMEOUT, PENDING_TIMEOUT_ENV

    command = [
        "fedtune", "run", "--superlink", SUPERLINK, "--nodes", str(spec.nodes), "--profile", spec.profile,
        "--root-certificates", str(paths.ca_cert), "--results", RESULTS,
        # after the ServerApp died: `FEDTUNE_RESUME_FROM=latest docker compose up ...` continues
        # from the last checkpoint (README, "Reliability")
        "--resume-from", "${FEDTUNE_RESUME_FROM:-}",
        # a run no ServerApp begins (e.g. its SuperExec refused, restarting forever) fails the
        # service after this many seconds instead of holding the stack up
        "--pending-timeout", f"${{{PENDING_TIMEOUT_ENV}:-{PENDING_TIMEOUT:.0f}}}",
    ]
    if spec.rounds is not None:
        command += ["--rounds", str(spec.rounds)]
    command += ["--run-config", " ".join(filter(None, [_secure_aggregation_setting(spec), _run_config(spec)]))]
    # On one host `run` waits for the model cache too: a first download (16 GB for the seed
    # model) must not count against its wait for the SuperNodes, which start only after it.
    cache = {"model-cache": DONE} if spec.role == "all" else {}
    return {
        "image": APP,
        "command": command,
        "depends_on": {**cache, "register": DONE, "serverapp": {"condition": "service_started"}},
        "volumes": [*_certs_mounts(spec, paths, "run"), RESULTS_MOUNT],
    }


def _gpu_devices(device_ids: list[str]) -> dict[str, Any]:
    return {"resources": {"reservations": {"devices": [
        {"driver": "nvidia", "device_ids": device_ids, "capabilities": ["gpu"]},
    ]}}}


def _evaluate_service(spec: StackSpec) -> dict[str, Any]:
    """One-shot after a successful run: its final adapter on the four benchmarks (spread over the
    GPUs), then the report. Benchmarks come from the model cache; the tiny profile uses its own."""
    from app.config import load_settings, parse_overrides

    settings = load_settings({"profile": spec.profile, **parse_overrides(spec.run_config)})
    command = ["fedtune", "eval-run", "--latest", RESULTS]
    if settings.model.name != "tiny":
        command += ["--data-dir", eval_data_dir()]
    if not spec.no_gpu:
        command += ["--gpus", ",".join(str(g) for g in range(spec.gpus))]
    command += ["--exact"] if spec.eval_exact else []
    command += ["--limit", str(spec.eval_limit)] if spec.eval_limit is not None else []
    service: dict[str, Any] = {
        "image": APP,
        "command": command,
        "depends_on": {"run": DONE},
        "environment": {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        "volumes": [f"model-cache:{CACHE}:ro", RESULTS_MOUNT],
        "network_mode": "none",
    }
    if not spec.no_gpu:
        service["deploy"] = _gpu_devices([str(g) for g in range(spec.gpus)])
    return service


def _report_service(spec: StackSpec) -> dict[str, Any]:
    """One-shot, last: prints the run's table; `docker compose up --exit-code-from report` ends here."""
    return {
        "image": APP,
        "command": ["fedtune", "report", "--latest", RESULTS],
        "depends_on": {"evaluate": DONE},
        "volumes": [RESULTS_MOUNT],
        "network_mode": "none",
    }


# ---------------------------------------------------------------------------- files


def compose_spec(spec: StackSpec) -> dict[str, Any]:
    """The compose file as a dict: every service, volume and flag of the stack."""
    from app.deploy.certs import CertPaths

    if spec.role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {spec.role!r}")
    if spec.nodes < 1 or (not spec.no_gpu and spec.gpus < 1):
        raise ValueError("--nodes and --gpus must be at least 1")
    if spec.placement not in ("node", "device") or (spec.placement == "device" and spec.role != "all"):
        raise ValueError(f"--placement {spec.placement!r}: expected node, or device with --role all "
                         "(a site's single SuperNode keeps its own trainer)")
    if spec.role != "superlink" and spec.publish != EDGE_PUBLISH:
        raise ValueError(f"--publish sets the edge's port, which only --role superlink has; role {spec.role!r} publishes nothing")
    paths = CertPaths(Path(CERTS), spec.nodes)
    services: dict[str, Any] = {}
    volumes: dict[str, Any] = {}
    if spec.role == "all":
        services["certs"] = _certs_service(spec)
        volumes["certs-issuer"] = {}
        volumes.update({_certs_volume(s, i): {} for s, i in _certs_holders(spec)})
    if spec.role in ("all", "site"):
        services["model-cache"] = _model_cache_service(spec)
        volumes["model-cache"] = {}
    if spec.role in ("all", "superlink"):
        services["superlink"] = _superlink_service(spec, paths)
        if spec.role == "superlink":
            services["edge"] = _edge_service(spec, paths)
        services["register"] = _register_service(spec, paths)
        services["serverapp"] = _serverapp_service(spec, paths)
        volumes["superlink-state"] = {}
    if spec.role == "all" and spec.placement == "device":
        services["trainer-tokens"] = _trainer_tokens_service(spec)
        for device in dict.fromkeys(node_devices(spec)):
            services[f"trainer-{device}"] = _trainer_service(spec, device)
        volumes.update({v: {} for v in _trainer_volumes(spec)})
    if spec.role == "all":
        for i in range(spec.nodes):
            gpu = None if spec.no_gpu else str(i % spec.gpus)
            services[f"supernode-{i}"] = _supernode_service(spec, paths, i, SUPERLINK, spec.nodes, gpu)
    if spec.role == "site":
        services["supernode"] = _supernode_service(
            spec, paths, SITE_PARTITION, SITE_SUPERLINK, f"${{FEDTUNE_NUM_PARTITIONS:-{spec.nodes}}}",
            None if spec.no_gpu else "${FEDTUNE_GPU:-0}")
    if spec.role in ("all", "superlink"):
        services["run"] = _run_service(spec, paths)
        if spec.role == "all":  # the coordinating site alone has no model to evaluate with
            services["evaluate"] = _evaluate_service(spec)
            services["report"] = _report_service(spec)
        last = list(services)[-1]
        for name, service in services.items():
            if name != last:
                # Only the last service is attached: `docker compose up --exit-code-from <last>` then
                # ends when it does, not when a one-shot service completes or a SuperNode restarts
                # (attached containers' exits abort the whole stack). Their logs: `docker compose logs SERVICE`.
                service["attach"] = False
    _with_memory_limits(spec, services)
    return {"name": spec.name, "services": services, "volumes": volumes}


def last_service(spec: StackSpec) -> str:
    """The service `docker compose up --exit-code-from` follows: the one that ends the stack's work."""
    return list(compose_spec(spec)["services"])[-1]


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


ENV_HELP = {
    "all": "FEDTUNE_BASE_IMAGE, FEDTUNE_PIP_OFFLINE, FEDTUNE_UID/GID,\n# FEDTUNE_RESULTS, "
           "FEDTUNE_APP_IMAGE, FEDTUNE_SUPERLINK_IMAGE, HF_TOKEN, FEDTUNE_PENDING_TIMEOUT, FEDTUNE_MEM_<SERVICE>,\n# "
           "FEDTUNE_SECURE_AGGREGATION.",
    "superlink": "FEDTUNE_CERTS_DIR, FEDTUNE_RESULTS,\n# FEDTUNE_EDGE_PUBLISH, FEDTUNE_CONTROL_PUBLISH, "
                 "FEDTUNE_EDGE_BASE_IMAGE, FEDTUNE_EDGE_IMAGE, FEDTUNE_SECURE_AGGREGATION, image settings as in compose.yaml.",
    "site": "FEDTUNE_SUPERLINK_ADDRESS, FEDTUNE_PARTITION_ID,\n# FEDTUNE_NUM_PARTITIONS, FEDTUNE_GPU, "
            "FEDTUNE_CERTS_DIR, HF_TOKEN, image settings as in compose.yaml.",
}
ENV_EXAMPLE = {"all": ".env.example", "superlink": ".env.superlink.example", "site": ".env.site.example"}


def render_compose(spec: StackSpec) -> str:
    import yaml

    header = (
        f"# Generated by `{spec.command_line()}` (app/deploy/compose.py).\n"
        f"# Start: docker compose up --exit-code-from {last_service(spec)}\n"
        "# Do not edit: change the generator and regenerate; tests/test_stack.py checks the two agree.\n"
        f"# Settings (.env, see {ENV_EXAMPLE[spec.role]}): {ENV_HELP[spec.role]}\n"
    )
    return header + yaml.dump(compose_spec(spec), Dumper=_dumper(), sort_keys=False, default_flow_style=False, width=100)


# The committed files and the spec each is generated from (tests/test_stack.py keeps them equal).
COMMITTED = {
    "compose.yaml": StackSpec(),
    "compose.smoke.yaml": smoke_spec(),
    "compose.superlink.yaml": StackSpec(role="superlink", name="fedtune-superlink"),
    "compose.site.yaml": StackSpec(role="site", name="fedtune-site"),
}
