"""Issue 16, nothing timed: the transport benchmark's echo app sends the adapter-shaped payload
app.comm counts, `--flower-settings off` covers every launcher setting, and the ClientApp reads
its start time without psutil."""

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np

from app import comm
from app.deploy import launcher

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


echo = _load("transport_echo", ROOT / "benchmarks" / "transport_app" / "transport_echo.py")
bench = _load("bench_transport", ROOT / "benchmarks" / "bench_transport.py")


def test_seed_size_gives_the_seed_adapter_shapes():
    shapes = echo.adapter_shapes(echo.SEED_MIB)
    assert len(shapes) == 192
    assert sum(int(np.prod(s)) for s in shapes.values()) == 13_795_328


def test_payload_is_what_comm_counts_in_both_layouts():
    for size in (1, 26, 52):
        shapes = echo.adapter_shapes(size)
        state = echo.make_state(shapes)
        counted = comm.transfer_bytes(shapes, echo.FORMAT)
        assert abs(counted / 2**20 - size) / size < 0.01
        for layout, arrays in (("packed", 1), ("per-array", 192)):
            record, wire = comm.encode(state, echo.FORMAT, comm.WEIGHTS, layout)
            assert len(record) == arrays and comm.record_bytes(record) == counted
            back = comm.decode(record, wire, expect_shapes=shapes, expect_format=echo.FORMAT)
            assert np.array_equal(back[next(iter(shapes))], comm.round_trip(state[next(iter(shapes))], echo.FORMAT))


def test_default_layout_is_what_the_app_sends():
    assert bench.app_layout("default") == "packed"
    assert bench.app_layout("per-array") == "per-array"


def test_settings_off_restores_every_launcher_setting():
    assert bench.FLOWER_DEFAULTS.keys() == launcher.FLOWER_SETTINGS.keys()


def test_environment_overrides_launcher_settings(monkeypatch, tmp_path):
    key = next(iter(launcher.FLOWER_SETTINGS))
    monkeypatch.delenv(key, raising=False)
    assert launcher.serverapp_env(launcher.flower_env(tmp_path))[key] == launcher.FLOWER_SETTINGS[key]
    assert key not in launcher.flower_env(tmp_path)  # the SuperNodes keep Flower's own poll
    monkeypatch.setenv(key, "2.5")
    assert launcher.serverapp_env(launcher.flower_env(tmp_path))[key] == "2.5"


def test_clientapp_process_start_time_without_psutil():
    import psutil

    import app.client_app as client_app

    # psutil adds the start ticks to /proc/stat's whole-second boot time, so it reads up to 1 s
    # early; ours comes from the boot clock (tests/test_clock_alignment.py checks it against the truth).
    assert -0.05 < client_app._process_start_time() - psutil.Process().create_time() < 1.05


def test_a_forked_clientapp_counts_from_its_shims_start(monkeypatch):
    """A ClientApp forked by the node's fork server (app/node/clientapp_forkserver.py) reports the
    start of the process flwr started, its shim, whose start ticks the fork server passes on."""
    import app.client_app as client_app
    from app.node.clientapp_forkserver import _start_ticks
    from app.node.clientapp_shim import PROCESS_START_TICKS_ENV

    own = client_app._process_start_time()
    monkeypatch.setenv(PROCESS_START_TICKS_ENV, str(_start_ticks(os.getpid()) - 100 * os.sysconf("SC_CLK_TCK")))
    assert abs(client_app._process_start_time() - (own - 100)) < 0.05  # a shim started 100 s before this process


def test_follow_run_survives_database_locked(monkeypatch, tmp_path):
    """`database is locked` at the SuperLink under concurrent clients ended `flwr run --stream`
    early. The launcher never streams (`flwr run` alone, then it polls `flwr ls`): a poll that
    fails is one unknown status, and following goes on until the run is finished."""
    import io

    replies = iter([
        {"success": False, "error-message": "sqlite3.OperationalError: database is locked"},
        launcher.LaunchError("`flwr ls` failed (1): database is locked"),
        {"success": True, "runs": [{"status": "running"}]},
        {"success": True, "runs": [{"status": "finished:completed"}]},
    ])
    calls = []

    def flwr_json(args, env, timeout=60):
        calls.append(args)
        reply = next(replies)
        if isinstance(reply, Exception):
            raise reply
        return reply

    monkeypatch.setattr(launcher, "flwr_json", flwr_json)
    monkeypatch.setattr(launcher, "POLL_SECONDS", 0)
    assert launcher.follow_run("7", {}, tmp_path, None, (), out=io.StringIO()) == "finished:completed"
    assert [c[0] for c in calls] == ["ls"] * 4


def test_submit_does_not_stream_logs(monkeypatch):
    seen = []
    monkeypatch.setattr(launcher, "flwr_json", lambda args, env, timeout=60: seen.append(args) or {"success": True, "run-id": 5})
    assert launcher.submit({}, {"num-server-rounds": 1}) == "5"
    assert seen[0][0] == "run" and "--stream" not in seen[0]
