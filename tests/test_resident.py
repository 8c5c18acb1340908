import contextlib
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

import app.training.trainer_service as trainer_service
from app.training.trainer_service import SOCKET_ENV, TrainerServer, TrainerUnavailable, call_trainer, run_supernode
from app.training.worker import NodeData, RoundWorker, TrainRequest

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


def test_a_work_request_waits_for_a_restarting_trainer(tmp_path):
    # The watchdog unlinks a dead trainer's socket and starts a new process that binds it seconds
    # later: a ClientApp's request waits for it (up to the connect timeout) instead of loading a
    # second model in-process. A socket nobody listens on (the dead one's) is waited for too.
    path = tmp_path / "trainer.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # bound, never listening: connections are refused
    with pytest.raises(TrainerUnavailable):  # without waiting: at once
        call_trainer(str(path), {"op": "ping"}, None, 5.0, 5.0)
    restarted: list[TrainerServer] = []

    def restart():
        time.sleep(1.0)
        restarted.append(TrainerServer(path))  # replaces the dead socket, as a restarted trainer does
        restarted[0].serve_forever()

    threading.Thread(target=restart, daemon=True).start()
    started = time.monotonic()
    try:
        reply, _ = call_trainer(str(path), {"op": "ping"}, None, 10.0, 5.0, wait_for_restart=True)
        assert "busy_seconds" in reply and 1.0 <= time.monotonic() - started < 10.0
    finally:
        for server in restarted:
            server.stop()
    # ... but not past the connect timeout.
    started = time.monotonic()
    with pytest.raises(TrainerUnavailable):
        call_trainer(str(tmp_path / "nothing.sock"), {"op": "ping"}, None, 1.0, 1.0, wait_for_restart=True)
    assert 0.9 <= time.monotonic() - started < 3.0


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
            if proc.status() != psutil.STATUS_ZOMBIE and proc.cmdline()[-3:-1] == ["app.training.trainer_service", "serve"]:
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
        with pytest.raises(RuntimeError, match="unknown trainer op 'bogus'"):  # served by the new process
            call_trainer(str(socket_path), {"op": "bogus"}, None, 5.0)
    finally:
        (tmp_path / "stop").write_text("")
        _, err = wrapper.communicate(timeout=60)
    assert wrapper.returncode == 0 and "resident trainer exited with code -9; restarting it" in err
    assert not socket_path.exists() and not _trainers(psutil.Process())


