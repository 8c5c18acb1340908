"""Multi-GPU / shared-GPU benchmark (issue 7): `fedtune local up --gpus ...` end to end.

On the GPU machine it builds a Llama-3-8B-shaped model with random seeded weights on local disk
(benchmarks/bench_client_round.build_random_llama), writes synthetic flashcards that fill the
512-token window, and runs the real launcher (SuperLink, SuperExec, N `fedtune supernode`
processes with resident trainers, TLS + SuperNode authentication) with the seed profile:

  refuse  `--supernodes 20` resident on the first GPU, which cannot hold them: the memory plan
          must refuse before any process starts;
  shared  N SuperNodes over the G GPUs (node i on GPU i mod G), `--clients` of them training
          concurrently each round (N = 20 if the plan fits, else as many as it allows);
  spread  `--clients` SuperNodes on that many different GPUs, all training each round (G > 1);
  packed  the same SuperNodes all on the first GPU: spread / packed is the issue's ratio;
  alone   one SuperNode, one client per round: the same round with nothing beside it.

A federation of the seed profile takes 3-7 minutes (the round is bound by Flower's transport of
the 26 MiB adapter, BENCHMARKS.md), so on a lent machine with a 10-minute command limit run one or
two phases per command (`--phases refuse,shared`, then `--phases spread`, ...; the model on local
disk is reused while the machine stays warm, else rebuilt in ~45 s). Before, on the machine:
`. benchmarks/device_setup.sh` (installs the carried `.whl/` wheels, keeps NVLink multicast off).

While a federation runs, a poller reads `nvidia-smi` every 0.5 s: memory used per GPU and the
compute processes (pid -> GPU UUID), mapped back to nodes through each process's FLWR_HOME
(node-i); the resident trainers also print the physical device they compute on
(`fedtune-trainer-device {...}` in supernode-i.log). Results: round wall times (steady = rounds
after the first, which loads the models), GPU memory per device with all resident models idle
and at the training peak, the pid -> GPU mapping checked against i mod G, the ratio shared/alone.

    python benchmarks/bench_multi_gpu.py --out benchmarks/results/multi_gpu_h100.json
    python benchmarks/bench_multi_gpu.py --tiny --phases shared,alone   # CPU dry run (no GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from app.deploy import gpu_plan  # noqa: E402

MIB = 2**20
GIB = 2**30


# --- nvidia-smi polling ----------------------------------------------------------------------


def _smi(query: str, kind: str = "gpu") -> list[list[str]]:
    flag = "--query-gpu" if kind == "gpu" else "--query-compute-apps"
    done = subprocess.run(["nvidia-smi", f"{flag}={query}", "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        return []
    return [[p.strip() for p in line.split(",")] for line in done.stdout.strip().splitlines() if line.strip()]


def gpu_inventory() -> list[dict]:
    if shutil.which("nvidia-smi") is None:
        return []
    return [
        {"index": i, "uuid": u, "name": n, "pci_bus_id": b, "total_mib": int(t)}
        for i, u, n, b, t in _smi("index,uuid,name,pci.bus_id,memory.total")
    ]


def node_of_pid(pid: int) -> int | None:
    """node-i from the process's FLWR_HOME (set by the launcher for supernode i and inherited)."""
    import psutil

    try:
        home = psutil.Process(pid).environ().get("FLWR_HOME", "")
    except (psutil.Error, OSError):
        return None
    match = re.search(r"node-(\d+)$", home)
    return int(match.group(1)) if match else None


