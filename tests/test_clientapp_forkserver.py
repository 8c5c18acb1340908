"""The warm ClientApp start (app/node/clientapp_forkserver.py): a real fork server and real
`flwr-clientapp` shims, in subprocesses. Most children run a stand-in (tests/forkserver_standin.py,
the production loop with another program); the production fork server runs the gated ClientApp."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st
from waiting import wait_until

from app.node import clientapp_forkserver as fs
from app.node import clientapp_shim
from app.node.fab_allowlist import CLIENTAPP_COMMAND, TaskCommandGate

STANDIN = str(Path(__file__).with_name("forkserver_standin.py"))
FALLBACK = "ClientApp fork server unavailable"


def _start(command: list[str], gate: TaskCommandGate, env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as handle:
        server = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT)
    wait_until(lambda: gate.forkserver_socket.exists() or server.poll() is not None, 60, "the fork server's socket")
    assert server.poll() is None, log.read_text()
    return server


@pytest.fixture
def node(tmp_path):
    """A gate with the fork server's shim, and the stand-in fork server on its socket."""
    gate = TaskCommandGate.install(forkserver=True)
    env = {**os.environ, **gate.env, "FORKTEST": "two words, ü and a = sign"}
    log = tmp_path / "forkserver.log"
    server = _start([sys.executable, STANDIN, str(gate.forkserver_socket)], gate, env, log)
    yield SimpleNamespace(gate=gate, env=env, server=server, log=log, shim=str(gate.directory / CLIENTAPP_COMMAND))
    server.kill()
    server.wait()
    gate.close()


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"  # dead, its parent has not reaped it yet


