"""The native launcher under faults: partly written metrics lines, signals (SIGHUP, SIGKILL, a
second Ctrl-C), concurrent launches. Flower's binaries are replaced by small fakes on PATH, so
these tests exercise the launcher's and the SuperNode wrapper's own process handling in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.deploy import launcher
from app.report import append_jsonl, read_jsonl


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
