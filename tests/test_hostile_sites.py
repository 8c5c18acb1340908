"""Hostile sites against the real thing: a SuperLink, the ServerApp and four `fedtune supernode`
processes, two of them run by sites that changed their own code (a site controls its machine, so
its node can send anything). One sends its honest update times 1000 (it decodes: only the norm
bound stops it); one sends a reply whose index is "[" * 5000 (the RecursionError that ended runs).
The run must finish, the two honest sites' updates count unclipped, the x1000 one is clipped to the
bound, the malformed one is refused with its reason, and every node is still up at the end.

The submitter's attacks on a site (a foreign ClientApp bundle, an AgentApp bundle, `dataset.name`
or `dataset.path` pointing at a site's files) are played end to end in tests/test_security.py and
tests/test_node_guards.py; README's hostile-site table lists every attack and its test."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from processes import Processes

# Installed on the hostile sites' PYTHONPATH: wraps app.comm.encode once app.comm is imported, in
# every process of that node (the ClientApp encodes the update), without touching the code tree.
HOSTILE_SITECUSTOMIZE = '''
import importlib.abc, importlib.util, os, sys

MODE = os.environ.get("HOSTILE_MODE", "")


def _hostile(comm):
    honest = comm.encode

    def encode(state, fmt, content=comm.WEIGHTS, layout="packed"):
        if content != comm.UPDATE:
            return honest(state, fmt, content, layout)
        if MODE == "x1000":
            return honest({k: v * 1000 for k, v in state.items()}, fmt, content, layout)
        arrays, wire = honest(state, fmt, content, layout)
        wire["index"] = "[" * 5000
        return arrays, wire

    comm.encode = encode


class _AfterComm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "app.comm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _hostile(module)

        spec.loader.exec_module = exec_module
        return spec


if MODE:
    sys.meta_path.insert(0, _AfterComm())
'''

NODES, ROUNDS, X1000, MALFORMED = 4, 2, 2, 3


def test_two_hostile_sites_of_four_neither_crash_nor_steer_the_run(tmp_path):
    from app.deploy.launcher import flower_env, free_port

    hostile = tmp_path / "hostile-site"
    hostile.mkdir()
    (hostile / "sitecustomize.py").write_text(HOSTILE_SITECUSTOMIZE)
    repo = Path(__file__).resolve().parents[1]
    results = tmp_path / "results"
    env = flower_env(tmp_path / "flwr-home")
    port = free_port()  # flwr 1.42 serves the Fleet and Control APIs on one HTTP port
    with Processes(tmp_path / "logs", env) as procs:
        procs.start("superlink", ["flower-superlink", "--insecure", "--port", str(port)])
        for node in range(NODES):
            mode = {X1000: "x1000", MALFORMED: "malformed-index"}.get(node, "")
            extra = {"FLWR_HOME": str(tmp_path / f"node-{node}"), "HOSTILE_MODE": mode,
                     "PYTHONPATH": os.pathsep.join(p for p in (str(hostile) if mode else "", str(repo), os.environ.get("PYTHONPATH", "")) if p)}
            procs.start(f"supernode-{node}", [sys.executable, "-m", "app.cli", "supernode", "--", "--insecure",
                                              "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
                                              "--node-config", f"partition-id={node} num-partitions={NODES}"], extra)
        done = subprocess.run(
            [sys.executable, "-m", "app.cli", "run", "--superlink", f"127.0.0.1:{port}", "--insecure", "--profile", "tiny",
             "--supernodes", str(NODES), "--rounds", str(ROUNDS), "--results", str(results), "--connect-timeout", "300",
             "--run-config", "strategy.fraction-train=1.0 strategy.min-replies=2"],
            env=env, capture_output=True, text=True, timeout=900,
        )
        logs = "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted((tmp_path / "logs").glob("*.log")))
        assert done.returncode == 0, done.stdout + done.stderr + logs
        assert all(proc.poll() is None for proc in procs.procs), "a process of the federation died\n" + logs

    [run] = list(results.glob("run-*"))
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rounds] == ["aggregated"] * ROUNDS, rounds
    for r in rounds:
        by_site = {c["partition_id"]: c for c in r["clients"]}
        assert sorted(by_site) == [0, 1, X1000], r  # the malformed reply never counts
        [refused] = [f for f in r["failed"] if "refused" in f["reason"]]
        assert "index" in refused["reason"], refused
        bound = r["norm_bound"]
        assert math.isfinite(bound) and bound > 0
        for site in (0, 1):  # honest: measured, not clipped
            assert by_site[site]["update_scale"] == 1.0 and by_site[site]["update_norm"] < bound, by_site[site]
        loud = by_site[X1000]
        assert loud["update_norm"] > bound and loud["update_scale"] * loud["update_norm"] <= bound * (1 + 1e-6), loud
        assert r["clipped"] == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds_aggregated"] == ROUNDS and not summary.get("stopped"), summary
    assert (run / f"peft_{ROUNDS}" / "adapter_model.safetensors").is_file()