class Poller(threading.Thread):
    """Samples GPU memory and compute processes until stopped."""

    def __init__(self, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[dict] = []
        self.pid_nodes: dict[int, int | None] = {}
        self._stop_event = threading.Event()
        self.enabled = shutil.which("nvidia-smi") is not None

    def run(self) -> None:
        while self.enabled and not self._stop_event.is_set():
            t = time.time()
            try:
                gpus = {u: int(m) for u, m in _smi("uuid,memory.used")}
                apps = {}
                for pid, uuid, used in _smi("pid,gpu_uuid,used_memory", kind="apps"):
                    pid_i = int(pid)
                    if pid_i not in self.pid_nodes:
                        self.pid_nodes[pid_i] = node_of_pid(pid_i)
                    apps[pid_i] = (uuid, int(used) if used.isdigit() else 0)
                self.samples.append({"t": t, "gpus": gpus, "apps": apps})
            except (subprocess.SubprocessError, ValueError, OSError):
                pass
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)


class LogTailer(threading.Thread):
    """Timestamps the Flower events in every SuperNode log under `root` (the logs have no clock)."""

    EVENTS = {
        "Receiving: train message": "recv", "Receiving: query": "recv-query", "Start `flwr-clientapp` process": "clientapp",
        "fedtune-trainer-device": "device", "Sending: train message": "send", "Sending: query": "send-query",
        "Sent successfully": "sent",
    }

    def __init__(self, root: Path, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.events: list[tuple[float, str, str]] = []
        self._offsets: dict[Path, int] = {}
        self._stop_event = threading.Event()
        self._earlier = set(root.glob(".local/*"))  # launches before this one

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.scan()
            self._stop_event.wait(self.interval)
        self.scan()

    def scan(self) -> None:
        for log in self.root.glob(".local/*/logs/supernode-*.log"):
            if log.parent.parent in self._earlier:
                continue
            offset = self._offsets.get(log, 0)
            try:
                with open(log, "rb") as handle:
                    handle.seek(offset)
                    chunk = handle.read()
            except OSError:
                continue
            end = chunk.rfind(b"\n") + 1
            self._offsets[log] = offset + end
            now = time.time()
            for line in chunk[:end].decode(errors="replace").splitlines():
                for needle, event in self.EVENTS.items():
                    if needle in line:
                        self.events.append((now, log.stem, event))

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)


# --- one federation --------------------------------------------------------------------------