def _ticks(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def _fresh_blas_threads() -> int:
    probe = ("import ctypes, numpy\n"
             "[p] = {l.split()[-1] for l in open('/proc/self/maps') if 'openblas' in l.rsplit('/', 1)[-1]}\n"
             "print(ctypes.CDLL(p).scipy_openblas_get_num_threads64_())")
    return int(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)


def test_the_child_gets_the_shims_argv_env_cwd_stdio_umask_and_exit_code(node, tmp_path):
    work = tmp_path / "work dir"
    work.mkdir()
    shim = subprocess.Popen([node.shim, "report", "7", "--an arg", "ü"], env=node.env, cwd=work, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.umask(0o027))
    shim_ticks = _ticks(shim.pid)  # the child reads stdin first: the shim is still there
    out, err = shim.communicate("what the SuperExec gave it on stdin", timeout=60)
    assert shim.returncode == 7, err
    assert FALLBACK not in err and err.count("stand-in on stderr") == 1, err
    got = json.loads(out)
    assert got["argv"] == [node.shim, "report", "7", "--an arg", "ü"]
    assert got["env"] == node.env
    assert got["cwd"] == str(work)
    assert got["stdin"] == "what the SuperExec gave it on stdin"
    assert got["umask"] == 0o027
    # a child of the fork server, in a process group of its own, named as flwr names the shim
    assert got["pid"] != shim.pid and got["ppid"] == node.server.pid and got["pgid"] == got["pid"]
    assert got["comm"] == CLIENTAPP_COMMAND
    # its t_process_start is the shim's start (app/client_app.py reads it)
    assert got["ticks"] == shim_ticks
    # Python's default handlers, OpenBLAS's threads as a fresh process has them, nothing of the fork server's left open
    assert got["sigint"] == repr(signal.default_int_handler) and got["sigterm"] == repr(signal.SIG_DFL)
    assert got["blas_threads"] == _fresh_blas_threads()
    assert got["open_fds"] == [0, 1, 2, 3]  # 3: the listing of /proc/self/fd itself
    # the fork server imported none of the app bundle's modules: flwr loads the bundle's own
    assert set(got["app_modules"]) <= {"app", "app.node", "app.node.clientapp_forkserver", "app.node.clientapp_shim", "app.node.flwr_patches",
                                       "app.node.lifeline"}, got["app_modules"]
    assert "refused" not in node.log.read_text()


def test_each_child_has_its_own_random_state(node):
    """numpy's global RNG is reseeded in each child, as a fresh process seeds its own."""
    draws = [json.loads(subprocess.run([node.shim, "report", "0"], env=node.env, stdin=subprocess.DEVNULL, capture_output=True,
                                       text=True, timeout=60, check=True).stdout)["random"] for _ in range(2)]
    assert draws[0] != draws[1]


def test_the_fork_server_has_one_thread(node):
    assert len(os.listdir(f"/proc/{node.server.pid}/task")) == 1


def _waiting_shim(node, tmp_path):
    pidfile = tmp_path / "child.pid"
    shim = subprocess.Popen([node.shim, "wait", str(pidfile)], env=node.env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child = int(wait_until(lambda: pidfile.exists() and pidfile.read_text(), 60, "the child's pid"))
    return shim, child


def test_sigterm_to_the_shim_reaches_the_child(node, tmp_path):
    shim, child = _waiting_shim(node, tmp_path)
    shim.send_signal(signal.SIGTERM)
    out, err = shim.communicate(timeout=60)
    assert (shim.returncode, out) == (43, "terminated\n"), err  # the child's handler ran and its exit code came back
    wait_until(lambda: _gone(child), 10, "the child to exit")


def test_a_child_that_dies_of_a_signal_takes_its_shim_along(node, tmp_path):
    """SIGINT: forwarded, KeyboardInterrupt in the child, which dies of SIGINT as Python does; so does its shim."""
    shim, child = _waiting_shim(node, tmp_path)
    shim.send_signal(signal.SIGINT)
    _, err = shim.communicate(timeout=60)
    assert shim.returncode == -signal.SIGINT, err
    assert "KeyboardInterrupt" in err


def test_a_child_killed_outright_takes_its_shim_along(node, tmp_path):
    """SIGKILL (the OOM killer's): the shim dies of it too, as the ClientApp process would have."""
    shim, child = _waiting_shim(node, tmp_path)
    os.kill(child, signal.SIGKILL)
    shim.communicate(timeout=60)
    assert shim.returncode == -signal.SIGKILL


def test_sigkill_of_the_shim_kills_the_child(node, tmp_path):
    shim, child = _waiting_shim(node, tmp_path)
    shim.kill()
    shim.wait()
    wait_until(lambda: _gone(child), 10, "the child of a killed shim to die")
    wait_until(lambda: not Path(f"/proc/{child}").exists(), 10, "the fork server to reap it")
    assert node.server.poll() is None
    done = subprocess.run([node.shim, "report", "5"], env=node.env, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert done.returncode == 5, done.stderr


def test_a_killed_fork_server_takes_its_children_along(node, tmp_path):
    shim, child = _waiting_shim(node, tmp_path)
    node.server.kill()
    _, err = shim.communicate(timeout=60)
    assert shim.returncode == 1 and "was lost with its fork server" in err, err
    wait_until(lambda: _gone(child), 10, "the child of a killed fork server to die")


def test_a_stopped_fork_server_stops_its_children(node, tmp_path):
    """SIGTERM (the wrapper's stop): the children get SIGTERM, their shims their exit codes."""
    shim, child = _waiting_shim(node, tmp_path)
    node.server.terminate()
    out, err = shim.communicate(timeout=60)
    assert (shim.returncode, out) == (43, "terminated\n"), err
    assert node.server.wait(timeout=30) == 0
    assert not node.gate.forkserver_socket.exists()


def test_without_a_fork_server_the_shim_runs_the_gated_clientapp_itself(node):
    """Down (its socket gone), or killed (its socket left behind): the shim says so once and runs
    the gated ClientApp in its own process (flwr's `flwr-clientapp --help` shows it got there)."""
    node.server.kill()
    node.server.wait()
    for _ in ("stale socket", "no socket"):
        done = subprocess.run([node.shim, "--help"], env=node.env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        assert "Run a Flower ClientApp" in done.stdout
        assert done.stderr.count(FALLBACK) == 1, done.stderr
        node.gate.forkserver_socket.unlink(missing_ok=True)


def test_the_fork_server_runs_the_gated_clientapp(tmp_path):
    """The production fork server (the gate's script, `serve_gated`): the shim's ClientApp is
    flwr's, through gated_clientapp, in a child of the fork server."""
    gate = TaskCommandGate.install(forkserver=True)
    env = {**os.environ, **gate.env}
    server = _start(gate.forkserver_command, gate, env, tmp_path / "forkserver.log")
    try:
        done = subprocess.run([str(gate.directory / CLIENTAPP_COMMAND), "--help"], env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "Run a Flower ClientApp" in done.stdout and FALLBACK not in done.stderr, done.stderr
        bad = subprocess.run([str(gate.directory / CLIENTAPP_COMMAND), "--token", "t", "--no-such-flag"], env=env, stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and "unrecognized arguments: --no-such-flag" in bad.stderr, bad.stderr
        assert FALLBACK not in bad.stderr
    finally:
        server.kill()
        server.wait()
        gate.close()


def test_a_request_with_another_environment_is_refused_and_the_shim_falls_back(node):
    """The fork server's modules read their environment when it imported them: a request that
    brings another one gets a fresh process (the shim's own)."""
    done = subprocess.run([node.shim, "--help"], env={**node.env, "FLWR_LOG_LEVEL": "DEBUG"}, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Run a Flower ClientApp" in done.stdout, done.stderr
    assert FALLBACK in done.stderr and "environment differs" in done.stderr and "FLWR_LOG_LEVEL" in done.stderr
    assert "FLWR_LOG_LEVEL" in node.log.read_text()


def _request(env: dict, **changes) -> bytes:
    body = {"argv": ["flwr-clientapp"], "env": env, "umask": 0o022, "stdio": [True, True, True], **changes}
    return json.dumps(body).encode()


def _ask(path: Path, chunks: list[tuple[bytes, list[int]]], close_early: bool = False) -> tuple[str, str] | None:
    """Send `chunks` (data, descriptors) as a shim would; the fork server's first reply, or None (closed)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(30)
    conn.connect(str(path))
    try:
        for data, fds in chunks:
            socket.send_fds(conn, [data], fds) if fds else conn.sendall(data)
            time.sleep(0.05)
        if close_early:
            return None
        return clientapp_shim._recv_frame(conn)
    finally:
        conn.close()


def test_malformed_requests_are_refused_and_the_fork_server_goes_on(node):
    path, env = node.gate.forkserver_socket, node.env
    fds = [0, 1, 2, os.open(".", os.O_PATH | os.O_DIRECTORY)]
    framed = lambda body: struct.pack("!I", len(body)) + body  # noqa: E731
    refused = {
        "not JSON": [(framed(b"{not json"), fds)],
        "not an object": [(framed(b"[1, 2]"), fds)],
        "an unknown field": [(framed(_request(env, extra=1)), fds)],
        "argv with NUL": [(framed(_request(env, argv=["a\0b"])), fds)],
        "a bad umask": [(framed(_request(env, umask=-1)), fds)],
        "an env name with '='": [(framed(_request({**env, "A=B": "c"})), fds)],
        "too large": [(struct.pack("!I", fs.MAX_REQUEST_BYTES + 1), fds)],
        "no descriptors": [(framed(_request(env)), [])],
        "one descriptor too few": [(framed(_request(env)), fds[:3])],
        "stdio flags against the count": [(framed(_request(env, stdio=[False, True, True])), fds)],
        "too many descriptors": [(framed(_request(env)), fds + fds)],
        "descriptors after the start": [(framed(_request(env))[:10], []), (framed(_request(env))[10:], fds)],
        "another environment": [(framed(_request({**env, "FORKTEST": "changed"})), fds)],
    }
    open_before = len(os.listdir(f"/proc/{node.server.pid}/fd"))
    for what, chunks in refused.items():
        reply = _ask(path, chunks)
        assert reply is not None and reply[0] == "refused", (what, reply)
        assert node.server.poll() is None, what
    _ask(path, [(framed(_request(env))[:7], fds)], close_early=True)  # half a request, then gone
    _ask(path, [(b"\xff\xff", [])], close_early=True)
    time.sleep(0.5)
    assert node.server.poll() is None
    assert len(os.listdir(f"/proc/{node.server.pid}/fd")) == open_before, "a refused request's descriptors stayed open"
    assert node.log.read_text().count("refused a request") == len(refused)
    done = subprocess.run([node.shim, "report", "3"], env=node.env, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert done.returncode == 3 and FALLBACK.encode() not in done.stderr, done.stderr


def test_an_incomplete_request_is_dropped_after_its_time(node, monkeypatch):
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(fs.REQUEST_SECONDS + 30)
    conn.connect(str(node.gate.forkserver_socket))
    conn.sendall(struct.pack("!I", 100))
    started = time.monotonic()
    reply = clientapp_shim._recv_frame(conn)
    conn.close()
    assert reply and reply[0] == "refused" and "incomplete" in reply[1]
    assert fs.REQUEST_SECONDS - 1 < time.monotonic() - started < fs.REQUEST_SECONDS + 5
    assert node.server.poll() is None


def test_a_request_from_another_uid_is_refused(node):
    assert fs.uid_refusal(os.getuid(), 1) is None
    assert "uid" in fs.uid_refusal(os.getuid() + 1, 1)
    left, right = socket.socketpair(socket.AF_UNIX)
    assert fs.peer_refusal(left) is None
    left.close(), right.close()
    if os.getuid() != 0:
        pytest.skip("switching to another uid needs root; the check itself is tested above")
    # Open the way for another user (the private directory is the first fence) and connect as nobody.
    node.gate.directory.chmod(0o711)
    node.gate.forkserver_socket.chmod(0o666)
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(65534)
            os.setuid(65534)
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.settimeout(30)
            conn.connect(str(node.gate.forkserver_socket))
            try:
                answer = conn.recv(100)
            except ConnectionResetError:
                answer = b""
            os._exit(0 if answer == b"" else 1)  # closed unanswered
        except BaseException as exc:  # noqa: BLE001
            os.write(2, repr(exc).encode())
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    wait_until(lambda: "runs as uid 65534" in node.log.read_text(), 10, "the refusal in the log")
    assert node.server.poll() is None


def test_the_wrapper_restarts_a_dead_fork_server(tmp_path):
    gate = TaskCommandGate.install(forkserver=True)
    env = {**os.environ, **gate.env}
    keeper = fs.ForkServerKeeper(gate.forkserver_command, env)
    try:
        wait_until(gate.forkserver_socket.exists, 60, "the fork server")
        first = keeper.proc.pid
        keeper.proc.kill()
        keeper.proc.wait()
        keeper.check()
        assert keeper.proc.pid != first and keeper.restarts == 1
        wait_until(lambda: _answers(gate.forkserver_socket), 60, "the restarted fork server")
        keeper.proc.send_signal(signal.SIGTERM)  # stopped, not dead: the node is stopping
        keeper.proc.send_signal(signal.SIGTERM)  # twice, as the launcher does
        assert keeper.proc.wait(timeout=30) == 0
        keeper.check()
        assert keeper.proc is None and keeper.restarts == 1
    finally:
        keeper.stop()
        gate.close()


def _answers(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(str(path))
        return True
    except OSError:
        return False


def test_a_fork_server_that_cannot_serve_is_not_restarted(tmp_path, capsys):
    keeper = fs.ForkServerKeeper([sys.executable, "-c", "import sys; sys.exit(2)"], dict(os.environ))
    keeper.proc.wait()
    keeper.check()
    assert keeper.proc is None and "ClientApps start in their own process" in capsys.readouterr().err
    keeper.check()  # and stays so


def test_the_switch_turns_it_off():
    assert fs.enabled({}) and fs.enabled({fs.FORKSERVER_ENV: "1"})
    assert not any(fs.enabled({fs.FORKSERVER_ENV: v}) for v in ("0", "false", "off", "no", " 0 "))
    gate = TaskCommandGate.install(forkserver=False)
    try:
        text = (gate.directory / CLIENTAPP_COMMAND).read_text()
        assert "gated_clientapp(" in text and "run_shim" not in text
        assert gate.forkserver_command is None and not (gate.directory / "clientapp-forkserver").exists()
    finally:
        gate.close()


_ANY_TEXT = st.text(st.characters(exclude_categories=()))  # surrogates too: undecodable bytes of argv and environ


@given(st.lists(_ANY_TEXT, min_size=1, max_size=4), st.dictionaries(_ANY_TEXT, _ANY_TEXT, max_size=4),
       st.integers(0, 0o777), st.lists(st.booleans(), min_size=3, max_size=3))
def test_the_shims_request_is_json(argv, env, umask, stdio):
    """The shim encodes its request without the json module; the fork server reads it with it."""
    assert json.loads(clientapp_shim.encode_request(argv, env, umask, stdio)) == {"argv": argv, "env": env, "umask": umask, "stdio": stdio}