def test_a_sigkilled_wrapper_takes_its_trainer_fork_server_and_supernode_down(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "flower-supernode"
    fake.write_text("#!/bin/sh\nexec sleep 100000\n")
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    wrapper = subprocess.Popen([sys.executable, "-m", "app.cli", "supernode", "--trainer-socket", str(tmp_path / "t.sock"), "--", "--insecure"], env=env)
    children = []
    try:
        # trainer, ClientApp fork server (app/node/clientapp_forkserver.py) and SuperNode
        _wait_for(lambda: len(psutil.Process(wrapper.pid).children()) == 3 and _trainers(psutil.Process(wrapper.pid)), 60)
        children = psutil.Process(wrapper.pid).children()
        assert any("clientapp-forkserver" in " ".join(p.cmdline()) for p in children)
        wrapper.kill()  # the OOM killer: the wrapper runs no cleanup
        wrapper.wait()
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        for proc in children:
            with contextlib.suppress(psutil.Error):
                proc.kill()


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
    from app.aggregation.replies import check_reply

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


def _silent_trainer(path):
    """A "trainer" that takes requests and never answers (hung)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    held = []
    threading.Thread(target=lambda: [held.append(listener.accept()) for _ in range(4)], daemon=True).start()
    return listener


def test_a_hung_trainer_times_out_and_the_round_trains_in_process(tmp_path, monkeypatch):
    import app.client_app as client_app

    path = tmp_path / "hung.sock"
    listener = _silent_trainer(path)
    started = time.monotonic()
    with pytest.raises(TrainerUnavailable, match="timed out"):
        call_trainer(str(path), {"op": "init", "run_config": RUN_CONFIG}, None, 1.0, 1.0)
    assert time.monotonic() - started < 5

    # The ClientApp's deadline: trainer.load-seconds + steps x trainer.step-seconds (4 steps in tiny).
    run_config = dict(RUN_CONFIG, **{"trainer.load-seconds": 1.0, "trainer.step-seconds": 0.25})
    monkeypatch.setenv(SOCKET_ENV, str(path))
    msg, context = _train_message(RoundWorker().initial_adapter(RUN_CONFIG))
    context.run_config = run_config
    reply = client_app.train(msg, context)
    listener.close()
    assert not reply.has_error() and reply.content["metrics"]["resident"] == 0.0 and reply.content["metrics"]["num-examples"] > 0


def test_request_deadline_scales_with_the_round():
    from app.config import load_settings

    settings = load_settings({"profile": "tiny", "train.training-arguments.max-steps": 10,
                              "train.training-arguments.gradient-accumulation-steps": 2})
    assert trainer_service.request_timeout(settings, "train") == settings.trainer.load_seconds + 20 * settings.trainer.step_seconds
    assert trainer_service.request_timeout(settings, "init") == settings.trainer.load_seconds


@pytest.fixture
def wrapper_in_this_process(tmp_path, monkeypatch):
    """run_supernode in this (main) thread beside a fake flower-supernode that runs until
    `stop` exists; a quick watchdog. Yields (run, stop file, ready); restores signal handlers."""
    import signal as signal_module

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stop = tmp_path / "stop"
    (bin_dir / "flower-supernode").write_text(f"#!/bin/sh\nwhile [ ! -f {stop} ]; do sleep 0.1; done\nexit 0\n")
    (bin_dir / "flower-supernode").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    for name, value in {"WATCHDOG_SECONDS": 0.5, "PING_TIMEOUT_SECONDS": 1.0, "PING_MISSES": 2, "RESTART_RETRY_SECONDS": 0.5}.items():
        monkeypatch.setattr(trainer_service, name, value)
    handlers = {s: signal_module.getsignal(s) for s in (signal_module.SIGTERM, signal_module.SIGINT, signal_module.SIGHUP)}
    path = str(tmp_path / "run" / "t.sock")

    def supernode_started() -> bool:  # only after the watchdog saw its trainer answer (else a test's
        # SIGSTOP could land between the trainer's first answer and the wrapper's own ping)
        for child in psutil.Process().children():
            with contextlib.suppress(psutil.Error):
                if "flower-supernode" in " ".join(child.cmdline()):
                    return True
        return False

    def ready():  # the wrapper's trainer, once it answers
        return trainer_service._answers(path) and supernode_started() and _trainers(psutil.Process())

    yield (lambda: run_supernode(["--insecure"], path)), stop, ready
    stop.write_text("")
    for s, handler in handlers.items():
        signal_module.signal(s, handler)


def _in_background(steps, stop):
    """Run `steps` in a thread while the wrapper runs here; always let the wrapper end."""
    errors = []

    def body():
        try:
            steps()
        except BaseException as exc:  # reported by the test
            errors.append(exc)
        finally:
            stop.write_text("")

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, errors


def _ended(proc: psutil.Process) -> bool:  # without reaping it: that is its parent's (the wrapper's) business
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _live_trainers():
    live = []
    for proc in _trainers(psutil.Process()):
        with contextlib.suppress(psutil.Error):  # gone meanwhile
            if proc.status() != psutil.STATUS_STOPPED:
                live.append(proc)
    return live


def _wait_for(condition, timeout):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
    return value


def test_watchdog_kills_and_restarts_a_hung_trainer(wrapper_in_this_process, capfd):
    import signal as signal_module

    run, stop, ready = wrapper_in_this_process

    def steps():
        [first] = _wait_for(ready, 60)
        first.send_signal(signal_module.SIGSTOP)  # hangs so hard it cannot even answer a ping
        _wait_for(lambda: _ended(first), 30)
        [second] = _wait_for(_live_trainers, 60)
        assert second.pid != first.pid

    thread, errors = _in_background(steps, stop)
    assert run() == 0
    thread.join()
    assert not errors, errors
    assert "resident trainer did not answer 2 pings within 1 s each; restarting it" in capfd.readouterr().err
    assert not _trainers(psutil.Process())


def test_a_failed_trainer_restart_leaks_nothing_and_the_node_keeps_running(wrapper_in_this_process, capfd):
    run, stop, ready = wrapper_in_this_process
    supernode_alive = []

    def steps():
        [first] = _wait_for(ready, 60)
        trainer_service.TRAINER_START_SECONDS = 0  # every restart from now on times out (restored below)
        first.kill()
        err = []
        _wait_for(lambda: err.append(capfd.readouterr().err) or "rounds train in-process meanwhile" in "".join(err), 30)
        time.sleep(1.5)  # more failed attempts, each must clean up after itself
        assert not _trainers(psutil.Process())
        supernode_alive.append(any("flower-supernode" in " ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)))

    start_seconds = trainer_service.TRAINER_START_SECONDS
    thread, errors = _in_background(steps, stop)
    try:
        assert run() == 0
    finally:
        trainer_service.TRAINER_START_SECONDS = start_seconds
    thread.join()
    assert not errors, errors
    assert supernode_alive == [True] and not psutil.Process().children(recursive=True)


def test_trainer_exits_promptly_on_sigterm_even_mid_round(tmp_path):
    import signal as signal_module

    path = tmp_path / "t.sock"
    trainer = subprocess.Popen([sys.executable, "-m", "app.training.trainer_service", "serve", str(path)])
    try:
        _wait_for(path.exists, 60)
        long_round = dict(_train_header(1), run_config=dict(RUN_CONFIG, **{"train.training-arguments.max-steps": 100000}))
        initial = RoundWorker().initial_adapter(RUN_CONFIG)
        threading.Thread(target=lambda: pytest.raises(TrainerUnavailable, call_trainer, str(path), long_round, initial, 5.0), daemon=True).start()
        _wait_for(lambda: psutil.Process(trainer.pid).cpu_times().user > 5, 120)  # loading, then training
        trainer.send_signal(signal_module.SIGTERM)
        trainer.wait(timeout=5)
    finally:
        trainer.kill()


def test_ping_is_answered_mid_round_and_reports_a_round_past_its_deadline(server, monkeypatch):
    release = threading.Event()
    monkeypatch.setattr(server, "_dispatch", lambda header, tensors, node: (release.wait(30), ({"ok": True}, None))[1])
    monkeypatch.setattr(trainer_service, "OVERDUE_GRACE_SECONDS", 0.0)
    worker = threading.Thread(target=pytest.raises, args=(TrainerUnavailable, call_trainer, str(server.path), {"op": "train"}, None, 5.0, 1.0),
                              daemon=True)  # its ClientApp gives up after 1 s
    worker.start()
    _wait_for(lambda: call_trainer(str(server.path), {"op": "ping"}, None, 1.0, 1.0)[0]["busy_seconds"] > 0, 10)
    assert call_trainer(str(server.path), {"op": "ping"}, None, 1.0, 1.0)[0]["overdue"] is False
    _wait_for(lambda: call_trainer(str(server.path), {"op": "ping"}, None, 1.0, 1.0)[0]["overdue"], 10)
    release.set()
    worker.join(timeout=10)


def test_watchdog_restarts_a_trainer_whose_round_is_overdue(tmp_path, monkeypatch, capfd):
    watchdog = trainer_service._Watchdog(str(tmp_path / "t.sock"))
    try:
        first = watchdog.trainer
        monkeypatch.setattr(trainer_service, "_answers", lambda path: {"ok": True, "busy_seconds": 2000.0, "overdue": True})
        watchdog.next_check = 0
        watchdog.check()
        assert first.poll() is not None and watchdog.trainer.poll() is None
        assert "resident trainer busy for 2000 s, past its request's deadline; restarting it" in capfd.readouterr().err
    finally:
        watchdog.stop()


def test_requests_queue_in_arrival_order_and_deadlines_start_with_their_turn(server, monkeypatch):
    """Three rounds handed in at once are served one after the other, in arrival order; each may
    take longer than its own deadline to finish, counted from the send, but not from its turn."""
    order, turn_seconds = [], 1.0

    def dispatch(header, tensors, node):
        order.append(header["n"])
        time.sleep(turn_seconds)
        return {"n": header["n"]}, None

    monkeypatch.setattr(server, "_dispatch", dispatch)
    monkeypatch.setattr(trainer_service, "QUEUE_HEARTBEAT_SECONDS", 0.2)
    replies, threads = {}, []
    for n in range(3):
        thread = threading.Thread(target=lambda n=n: replies.setdefault(n, call_trainer(str(server.path), {"op": "train", "n": n}, None, 5.0,
                                                                                         2 * turn_seconds)[0]))
        thread.start()
        threads.append(thread)
        _wait_for(lambda n=n: len(server._queue) == n + 1, 10)  # arrived in this order
    assert call_trainer(str(server.path), {"op": "ping"}, None, 1.0, 1.0)[0]["waiting"] == 2
    for thread in threads:
        thread.join(timeout=30)
    assert order == [0, 1, 2]  # the last waited 2 x its deadline before its turn, and still counted
    assert [replies[n]["n"] for n in range(3)] == [0, 1, 2]
    assert all(replies[n]["trainer_id"] == server.trainer_id for n in range(3))


def test_a_request_that_gives_up_while_queued_leaves_the_queue(server, monkeypatch):
    release = threading.Event()
    monkeypatch.setattr(server, "_dispatch", lambda header, tensors, node: (release.wait(30), ({"ok": True}, None))[1])
    monkeypatch.setattr(trainer_service, "QUEUE_HEARTBEAT_SECONDS", 0.1)
    monkeypatch.setattr(trainer_service, "QUEUE_SILENCE_SECONDS", 0.5)
    first = threading.Thread(target=call_trainer, args=(str(server.path), {"op": "train"}, None, 5.0, 30.0), daemon=True)
    first.start()
    _wait_for(lambda: server._busy is not None, 10)
    # A queued ClientApp that stops listening (it fell back in-process): the trainer drops its request.
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(str(server.path))
    trainer_service.send_message(conn, {"op": "train", "timeout": 30.0})
    _wait_for(lambda: len(server._queue) == 2, 10)
    conn.close()
    _wait_for(lambda: len(server._queue) == 1, 10)
    release.set()
    first.join(timeout=10)
    assert not server._queue


def test_a_trainer_silent_before_the_turn_counts_as_hung(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_service, "QUEUE_SILENCE_SECONDS", 0.5)
    listener = _silent_trainer(tmp_path / "silent.sock")
    started = time.monotonic()
    with pytest.raises(TrainerUnavailable, match="timed out"):
        call_trainer(str(tmp_path / "silent.sock"), {"op": "train"}, None, 1.0, 600.0)
    assert time.monotonic() - started < 5
    listener.close()
