"""A run fails when it fails (issue 25): node failure reasons on the console the first time they
occur, a run that trained nothing exits non-zero with its reasons and is not evaluated, and the
launcher says what it is doing while it starts."""

import io
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from app.deploy import launcher
from app.evaluation import run_eval
from app.results.metrics import append_jsonl

DATA_ERROR = "error 2: <class 'RuntimeError'>:<'resident trainer failed: DataError: the partition has no usable example'>"
TIMEOUT = "no reply within strategy.round-timeout=3600 s"


def _round(number: int, failed: list[tuple[str, str]], aggregated: bool = False) -> dict:
    return {
        "round": number, "status": "aggregated" if aggregated else "skipped", "train_loss": 1.5 if aggregated else None,
        "clients": [], "failures": len(failed), "bytes_round": 0, "cumulative_mib": 0.0, "round_seconds": 1.0,
        "failed": [{"node_id": i, "node": node, "reason": reason, "attempt": 0} for i, (node, reason) in enumerate(failed)],
    }


def test_each_failure_reason_is_shown_once_under_the_round_it_first_occurs(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rounds = [
        _round(1, [("supernode-0", DATA_ERROR), ("supernode-1", DATA_ERROR), ("supernode-2", DATA_ERROR)]),
        _round(2, [("supernode-1", DATA_ERROR), ("supernode-3", TIMEOUT)]),
        _round(3, [("supernode-3", TIMEOUT)], aggregated=True),
    ]
    shown = []
    for record in rounds:
        append_jsonl(metrics, record)
        shown.append(launcher._round_line(record, metrics).splitlines())
    assert shown[0][0].startswith("round   1: skipped")
    assert shown[0][1:] == ["  supernode-0 (and 2 more nodes) failed: RuntimeError: resident trainer failed: "
                            "DataError: the partition has no usable example"]
    assert shown[1][1:] == [f"  supernode-3 failed: {TIMEOUT}"]  # the data error was shown already
    assert len(shown[2]) == 1 and shown[2][0].startswith("round   3: loss 1.5000")


def test_follow_run_prints_the_reasons_as_the_run_goes(tmp_path, monkeypatch):
    """Through the launcher's real follow loop: the reasons come from metrics.jsonl as it grows."""
    run_dir = tmp_path / "run-1"
    run_dir.mkdir()
    records = iter([_round(1, [("supernode-0", DATA_ERROR)]), _round(2, [("supernode-0", DATA_ERROR)])])

    def status(run_id, env):
        record = next(records, None)
        if record is None:
            return "finished:completed"
        append_jsonl(run_dir / "metrics.jsonl", record)
        return "running"

    monkeypatch.setattr(launcher, "run_status", status)
    monkeypatch.setattr(launcher, "POLL_SECONDS", 0)
    out = io.StringIO()
    assert launcher.follow_run("1", {}, run_dir, None, (), out=out) == "finished:completed"
    assert out.getvalue().count("failed: RuntimeError: resident trainer failed: DataError") == 1


def _run_dir(tmp_path: Path, summary: dict | None, rounds: list[dict]) -> Path:
    run_dir = tmp_path / "run-7"
    run_dir.mkdir()
    for record in rounds:
        append_jsonl(run_dir / "metrics.jsonl", record)
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


@pytest.fixture
def no_evaluation(monkeypatch):
    """Records what finish_run does instead of evaluating and writing reports."""
    calls = []
    monkeypatch.setattr(run_eval, "evaluate_and_report", lambda run_dir, **kw: calls.append(("evaluate", run_dir)) or 0)
    from app.results import report

    monkeypatch.setattr(report, "write_report", lambda run_dir: calls.append(("report", run_dir)) or [run_dir / "report.html"])
    return calls


ARGS = types.SimpleNamespace(no_eval=False, exact=False, limit=None, data_dir=None)


@pytest.mark.parametrize(("summary", "status", "why"), [
    ({"rounds_aggregated": 0, "stopped": None}, "finished:completed", "no round aggregated: the adapter is the untrained initial one"),
    ({"rounds_aggregated": 0, "stopped": "no round aggregated: every node failed"}, "finished:failed",
     "the run stopped: no round aggregated: every node failed"),
    ({"rounds_aggregated": 3, "stopped": "RuntimeError: boom"}, "finished:failed", "the run stopped: RuntimeError: boom"),
    ({"rounds_aggregated": 2, "stopped": None}, "finished:failed", "the run ended finished:failed"),
    (None, "finished:failed", "the run ended finished:failed without a readable"),
])
def test_a_run_that_trained_nothing_exits_1_with_its_reasons_and_is_not_evaluated(tmp_path, capsys, no_evaluation, summary, status, why):
    run_dir = _run_dir(tmp_path, summary, [_round(1, [("supernode-0", DATA_ERROR), ("supernode-1", DATA_ERROR)]),
                                           _round(2, [("supernode-1", TIMEOUT)])])
    assert run_eval.finish_run(run_dir, ARGS, [], status) == 1
    out, err = capsys.readouterr()
    assert err.splitlines()[0].startswith(f"fedtune: {why}")
    assert err.splitlines()[1:] == [
        "  supernode-0, supernode-1: RuntimeError: resident trainer failed: DataError: the partition has no usable example",
        f"  supernode-1: {TIMEOUT}",
    ]
    assert "evaluation skipped" in out
    assert ("evaluate", run_dir) not in no_evaluation
    assert (("report", run_dir) in no_evaluation) == (summary is not None)  # the training report, for the record


def test_summary_failure_reasons_are_used_when_the_serverapp_wrote_them(tmp_path, capsys, no_evaluation):
    run_dir = _run_dir(tmp_path, {"rounds_aggregated": 0, "stopped": "no round aggregated",
                                  "failure_reasons": ["supernode-0: DataError: no usable example"]}, [])
    assert run_eval.finish_run(run_dir, ARGS, [], "finished:failed") == 1
    assert capsys.readouterr().err.splitlines()[1:] == ["  supernode-0: DataError: no usable example"]


def test_a_trained_run_is_evaluated(tmp_path, no_evaluation):
    run_dir = _run_dir(tmp_path, {"rounds_aggregated": 1, "stopped": None}, [_round(1, [], aggregated=True)])
    assert run_eval.finish_run(run_dir, ARGS, [], "finished:completed") == 0
    assert no_evaluation == [("evaluate", run_dir)]


def test_progress_redraws_on_a_terminal_and_prints_milestones_otherwise(monkeypatch):
    log = io.StringIO()
    progress = launcher.Progress("SuperNode keys registered", 20, out=log, every=3600)
    for k in range(1, 21):
        progress.step(k)
    assert log.getvalue().splitlines() == ["SuperNode keys registered: 1/20", "SuperNode keys registered: 20/20"]

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty = Terminal()
    progress = launcher.Progress("keys", 3, out=tty)
    for k in range(1, 4):
        progress.step(k)
    assert tty.getvalue() == "\rkeys: 1/3\rkeys: 2/3\rkeys: 3/3\n"


def test_model_loading_lines_of_the_node_logs_are_shown(tmp_path):
    from app.training.worker import MODEL_LOG_PREFIX

    out = io.StringIO()
    watch = launcher.NodeLogWatcher(tmp_path, ["supernode-0", "supernode-1"], out=out)
    watch()  # no log yet
    (tmp_path / "supernode-1.log").write_text(f"INFO: noise\n{MODEL_LOG_PREFIX}loading tiny\n{MODEL_LOG_PREFIX}load")
    watch()
    with open(tmp_path / "supernode-1.log", "a") as log:
        log.write("ed tiny in 6.7 s\n")
    watch()
    watch()
    assert out.getvalue().splitlines() == ["supernode-1: loading tiny", "supernode-1: loaded tiny in 6.7 s"]


def test_bad_data_given_with_run_config_is_named(tmp_path, capsys):
    args = types.SimpleNamespace(profile="tiny", rounds=1, data=None, results=str(tmp_path / "r"), gpus="", supernodes=2,
                                 insecure=True, connect_timeout=1.0, resume_from="",
                                 run_config=f"dataset.path={tmp_path / 'nope.parquet'}")
    assert launcher.local_up(args) == 2
    assert capsys.readouterr().err.strip() == (f"fedtune: --run-config dataset.path: dataset file {tmp_path / 'nope.parquet'}: "
                                               "not found (expected a .json, .jsonl or .parquet file)")
    assert not (tmp_path / "r").exists()


def test_a_run_where_no_node_can_train_fails_with_the_reason(tmp_path):
    """End to end (real processes, tiny profile): every row's output is empty, so no node has an
    example; the run prints the reason once, skips the evaluation and exits 1."""
    data = tmp_path / "empty-answers.jsonl"
    data.write_text("".join(json.dumps({"input": f"question {i}", "output": ""}) + "\n" for i in range(20)))
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "local", "up", "--profile", "tiny", "--supernodes", "2", "--rounds", "1",
         "--data", str(data), "--results", str(tmp_path / "results")],
        capture_output=True, text=True, timeout=900, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    print(done.stdout, done.stderr)
    assert done.returncode == 1
    for phase in ("certificates: a CA, the SuperLink's and 2 SuperNode keys", "SuperLink: listening on",
                  "SuperNode keys registered: 2/2", "SuperNodes online: 2/2", "loading tiny"):
        assert phase in done.stdout
    assert done.stdout.count("failed: RuntimeError: resident trainer failed: DataError: the partition has no usable example") == 1
    assert "fedtune: no round aggregated" in done.stderr or "fedtune: the run stopped" in done.stderr
    assert "the partition has no usable example" in done.stderr
    assert "evaluating" not in done.stdout and "evaluation skipped" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
