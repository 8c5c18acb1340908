"""A site's node runs and reads only what its site approved, whatever a run's submitter sends."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from processes import Processes
from test_security import INTRUDER, INTRUDER_PYPROJECT

from app.node.fab_allowlist import CLIENTAPP_COMMAND, TaskCommandGate, superexec_elsewhere

AGENT = '''
import json, os
from pathlib import Path

from flwr.agentapp import AgentApp

# on a SuperNode (only its environment names the marker): proof that this bundle's code ran there
if "FEDTUNE_TEST_MARKER" in os.environ:
    Path(os.environ["FEDTUNE_TEST_MARKER"]).write_text("imported")

app = AgentApp()


def call(agent, name, **arguments):
    return json.loads(agent.grid.call({"name": name, "call_id": name, "arguments": arguments})["output"])


@app.main()
def main(agent, context) -> None:
    if "FEDTUNE_TEST_MARKER" in os.environ:
        Path(os.environ["FEDTUNE_TEST_MARKER"]).write_text("ran")
        return
    nodes = []  # at the SuperLink: send every node a message, which the node runs as an AgentApp task
    while not nodes:
        nodes = call(agent, "get_nodes", sample_size=None)["nodes"]
    messages = [{"dst_node_id": n["id"], "payload": "hello", "reply_to_message_id": None} for n in nodes]
    sent = call(agent, "push_messages", messages=messages)
    call(agent, "pull_messages", message_ids=[r["message_id"] for r in sent["results"] if r["message_id"]], timeout=120)
'''

AGENT_PYPROJECT = '''
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "agent"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "mallory"

[tool.flwr.app.components]
agentapp = "agent:app"
'''

# An AgentApp run is what `flwr chat` starts: a bundle declaring an `agentapp` component, with a prompt.
START_AGENT_RUN = '''
import hashlib
import sys
from pathlib import Path

from flwr.cli.build import build_fab_from_disk
from flwr.cli.chat.chat_app import start_chat_run
from flwr.cli.flower_config import read_superlink_connection
from flwr.cli.utils import init_http_client_from_connection

fab = build_fab_from_disk(Path(sys.argv[1]))
client = init_http_client_from_connection(read_superlink_connection("fedtune"))
print(start_chat_run(client, "hello", None, None, fab_hash=hashlib.sha256(fab).hexdigest(), fab_content=fab)[0])
'''


def test_supernode_refuses_an_agent_run(tmp_path):
    """flwr 1.42's SuperNode turns an AgentApp run's messages into AGENT_APP tasks, which its
    SuperExec starts as `flwr-agentapp`: that installs and imports the bundle. A node with an empty
    allowlist refuses it before any of its code runs (the marker stays absent) and logs why; the
    refused task is finished as failed, so the node is not left waiting for its reply and takes
    the next run's ClientApp message (flwr's SuperNode handles one message at a time)."""
    from app.deploy.launcher import flower_env, free_port, write_cli_config

    app_dir = tmp_path / "agent"
    app_dir.mkdir()
    (app_dir / "agent.py").write_text(AGENT)
    (app_dir / "pyproject.toml").write_text(AGENT_PYPROJECT)
    marker = tmp_path / "marker"
    env = flower_env(tmp_path / "flwr-home")
    port = free_port()
    write_cli_config(tmp_path / "flwr-home", f"127.0.0.1:{port}", None)

    with Processes(tmp_path / "logs", env) as procs:
        procs.start("superlink", ["flower-superlink", "--insecure", "--port", str(port)])
        node_log = procs.supernode("supernode", port, tmp_path / "node",
                                   {"FEDTUNE_TEST_MARKER": str(marker), "FEDTUNE_ALLOWED_FABS": ""})
        deadline = time.monotonic() + 300
        while True:  # the SuperLink may still be starting
            done = subprocess.run([sys.executable, "-c", START_AGENT_RUN, str(app_dir)], env=env,
                                  capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                break
            assert time.monotonic() < deadline, done.stdout + done.stderr
            time.sleep(2)
        refusal = "refused an AgentApp task (flwr-agentapp)"
        while refusal not in node_log.read_text() and not marker.exists():
            assert time.monotonic() < deadline, node_log.read_text()
            time.sleep(1)
        time.sleep(3)  # a refusal logged first must not be followed by the bundle running anyway
        assert not marker.exists(), "the AgentApp bundle's code ran on the SuperNode"
        assert refusal in node_log.read_text()
        assert not list((tmp_path / "node").rglob("agent.py")), "the refused bundle was unpacked"

        # The node still takes ClientApp tasks afterwards, through its bundle check.
        client_dir = tmp_path / "intruder"
        client_dir.mkdir()
        (client_dir / "intruder.py").write_text(INTRUDER)
        (client_dir / "pyproject.toml").write_text(INTRUDER_PYPROJECT)
        subprocess.run(["flwr", "run", str(client_dir), "fedtune"], env=env, check=True, capture_output=True, timeout=300)
        while "not approved by this site" not in node_log.read_text():
            assert time.monotonic() < deadline, node_log.read_text()
            time.sleep(1)
        assert not marker.exists()
        # ... in a ClientApp its fork server started (app/node/clientapp_forkserver.py): a shim that
        # had to start it itself would say so, a refused request would be in the fork server's log
        assert "fork server unavailable" not in node_log.read_text() and "refused a request" not in node_log.read_text()


# How flwr 1.42's SubprocessExecutor starts a task command: output to /dev/null for some types.
SUPEREXEC_LIKE = """
import subprocess, sys
sys.exit(subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).wait())
"""


@pytest.mark.parametrize("forkserver", [True, False])
def test_every_task_command_a_superexec_starts_is_gated(forkserver):
    """Every task type of the installed flwr has its command in the gate, first on the node's PATH
    (a type added by a future flwr fails here): `flwr-clientapp` with the bundle allowlist (also
    in its fallback when it asks the ClientApp fork server first), every other command refused,
    in the log of the SuperExec that started it, even when flwr sends the task's own output to /dev/null."""
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType

    gate = TaskCommandGate.install(forkserver=forkserver)
    try:
        for task_type in TaskType:
            command = TASK_TYPE_TO_COMMAND[task_type]
            found = shutil.which(command, path=gate.env["PATH"])
            assert found and Path(found).parent == gate.directory, f"{task_type!r}: {command} is not gated"
            if command == CLIENTAPP_COMMAND:
                assert "gated_clientapp(" in Path(found).read_text()
                assert ("run_shim(" in Path(found).read_text()) is forkserver
                continue
            started = subprocess.run([sys.executable, "-c", SUPEREXEC_LIKE, command, "--runtime-api-address", "127.0.0.1:9",
                                      "--token", "t", "--insecure"], env={**os.environ, **gate.env},
                                     capture_output=True, text=True, timeout=60)
            assert started.returncode != 0, command
            assert f"refused " in started.stderr and f"task ({command})" in started.stderr, (command, started.stderr)
    finally:
        gate.close()
    assert not gate.directory.exists()


