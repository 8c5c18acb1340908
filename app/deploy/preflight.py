"""`fedtune stack check`: what this host lacks to run a generated compose file, and what to do.

Compose itself fails late and vaguely: without the NVIDIA runtime, `could not select device
driver "nvidia"`; offline, `service "model-cache" didn't complete successfully` (the cause only
in its logs); with a root-owned ./results, a ServerApp that cannot write its first checkpoint.
Each check here reads the host through `Host`, so tests give it stand-ins for Docker and the
network; the file system is the real one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from app.deploy.compose import RESULTS, UID

HUB = "https://huggingface.co"
SEED_DOWNLOAD = "about 16 GB"  # the seed's base model, its data and the four benchmarks


class HostError(RuntimeError):
    """A host query failed; the message is what the tool said."""


@dataclass(frozen=True)
class Finding:
    check: str
    ok: bool
    detail: str
    fix: str = ""

    def lines(self) -> list[str]:
        head = f"{'ok  ' if self.ok else 'FAIL'} {self.check}: {self.detail}"
        return [head, *([f"     fix: {self.fix}"] if self.fix else [])]


def _docker_json(*args: str) -> Any:
    try:
        done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HostError(f"`docker {' '.join(args)}`: {exc}") from None
    if done.returncode != 0:
        raise HostError(f"`docker {' '.join(args)}` failed: {(done.stderr or done.stdout).strip()[-500:]}")
    return json.loads(done.stdout) if done.stdout.strip().startswith(("{", "[", '"')) else done.stdout


def _docker_info() -> dict[str, Any]:
    return _docker_json("info", "--format", "{{json .}}")


def _docker_volumes() -> list[str]:
    return _docker_json("volume", "ls", "--quiet").split()


def _compose_version() -> str | None:
    try:
        return str(_docker_json("compose", "version", "--short")).strip()
    except HostError:
        return None


def _connect(host: str, port: int) -> str | None:
    """None when a TCP connection to host:port opens within 5 s, else why not."""
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        return str(exc.strerror or exc)
    return None


@dataclass
class Host:
    """What the checks read from the host (stand-ins in tests)."""

    docker_info: Callable[[], dict[str, Any]] = _docker_info
    docker_volumes: Callable[[], list[str]] = _docker_volumes
    compose_version: Callable[[], str | None] = _compose_version
    which: Callable[[str], str | None] = shutil.which
    connect: Callable[[str, int], str | None] = _connect
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))


def compose_environment(compose_dir: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """What Compose interpolates with: the project's .env, overridden by the environment."""
    values: dict[str, str] = {}
    env_file = compose_dir / ".env"
    if env_file.is_file():
        for line in env_file.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and not key.strip().startswith("#"):
                values[key.strip()] = value.strip().strip("'\"")
    return {**values, **environ}


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """${VAR}, ${VAR:-default} and ${VAR-default}, as Compose reads them (enough for our files)."""

    def value(match: re.Match) -> str:
        name, op, default = match.group(1), match.group(2) or "", match.group(3) or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        return env.get(name, "")

    return re.sub(r"\$\{(\w+)(?:(:?-)([^}]*))?\}", value, text)


# ---------------------------------------------------------------------------- checks


def check_docker(host: Host) -> tuple[Finding, dict[str, Any] | None]:
    try:
        info = host.docker_info()
    except HostError as exc:
        return Finding("Docker engine", False, str(exc),
                       "start Docker, and run as a user who may use it (the `docker` group)"), None
    return Finding("Docker engine", True, f"version {info.get('ServerVersion', '?')}"), info


def check_compose(host: Host) -> Finding:
    version = host.compose_version()
    if version is None:
        return Finding("Docker Compose v2", False, "`docker compose version` fails",
                       "docker/install-compose.sh installs the Compose v2 plugin")
    return Finding("Docker Compose v2", True, f"version {version}")


