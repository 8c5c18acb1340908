"""`fedtune stack`: the Docker Compose deployment (generator in app/deploy/compose.py, driver in app/deploy/smoke.py).

    fedtune stack compose > compose.yaml                              # what `docker compose up` runs
    fedtune stack compose --role superlink > compose.superlink.yaml   # the coordinating site
    fedtune stack compose --role site > compose.site.yaml             # one hospital's SuperNode
    fedtune stack smoke                                               # CPU smoke run of the whole stack
    fedtune stack check [-f compose.yaml]                             # what this host lacks to run it
    fedtune stack up [-f compose.yaml]                                # check, up; on failure logs, then down

The services (docs/docker.md):

    certs        one-shot: CA, SuperLink certificate, SuperExec secret, one key pair per SuperNode,
                 created in the `certs-issuer` volume when missing, then each service's own files
                 copied into that service's volume (`fedtune stack certs`, app.deploy.certs)
    model-cache  one-shot: the profile's base model, data and the four benchmarks into the
                 `model-cache` volume, once; every SuperNode mounts it read-only (`fedtune stack cache`)
    superlink    flower-superlink, TLS + SuperNode authentication, state in the `superlink-state`
                 volume, healthcheck; its one port (Fleet, Control and Runtime API) is published
                 nowhere on one host, on the host's loopback at a coordinating site
    edge         (coordinating site) nginx: TLS to the sites, forwards the Fleet API only
    register     one-shot: registers each SuperNode's public key over the Control API
    serverapp    flower-superexec running the ServerApp (FedProx) for the SuperLink; CPU only
    supernode-i  `fedtune supernode -- flower-supernode ...`, partition i of N, GPU i mod G
    trainer-tokens, trainer-<gpu>  (--placement device) one-shot: a token per SuperNode and each
                 device's registry (`fedtune stack trainer-tokens`); then one `fedtune trainer` per
                 GPU holding the base model for the SuperNodes of that GPU (app/training/device_trainer.py)
    run          one-shot: `fedtune run` submits the run, follows it and exits with its status
    evaluate     one-shot after `run` succeeded: `fedtune eval-run`, the final adapter on the benchmarks
    report       one-shot, last: `fedtune report`, prints the table (`--exit-code-from report`)

The commands those services run inside the containers (`certs`, `register`, `cache`) live here.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from app.deploy.compose import (CACHE, CERTS, DEFAULT_GPUS, DEFAULT_NODES, ROLES, SUPERLINK, StackSpec, dataset_file,
                                eval_data_dir, render_compose)
from app.deploy.smoke import StackError

FEDERATION = "fedtune"


# ---------------------------------------------------------------------------- in-container commands


def _owner(text: str) -> tuple[int, int]:
    uid, _, gid = text.partition(":")
    if not (uid.isdigit() and gid.isdigit()):
        raise ValueError(f"--owner {text!r}: expected UID:GID, e.g. 10001:10001")
    return int(uid), int(gid)


def cmd_certs(args) -> int:
    """Create what is missing in the issuer's directory, keep what exists and is valid; with
    --export, copy each service its own files (app.deploy.certs.service_files) into
    EXPORT/<service> (its volume), owned by --owner."""
    from app.deploy.certs import SERVICES, CertError, ensure_certs, export_service_files

    try:
        owner = _owner(args.owner) if args.owner else None
        paths = ensure_certs(Path(args.dir), args.san or ["superlink"], num_supernodes=args.supernodes)
        if args.export:
            export = Path(args.export)
            for service in SERVICES:
                if service == "supernode":
                    for i in range(args.supernodes):
                        export_service_files(paths, service, export / f"supernode-{i}", i, owner)
                elif (export / service).is_dir():  # the edge has no volume on one host
                    export_service_files(paths, service, export / service, owner=owner)
    except (CertError, ValueError, OSError) as exc:
        print(f"fedtune: {exc}", file=sys.stderr)
        return 2
    print(f"certificates ready in {paths.directory} (CA, SuperLink, SuperExec secret, {args.supernodes} SuperNode keys)"
          + (f"; each service's own files copied under {args.export}" if args.export else ""))
    return 0


def cmd_trainer_tokens(args) -> int:
    """Fresh per-node tokens and per-device registries for the device trainers, into the volumes
    named by app.deploy.compose.trainer_volume under --export, owned by --owner; the socket
    volumes are made the containers' user's, mode 0700."""
    from app.deploy.compose import REGISTRY_FILE, TOKEN_FILE, trainer_volume
    from app.training.node_tokens import Binding, new_token, write_registry, write_token

    try:
        owner = _owner(args.owner) if args.owner else None
        devices = [d.strip() for d in args.devices.split(",")]
        if not all(devices) or not 0 < len(devices) <= args.partitions:
            raise ValueError(f"--devices {args.devices!r}: expected one device per SuperNode (at most --partitions {args.partitions})")
        export = Path(args.export)
        tokens = [new_token() for _ in devices]
        for i, token in enumerate(tokens):
            write_token(export / trainer_volume("token", i) / TOKEN_FILE, token, owner)
        for device in dict.fromkeys(devices):
            bindings = {tokens[i]: Binding(i, args.partitions) for i, d in enumerate(devices) if d == device}
            write_registry(export / trainer_volume("registry", device) / REGISTRY_FILE, bindings, owner)
            sockets = export / trainer_volume("socket", device)
            sockets.mkdir(parents=True, exist_ok=True)
            if owner is not None:
                os.chown(sockets, *owner)
            sockets.chmod(0o700)
    except (ValueError, OSError) as exc:
        print(f"fedtune: {exc}", file=sys.stderr)
        return 2
    print(f"trainer tokens: {len(devices)} SuperNode(s), {len(set(devices))} device trainer(s)")
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
    from app.deploy.certs import CertPaths, flwr_cli_config, register_supernode_command

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
        from app.training.tiny import tiny_dataset_path, tiny_eval_dir, tiny_model_dir

        print(f"tiny model: {tiny_model_dir()}\ntiny data: {tiny_dataset_path()}\ntiny benchmarks: {tiny_eval_dir()}", flush=True)
    if settings.model.name != "tiny" and not Path(settings.model.name).exists():
        from huggingface_hub import snapshot_download

        hub_cache = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
        with download_progress(hub_cache, f"model {settings.model.name}"):
            path = snapshot_download(
                settings.model.name,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"],
            )
        print(f"model {settings.model.name}: {path}", flush=True)
    if settings.model.name != "tiny":
        from app.evaluation.benchmarks import EvalDataError, export_benchmarks

        target = Path(eval_data_dir(os.environ.get("FEDTUNE_CACHE", f"{CACHE}/fedtune")))
        try:
            for name, path in export_benchmarks(target).items():
                print(f"benchmark {name}: {path}", flush=True)
        except EvalDataError as exc:
            print(f"fedtune: {exc}", file=sys.stderr)
            return 2
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


class download_progress:
    """While a download runs, print every `every` seconds how much is in `directory` (docker
    compose logs show no progress bar: tqdm redraws one line that a log never shows)."""

    def __init__(self, directory: Path, label: str, every: float = 30.0) -> None:
        import threading

        self.directory, self.label, self.every = directory, label, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _size(self) -> int:
        total = 0
        for root, _, files in os.walk(self.directory):
            for name in files:
                try:
                    total += os.lstat(os.path.join(root, name)).st_size  # blobs, not their symlinks
                except OSError:
                    continue  # an .incomplete file renamed meanwhile
        return total

    def _line(self) -> str:
        done, seconds = self._size() - self._start, time.monotonic() - self._started
        return f"{self.label}: {done / 2**20:.0f} MiB downloaded in {seconds:.0f} s ({done / 2**20 / max(seconds, 1e-9):.1f} MiB/s)"

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            print(self._line(), flush=True)

    def __enter__(self):
        self._start, self._started = self._size(), time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        print(self._line(), flush=True)


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
        publish=args.publish or StackSpec.publish, role=args.role, eval_exact=args.eval_exact, eval_limit=args.eval_limit,
        placement=args.placement,
    )
    try:
        sys.stdout.write(render_compose(spec))
    except Exception as exc:  # config errors name the key
        print(f"fedtune: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_check(args) -> int:
    from app.deploy.preflight import check_stack, report

    compose_file = Path(args.file)
    if not compose_file.is_file():
        print(f"fedtune: {compose_file}: no such compose file (generate one with `fedtune stack compose`)", file=sys.stderr)
        return 2
    text, code = report(check_stack(compose_file), compose_file)
    print(text, flush=True)
    return code


def cmd_up(args) -> int:
    from app.deploy.stack_up import stack_up

    compose_file = Path(args.file)
    if not compose_file.is_file():
        print(f"fedtune: {compose_file}: no such compose file (generate one with `fedtune stack compose`)", file=sys.stderr)
        return 2
    try:
        return stack_up(compose_file, preflight=not args.no_check)
    except ValueError as exc:
        print(f"fedtune: {compose_file}: {exc}", file=sys.stderr)
        return 2


def cmd_smoke(args) -> int:
    from app.deploy.smoke import smoke

    try:
        result = smoke(nodes=args.nodes, rounds=args.rounds, results=Path(args.results) if args.results else None,
                       project=args.project, timeout=args.timeout, build=args.build, keep=args.keep, secure_aggregation=args.secure_aggregation)
    except StackError as exc:
        print(f"fedtune stack smoke FAILED: {exc}", file=sys.stderr)
        return 1
    idle = {kind: sorted(m[kind] for m in result.idle_memory_mib.values()) for kind in ("stats", "anonymous")}
    print(json.dumps({
        "run_exit_code": result.run_exit_code,
        "up_to_all_supernodes_online_s": round(result.up_seconds, 1),
        "total_s": round(result.total_seconds, 1),
        "phases_s": result.phases,
        "run_dirs": [str(p) for p in result.run_dirs],
        "idle_supernode_memory_mib": {kind: {"median": round(statistics.median(v), 1), "max": round(v[-1], 1)}
                                      for kind, v in idle.items() if v},
        "supernode_restarts": result.supernode_restarts,
        "supernode_uids": sorted({u for s, us in result.users.items() if s.startswith("supernode-") for u in us}),
        "leftovers": result.leftovers,
    }, indent=2))
    return 0 if not any(result.leftovers.values()) or args.keep else 1


def register(subparsers) -> None:
    stack = subparsers.add_parser("stack", help="the Docker Compose stack (generator, smoke run, in-container steps)")
    sub = stack.add_subparsers(dest="stack_command", required=True)

    comp = sub.add_parser("compose", help="print a compose file (compose.yaml, or a split one with --role)")
    comp.add_argument("--role", choices=ROLES, default="all",
                      help="all: one host; superlink: the coordinating site; site: one remote SuperNode")
    comp.add_argument("--nodes", type=int, help=f"SuperNodes (default FEDTUNE_NODES from env/.env, else {DEFAULT_NODES})")
    comp.add_argument("--gpus", type=int, help=f"GPUs; node i gets GPU i mod G (default FEDTUNE_GPUS, else {DEFAULT_GPUS})")
    comp.add_argument("--profile", default="bio-medical-llama3-8b", help="configuration profile (bio-medical-llama3-8b | tiny)")
    comp.add_argument("--no-gpu", action="store_true", help="no GPU reservations (CPU hosts)")
    comp.add_argument("--rounds", type=int, help="num-server-rounds for the run service")
    comp.add_argument("--run-config", default="", help='extra run config, "key=value ..."')
    comp.add_argument("--name", default="fedtune", help="compose project name")
    comp.add_argument("--publish", help=f"ports entry of the edge, --role superlink only (default {StackSpec.publish!r})")
    comp.add_argument("--eval-exact", action="store_true", help="the evaluate service uses the reference loop (slow)")
    comp.add_argument("--eval-limit", type=int, help="the evaluate service: first N questions of each benchmark")
    comp.add_argument("--placement", choices=("node", "device"), default="node",
                      help="node: a trainer per SuperNode; device: one trainer per GPU for its SuperNodes (--role all)")
    comp.set_defaults(func=cmd_compose)

    ck = sub.add_parser("check", help="say what this host lacks to run a compose file (Docker, GPU runtime, model "
                                      "download, the results directory's owner) and what to do")
    ck.add_argument("-f", "--file", default="compose.yaml", help="the compose file (default compose.yaml)")
    ck.set_defaults(func=cmd_check)

    up = sub.add_parser("up", help="check the host, then `docker compose up --exit-code-from` the file's last service; "
                                   "when that fails, print the failed services' logs and `docker compose down`")
    up.add_argument("-f", "--file", default="compose.yaml", help="the compose file (default compose.yaml)")
    up.add_argument("--no-check", action="store_true", help="skip `fedtune stack check`")
    up.set_defaults(func=cmd_up)

    sm = sub.add_parser("smoke", help="CPU smoke run: the stack with the tiny profile, N SuperNodes, R rounds; then down")
    sm.add_argument("--nodes", type=int, default=DEFAULT_NODES)
    sm.add_argument("--rounds", type=int, default=2)
    sm.add_argument("--results", help="results directory (default ./results)")
    sm.add_argument("--project", default="fedtune-smoke")
    sm.add_argument("--timeout", type=float, default=1200.0)
    sm.add_argument("--build", action="store_true", help="(re)build the images first")
    sm.add_argument("--secure-aggregation", action="store_true", help="with privacy.secure-aggregation=true (FEDTUNE_SECURE_AGGREGATION)")
    sm.add_argument("--keep", action="store_true", help="leave the stack up (tear down with docker compose -p PROJECT down -v)")
    sm.set_defaults(func=cmd_smoke)

    ce = sub.add_parser("certs", help="(in the certs service) create missing certificates and keys, keep valid ones")
    ce.add_argument("--dir", default=CERTS)
    ce.add_argument("--san", action="append", default=[])
    ce.add_argument("--supernodes", type=int, default=DEFAULT_NODES)
    ce.add_argument("--export", help="copy each service its own files into EXPORT/<service> (one volume each)")
    ce.add_argument("--owner", help="UID:GID of the copies (as root)")
    ce.set_defaults(func=cmd_certs)

    tt = sub.add_parser("trainer-tokens", help="(in the trainer-tokens service) per-node tokens and per-device trainer registries")
    tt.add_argument("--export", required=True, help="directory holding the trainer volumes")
    tt.add_argument("--devices", required=True, help="the device of each SuperNode, comma-separated (cpu or a GPU id)")
    tt.add_argument("--partitions", type=int, required=True, help="num-partitions of every node")
    tt.add_argument("--owner", help="UID:GID of the files (as root)")
    tt.set_defaults(func=cmd_trainer_tokens)

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
