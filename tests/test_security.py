"""Security properties that need no federation: output modes."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from processes import Processes

from app.results.checkpoint import save_adapter
from app.config import load_settings
from app.results.metrics import plot_run, write_json_atomic


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_take_the_callers_umask(tmp_path, umask):
    """tempfile makes 0600 files and 0700 directories whatever the umask; outputs must instead be
    what the caller's umask gives (0644 / 0755 for the usual 0022) so the results can be read by
    whoever may read the results directory."""
    rounds = [{"round": 1, "clients": [{"train_loss": 1.0}], "train_loss": 1.0, "cumulative_mib": 1.0}]
    old = os.umask(umask)
    try:
        adapter = save_adapter(tmp_path / "peft_1", {"w": np.zeros(2, dtype=np.float32)}, load_settings({"profile": "tiny"}).model)
        write_json_atomic(tmp_path / "summary.json", {"a": 1})
        plot_run(rounds, tmp_path / "training.png")
    finally:
        os.umask(old)
    for path in [adapter, *adapter.iterdir(), tmp_path / "summary.json", tmp_path / "training.png"]:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, (path, oct(path.stat().st_mode))


def test_run_config_cannot_point_a_node_outside_its_read_dirs(tmp_path, monkeypatch):
    """The submitter's run config names dataset.path / a local model.name; the node reads them
    only inside its cache and the site's FEDTUNE_NODE_READ_DIRS (symlinks resolved), refuses
    anything else before loading, and the refusal does not reveal the site's directories."""
    from app.node.read_policy import ReadRefused, check_run_reads
    from app.training.worker import RoundWorker

    site = tmp_path / "site-data"
    site.mkdir()
    (site / "cards.jsonl").write_text("{}\n")
    secret = tmp_path / "elsewhere" / "patients.jsonl"
    secret.parent.mkdir()
    secret.write_text("{}\n")
    (site / "link.jsonl").symlink_to(secret)
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FEDTUNE_NODE_READ_DIRS", str(site))

    def settings(**run_config):
        return load_settings({"profile": "tiny", **run_config})

    check_run_reads(settings(**{"dataset.path": str(site / "cards.jsonl")}))
    check_run_reads(settings(**{"dataset.path": str(tmp_path / "cache" / "x.jsonl")}))
    check_run_reads(settings(**{"model.name": "org/hub-model"}))  # a hub id, not a path
    for run_config in ({"dataset.path": str(secret)}, {"dataset.path": str(site / "link.jsonl")},
                       {"dataset.path": str(site / ".." / "elsewhere" / "patients.jsonl")}, {"model.name": "/etc"}):
        with pytest.raises(ReadRefused, match=r"outside the directories this node may read") as refused:
            check_run_reads(settings(**run_config))
        told = str(refused.value).replace(repr(next(iter(run_config.values()))), "")  # the submitter's own value aside
        assert str(site) not in told and "cache" not in told, told
    with pytest.raises(ReadRefused, match="dataset.path"):  # before any model or data is loaded
        RoundWorker().initial_adapter({"profile": "tiny", "dataset.path": str(secret)})


INTRUDER = '''
import os, time
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

# on the SuperNode (only its environment names the marker): proof that this bundle's code ran there
if "FEDTUNE_TEST_MARKER" in os.environ:
    Path(os.environ["FEDTUNE_TEST_MARKER"]).write_text("imported")

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    nodes = []
    while not nodes:
        nodes = list(grid.get_node_ids())
        time.sleep(1)
    # every node: the SuperLink may still list a node stopped a moment ago first
    grid.send_and_receive([Message(RecordDict(), dst_node_id=n, message_type="query") for n in nodes], timeout=120)


@client.query()
def query(msg: Message, context: Context) -> Message:
    Path(os.environ["FEDTUNE_TEST_MARKER"]).write_text("ran")
    return Message(RecordDict(), reply_to=msg)
'''

INTRUDER_PYPROJECT = '''
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "intruder"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "mallory"

[tool.flwr.app.components]
serverapp = "intruder:server"
clientapp = "intruder:client"
'''


def test_supernode_refuses_a_bundle_its_site_did_not_approve(tmp_path):
    """A bundle submitted through the Control API that is not this installation's own app is
    refused at the SuperNode before any of its code runs (its marker file stays absent); the
    same bundle, once the site lists its hash in FEDTUNE_ALLOWED_FABS, runs (so the check can tell)."""
    from flwr.cli.build import build_fab_from_disk

    from app.deploy.launcher import flower_env, free_port, write_cli_config
    from app.node.fab_allowlist import fab_sha256

    app_dir = tmp_path / "intruder"
    app_dir.mkdir()
    (app_dir / "intruder.py").write_text(INTRUDER)
    (app_dir / "pyproject.toml").write_text(INTRUDER_PYPROJECT)
    marker = tmp_path / "marker"
    env = flower_env(tmp_path / "flwr-home")
    port = free_port()
    write_cli_config(tmp_path / "flwr-home", f"127.0.0.1:{port}", None)

    def submit_and_wait(log: Path, until) -> str:
        deadline = time.monotonic() + 300
        while True:  # the SuperLink may still be starting
            done = subprocess.run(["flwr", "run", str(app_dir), "fedtune"], env=env, capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                break
            assert time.monotonic() < deadline, done.stdout + done.stderr
            time.sleep(2)
        while not until():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(1)
        return log.read_text()

    with Processes(tmp_path / "logs", env) as procs:
        procs.start("superlink", ["flower-superlink", "--insecure", "--port", str(port)])
        first = procs.supernode("supernode-1", port, tmp_path / "node-1", {"FEDTUNE_TEST_MARKER": str(marker)})
        text = submit_and_wait(first, lambda: "not approved by this site" in first.read_text() or marker.exists())
        assert not marker.exists(), "the refused bundle's code ran on the SuperNode"
        assert "app bundle sha256 " + fab_sha256(build_fab_from_disk(app_dir)) in text
        assert not list((tmp_path / "node-1").rglob("intruder.py")), "the refused bundle was unpacked"

        os.killpg(procs.procs[-1].pid, signal.SIGTERM)
        procs.procs[-1].wait(timeout=60)
        second = procs.supernode("supernode-2", port, tmp_path / "node-2",
                                 {"FEDTUNE_TEST_MARKER": str(marker), "FEDTUNE_ALLOWED_FABS": fab_sha256(build_fab_from_disk(app_dir))})
        submit_and_wait(second, marker.exists)