@pytest.mark.parametrize("args, elsewhere", [
    ([], False),
    (["--insecure", "--isolation", "subprocess", "--superlink", "x:1"], False),
    (["--isolation", "process"], True),
    (["--isolation=process"], True),
    (["--isol", "process"], True),  # argparse takes an unambiguous prefix, as flwr's parser does
    (["--isolation"], True),
])
def test_a_separate_superexec_is_recognised(args, elsewhere):
    assert superexec_elsewhere(args) is elsewhere


def test_supernode_refuses_process_isolation(tmp_path):
    """With `--isolation process` the SuperExec is some other process, starting commands from its
    own PATH, where the gate is not: `fedtune supernode` refuses to start rather than run ungated."""
    done = subprocess.run([sys.executable, "-m", "app.cli", "supernode", "--", "--insecure", "--isolation", "process",
                           "--superlink", "127.0.0.1:9"], env={**os.environ, "FLWR_HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "refusing --isolation process" in done.stderr


@pytest.fixture
def site_tree(tmp_path, monkeypatch):
    """A node whose site lets it read `site/` (and its cache); the process runs in `work/`, outside
    both; `outside/` holds data the run must not reach, also through `site/link`."""
    for d in ("site/cards", "outside/cards", "work", "cache"):
        (tmp_path / d).mkdir(parents=True)
    for d in ("site/cards", "outside/cards"):
        (tmp_path / d / "train.jsonl").write_text('{"input": "q", "output": "a"}\n')
    (tmp_path / "site" / "link").symlink_to(tmp_path / "outside")
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FEDTUNE_NODE_READ_DIRS", str(tmp_path / "site"))
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path


def _dataset(name: str):
    from app.config import load_settings

    return load_settings({"profile": "tiny", "dataset.name": name})


def test_dataset_name_goes_through_the_read_policy(site_tree):
    """`dataset.name` goes to `datasets.load_dataset`, which loads a local directory before it asks
    the hub: a run config naming a directory outside the site's read dirs is refused, before any
    model or data loads, like `dataset.path`; a hub name (owner/name) and `tiny` are no reads."""
    from app.node.read_policy import ReadRefused, check_run_reads
    from app.training.worker import RoundWorker

    outside = site_tree / "outside" / "cards"
    for name in ("tiny", "medalpaca/medical_meadow_medical_flashcards", "owner/name", str(site_tree / "site" / "cards")):
        check_run_reads(_dataset(name))
    for name in (str(outside), "../outside/cards", str(site_tree / "site" / "link" / "cards"), "json"):
        with pytest.raises(ReadRefused, match=r"dataset.name=.* is outside the directories this node may read"):
            check_run_reads(_dataset(name))
    (site_tree / "work" / "owner" / "name").mkdir(parents=True)  # now a local directory, outside
    with pytest.raises(ReadRefused, match="outside the directories"):
        check_run_reads(_dataset("owner/name"))
    with pytest.raises(ReadRefused, match="names no file or directory"):  # datasets would load a builder or the hub instead
        check_run_reads(_dataset(str(site_tree / "site" / "no-such")))
    with pytest.raises(ReadRefused, match="dataset.name"):
        RoundWorker().initial_adapter({"profile": "tiny", "dataset.name": str(outside)})


SEGMENTS = st.sampled_from(["..", ".", "~", "site", "outside", "cards", "link", "work", "json", "csv", "owner", "name", "train.jsonl"])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(absolute=st.booleans(), segments=st.lists(SEGMENTS, min_size=1, max_size=5))
def test_no_dataset_name_reaches_outside_the_read_dirs(site_tree, absolute, segments):
    """Whatever `dataset.name` a run sends, if the node accepts it then `datasets.load_dataset`,
    judged by its own rules (a builder name reads the working directory; an existing directory
    is loaded from disk; anything else goes to the hub), reads nothing outside the read dirs."""
    from datasets.load import _PACKAGED_DATASETS_MODULES

    from app.node.read_policy import ReadRefused, check_run_reads, read_dirs

    name = (str(site_tree) + "/" if absolute else "") + "/".join(segments)
    try:
        check_run_reads(_dataset(name))
    except ReadRefused:
        return
    assert name not in _PACKAGED_DATASETS_MODULES, name
    if os.path.isdir(name):
        assert any(Path(name).resolve().is_relative_to(d) for d in read_dirs()), name
