"""Faults against the Compose stack on the real Docker engine (issue 15, part 2), in one stack to
keep CI short: tiny profile, no GPU, five SuperNode containers all sampled every round.

- supernode-1 crashes in the middle of round 1 (its main process SIGKILLed from the host, as the
  OOM killer would): the round aggregates the others, Docker's restart policy brings the node
  back, and it trains again in a later round. (`docker kill` is an operator's stop, which Docker's
  restart policies deliberately ignore; `docker compose up -d` brings such a node back.)
- `docker restart` of the SuperLink after round 2: the nodes and the ServerApp reconnect on its
  state volume, the same run goes on, no round is lost.
- `docker kill` of the serverapp container after checkpoint peft_4: the run fails, and the one
  documented command `FEDTUNE_RESUME_FROM=latest docker compose up --exit-code-from report`
  continues it to the end, through the evaluation and the report.
- supernode-3 reads a corrupt model cache and supernode-4 was given a GPU that is not there:
  each fails every round it is sampled with a reason naming the node and the cause; the rest of
  the federation goes on.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import yaml

from app.deploy.compose import UID, app_image, compose_spec, smoke_spec
from app.deploy.smoke import AFTER_RUN, Stack, _ensure_results_dir
from test_stack_docker import CLIENT, engine, images  # noqa: F401 - module fixtures

NODES, ROUNDS, CRASHED, CORRUPT_CACHE, NO_GPU = 5, 6, 1, 3, 4
REJOINED_SECONDS = 15
PROJECT = "fedtune-test-faults"
RUN_CONFIG = "strategy.fraction-train=1.0 strategy.round-timeout=90 train.save-every-round=2"


def _rounds(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")] if path.exists() else []


def _wait(what: str, stack: Stack, deadline: float, condition):
    """Poll `condition` until it returns something truthy; fail with the stack's logs past `deadline`."""
    while not (value := condition()):
        failed = [f for f in stack.failed_services() if f[0] not in ("run", "serverapp")]
        assert not failed, stack.failure_report(failed)
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n" + stack.failure_report(stack.failed_services())
        time.sleep(1)
    return value


def _running_for(container, seconds: float) -> bool:
    """Whether the container has been running for `seconds`: a SuperNode whose activation the
    SuperLink refuses exits within seconds of its start."""
    container.reload()
    state = container.attrs["State"]
    started = datetime.fromisoformat(state["StartedAt"][:19]).replace(tzinfo=timezone.utc)
    return state["Status"] == "running" and (datetime.now(timezone.utc) - started).total_seconds() >= seconds


def _corrupt_cache(tmp_path: Path, volume: str) -> Path:
    """A copy of the filled model cache whose base model weights are cut short."""
    corrupt = tmp_path / "corrupt-cache"
    corrupt.mkdir()
    os.chown(corrupt, UID, UID)
    CLIENT.containers.run(app_image(), ["sh", "-c", "cp -a /cache/. /out/ && for f in $(find /out -name model.safetensors); do truncate -s 4096 $f; done"],
                          volumes={volume: {"bind": "/cache", "mode": "ro"}, str(corrupt): {"bind": "/out", "mode": "rw"}},
                          remove=True, network_mode="none")
    assert list(corrupt.rglob("model.safetensors")), "the model cache holds no model.safetensors to corrupt"
    return corrupt


