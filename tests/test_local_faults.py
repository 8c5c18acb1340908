"""The native launcher under faults: partly written metrics lines, signals (SIGHUP, SIGKILL, a
second Ctrl-C), concurrent launches. Flower's binaries are replaced by small fakes on PATH, so
these tests exercise the launcher's and the SuperNode wrapper's own process handling in seconds."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import psutil
import pytest

from app.deploy import launcher
from app.results.metrics import append_jsonl, read_jsonl
from waiting import wait_until


def _record(n: int) -> dict:
    return {"round": n, "train_loss": 1.0 / n, "clients": [{}], "failures": 0, "bytes_round": 2**20,
            "cumulative_mib": float(n), "round_seconds": 1.5}


def test_follow_run_waits_for_a_partly_written_line_and_skips_bad_ones(tmp_path, monkeypatch, capsys):
    metrics = tmp_path / "metrics.jsonl"
    line2 = json.dumps(_record(2)) + "\n"
    metrics.write_text(json.dumps(_record(1)) + "\n" + line2[:17])  # round 2 half written
    # Each poll: the ServerApp writes on; the rest of round 2, then a garbage line, then round 3.
    writes = iter([line2[17:], "{not json\n", json.dumps(_record(3)) + "\n" + '{"round": 4, "tr', ""])
    statuses = iter(["running", "running", "running", "finished:completed"])

    def status(run_id, env):
        with open(metrics, "a") as handle:
            handle.write(next(writes))
        return next(statuses)

    monkeypatch.setattr(launcher, "run_status", status)
    monkeypatch.setattr(launcher, "POLL_SECONDS", 0)
    assert launcher.follow_run("1", {}, tmp_path, None, ()) == "finished:completed"
    out = capsys.readouterr().out
    assert [ln.split(":")[0] for ln in out.splitlines() if ln.startswith("round")] == ["round   1", "round   2", "round   3"]
    assert f"warning: skipped {metrics} line 3: not JSON" in out and "(1 skipped so far)" in out
    assert f"warning: skipped {metrics}'s unfinished last line (line 5)" in out


def test_follow_run_waits_for_a_silent_superlink_counting_from_its_last_answer(tmp_path, monkeypatch, capsys):
    """A SuperLink that stops answering (restarting, or a starved host) is waited for, with a
    warning per attempt, for SUPERLINK_PATIENCE counted from its last answer (the first failed
    call's own time included), then the follower gives up with how long it waited."""
    clock = iter(range(0, 10_000, 100))  # each call to monotonic: 100 s later (a flwr call timing out)
    monkeypatch.setattr(launcher.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(launcher, "POLL_SECONDS", 0)
    monkeypatch.setattr(launcher, "SUPERLINK_PATIENCE", 250.0)
    answers = iter([launcher.LaunchError("timed out"), "running", launcher.LaunchError("timed out"), launcher.LaunchError("timed out"),
                    launcher.LaunchError("timed out")])

    def status(run_id, env):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(launcher, "run_status", status)
    with pytest.raises(launcher.LaunchError, match=r"SuperLink unreachable for 300 s: timed out"):
        launcher.follow_run("1", {}, tmp_path, None, ())
    warnings = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("warning: no answer from the SuperLink")]
    assert len(warnings) == 3 and "giving up after 250 s" in warnings[0]


def test_read_jsonl_skips_and_counts_a_torn_line_and_append_starts_a_fresh_one(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, _record(1))
    with open(path, "a") as handle:
        handle.write('{"round": 2, "train_lo')  # the crash cut round 2 short
    assert read_jsonl(path) == [_record(1)]
    assert f"{path}: skipped 1 unreadable line(s) (the last one unfinished" in caplog.text
    append_jsonl(path, _record(3))  # a later writer loses only the torn record
    caplog.clear()
    assert read_jsonl(path) == [_record(1), _record(3)]
    assert f"{path} line 2: not JSON" in caplog.text


FAKE_FLWR = """#!{python}
import json, sys
args = sys.argv[1:]
if args[:2] == ["supernode", "list"]:
    print(json.dumps({{"nodes": [{{"status": "online"}}] * 100}}))
elif args[:1] == ["run"]:
    print(json.dumps({{"success": True, "run-id": 7}}))
elif args[:1] == ["ls"]:
    print(json.dumps({{"runs": [{{"status": "running"}}]}}))
"""
FAKE_SUPERLINK = """#!{python}
import socket, sys, time
sock = socket.socket()
sock.bind(("127.0.0.1", int(sys.argv[sys.argv.index("--port") + 1])))
sock.listen()
time.sleep(100000)
"""
# FAKE_HUNG=1: a SuperNode that ignores SIGTERM (a hung one), so stopping it takes the launcher's SIGKILL.
FAKE_SUPERNODE = """#!/bin/sh
[ "$FAKE_HUNG" = 1 ] && trap '' TERM
while :; do sleep 0.2; done
"""


@pytest.fixture
def fake_flower(tmp_path):
    """Flower's binaries replaced by fakes: the launcher, the SuperNode wrapper and the real
    resident trainers run as in production; `flwr` reports every node online and the run running."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"flwr": FAKE_FLWR, "flower-superlink": FAKE_SUPERLINK, "flower-superexec": "#!/bin/sh\nexec sleep 100000\n",
                       "flower-supernode": FAKE_SUPERNODE}.items():
        (bin_dir / name).write_text(text.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHONUNBUFFERED="1")


def _federation_processes(results: Path) -> dict[psutil.Process, list[str]]:
    """Live processes of launches into `results`, with their command lines."""
    found = {}
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("FLWR_HOME", "").startswith(str(results)) and proc.status() != psutil.STATUS_ZOMBIE:
                found[proc] = proc.cmdline()
        except psutil.Error:  # gone meanwhile
            continue
    return found


NODES = 3


def _launch(results: Path, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", "local", "up", "--profile", "tiny", "--supernodes", str(NODES), "--insecure",
         "--results", str(results)], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
    )


def _running(results: Path, *launches: tuple[subprocess.Popen, Path]) -> None:
    """Until each launch submitted its run and every node's trainer and flower-supernode run."""
    def up():
        for proc, log in launches:
            assert proc.poll() is None, log.read_text()
        commands = _federation_processes(results).values()
        trainers = [c for c in commands if "app.training.trainer_service" in c]
        supernodes = [c for c in commands if c[1:2] and c[1].endswith("/flower-supernode")]
        submitted = all("submitted" in log.read_text() for _, log in launches)
        return submitted and len(trainers) == len(supernodes) == NODES * len(launches)

    wait_until(up, 120, "the federation")


def _gone(results: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (left := _federation_processes(results)) and time.monotonic() < deadline:
        time.sleep(0.2)
    names = [" ".join(command[:4]) for command in left.values()]
    for proc in left:  # never leave them to the next test
        with suppress(psutil.Error):
            proc.kill()
    assert not names, f"still running {timeout:.0f} s after the stop: {names}"


def test_sighup_stops_the_whole_federation(tmp_path, fake_flower):
    results, log = tmp_path / "results", tmp_path / "out.log"
    proc = _launch(results, fake_flower, log)
    try:
        _running(results, (proc, log))
        proc.send_signal(signal.SIGHUP)  # the SSH session dropped
        assert proc.wait(timeout=60) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
        _gone(results)


def test_concurrent_launches_with_one_results_directory_share_nothing(tmp_path, fake_flower):
    results = tmp_path / "results"
    first = _launch(results, fake_flower, tmp_path / "a.log")
    second = _launch(results, fake_flower, tmp_path / "b.log")  # same second, same --results
    try:
        _running(results, (first, tmp_path / "a.log"), (second, tmp_path / "b.log"))
        works = sorted((results / ".local").iterdir())
        assert len(works) == 2  # own work directories: own state.db, flwr-home, logs
        ports = {(w / "flwr-home" / "config.toml").read_text().split('address = "')[1].split('"')[0] for w in works}
        assert len(ports) == 2
        for proc in (first, second):
            proc.terminate()
        assert first.wait(timeout=60) == 1 and second.wait(timeout=60) == 1
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()
        _gone(results)


def test_a_sigkilled_launcher_takes_its_processes_down(tmp_path, fake_flower):
    results, log = tmp_path / "results", tmp_path / "out.log"
    proc = _launch(results, fake_flower, log)
    try:
        _running(results, (proc, log))
        proc.kill()  # the OOM killer: no handler runs
        proc.wait()
    finally:
        _gone(results)


def test_a_second_ctrl_c_does_not_break_off_the_stop(tmp_path, fake_flower):
    results, log = tmp_path / "results", tmp_path / "out.log"
    proc = _launch(results, dict(fake_flower, FAKE_HUNG="1"), log)
    try:
        _running(results, (proc, log))
        proc.send_signal(signal.SIGINT)
        time.sleep(2)  # stopping: the hung SuperNodes wait for the SIGKILL after the grace period
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 1
        assert "further signals are ignored" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        _gone(results, timeout=5)  # the launcher's stop itself must have finished them


def test_superlink_port_taken_before_it_binds_is_replaced(tmp_path, monkeypatch, capsys):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1], launcher.free_port()])  # another process got the first port first
    monkeypatch.setattr(launcher, "free_port", lambda: next(ports))
    federation = launcher.Federation(tmp_path)
    try:
        port = launcher.start_superlink(
            federation, lambda port: ["flower-superlink", "--insecure", "--isolation", "process", "--host", "127.0.0.1", "--port", str(port),
                                      "--database", str(tmp_path / "state.db")], launcher.flower_env(tmp_path / "home"))
        assert port != taken.getsockname()[1] and federation.processes["superlink"].poll() is None
        assert f"port {taken.getsockname()[1]} was taken by another process; trying another" in capsys.readouterr().out
    finally:
        federation.stop()
        taken.close()


def test_a_restarted_supernode_gets_a_fresh_port(tmp_path):
    federation = launcher.Federation(tmp_path)
    commands = []

    def command():  # made anew at each start; the first start fails at once, as on a port taken meanwhile
        commands.append([sys.executable, "-c", f"import time; time.sleep({60 if commands else 0})", f"--port={len(commands)}"])
        return commands[-1]

    federation.start("supernode-0", command, os.environ.copy())
    try:
        federation.processes["supernode-0"].wait()
        federation.check(())
        federation.pending["supernode-0"] = 0  # skip the back-off
        federation.check(())
        assert [c[-1] for c in commands] == ["--port=0", "--port=1"] and federation.processes["supernode-0"].poll() is None
    finally:
        federation.stop()
