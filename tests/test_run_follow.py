"""`fedtune run` says what is wrong (issue 25, item 3) and gives up on a run that never starts
(issue 24, item 8). The SuperLink is the real `flwr` CLI against a closed port or a TLS
listener with another CA; node lists and run states come from a stand-in `flwr` on the PATH."""

from __future__ import annotations

import json
import socket
import ssl
import sys
import textwrap
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest

from app.cli import main
from app.deploy import launcher
from app.deploy.certs import ensure_certs

FLWR_UNAVAILABLE = "Connection to the SuperLink is unavailable"

# A stand-in for the `flwr` CLI: answers from a JSON scenario file and logs every call.
FAKE_FLWR = textwrap.dedent('''\
    import json, os, sys
    scenario = json.load(open(os.environ["FAKE_FLWR_SCENARIO"]))
    args = sys.argv[1:]
    with open(os.environ["FAKE_FLWR_SCENARIO"] + ".calls", "a") as log:
        log.write(json.dumps(args) + "\\n")
    if args[:2] == ["supernode", "list"]:
        reply = {"success": True, "nodes": [{"node-id": str(i), "status": s} for i, s in enumerate(scenario["nodes"])]}
    elif args[0] == "run":
        reply = {"success": True, "run-id": "7"}
    elif args[0] == "ls":
        reply = {"success": True, "runs": [{"run-id": "7", "status": scenario["run_status"], "status-details": "",
                                            "pending-at": "2026-12-06 09:00:00Z", "starting-at": ""}]}
    elif args[0] == "stop":
        reply = {"success": True, "run-id": args[1]}
    else:
        reply = {"success": False, "error-message": "unexpected " + " ".join(args)}
    print(json.dumps(reply))
''')


@pytest.fixture
def fake_flwr(tmp_path, monkeypatch):
    """Writes a scenario (node statuses, the run's status) and returns a reader of the calls made."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "flwr"
    script.write_text(f"#!{sys.executable}\n{FAKE_FLWR}")
    script.chmod(0o755)
    scenario = tmp_path / "scenario.json"
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("FAKE_FLWR_SCENARIO", str(scenario))
    monkeypatch.setattr(launcher, "POLL_SECONDS", 0.05)

    def setup(nodes: list[str], run_status: str = "running"):
        scenario.write_text(json.dumps({"nodes": nodes, "run_status": run_status}))
        return lambda: [json.loads(line) for line in Path(f"{scenario}.calls").read_text().splitlines()]

    return setup


def _run(argv: list[str], tmp_path: Path, within: float = 60.0) -> int:
    """`fedtune run ...`'s exit status; a run still waiting or following after `within` seconds
    fails the test instead of hanging it (the bug these tests are about)."""
    result: list[int | BaseException] = []

    def run() -> None:
        try:
            result.append(main(["run", "--results", str(tmp_path / "results"), *argv]))
        except BaseException as exc:  # SystemExit from argparse included: raised below
            result.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(within)
    assert result, f"`fedtune run` still waiting after {within:.0f} s"
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def _closed_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Listener:
    """Accepts connections on 127.0.0.1 and, with `tls`, completes a TLS handshake with it."""

    def __init__(self, tls: ssl.SSLContext | None) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port, self.tls, self.done = self.sock.getsockname()[1], tls, threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    if self.tls is not None:
                        with self.tls.wrap_socket(conn, server_side=True) as tls_conn:
                            tls_conn.recv(1)
                    else:
                        conn.recv(1)
                except (OSError, ssl.SSLError):
                    pass

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self.sock.close()


def _server_tls(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    """A SuperLink's certificate from CA `a`, and the CA of another deployment, `b`."""
    a = ensure_certs(tmp_path / "a", ["127.0.0.1"], num_supernodes=1)
    b = ensure_certs(tmp_path / "b", ["127.0.0.1"], num_supernodes=1)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(a.directory / "superlink.crt", a.directory / "superlink.key")
    return context, b.ca_cert


def test_an_unreachable_superlink_fails_in_seconds_with_flwrs_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(launcher, "UNREACHABLE_SECONDS", 2.0)
    started = time.monotonic()
    code = _run(["--superlink", f"127.0.0.1:{_closed_port()}", "--insecure", "--nodes", "2"], tmp_path)
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 1
    assert elapsed < 60, f"took {elapsed:.0f} s; --connect-timeout is 600 s"
    assert "the SuperLink is unreachable" in err and "cannot connect to 127.0.0.1:" in err
    assert FLWR_UNAVAILABLE in err  # flwr's own words are kept
    assert "SuperNodes connected" not in err  # not blamed on the nodes
    assert launcher.UNREACHABLE_SECONDS <= 30  # the real default is seconds too


def test_a_superlink_with_another_ca_is_a_tls_error_at_once(tmp_path, capsys):
    server, other_ca = _server_tls(tmp_path)
    with _Listener(server) as listener:
        started = time.monotonic()
        code = _run(["--superlink", f"127.0.0.1:{listener.port}", "--root-certificates", str(other_ca), "--nodes", "2"], tmp_path)
    err = capsys.readouterr().err
    assert code == 1 and time.monotonic() - started < 60
    assert "TLS with the SuperLink failed" in err and "does not verify against --root-certificates" in err
    assert str(other_ca) in err and FLWR_UNAVAILABLE in err
    assert "unreachable" not in err and "SuperNodes connected" not in err


