import os
import socket
import stat
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest

from app.trainer_service import SOCKET_ENV, TrainerServer, TrainerUnavailable, call_trainer, run_supernode
from app.worker import NodeData, RoundWorker, TrainRequest

RUN_CONFIG = {"profile": "tiny", "dataset.num-partitions": 20}


@pytest.fixture
def server(tmp_path):
    srv = TrainerServer(tmp_path / "private" / "trainer.sock")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.stop()
    thread.join(timeout=5)


def _train_header(server_round, lr=0.05, mu=0.01):
    return {"op": "train", "run_config": RUN_CONFIG, "node": {"partition_id": 3, "num_partitions": 20, "data_path": ""},
            "server_round": server_round, "lr": lr, "proximal_mu": mu}


def test_socket_is_private(server):
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(server.path.parent).st_mode) == 0o700


def test_resident_rounds_equal_in_process_rounds(server):
    _, initial = call_trainer(str(server.path), {"op": "init", "run_config": RUN_CONFIG}, None, 5.0)
    reference_initial = RoundWorker().initial_adapter(RUN_CONFIG)
    assert initial.keys() == reference_initial.keys()
    assert all(np.array_equal(initial[k], reference_initial[k]) for k in initial)

    resident_state, in_process_state = initial, reference_initial
    for server_round in (1, 2):  # round 2 reuses the warm model: it must not leak round 1's state
        reply, resident_state = call_trainer(str(server.path), _train_header(server_round), resident_state, 5.0)
        request = TrainRequest(RUN_CONFIG, NodeData(3, 20), server_round, 0.05, 0.01)
        in_process_state, metrics = RoundWorker().train(request, in_process_state)
        assert reply["metrics"]["train-loss"] == metrics["train-loss"]
        assert all(np.array_equal(resident_state[k], in_process_state[k]) for k in resident_state)
    assert not all(np.array_equal(resident_state[k], initial[k]) for k in initial)  # it did train


def test_trainer_errors_are_reported_not_fatal(server):
    bad = dict(_train_header(1), node={"partition_id": 25, "num_partitions": 20, "data_path": ""})
    initial = RoundWorker().initial_adapter(RUN_CONFIG)
    with pytest.raises(RuntimeError, match="partition-id 25 is outside 0..19"):
        call_trainer(str(server.path), bad, initial, 5.0)
    reply, _ = call_trainer(str(server.path), _train_header(1), initial, 5.0)  # still serving
    assert reply["metrics"]["num-examples"] > 0


def test_missing_trainer_is_unavailable(tmp_path):
    with pytest.raises(TrainerUnavailable):
        call_trainer(str(tmp_path / "nothing.sock"), {"op": "init", "run_config": RUN_CONFIG}, None, 1.0)


