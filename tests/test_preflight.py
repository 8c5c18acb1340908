"""`fedtune stack check` (issue 25, item 5): what the host lacks to run a generated compose file,
and what to do. Docker and the network are stand-ins; the file system is real (tmp_path)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from app.deploy import preflight
from app.deploy.compose import StackSpec, render_compose, smoke_spec
from app.deploy.preflight import Host, HostError, check_stack, interpolate, report

DOCKER_INFO = {"ServerVersion": "27.3.1", "Runtimes": {"runc": {"path": "runc"}, "io.containerd.runc.v2": {}}}
WITH_NVIDIA = {**DOCKER_INFO, "Runtimes": {**DOCKER_INFO["Runtimes"], "nvidia": {"path": "nvidia-container-runtime"}}}


def _host(info=DOCKER_INFO, volumes=(), hub_error=None, environ=None, hook=None, compose="2.40.3") -> Host:
    def docker_info():
        if isinstance(info, Exception):
            raise info
        return info

    connects = []

    def connect(host, port):
        connects.append((host, port))
        return hub_error

    host = Host(docker_info=docker_info, docker_volumes=lambda: list(volumes), compose_version=lambda: compose,
                which=lambda name: hook if name == "nvidia-container-runtime-hook" else None, connect=connect,
                environ=environ or {})
    host.connects = connects  # what the model-cache check dialled
    return host


def _stack(tmp_path: Path, spec: StackSpec = StackSpec(nodes=2, gpus=1), results_mode: int | None = 0o777) -> Path:
    compose_file = tmp_path / "compose.yaml"
    compose_file.write_text(render_compose(spec))
    if results_mode is not None:
        (tmp_path / "results").mkdir()
        (tmp_path / "results").chmod(results_mode)
    return compose_file


def _by_check(findings) -> dict[str, preflight.Finding]:
    return {f.check: f for f in findings}


def test_a_host_without_the_nvidia_runtime_is_pointed_to_the_cpu_smoke_stack(tmp_path):
    findings = _by_check(check_stack(_stack(tmp_path), _host(volumes=["fedtune_model-cache"])))
    gpu = findings["GPU runtime"]
    assert not gpu.ok and "no NVIDIA runtime" in gpu.detail and "runc" in gpu.detail
    assert "could not select device driver" in gpu.detail
    assert "NVIDIA Container Toolkit" in gpu.fix and "fedtune stack smoke" in gpu.fix
    text, code = report(list(findings.values()), tmp_path / "compose.yaml")
    assert code == 1 and "FAIL GPU runtime" in text and "1 problem(s)" in text


@pytest.mark.parametrize("host", [_host(info=WITH_NVIDIA, volumes=["fedtune_model-cache"]),
                                  _host(volumes=["fedtune_model-cache"], hook="/usr/bin/nvidia-container-runtime-hook")])
def test_a_gpu_host_passes(tmp_path, host):
    findings = check_stack(_stack(tmp_path), host)
    assert all(f.ok for f in findings), report(findings, tmp_path / "compose.yaml")[0]
    assert report(findings, tmp_path / "compose.yaml")[1] == 0


def test_the_cpu_smoke_stack_needs_no_gpu_runtime_and_no_download(tmp_path):
    host = _host(hub_error="Name or service not known")
    findings = _by_check(check_stack(_stack(tmp_path, smoke_spec(nodes=2)), host))
    assert "GPU runtime" not in findings and findings["model cache"].ok and "tiny" in findings["model cache"].detail
    assert host.connects == []


def test_docker_unreachable_says_so_and_skips_what_needs_it(tmp_path):
    host = _host(info=HostError("`docker info` failed: permission denied while trying to connect to the Docker daemon socket"),
                 compose=None)
    findings = _by_check(check_stack(_stack(tmp_path), host))
    assert not findings["Docker engine"].ok and "permission denied" in findings["Docker engine"].detail
    assert "docker` group" in findings["Docker engine"].fix
    assert not findings["Docker Compose v2"].ok and "install-compose.sh" in findings["Docker Compose v2"].fix
    assert "GPU runtime" not in findings and "model cache" not in findings


def test_an_empty_model_cache_without_the_hub_fails_before_up(tmp_path):
    host = _host(info=WITH_NVIDIA, hub_error="Name or service not known")
    cache = _by_check(check_stack(_stack(tmp_path), host))["model cache"]
    assert not cache.ok and "fedtune_model-cache does not exist" in cache.detail
    assert "huggingface.co:443 cannot be reached" in cache.detail and "Name or service not known" in cache.detail
    assert "fedtune stack smoke" in cache.fix and host.connects == [("huggingface.co", 443)]
    # through the proxy Docker is told to use
    host = _host(info=WITH_NVIDIA, hub_error="Connection refused", environ={"HTTPS_PROXY": "http://proxy.example:3128"})
    (tmp_path / "p").mkdir()
    cache = _by_check(check_stack(_stack(tmp_path / "p"), host))["model cache"]
    assert not cache.ok and "the proxy proxy.example:3128" in cache.detail and host.connects == [("proxy.example", 3128)]


def test_hf_hub_offline_in_env_file_fails_without_dialling(tmp_path):
    compose_file = _stack(tmp_path)
    (tmp_path / ".env").write_text("# offline host\nHF_HUB_OFFLINE=1\n")
    host = _host(info=WITH_NVIDIA)
    cache = _by_check(check_stack(compose_file, host))["model cache"]
    assert not cache.ok and "HF_HUB_OFFLINE=1 forbids it" in cache.detail and host.connects == []


def test_a_filled_cache_or_a_reachable_hub_passes(tmp_path):
    assert _by_check(check_stack(_stack(tmp_path), _host(info=WITH_NVIDIA)))["model cache"].ok  # hub reachable
    host = _host(info=WITH_NVIDIA, volumes=["fedtune_model-cache"], hub_error="down")
    cache = _by_check(check_stack(tmp_path / "compose.yaml", host))["model cache"]
    assert cache.ok and "exists" in cache.detail


def test_results_owned_by_another_uid_gets_the_chown_command(tmp_path):
    compose_file = _stack(tmp_path, results_mode=0o755)
    owner = (tmp_path / "results").stat().st_uid
    other = 10001 if owner != 10001 else 10002
    host = _host(info=WITH_NVIDIA, volumes=["fedtune_model-cache"], environ={"FEDTUNE_UID": str(other), "FEDTUNE_GID": str(other)})
    results = _by_check(check_stack(compose_file, host))["results directory"]
    assert not results.ok and f"owned by uid {owner}" in results.detail and f"{other}:{other} cannot write" in results.detail
    assert f"sudo chown {other}:{other} " in results.fix and str(tmp_path / "results") in results.fix
    assert "FEDTUNE_UID=$(id -u)" in results.fix
    # the same directory passes for the uid that owns it
    host = _host(info=WITH_NVIDIA, volumes=["fedtune_model-cache"], environ={"FEDTUNE_UID": str(owner), "FEDTUNE_GID": str(owner)})
    assert _by_check(check_stack(compose_file, host))["results directory"].ok


def test_a_missing_results_directory_and_fedtune_results_from_env_file(tmp_path):
    compose_file = _stack(tmp_path, results_mode=None)
    host = _host(info=WITH_NVIDIA, volumes=["fedtune_model-cache"])
    results = _by_check(check_stack(compose_file, host))["results directory"]
    assert not results.ok and "does not exist; Docker would create it owned by root" in results.detail
    assert results.fix.startswith("`sudo install -d -o 10001 -g 10001 -m 0755 ")
    elsewhere = tmp_path / "out"
    elsewhere.mkdir(mode=0o777)
    elsewhere.chmod(0o777)
    (tmp_path / ".env").write_text(f"FEDTUNE_RESULTS={elsewhere}\n")
    results = _by_check(check_stack(compose_file, host))["results directory"]
    assert results.ok and str(elsewhere) in results.detail


def test_the_command_prints_the_report_and_fails(tmp_path, monkeypatch, capsys):
    from app.cli import main

    compose_file = _stack(tmp_path, results_mode=None)
    monkeypatch.setattr(preflight, "Host", lambda: _host(volumes=["fedtune_model-cache"]))
    assert main(["stack", "check", "-f", str(compose_file)]) == 1
    out = capsys.readouterr().out
    assert "FAIL GPU runtime" in out and "FAIL results directory" in out and "2 problem(s)" in out
    assert main(["stack", "check", "-f", str(tmp_path / "nope.yaml")]) == 2
    assert "no such compose file" in capsys.readouterr().err


@settings(max_examples=200, deadline=None)
@given(name=st.from_regex(r"[A-Z_]{1,8}", fullmatch=True), value=st.text(st.characters(blacklist_characters="}$"), max_size=8),
       default=st.text(st.characters(blacklist_characters="}$"), max_size=8), is_set=st.booleans())
def test_interpolation_reads_as_compose_does(name, value, default, is_set):
    env = {name: value} if is_set else {}
    assert interpolate(f"${{{name}:-{default}}}", env) == (value if is_set and value else default)
    assert interpolate(f"${{{name}-{default}}}", env) == (value if is_set else default)
    assert interpolate(f"a/${{{name}}}/b", env) == f"a/{value if is_set else ''}/b"


class _FakeCompose:
    """Plays `docker compose`: `up` exits with `up_code`; `ps` lists `containers`; logs per service."""

    def __init__(self, up_code: int, containers: list[dict], one_array: bool = False) -> None:
        self.up_code, self.containers, self.one_array, self.calls = up_code, containers, one_array, []

    def __call__(self, argv, **kwargs):
        import json
        import subprocess

        self.calls.append(argv[4:])
        verb, stdout = argv[4], ""
        if verb == "up":
            return subprocess.CompletedProcess(argv, self.up_code)
        if verb == "ps":
            stdout = json.dumps(self.containers) if self.one_array else "\n".join(json.dumps(c) for c in self.containers)
        if verb == "logs":
            stdout = f"{argv[-1]}: OSError: We couldn't connect to 'https://huggingface.co'\n"
        return subprocess.CompletedProcess(argv, 0, stdout, "")


@pytest.mark.parametrize("one_array", [False, True])
def test_a_failed_up_prints_the_failed_services_logs_and_leaves_nothing_running(tmp_path, capsys, one_array):
    from app.deploy.stack_up import stack_up

    compose = _FakeCompose(1, [
        {"Service": "model-cache", "State": "exited", "ExitCode": 1},
        {"Service": "certs", "State": "exited", "ExitCode": 0},
        {"Service": "superlink", "State": "running", "ExitCode": 0},
        {"Service": "serverapp", "State": "running", "ExitCode": 0},
    ], one_array)
    compose_file = _stack(tmp_path)
    assert stack_up(compose_file, run=compose, preflight=False) == 1
    out = capsys.readouterr().out
    assert compose.calls[0] == ["up", "--exit-code-from", "report"]
    assert ["logs", "--no-color", "--tail", "40", "model-cache"] in compose.calls
    assert not any(c[:1] == ["logs"] and c[-1] == "certs" for c in compose.calls)  # it succeeded
    assert compose.calls[-1] == ["down"]  # volumes kept: no -v
    assert "model-cache exited with code 1" in out and "couldn't connect to 'https://huggingface.co'" in out
    assert "stopping and removing serverapp, superlink with `docker compose down`" in out


def test_a_successful_up_is_left_alone_and_a_failed_check_starts_nothing(tmp_path, monkeypatch, capsys):
    from app.deploy.stack_up import stack_up

    compose = _FakeCompose(0, [])
    assert stack_up(_stack(tmp_path), run=compose, preflight=False) == 0
    assert compose.calls == [["up", "--exit-code-from", "report"]]
    compose = _FakeCompose(0, [])
    monkeypatch.setattr(preflight, "Host", lambda: _host())  # no NVIDIA runtime
    (tmp_path / "s").mkdir()
    assert stack_up(_stack(tmp_path / "s"), run=compose, preflight=True) == 1
    assert compose.calls == [] and "FAIL GPU runtime" in capsys.readouterr().out
    # the coordinator's file ends with `run`
    (tmp_path / "c").mkdir()
    compose = _FakeCompose(0, [])
    assert stack_up(_stack(tmp_path / "c", StackSpec(role="superlink")), run=compose, preflight=False) == 0
    assert compose.calls == [["up", "--exit-code-from", "run"]]