def fedtune_up(args_list: list[str], timeout: float) -> dict:
    """Run `fedtune local up ...`, timestamping each output line; stop it at `timeout`."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    started = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "local", "up", *args_list], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    lines: list[tuple[float, str]] = []

    def reader():
        for line in proc.stdout:
            lines.append((time.time(), line.rstrip("\n")))
            print(f"  | {line}", end="", flush=True)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the launcher stops its federation on SIGTERM
        code = proc.wait(timeout=60)
        lines.append((time.time(), f"[bench] stopped after {timeout:.0f} s"))
    thread.join(timeout=10)
    return {"returncode": code, "seconds": time.time() - started, "started": started, "lines": lines}


def _find_line(lines, pattern: str):
    for t, line in lines:
        if (m := re.search(pattern, line)):
            return t, m
    return None, None


def run_federation(name: str, nodes: int, gpus: list[str], rounds: int, clients: int, model: str, data: Path,
                   results: Path, profile: str, timeout: float, extra: str = "") -> dict:
    run_config = [f"model.name={model}"] if model else []
    if clients < nodes:  # exactly `clients` sampled per round (Flower: max(int(n*f), min nodes))
        run_config += [f"strategy.fraction-train={clients / nodes}", f"strategy.min-train-nodes={clients}"]
    else:
        run_config += ["strategy.fraction-train=1.0"]
    run_config += extra.split()
    cli = ["--profile", profile, "--supernodes", str(nodes), "--rounds", str(rounds), "--data", str(data),
           "--results", str(results), "--run-config", " ".join(run_config), "--no-eval"]
    if gpus:
        cli += ["--gpus", ",".join(gpus)]
    print(f"\n== {name}: fedtune local up {' '.join(cli)}", flush=True)
    poller = Poller()
    tailer = LogTailer(results)
    poller.start()
    tailer.start()
    try:
        launch = fedtune_up(cli, timeout)
    finally:
        poller.stop()
        tailer.stop()
    out = {"name": name, "nodes": nodes, "gpus": gpus, "clients_per_round": clients, "rounds_configured": rounds,
           "run_config": " ".join(run_config), "returncode": launch["returncode"], "launcher_seconds": launch["seconds"]}
    _, logs = _find_line(launch["lines"], r"^logs: (\S+)")
    t_submit, run = _find_line(launch["lines"], r"run (\d+) submitted; results in (\S+)")
    t_online, _ = _find_line(launch["lines"], rf"SuperNodes online: {nodes}/{nodes}")
    out["plan_output"] = [line for _, line in launch["lines"] if line.startswith(("GPU memory plan", "  GPU "))]
    out["seconds_to_all_online"] = (t_online - launch["started"]) if t_online else None
    rounds_rows = []
    if run:
        run_dir = Path(run.group(2))
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists():
            rounds_rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        out["run_dir"] = str(run_dir)
        out["seconds_submit_to_end"] = launch["started"] + launch["seconds"] - t_submit
    for r in rounds_rows:
        r["clients"] = sorted(r["clients"], key=lambda c: c["partition_id"])
    out["rounds"] = [
        {
            "round": r["round"],
            "round_seconds": r["round_seconds"],
            "nodes": [c["partition_id"] for c in r["clients"]],
            "train_seconds": [round(c["train_seconds"], 3) for c in r["clients"]],
            "clientapp_seconds": [round(c["clientapp_seconds"], 3) for c in r["clients"]],
            "model_load_seconds": [round(c["model_load_seconds"], 3) for c in r["clients"]],
            "resident": all(c["resident"] for c in r["clients"]),
            "failures": r["failures"],
            "train_loss": r["train_loss"],
        }
        for r in rounds_rows
    ]
    steady = [r["round_seconds"] for r in out["rounds"][1:]] or [r["round_seconds"] for r in out["rounds"]]
    out["steady_round_seconds"] = statistics.median(steady) if steady else None
    steady_train = [t for r in out["rounds"][1:] for t in r["train_seconds"]]
    out["steady_client_train_seconds"] = statistics.median(steady_train) if steady_train else None

    # Evidence from the processes: the trainers' own device records, and nvidia-smi's pid -> GPU.
    device_records = {}
    if logs:
        for log in sorted(Path(logs.group(1)).glob("supernode-*.log")):
            index = int(log.stem.split("-")[1])
            records = gpu_plan.parse_device_lines(log.read_text(errors="replace"))
            if records:
                device_records[index] = records[0]
        out["log_dir"] = logs.group(1)
    out["trainer_device_records"] = device_records
    t0 = t_submit or launch["started"]
    out["timeline"] = {
        "t0": "run submitted",
        "rounds_printed": [[round(t - t0, 2), line.strip()[:40]] for t, line in launch["lines"] if line.lstrip().startswith("round ")],
        "node_events": [[round(t - t0, 2), node, event] for t, node, event in tailer.events],
        # total GPU memory and each node's process, MiB, every sample
        "memory": [
            [round(smp["t"] - t0, 2), sum(smp["gpus"].values()),
             {str(poller.pid_nodes.get(p)): used for p, (_, used) in smp["apps"].items()}]
            for smp in poller.samples
        ],
    }
    printed = out["timeline"]["rounds_printed"]
    if printed and out["timeline"]["memory"]:
        # After round 1 (which loads the models): the steady rounds' training peak.
        steady_mem = [m for m in out["timeline"]["memory"] if m[0] > printed[0][0]]
        if steady_mem:
            out["steady_peak_gpu_mib"] = max(m[1] for m in steady_mem)
            out["steady_peak_node_mib"] = {
                n: max(m[2].get(n, 0) for m in steady_mem) for n in {k for m in steady_mem for k in m[2]}
            }
    out |= memory_summary(poller, gpus, nodes)
    out["mapping_ok"] = check_mapping(out, gpus, nodes)
    return out


def memory_summary(poller: Poller, gpus: list[str], nodes: int) -> dict:
    if not poller.samples:
        return {"memory": None, "pid_map": {}}
    inventory = {g["index"]: g for g in gpu_inventory()}
    uuid_of = {g: inventory[g]["uuid"] if g in inventory else g for g in dict.fromkeys(gpus)}
    pid_map: dict[int, dict] = {}
    for s in poller.samples:
        for pid, (uuid, used) in s["apps"].items():
            entry = pid_map.setdefault(pid, {"node": poller.pid_nodes.get(pid), "gpu_uuids": set(), "max_mib": 0, "used": []})
            entry["gpu_uuids"].add(uuid)
            entry["max_mib"] = max(entry["max_mib"], used)
            entry["used"].append(used)
    per_gpu = {}
    for gpu, uuid in uuid_of.items():
        series = [s["gpus"].get(uuid, 0) for s in poller.samples]
        gpu_nodes = [i for i in range(nodes) if gpus[i % len(gpus)] == gpu]
        # "All resident, idle": samples in which every node of this GPU has its model loaded
        # (its process holds > 2 GiB); the least memory among them is when none is training.
        loaded = []
        for s in poller.samples:
            holding = {poller.pid_nodes.get(p) for p, (u, used) in s["apps"].items() if u == uuid and used > 2048}
            if set(gpu_nodes) <= holding:
                loaded.append(s["gpus"].get(uuid, 0))
        per_gpu[gpu] = {
            "uuid": uuid,
            "nodes": gpu_nodes,
            "peak_mib": max(series),
            "all_resident_idle_mib": min(loaded) if loaded else None,
            "samples_with_all_loaded": len(loaded),
        }
    per_node = {}
    for pid, entry in pid_map.items():
        if entry["node"] is None:
            continue
        big = [u for u in entry["used"] if u > 2048]
        per_node.setdefault(entry["node"], []).append({
            "pid": pid, "gpu_uuids": sorted(entry["gpu_uuids"]), "peak_mib": entry["max_mib"],
            "idle_resident_mib": min(big) if big else None,
        })
    return {
        "memory": per_gpu,
        "pid_map": {str(k): v for k, v in sorted(per_node.items())},
        "samples": len(poller.samples),
    }


def check_mapping(out: dict, gpus: list[str], nodes: int) -> bool | None:
    """Every node's compute process (nvidia-smi) and its trainer's own record are on GPU i mod G."""
    if not gpus or not out.get("memory"):
        return None
    uuid_of = {g: v["uuid"] for g, v in out["memory"].items()}
    ok = True
    for i in range(nodes):
        expected = uuid_of[gpus[i % len(gpus)]]
        seen = {u for e in out["pid_map"].get(str(i), []) for u in e["gpu_uuids"]}
        record = out["trainer_device_records"].get(i)
        if seen and seen != {expected}:
            ok = False
        if record and record.get("uuid") != expected:
            ok = False
    return ok


# --- the benchmark ---------------------------------------------------------------------------


def prepare_data(work: Path) -> Path:
    """The work directory and its synthetic flashcards that fill the 512-token window (made once)."""
    import bench_client_round

    work.mkdir(parents=True, exist_ok=True)
    data = work / "long_flashcards.jsonl"
    if not data.exists():
        bench_client_round.write_long_flashcards(data)
    return data


def build_model(directory: Path) -> float:
    """In a child process, so this one never holds GPU memory."""
    started = time.perf_counter()
    code = "import sys; from pathlib import Path; from bench_client_round import build_random_llama; build_random_llama(Path(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", code, str(directory)], cwd=ROOT / "benchmarks", check=True,
                   env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT), os.environ.get("PYTHONPATH", "")])))
    return time.perf_counter() - started


def auto_nodes(settings_run_config: dict, gpus: list[str], clients: int, wanted: int) -> tuple[int, str]:
    """20 if the plan fits, else the most resident nodes the GPUs hold with `clients` training."""
    from app.config import load_settings

    settings = load_settings(settings_run_config)
    found = gpu_plan.query_gpus()
    plan = gpu_plan.make_plan(settings, 1, gpus[:1], found)
    if plan is None or found is None:
        return wanted, "plan unavailable"
    total = 0
    for gpu in gpus:
        info = gpu_plan._find(gpu, found)
        total += gpu_plan.max_resident_nodes(info.free_bytes, plan.footprint_bytes, plan.train_extra_bytes, clients)
    n = min(wanted, total)
    return n, f"plan: {plan.footprint_bytes / GIB:.1f} GiB per resident model, +{plan.train_extra_bytes / GIB:.1f} GiB per trainer -> {total} resident node(s) fit on {len(gpus)} GPU(s)"


def refuse_phase(model: str, data: Path, results: Path, gpus: list[str], nodes: int) -> dict:
    before = _smi("pid", kind="apps") if shutil.which("nvidia-smi") else []
    cli = ["--supernodes", str(nodes), "--gpus", ",".join(gpus), "--rounds", "3", "--data", str(data),
           "--results", str(results), "--run-config", f"model.name={model}"]
    print(f"\n== refuse: fedtune local up {' '.join(cli)}", flush=True)
    launch = fedtune_up(cli, timeout=120)
    after = _smi("pid", kind="apps") if shutil.which("nvidia-smi") else []
    text = "\n".join(line for _, line in launch["lines"])
    return {
        "command": "fedtune local up " + " ".join(cli),
        "returncode": launch["returncode"],
        "seconds": launch["seconds"],
        "refused_before_start": launch["returncode"] == 2 and "logs:" not in text and "does not fit" in text,
        "gpu_processes_before_after": [len(before), len(after)],
        "message": text,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "multi_gpu.json"))
    parser.add_argument("--work", default="/tmp/fedtune-bench")
    parser.add_argument("--gpus", default=None, help="GPU ids (default: every GPU nvidia-smi lists)")
    parser.add_argument("--supernodes", type=int, default=0, help="shared phase nodes (default: 20, or what the plan allows)")
    parser.add_argument("--clients", type=int, default=3, help="clients training per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--phases", default="refuse,shared,alone", help="any of refuse,shared,spread,packed,alone")
    parser.add_argument("--timeout", type=float, default=420, help="seconds per federation")
    parser.add_argument("--extra", default="", help="extra run-config items for the shared phase")
    parser.add_argument("--tiny", action="store_true", help="CPU dry run with the tiny profile")
    args = parser.parse_args()

    work = Path(args.work)
    data = prepare_data(work)
    inventory = gpu_inventory()
    gpus = [g for g in args.gpus.split(",") if g] if args.gpus else [g["index"] for g in inventory]
    phases = args.phases.split(",")
    result: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "device": ", ".join(sorted({g["name"] for g in inventory})) or (platform.processor() or "cpu"),
        "gpus": inventory,
        "versions": _versions(),
        "profile": "tiny" if args.tiny else "bio-medical-llama3-8b",
        "rounds": args.rounds,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps(result, indent=2, default=sorted) + "\n")

    if args.tiny:
        model, profile = "", "tiny"
    else:
        model, profile = str(work / "llama-3-8b-random"), "bio-medical-llama3-8b"
        result["model_build_seconds"] = build_model(Path(model))
        print(f"random 8B-shaped model ready ({result['model_build_seconds']:.0f} s)", flush=True)

    if "refuse" in phases and gpus:  # 20 resident models on one GPU: must be refused up front
        result["refuse"] = refuse_phase(model, data, work / "results-refuse", gpus[:1], 20)
        save()
    if "shared" in phases:
        nodes, why = (args.supernodes, "given") if args.supernodes else (20, "")
        if not args.supernodes and gpus and not args.tiny:
            nodes, why = auto_nodes({"model.name": model}, gpus, args.clients, 20)
        print(f"shared phase: {nodes} SuperNodes on GPU(s) {gpus or '-'} ({why})", flush=True)
        result["shared"] = run_federation("shared", nodes, gpus, args.rounds, min(args.clients, nodes), model, data,
                                          work / "results-shared", profile, args.timeout, args.extra)
        result["shared"]["nodes_chosen_by"] = why
        save()
    # The ratio: `clients` nodes on as many different GPUs vs the same nodes on one GPU.
    if "spread" in phases and len(gpus) > 1:
        spread = gpus[: min(len(gpus), args.clients)]
        result["spread"] = run_federation("spread", args.clients, spread, args.rounds, args.clients, model, data,
                                          work / "results-spread", profile, args.timeout)
        save()
    if "packed" in phases:
        result["packed"] = run_federation("packed", args.clients, gpus[:1], args.rounds, args.clients, model, data,
                                          work / "results-packed", profile, args.timeout)
        save()
    if "alone" in phases:
        result["alone"] = run_federation("alone", 1, gpus[:1], args.rounds, 1, model, data, work / "results-alone", profile, args.timeout)
        save()
    steady = {k: result.get(k, {}).get("steady_round_seconds") for k in ("shared", "spread", "packed", "alone")}
    if steady["shared"] and steady["alone"]:
        result["shared_over_alone"] = steady["shared"] / steady["alone"]
    if steady["spread"] and steady["packed"]:
        result["spread_over_packed"] = steady["spread"] / steady["packed"]
    save()
    print_table(result)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ["torch", "transformers", "peft", "bitsandbytes", "flwr", "liger-kernel"]:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "-"
    driver = _smi("driver_version") if shutil.which("nvidia-smi") else []
    return found | {"python": platform.python_version(), "driver": driver[0][0] if driver else "-"}


def print_table(r: dict) -> None:
    print(f"\n{r['device']} | {r['versions']} | {r['date']}")
    if "refuse" in r:
        f = r["refuse"]
        print(f"refuse: rc {f['returncode']} in {f['seconds']:.1f} s, refused before start: {f['refused_before_start']}")
    for name in ("shared", "spread", "packed", "alone"):
        if name not in r:
            continue
        f = r[name]
        rounds = ", ".join(f"{x['round_seconds']:.1f}" for x in f["rounds"])
        print(f"{name}: {f['nodes']} node(s) on GPU(s) {f['gpus']}, {f['clients_per_round']} per round, rc {f['returncode']}; "
              f"round wall times [{rounds}] s; steady {f['steady_round_seconds']}; client train (steady) {f['steady_client_train_seconds']}")
        for gpu, m in (f.get("memory") or {}).items():
            idle = m["all_resident_idle_mib"]
            print(f"  GPU {gpu}: {len(m['nodes'])} node(s); all resident idle {idle / 1024 if idle else float('nan'):.1f} GiB; peak {m['peak_mib'] / 1024:.1f} GiB")
        for node, entries in f.get("pid_map", {}).items():
            record = f["trainer_device_records"].get(int(node)) or f["trainer_device_records"].get(node) or {}
            for e in entries:
                print(f"  node {node}: pid {e['pid']} on {e['gpu_uuids']} (trainer says {record.get('uuid')} / {record.get('pci_bus_id')}); "
                      f"idle {e['idle_resident_mib']} MiB, peak {e['peak_mib']} MiB")
        print(f"  node i on GPU i mod G: {f['mapping_ok']}")
    if "shared_over_alone" in r:
        print(f"steady round, shared / alone: {r['shared_over_alone']:.2f}")
    if "spread_over_packed" in r:
        print(f"steady round, {r['spread']['nodes']} clients on {len(r['spread']['gpus'])} GPUs / on one GPU: {r['spread_over_packed']:.2f}")


if __name__ == "__main__":
    main()