def test_wrapper_exports_socket_and_cleans_up(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "flower-supernode"
    # The fake SuperNode checks it can see the trainer socket, then exits with its own code.
    fake.write_text(f'#!/bin/sh\n[ -S "${SOCKET_ENV}" ] && echo "$@" > {tmp_path}/args && exit 3\nexit 9\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    socket_path = tmp_path / "run" / "t.sock"
    assert run_supernode(["--insecure", "--superlink", "x:1"], str(socket_path)) == 3
    assert (tmp_path / "args").read_text().strip() == "--insecure --superlink x:1"
    assert not socket_path.exists()


def _trainers(parent: psutil.Process) -> list[psutil.Process]:
    found = []
    for proc in parent.children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.cmdline()[-3:-1] == ["app.trainer_service", "serve"]:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_wrapper_restarts_a_dead_trainer(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "flower-supernode"
    fake.write_text(f"#!/bin/sh\nwhile [ ! -f {tmp_path}/stop ]; do sleep 0.2; done\nexit 0\n")
    fake.chmod(0o755)
    socket_path = tmp_path / "run" / "t.sock"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    wrapper = subprocess.Popen([sys.executable, "-m", "app.cli", "supernode", "--trainer-socket", str(socket_path), "--", "--insecure"],
                               env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (socket_path.exists() and (found := _trainers(psutil.Process(wrapper.pid)))) and time.monotonic() < deadline:
            time.sleep(0.2)
        [first] = found
        first.kill()
        while time.monotonic() < deadline:
            found = [p for p in _trainers(psutil.Process(wrapper.pid)) if p.pid != first.pid]
            if found and socket_path.exists():
                break
            time.sleep(0.2)
        assert found, "the trainer was not restarted"
        with pytest.raises(RuntimeError, match="unknown trainer op 'ping'"):  # served by the new process
            call_trainer(str(socket_path), {"op": "ping"}, None, 5.0)
    finally:
        (tmp_path / "stop").write_text("")
        _, err = wrapper.communicate(timeout=60)
    assert wrapper.returncode == 0 and "resident trainer exited with code -9; restarting it" in err
    assert not socket_path.exists() and not _trainers(psutil.Process())


def _train_message(initial: dict):
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from app import comm
    from app.config import load_settings

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 0
    config = ConfigRecord({"server-round": 1, "lr": 0.05, "proximal-mu": 0.01})
    arrays, wire = comm.encode(initial, comm.download_format(load_settings(RUN_CONFIG).comm.format), comm.WEIGHTS)
    msg = Message(RecordDict({"arrays": arrays, "wire": wire, "config": config}), dst_node_id=7, message_type="train")
    msg.metadata.__dict__["_message_id"] = msg.object_id
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 3, "num-partitions": 20}, state=RecordDict(), run_config=RUN_CONFIG)
    return msg, context


def test_resident_reply_is_one_the_server_accepts(server, monkeypatch):
    """The trainer's safetensors reply comes back sorted by name; the update must still travel
    in the global adapter's order, or the ServerApp refuses it (seen on the H200)."""
    import app.client_app as client_app
    from app import comm
    from app.config import load_settings
    from app.server_app import check_reply

    initial = RoundWorker().initial_adapter(RUN_CONFIG)
    initial = dict(reversed(list(initial.items())))  # an order that sorting changes
    monkeypatch.setenv(SOCKET_ENV, str(server.path))
    msg, context = _train_message(initial)
    reply = client_app.train(msg, context)
    assert reply.content["metrics"]["resident"] == 1.0
    update, metrics = check_reply(reply, comm.shapes_of(initial), load_settings(RUN_CONFIG).comm.format, 600)
    assert list(update) == list(initial) and metrics["num-examples"] > 0 and any(np.any(v) for v in update.values())


def test_trainer_dying_mid_round_falls_back_to_in_process(tmp_path, monkeypatch):
    from flwr.app import ArrayRecord

    import app.client_app as client_app

    # A "trainer" that takes the request and dies without replying.
    path = tmp_path / "dying.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def die():
        conn, _ = listener.accept()
        conn.recv(1024)
        conn.close()

    threading.Thread(target=die, daemon=True).start()
    monkeypatch.setenv(SOCKET_ENV, str(path))
    msg, context = _train_message(RoundWorker().initial_adapter(RUN_CONFIG))
    reply = client_app.train(msg, context)
    listener.close()
    assert not reply.has_error() and reply.content["metrics"]["resident"] == 0.0
    assert reply.content["metrics"]["num-examples"] > 0 and isinstance(reply.content["arrays"], ArrayRecord)


def test_fedtune_command_line_imports_no_torch():
    """`fedtune supernode` waits in every SuperNode container: building the CLI must not pull in
    torch or transformers (half a GB of resident memory per idle node)."""
    heavy = "('torch', 'transformers', 'peft', 'datasets', 'numpy', 'cryptography', 'pydantic')"
    code = ("import sys; from app.cli import build_parser; build_parser(sys.argv[1]); "
            f"print(sorted(m for m in {heavy} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, "supernode"], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    code = code.replace("build_parser(sys.argv[1])", "build_parser()")  # every command (help)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "torch" not in done.stdout and "transformers" not in done.stdout