def test_stack_survives_node_crash_superlink_restart_and_serverapp_loss(images, tmp_path):
    results = tmp_path / "results"
    spec = replace(smoke_spec(NODES, ROUNDS, PROJECT), run_config=RUN_CONFIG)
    compose = compose_spec(spec)
    compose_file = tmp_path / "compose.yaml"
    compose_file.write_text(yaml.safe_dump(compose))
    stack = Stack(compose_file, PROJECT, env={"FEDTUNE_RESULTS": str(results)})
    _ensure_results_dir(results, UID)
    stack.down()
    deadline = time.monotonic() + 1500
    try:
        stack.compose("up", "--detach", "--quiet-pull", "model-cache", capture=True, timeout=600)
        stack.wait_exit("model-cache", deadline)
        # two broken nodes: a corrupt cache of their own, a GPU that is not there
        broken = compose_spec(spec)
        broken["services"][f"supernode-{CORRUPT_CACHE}"]["volumes"] = [
            v for v in broken["services"][f"supernode-{CORRUPT_CACHE}"]["volumes"] if not v.startswith("model-cache:")
        ] + [f"{_corrupt_cache(tmp_path, f'{PROJECT}_model-cache')}:/cache:ro"]
        broken["services"][f"supernode-{NO_GPU}"]["environment"]["FEDTUNE_GPU"] = "0"
        compose_file.write_text(yaml.safe_dump(broken))
        stack.compose("up", "--detach", *(s for s in broken["services"] if s not in AFTER_RUN), capture=True, timeout=600)
        run_dir = _wait("the run directory", stack, deadline, lambda: next(results.glob("run-*"), None))

        # 1. a SuperNode crashes mid-round; its restart policy brings it back
        crashed = stack.container(f"supernode-{CRASHED}")
        _wait("supernode-1 training in round 1", stack, deadline, lambda: f"supernode-{CRASHED}" in stack.training() or _rounds(run_dir))
        assert not _rounds(run_dir), "round 1 ended before supernode-1 could be crashed in it"
        crashed_at = time.time()
        stack.crash(f"supernode-{CRASHED}")
        _wait("supernode-1 restarted by its policy", stack, deadline,
              lambda: crashed.reload() or (crashed.attrs["RestartCount"] >= 1 and crashed.status == "running"))

        # 2. the SuperLink restarts on its state volume
        _wait("round 2", stack, deadline, lambda: len(_rounds(run_dir)) >= 2)
        stack.container("superlink").restart(timeout=10)

        # 3. the ServerApp's container is killed after a checkpoint; the run is resumed
        _wait("checkpoint peft_4", stack, deadline, lambda: (run_dir / "peft_4").is_dir())
        stack.container("serverapp").kill()
        run_service = stack.container("run")
        _wait("the run service to give up", stack, deadline, lambda: run_service.reload() or run_service.status == "exited")
        assert run_service.attrs["State"]["ExitCode"] != 0
        # The crashed node rejoins once the SuperLink has seen its old session's heartbeats stop (up
        # to a minute); until then each restart is refused, and Docker's back-off between restarts
        # doubles. Resume only once it is back, so that the resumed rounds can sample it.
        _wait("supernode-1 back in the federation", stack, deadline, lambda: _running_for(crashed, REJOINED_SECONDS))
        stack.env["FEDTUNE_RESUME_FROM"] = "latest"
        resumed = stack.compose("up", "--exit-code-from", "report", capture=True, timeout=max(deadline - time.monotonic(), 60), check=False)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:] + stack.failure_report(stack.failed_services())

        first = _rounds(run_dir)
        second_dir = next(p for p in results.glob("run-*") if p != run_dir)
        second = _rounds(second_dir)
        summary = json.loads((second_dir / "summary.json").read_text())
        logs = {i: stack.logs(f"supernode-{i}", tail=400) for i in (CRASHED, CORRUPT_CACHE, NO_GPU)}
    finally:
        stack.down()

    # no round lost across the SuperLink restart; the resumed run continued from the checkpoint
    assert [r["round"] for r in first][:4] == [1, 2, 3, 4]
    assert Path(summary["resumed_from"]).parent.name == run_dir.name
    assert [r["round"] for r in second] == list(range(1, ROUNDS + 1))
    assert all(r["status"] == "aggregated" for r in second)
    assert (second_dir / f"peft_{ROUNDS}" / "adapter_model.safetensors").exists()
    assert (second_dir / "report.md").exists() and (second_dir / "eval" / "summary.json").exists()

    # the crash cost round 1 one reply, and the node trained again after its restart
    trained = [{c["partition_id"] for c in r["clients"]} for r in second]
    rounds = [(r["round"], r.get("t_end"), sorted(t), {f["node"]: f["reason"][:120] for f in r["failed"]}) for r, t in zip(second, trained)]
    assert CRASHED not in trained[0] and any(CRASHED in t for t in trained[1:]), (f"crashed at {crashed_at:.0f}", rounds, logs[CRASHED][-6000:])
    assert {0, 2} <= trained[0] and all({0, 2} <= t for t in trained), trained
    # the broken nodes never trained; every round names them and says why
    assert not any(t & {CORRUPT_CACHE, NO_GPU} for t in trained), trained
    for r in second[4:]:  # rounds of the resumed run itself
        reasons = {f["node"]: f["reason"] for f in r["failed"]}
        assert "model cache may be incomplete or corrupt" in reasons[f"supernode-{CORRUPT_CACHE}"], reasons
        assert "was given GPU 0 (FEDTUNE_GPU) but CUDA sees no device" in reasons[f"supernode-{NO_GPU}"], reasons
    assert "model cache may be incomplete or corrupt" in logs[CORRUPT_CACHE]
    assert "CUDA sees no device" in logs[NO_GPU]