def test_insecure_against_a_tls_superlink_and_tls_against_a_plaintext_one(tmp_path, capsys):
    server, other_ca = _server_tls(tmp_path)
    with _Listener(server) as listener:
        assert _run(["--superlink", f"127.0.0.1:{listener.port}", "--insecure", "--nodes", "2"], tmp_path) == 1
    assert "serves TLS: give --root-certificates" in capsys.readouterr().err
    with _Listener(None) as listener:
        assert _run(["--superlink", f"127.0.0.1:{listener.port}", "--root-certificates", str(other_ca), "--nodes", "2"], tmp_path) == 1
    err = capsys.readouterr().err
    assert "no TLS session" in err and "--insecure?" in err and FLWR_UNAVAILABLE in err


def test_too_few_nodes_names_the_nodes_and_what_the_superlink_knows(tmp_path, capsys, fake_flwr):
    fake_flwr(["online", "registered", "registered", "offline"])
    code = _run(["--superlink", "127.0.0.1:9093", "--insecure", "--nodes", "4", "--connect-timeout", "0.3"], tmp_path)
    err = capsys.readouterr().err
    assert code == 1
    assert "only 1 of 4 SuperNodes connected" in err and "the SuperLink answers and also knows" in err
    assert "2 registered" in err and "1 offline" in err


def test_nodes_default_from_the_runs_partitions(tmp_path, capsys, fake_flwr):
    calls = fake_flwr(["online", "online"])
    # the tiny profile keeps the seed's 20 partitions: 2 online nodes are too few
    assert _run(["--superlink", "127.0.0.1:9093", "--insecure", "--profile", "tiny", "--connect-timeout", "0.3"], tmp_path) == 1
    assert "only 2 of 20 SuperNodes" in capsys.readouterr().err
    calls = fake_flwr(["online", "online"], run_status="finished:completed")
    assert _run(["--superlink", "127.0.0.1:9093", "--insecure", "--profile", "tiny",
                 "--run-config", "dataset.num-partitions=2"], tmp_path) == 0
    # --nodes sets the run's partitions, so nodes started with num-partitions=N agree with it
    assert _run(["--superlink", "127.0.0.1:9093", "--insecure", "--profile", "tiny", "--nodes", "2"], tmp_path) == 0
    submitted = [c for c in calls() if c[0] == "run"][-1]
    assert "dataset.num-partitions=2" in submitted[submitted.index("--run-config") + 1].split()


def test_a_run_that_stays_pending_is_stopped_with_flwrs_status(tmp_path, capsys, fake_flwr):
    calls = fake_flwr(["online", "online"], run_status="pending")
    started = time.monotonic()
    code = _run(["--superlink", "127.0.0.1:9093", "--insecure", "--nodes", "2", "--profile", "tiny",
                 "--pending-timeout", "0.5"], tmp_path)
    err = capsys.readouterr().err
    assert code == 1 and time.monotonic() - started < 30
    assert "run 7 was not begun by any ServerApp within" in err and '"status": "pending"' in err
    assert '"pending-at": "2026-12-06 09:00:00Z"' in err and "stopped it" in err
    assert ["stop", "7", "fedtune", "--format", "json"] in calls()


def test_the_pending_timeout_comes_from_the_environment(tmp_path, capsys, fake_flwr, monkeypatch):
    fake_flwr(["online", "online"], run_status="starting")
    monkeypatch.setenv(launcher.PENDING_TIMEOUT_ENV, "0.3")
    assert _run(["--superlink", "127.0.0.1:9093", "--insecure", "--nodes", "2", "--profile", "tiny"], tmp_path) == 1
    assert '"status": "starting"' in capsys.readouterr().err
    monkeypatch.setenv(launcher.PENDING_TIMEOUT_ENV, "ten minutes")
    assert _run(["--superlink", "127.0.0.1:9093", "--insecure", "--nodes", "2"], tmp_path) == 2
    assert f"{launcher.PENDING_TIMEOUT_ENV}='ten minutes': expected seconds" in capsys.readouterr().err


def test_a_running_run_is_not_cut_off_by_the_pending_timeout(tmp_path, capsys, fake_flwr, monkeypatch):
    fake_flwr(["online"], run_status="running")
    statuses = iter(["running", "running", "running", "finished:completed"])

    def slow_status(run_id, env):  # each answer after the timeout would have struck
        time.sleep(0.4)
        return next(statuses)

    monkeypatch.setattr(launcher, "run_status", slow_status)
    assert _run(["--superlink", "127.0.0.1:9093", "--insecure", "--nodes", "1", "--profile", "tiny",
                 "--pending-timeout", "0.3"], tmp_path) == 0
    assert "run 7: finished:completed" in capsys.readouterr().out


def test_a_listener_too_busy_for_a_handshake_is_not_called_a_tls_problem(tmp_path):
    _, ca = _server_tls(tmp_path)
    with closing(socket.create_server(("127.0.0.1", 0))) as silent:  # accepts (backlog), never answers
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        assert launcher.probe_superlink(address, str(ca), timeout=0.5) is None
        assert launcher.probe_superlink(address, None, timeout=0.5) is None


def test_bad_nodes_and_address_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:  # argparse's own one-line error (app/cli.py)
        _run(["--superlink", "127.0.0.1:9093", "--insecure", "--nodes", "0"], tmp_path)
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "--nodes: expected a positive integer, got '0'" in err and "Traceback" not in err, err
    assert _run(["--superlink", "superlink", "--insecure"], tmp_path) == 2
    assert "--superlink 'superlink': expected host:port" in capsys.readouterr().err
