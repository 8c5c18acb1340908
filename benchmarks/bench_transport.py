"""Transport benchmark (issue 16): what a round costs in Flower 1.42's transport alone.

Real processes started the way `fedtune local up` starts them (app/deploy/launcher.py: its
Flower settings, TLS and SuperNode authentication from app.deploy.certs, a SuperLink with its
state database, a SuperExec running the ServerApp, N SuperNodes spawning a ClientApp process per
message) run the torch-free echo app in benchmarks/transport_app: the ServerApp sends an
adapter-shaped bfloat16 state of --size-mib (the seed adapter's 192 tensors, scaled) through
app.comm with each layout and the app's own exchange(); each ClientApp decodes and echoes it.
SuperNodes are flower-supernode without the launcher's wrapper (which adds a resident trainer
and the bundle allowlist, whose ClientApp entry leaves out the SuperNode's imports: that saving
is measured by import time, BENCHMARKS.md "Process start"). `--flwr-patches on` runs them and
the echo ServerApp with app/node/flwr_patches.py's shorter waits, as on GPU hosts.

One federation serves all runs; runs alternate between layouts (A, B, A, B ...) so that a
shared host's load falls on both. A round is timed by the ServerApp from encoding to the last
reply decoded.

    python benchmarks/bench_transport.py --size-mib 26 --clients 1 --rounds 4 --layouts per-array,default --json OUT.json
    ... --flower-settings off          # Flower's own defaults instead of the launcher's FLOWER_SETTINGS
    ... --set FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE=67108864   # any other Flower setting, for every process
    ... --flwr-patches on              # SuperNode poll 0.5 s, short reply waits and pull retries
    ... --idle-cpu 30 --layouts ''     # what idle SuperNodes' polling costs the SuperLink (CPU share over 30 s)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.deploy import launcher  # noqa: E402
from app.deploy.certs import ensure_certs  # noqa: E402
from app.node.flwr_patches import GPU_POLL_SECONDS, POLL_ENV, supernode_command  # noqa: E402

ECHO_APP = REPO / "benchmarks" / "transport_app"
# Flower 1.42's value of every setting the launcher changes: what `--flower-settings off` restores.
FLOWER_DEFAULTS = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "1.0"}


def app_layout(name: str) -> str:
    """`default` is the layout the app sends (comm.layout's default), anything else comm's name."""
    if name == "default":
        from app.config import load_settings

        return load_settings({}).comm.layout
    return name


def start(work: Path, clients: int, patches: bool) -> tuple[launcher.Federation, dict[str, str]]:
    env = launcher.flower_env(work / "flwr-home")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))  # the echo app imports app.comm
    port = launcher.free_port()
    address = f"127.0.0.1:{port}"
    paths = ensure_certs(work / "certs", ["127.0.0.1"], num_supernodes=clients)
    security = launcher._secure(paths)
    launcher.write_cli_config(work / "flwr-home", address, security["root"])
    (work / "logs").mkdir()
    federation = launcher.Federation(work / "logs")
    federation.start(
        "superlink",
        ["flower-superlink", *security["superlink"], "--host", "127.0.0.1", "--port", str(port),
         "--database", str(work / "state.db"), "--disable-runtime-dependency-installation"],
        env,
    )
    federation.start("superexec", ["flower-superexec", *security["superexec"], "--runtime-api-address", address], env)
    node_env = dict(env, **{POLL_ENV: GPU_POLL_SECONDS if patches else ""})
    for i in range(clients):
        launcher.register_node(paths, i, env, federation, ESSENTIAL)
        federation.start(
            f"supernode-{i}",
            [*supernode_command(node_env), *security["supernode"](i), "--superlink", address, "--port", str(launcher.free_port())],
            dict(node_env, FLWR_HOME=str(work / f"node-{i}")),
        )
    launcher.wait_for_nodes(clients, env, federation, ESSENTIAL, 300, out=open(os.devnull, "w"))
    return federation, env


ESSENTIAL = ("superexec", "superlink")


def run_once(env, federation, work: Path, layout: str, args, tag: str) -> list[dict]:
    out = work / f"{tag}.json"
    config = {"size-mib": float(args.size_mib), "layout": app_layout(layout), "rounds": args.rounds, "clients": args.clients, "out": str(out),
              "short-pull-retry": args.flwr_patches == "on"}
    run_id = launcher.submit(env, config, app_dir=ECHO_APP)
    status = launcher.follow_run(run_id, env, work / "no-run-dir", federation, ESSENTIAL, out=open(os.devnull, "w"))
    if status != "finished:completed" or not out.exists():
        raise SystemExit(f"run {run_id} ({layout}) ended {status}; logs in {work / 'logs'}")
    return json.loads(out.read_text())


def superlink_idle_cpu(federation: launcher.Federation, seconds: float) -> float:
    """The SuperLink's CPU time (its process and children) per wall second while the nodes idle."""
    import psutil

    proc = psutil.Process(federation.processes["superlink"].pid)

    def cpu() -> float:
        times = proc.cpu_times()
        return times.user + times.system + sum(c.cpu_times().user + c.cpu_times().system for c in proc.children(recursive=True))

    time.sleep(5)  # past the nodes' first requests
    before, started = cpu(), time.monotonic()
    time.sleep(seconds)
    return (cpu() - before) / (time.monotonic() - started)


def metadata() -> dict:
    import flwr
    import grpc
    import numpy

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    return {
        "device": f"CPU: {cpu}, {os.cpu_count()} cores",
        "versions": {"python": platform.python_version(), "flwr": flwr.__version__ if hasattr(flwr, "__version__") else "1.42.0",
                     "numpy": numpy.__version__, "grpcio": grpc.__version__},
        "date": time.strftime("%Y-%m-%d"),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=float, default=26.0)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--layouts", default="per-array,default")
    parser.add_argument("--repeats", type=int, default=1, help="runs per layout, interleaved")
    parser.add_argument("--flower-settings", choices=("on", "off"), default="on", help="the launcher's FLOWER_SETTINGS, or Flower's defaults")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an environment setting for every process")
    parser.add_argument("--flwr-patches", choices=("on", "off"), default="off", help="app/node/flwr_patches.py's shorter waits (GPU hosts' default)")
    parser.add_argument("--idle-cpu", type=float, default=0, metavar="SECONDS", help="first measure the SuperLink's CPU while the nodes idle")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    layouts = [x for x in args.layouts.split(",") if x]
    settings = dict(launcher.FLOWER_SETTINGS if args.flower_settings == "on" else FLOWER_DEFAULTS)
    settings.update(kv.split("=", 1) for kv in args.set)
    os.environ.update(settings)  # flower_env lets the environment override FLOWER_SETTINGS

    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench-transport-"))
    federation = None
    rounds: dict[str, list[dict]] = {layout: [] for layout in layouts}
    try:
        federation, env = start(work, args.clients, args.flwr_patches == "on")
        idle_cpu = superlink_idle_cpu(federation, args.idle_cpu) if args.idle_cpu else None
        for rep in range(args.repeats):
            for layout in layouts:
                rows = run_once(env, federation, work, layout, args, f"{layout}-{rep}")
                rounds[layout] += rows
                print(f"{layout:>10} run {rep + 1}: " + " ".join(f"{r['round_s']:.2f}" for r in rows) + " s", flush=True)
    except launcher.LaunchError as exc:
        raise SystemExit(f"bench_transport: {exc}; logs kept in {work / 'logs'}") from None
    finally:
        if federation:
            federation.stop()
    # Issue 16's `database is locked` under concurrent clients: how often any process logged it.
    locked = {log.stem: n for log in sorted((work / "logs").glob("*.log")) if (n := log.read_text(errors="replace").count("database is locked"))}
    shutil.rmtree(work, ignore_errors=True)

    result = {}
    for layout, rows in rounds.items():
        times = [r["round_s"] for r in rows]
        result[layout] = {
            "median_round_s": round(statistics.median(times), 3), "min_round_s": round(min(times), 3), "max_round_s": round(max(times), 3),
            "rounds_s": [round(t, 3) for t in times], "arrays_per_message": rows[0]["arrays"], "payload_bytes": rows[0]["bytes_down"],
            "layout": app_layout(layout),
        }
    result["config"] = {"size_mib": args.size_mib, "clients": args.clients, "rounds": args.rounds, "repeats": args.repeats,
                        "flower_settings": settings, "flwr_patches": args.flwr_patches, "tls": True}
    result["database_locked_lines"] = locked
    if idle_cpu is not None:
        result["superlink_idle_cpu_share"] = round(idle_cpu, 4)
        print(f"SuperLink CPU with {args.clients} idle SuperNode(s): {idle_cpu:.1%} of a core over {args.idle_cpu:g} s")
    result["load_average"] = {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]}
    result.update(metadata())
    print(f"\n{args.size_mib:g} MiB, {args.clients} client(s), settings {settings}, flwr patches {args.flwr_patches}, load {load_before[0]:.1f}->{result['load_average']['after'][0]:.1f}")
    print(f"{'layout':>10} {'arrays':>6} {'median s':>9} {'min-max s':>13}")
    for layout in layouts:
        r = result[layout]
        print(f"{layout:>10} {r['arrays_per_message']:>6} {r['median_round_s']:>9.2f} {r['min_round_s']:>6.2f}-{r['max_round_s']:<6.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
