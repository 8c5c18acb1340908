"""End to end through real Flower processes: `fedtune local up --profile tiny`."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from app import comm
from app.config import load_settings
from app.training.model import adapter_shapes, load_base_model

NODES, ROUNDS = 20, 2


def _our_processes(root: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("FLWR_HOME", "").startswith(str(root)):
                found.append(proc)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def _fedtune(*args: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "app.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **kwargs)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    proc = _fedtune("local", "up", "--profile", "tiny", "--supernodes", str(NODES), "--rounds", str(ROUNDS),
                    "--results", str(results), *_security_flags())
    output, _ = proc.communicate(timeout=900)
    print(output)
    runs = [p for p in results.iterdir() if p.name.startswith("run-")]
    return proc.returncode, output, results, runs


def _security_flags() -> list[str]:
    return []  # TLS is the default


def test_run_completes_with_progress(finished_run):
    code, output, _, runs = finished_run
    assert code == 0, output
    assert f"SuperNodes online: {NODES}/{NODES}" in output
    assert "round   1:" in output and f"round   {ROUNDS}:" in output
    assert len(runs) == 1
    # issue 25: a line per starting phase, and no library noise on the console (not a terminal: no bars)
    for phase in (f"SuperNode keys registered: {NODES}/{NODES}", "SuperLink: listening on", ": loading tiny", ": loaded tiny in"):
        assert phase in output
    for noise in ("No module named 'kernels'", "FutureWarning", "Loading weights", "it/s]", "q/s]", "Traceback"):
        assert noise not in output


def test_outputs_and_budget(finished_run):
    _, _, _, [run] = finished_run
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    settings = load_settings({"profile": "tiny"})
    shapes = adapter_shapes(settings.model, **_tiny_llama_config())
    down = comm.transfer_bytes(shapes, comm.download_format(settings.comm.format))
    up = comm.transfer_bytes(shapes, settings.comm.format)
    clients = max(1, int(NODES * settings.strategy.fraction_train))
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    for r in rounds:
        assert len(r["clients"]) == clients and r["failures"] == 0
        assert r["bytes_down"] == clients * down and r["bytes_up"] == clients * up
        assert r["comm_format"] == settings.comm.format
        assert len({c["partition_id"] for c in r["clients"]}) == clients
        assert all(c["resident"] for c in r["clients"])
    assert summary["communication_mib"] == pytest.approx(ROUNDS * clients * (down + up) / 2**20)
    assert summary["rounds_completed"] == ROUNDS
    assert (run / "training.png").stat().st_size > 10_000


def test_run_ends_with_the_evaluation_and_the_report(finished_run):
    _, output, _, [run] = finished_run
    evaluation = json.loads((run / "eval" / "summary.json").read_text())
    assert set(evaluation["accuracies"]) == {"pubmedqa", "medmcqa", "medqa", "careqa"}
    assert evaluation["peft_path"] == str(run / f"peft_{ROUNDS}") and evaluation["random_weights"] is True
    assert f"accuracy: pubmedqa {evaluation['accuracies']['pubmedqa']:.4f}" in output
    this_run = next(line for line in (run / "report.md").read_text().splitlines() if line.startswith("| this run"))
    assert "tiny model, random weights" in this_run and "n/a" not in this_run
    assert 'data-chart="loss"' in (run / "report.html").read_text()


def test_training_loss_goes_down(finished_run):
    _, _, _, [run] = finished_run
    losses = [json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 0.01, losses


def test_final_adapter_loads_onto_tiny_base(finished_run):
    from peft import PeftModel

    _, _, _, [run] = finished_run
    model = PeftModel.from_pretrained(load_base_model("tiny", 0), str(run / f"peft_{ROUNDS}"))
    out = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(out).all()


def test_clientapps_start_from_their_nodes_fork_servers(finished_run):
    """Every SuperNode runs a ClientApp fork server (app/node/clientapp_forkserver.py) that serves
    its shims: none refused (another environment, a bad request), and a shim started its ClientApp
    itself only if it came before its fork server listened (20 of them importing at once on a busy host)."""
    _, _, results, _ = finished_run
    logs = sorted(results.glob(".local/*/logs/supernode-*.log"))
    assert len(logs) == NODES
    text = "".join(log.read_text(errors="replace") for log in logs)
    started = text.count("Start `flwr-clientapp` process")  # by flwr, in every ClientApp (the sampled nodes')
    assert started > 0
    assert "refused a request" not in text and "fork server exited" not in text
    fallbacks = [line for line in text.splitlines() if "ClientApp fork server unavailable" in line]
    assert all("No such file or directory" in line or "Connection refused" in line for line in fallbacks), fallbacks
    assert len(fallbacks) < started, fallbacks
    # The launcher hashed the app once and listed it for its nodes: no ClientApp built the bundle to hash it.
    assert "hashed this node's own app bundle" not in text
    # and each client's line in metrics.jsonl says whether its ClientApp was forked warm
    [metrics] = results.glob("run-*/metrics.jsonl")
    clients = [c for line in metrics.read_text().splitlines() for c in json.loads(line)["clients"]]
    forked = [c["clientapp_forked"] for c in clients]
    assert forked and set(forked) <= {0.0, 1.0} and sum(forked) >= len(forked) - len(fallbacks)
    # and when it had pulled its message, between its start and its handler (the bundle check's time)
    assert all(c["t_process_start"] - 0.01 <= c["t_pulled"] <= c["t_handler_start"] for c in clients), clients


def test_no_process_left_behind(finished_run):
    _, _, results, _ = finished_run
    assert _our_processes(results) == []


def test_ctrl_c_stops_everything(tmp_path):
    proc = _fedtune("local", "up", "--profile", "tiny", "--supernodes", "2", "--rounds", "50", "--results", str(tmp_path), *_security_flags())
    deadline = time.monotonic() + 300
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "submitted" in line or time.monotonic() > deadline:
            break
    assert any("submitted" in line for line in lines), "".join(lines)
    running = _our_processes(tmp_path)
    assert running
    # the running SuperLink's own flags: TLS and SuperNode authentication on, its key outside
    # the results directory in a private directory of its own
    [superlink] = [p.cmdline() for p in running if "flower-superlink" in " ".join(p.cmdline()[:2])]
    assert "--enable-supernode-auth" in superlink, superlink
    keys = Path(superlink[superlink.index("--ssl-keyfile") + 1]).parent
    assert not keys.is_relative_to(tmp_path) and stat.S_IMODE(keys.stat().st_mode) == 0o700, keys
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "interrupted" in rest, "".join(lines) + rest
    left = [(p.pid, p.cmdline()) for p in _our_processes(tmp_path)]
    assert left == [], left
    assert not keys.exists(), f"{keys} outlived the launch"


def _tiny_llama_config() -> dict:
    from app.training.tiny import tiny_model_dir

    config = json.loads((tiny_model_dir() / "config.json").read_text())
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")
    return {k: config[k] for k in keys}


def test_flower_apis_served_over_tls(finished_run):
    _, _, results, _ = finished_run
    [superlink_log] = results.glob(".local/*/logs/superlink.log")
    assert "running on https://127.0.0.1:" in superlink_log.read_text()
    # nothing secret in the results directory: the launch's keys lived elsewhere
    secrets = [p for p in results.rglob("*") if p.suffix in (".key", ".secret", ".pub") or p.name == "ca.crt"]
    assert secrets == [], secrets


def test_outputs_follow_the_umask(finished_run):
    """Every output has the mode the launching user's umask gives new files (0644 / 0755 under
    the usual 0022), not tempfile's 0600 / 0700: the host user loads an adapter the containers'
    user wrote (README's PeftModel.from_pretrained)."""
    _, _, _, runs = finished_run
    umask = os.umask(0)
    os.umask(umask)
    run_dir = runs[0]
    for path in [run_dir, *run_dir.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o777 if path.is_dir() else 0o666) & ~umask, (path, oct(mode))


def test_bad_config_is_refused_before_anything_starts(tmp_path):
    proc = _fedtune("local", "up", "--profile", "tiny", "--insecure", "--results", str(tmp_path),
                    "--run-config", "train.seq-lenght=8 model.quantization=3")
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "unknown config key(s) 'train.seq-lenght'" in output
    assert not (tmp_path / ".local").exists()


def test_waiting_for_nodes_survives_a_superlink_that_does_not_answer(monkeypatch, capsys):
    """A SuperLink still starting, or a host too loaded to answer `flwr supernode list` in time,
    is asked again; a persistent error is named when the wait gives up."""
    from app.deploy import launcher

    replies = iter([launcher.LaunchError("`flwr supernode list` did not answer within 60 s"), 1, 2])

    def online(env):
        reply = next(replies)
        if isinstance(reply, Exception):
            raise reply
        return reply

    monkeypatch.setattr(launcher, "online_nodes", online)
    monkeypatch.setattr(launcher, "POLL_SECONDS", 0)
    launcher.wait_for_nodes(2, {}, None, (), timeout=60)
    assert "SuperNodes online: 2/2" in capsys.readouterr().out

    def never(env):
        raise launcher.LaunchError("Connection to the SuperLink is unavailable")

    monkeypatch.setattr(launcher, "online_nodes", never)
    with pytest.raises(launcher.LaunchError, match="only 0 of 2 .* last error: Connection to the SuperLink"):
        launcher.wait_for_nodes(2, {}, None, (), timeout=0)