def needs_gpu(services: Mapping[str, Any]) -> list[str]:
    """The services that reserve NVIDIA GPUs."""
    return [name for name, s in services.items()
            if any(d.get("driver") == "nvidia"
                   for d in s.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", []))]


def check_gpu_runtime(info: Mapping[str, Any], services: Mapping[str, Any], host: Host) -> Finding | None:
    """Docker hands GPUs to containers through the NVIDIA Container Toolkit: a registered
    `nvidia` runtime, or the prestart hook dockerd looks for on its PATH."""
    gpu_services = needs_gpu(services)
    if not gpu_services:
        return None
    runtimes = sorted(info.get("Runtimes") or {})
    hook = host.which("nvidia-container-runtime-hook")
    if "nvidia" in runtimes or hook:
        return Finding("GPU runtime", True, "NVIDIA runtime " + ("registered with Docker" if "nvidia" in runtimes else f"hook at {hook}"))
    return Finding(
        "GPU runtime", False,
        f"{len(gpu_services)} services reserve NVIDIA GPUs ({', '.join(gpu_services[:3])}{' ...' if len(gpu_services) > 3 else ''}), "
        f"but Docker has no NVIDIA runtime (runtimes: {', '.join(runtimes) or 'none'}); `up` would stop with "
        "'could not select device driver \"nvidia\"'",
        "install the NVIDIA Container Toolkit and run `sudo nvidia-ctk runtime configure --runtime=docker && sudo systemctl "
        "restart docker`; without a GPU, run the CPU stack instead: `fedtune stack smoke` (compose.smoke.yaml, tiny profile)")


def _option(command: list[str], flag: str, default: str = "") -> str:
    return command[command.index(flag) + 1] if flag in command and command.index(flag) + 1 < len(command) else default


def check_model_cache(project: str, services: Mapping[str, Any], env: Mapping[str, str], host: Host) -> Finding | None:
    """The model-cache service downloads from the hub unless its volume is already filled."""
    from app.config import ConfigError, load_settings, parse_overrides

    cache = services.get("model-cache")
    if cache is None:
        return None
    command = [str(part) for part in cache.get("command", [])]
    try:
        settings = load_settings({"profile": _option(command, "--profile", "bio-medical-llama3-8b"),
                                  **parse_overrides(_option(command, "--run-config"))})
    except ConfigError as exc:
        return Finding("model cache", False, f"the model-cache service's configuration: {exc}", "regenerate the compose file")
    if settings.model.name == "tiny":
        return Finding("model cache", True, "tiny profile: built locally, nothing to download")
    volume = f"{project}_model-cache"
    try:
        if volume in host.docker_volumes():
            return Finding("model cache", True, f"volume {volume} exists (a download it holds in part resumes)")
    except HostError as exc:
        return Finding("model cache", False, str(exc), "start Docker")
    first = (f"volume {volume} does not exist yet, so the first `up` downloads {settings.model.name}, its data "
             f"and the benchmarks ({SEED_DOWNLOAD}) from the Hugging Face hub")
    offline_fix = ("run it once where the hub is reachable (set HTTPS_PROXY for Docker if you use a proxy), "
                   "or use the CPU smoke stack, which downloads nothing: `fedtune stack smoke`")
    if env.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return Finding("model cache", False, f"{first}, but HF_HUB_OFFLINE={env['HF_HUB_OFFLINE']} forbids it", offline_fix)
    proxy = env.get("HTTPS_PROXY") or env.get("https_proxy")
    target = urlparse(proxy if proxy else env.get("HF_ENDPOINT") or HUB)
    port = target.port or (443 if target.scheme == "https" else 80)
    if (error := host.connect(target.hostname or "", port)) is not None:
        via = f"the proxy {target.hostname}:{port}" if proxy else f"{target.hostname}:{port}"
        return Finding("model cache", False, f"{first}, but {via} cannot be reached from this host ({error})", offline_fix)
    return Finding("model cache", True, f"{first}; {target.hostname} is reachable")


def _writable_by(mode: int, owner: int, group: int, uid: int, gid: int) -> bool:
    if uid == 0:
        return True
    if owner == uid:
        return bool(mode & stat.S_IWUSR and mode & stat.S_IXUSR)
    if group == gid:
        return bool(mode & stat.S_IWGRP and mode & stat.S_IXGRP)
    return bool(mode & stat.S_IWOTH and mode & stat.S_IXOTH)


def results_sources(services: Mapping[str, Any]) -> set[str]:
    """The host side of every bind mount at /results (before interpolation)."""
    return {volume.rsplit(":", 1)[0] for s in services.values() for volume in s.get("volumes", [])
            if isinstance(volume, str) and volume.endswith(f":{RESULTS}")}


def check_results(services: Mapping[str, Any], env: Mapping[str, str], compose_dir: Path) -> list[Finding]:
    """The containers' user (FEDTUNE_UID/GID, 10001) must be able to write the results directory;
    one Docker creates is root's."""
    try:
        uid, gid = int(env.get("FEDTUNE_UID") or UID), int(env.get("FEDTUNE_GID") or UID)
    except ValueError:
        return [Finding("results directory", False, f"FEDTUNE_UID/FEDTUNE_GID {env.get('FEDTUNE_UID')!r}/{env.get('FEDTUNE_GID')!r}: "
                        "expected numbers", "set them to a uid and gid, e.g. `id -u` and `id -g`, and rebuild the images")]
    findings = []
    for source in sorted(results_sources(services)):
        path = Path(interpolate(source, env))
        path = path if path.is_absolute() else compose_dir / path
        # as the user would type it: relative below the working directory, else absolute
        shown = os.path.relpath(path) if path.resolve().is_relative_to(Path.cwd().resolve()) else str(path)
        own = "or build the images as yourself: FEDTUNE_UID=$(id -u) and FEDTUNE_GID=$(id -g) in .env, then `docker compose build`"
        if not path.exists():
            findings.append(Finding("results directory", False, f"{shown} does not exist; Docker would create it owned by root "
                                    f"and uid {uid} could not write there",
                                    f"`sudo install -d -o {uid} -g {gid} -m 0755 {shown}` ({own})"))
            continue
        if not path.is_dir():
            findings.append(Finding("results directory", False, f"{shown} is not a directory", "remove it or set FEDTUNE_RESULTS"))
            continue
        st = path.stat()
        if _writable_by(st.st_mode, st.st_uid, st.st_gid, uid, gid):
            findings.append(Finding("results directory", True, f"{shown} is writable by uid {uid}"))
        else:
            findings.append(Finding("results directory", False,
                                    f"{shown} is owned by uid {st.st_uid}:{st.st_gid} (mode {stat.filemode(st.st_mode)}), "
                                    f"which the containers' user {uid}:{gid} cannot write",
                                    f"`sudo chown {uid}:{gid} {shown}` ({own})"))
    return findings


def check_stack(compose_file: Path, host: Host | None = None) -> list[Finding]:
    """Every check for one generated compose file, in the order `up` would hit them."""
    import yaml

    host = host or Host()
    spec = yaml.safe_load(compose_file.read_text())
    services = spec.get("services", {})
    compose_dir = compose_file.resolve().parent
    env = compose_environment(compose_dir, host.environ)
    docker, info = check_docker(host)
    findings = [docker, check_compose(host)]
    if info is not None and (gpu := check_gpu_runtime(info, services, host)) is not None:
        findings.append(gpu)
    if info is not None and (cache := check_model_cache(str(spec.get("name", compose_dir.name)), services, env, host)) is not None:
        findings.append(cache)
    findings += check_results(services, env, compose_dir)
    return findings


def report(findings: list[Finding], compose_file: Path) -> tuple[str, int]:
    """The printed report and the exit status (1 when anything is missing)."""
    lines = [line for f in findings for line in f.lines()]
    failed = [f for f in findings if not f.ok]
    if failed:
        lines.append(f"{len(failed)} problem(s): fix them before `docker compose -f {compose_file} up`")
    else:
        lines.append(f"this host can run {compose_file}")
    return "\n".join(lines), 1 if failed else 0
