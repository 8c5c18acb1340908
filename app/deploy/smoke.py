"""Driving a compose stack from the host: `docker compose` for the lifecycle, the docker SDK to
inspect containers (state, logs, memory, users), and the CPU smoke run (`fedtune stack smoke`)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.deploy.compose import DEFAULT_NODES, REPO, UID, app_image, compose_spec, render_compose, smoke_spec


SUPERNODE_RESTARTS = 15  # Docker's back-off (0.1 s doubling) spans about a minute by then
AFTER_RUN = ("evaluate", "report")  # one-shot services that start once `run` succeeded, in order


class StackError(RuntimeError):
    """The stack failed; the message says which service and includes its logs."""


def compose_command() -> list[str]:
    """`docker compose` (v2); a clear error when only the old docker-compose 1.x is there."""
    if shutil.which("docker") is None:
        raise StackError("docker is not installed")
    done = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if done.returncode != 0:
        raise StackError("Docker Compose v2 (`docker compose`) is missing: run docker/install-compose.sh")
    return ["docker", "compose"]


@dataclass
class Stack:
    """One compose project, driven with `docker compose` and inspected with the docker SDK."""

    compose_file: Path
    project: str
    env: dict[str, str] = field(default_factory=dict)
    out: Any = sys.stdout

    def __post_init__(self) -> None:
        import docker

        self.client = docker.from_env(timeout=120)
        self.base = [*compose_command(), "-p", self.project, "-f", str(self.compose_file), "--project-directory", str(REPO)]

    def compose(self, *args: str, check: bool = True, capture: bool = False, timeout: float | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [*self.base, *args], env={**os.environ, **self.env}, text=True, timeout=timeout,
            capture_output=capture, stdout=None if capture else self.out, stderr=None if capture else subprocess.STDOUT,
        )
        if check and done.returncode != 0:
            raise StackError(f"`docker compose {' '.join(args)}` failed ({done.returncode})"
                             + (f": {done.stdout[-3000:]}{done.stderr[-3000:]}" if capture else ""))
        return done

    def containers(self, service: str | None = None) -> list:
        labels = [f"com.docker.compose.project={self.project}"]
        if service:
            labels.append(f"com.docker.compose.service={service}")
        return self.client.containers.list(all=True, filters={"label": labels})

    def container(self, service: str):
        found = self.containers(service)
        return found[0] if found else None

    def containers_by_role(self, role: str) -> list:
        labels = [f"com.docker.compose.project={self.project}", f"fedtune.role={role}"]
        return self.client.containers.list(all=True, filters={"label": labels})

    def logs(self, service: str, tail: int = 80) -> str:
        container = self.container(service)
        if container is None:
            return f"(no container for {service})"
        return container.logs(tail=tail, timestamps=False).decode(errors="replace")

    def leftovers(self) -> dict[str, list[str]]:
        """Containers, networks and volumes still labelled with this project."""
        label = {"label": f"com.docker.compose.project={self.project}"}
        return {
            "containers": [c.name for c in self.client.containers.list(all=True, filters=label)],
            "networks": [n.name for n in self.client.networks.list(filters=label)],
            "volumes": [v.name for v in self.client.volumes.list(filters=label)],
        }

    def down(self) -> None:
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", check=False, capture=True, timeout=600)

    def failed_services(self) -> list[tuple[str, str]]:
        """(service, reason) for every container that exited non-zero or restarted. A SuperNode's
        restarts are its designed recovery (a SuperLink too busy to answer its activation in time
        refuses the retry until it has seen the first attempt's heartbeats stop): one fails only
        past SUPERNODE_RESTARTS."""
        bad = []
        for c in self.containers():
            service = c.labels.get("com.docker.compose.service", c.name)
            state, restarts = c.attrs["State"], c.attrs.get("RestartCount", 0)
            if state.get("OOMKilled"):  # whatever its role: its mem_limit is too small for an honest run
                limit = c.attrs.get("HostConfig", {}).get("Memory", 0)
                bad.append((service, f"killed at its memory limit ({limit / 2**20:.0f} MiB; FEDTUNE_MEM_<SERVICE> raises it)"))
            elif c.labels.get("fedtune.role") == "supernode":
                if restarts > SUPERNODE_RESTARTS:
                    bad.append((service, f"restarted {restarts} times"))
            elif state["Status"] == "exited" and state["ExitCode"] != 0:
                bad.append((service, f"exited with code {state['ExitCode']}"))
            elif state.get("Restarting") or restarts > 0:
                bad.append((service, f"restarted {restarts} time(s)"))
        return sorted(bad)

    def wait_exit(self, service: str, deadline: float) -> None:
        """Until `service`'s container exits; StackError if it fails or the deadline passes."""
        while True:
            container = self.container(service)
            if container is not None:
                container.reload()
                if container.status == "exited":
                    if (code := container.attrs["State"]["ExitCode"]) != 0:
                        raise StackError(f"{service} exited with code {code}\n" + self.failure_report([(service, f"exit {code}")]))
                    return
            if time.monotonic() > deadline:
                raise StackError(f"timed out waiting for {service}\n" + self.failure_report(self.failed_services()))
            time.sleep(1)

    def training(self) -> list[str]:
        """SuperNode services running a ClientApp right now: the nodes in the current round."""
        import docker

        found = []
        for c in self.containers_by_role("supernode"):
            try:
                if c.status == "running" and any("flwr-clientapp" in " ".join(p) for p in c.top()["Processes"] or []):
                    found.append(c.labels["com.docker.compose.service"])
            except docker.errors.APIError:  # it stopped between the listing and `top`
                continue
        return sorted(found)

    def crash(self, service: str) -> None:
        """SIGKILL the container's main process from the host, as the OOM killer or a fatal bug
        would: unlike `docker kill` (an operator's stop, which Docker's restart policies ignore by
        design), the service's restart policy then applies. Needs the host's root."""
        container = self.container(service)
        container.reload()
        os.kill(container.attrs["State"]["Pid"], signal.SIGKILL)

    def restarts(self, role: str) -> dict[str, int]:
        return {c.labels["com.docker.compose.service"]: c.attrs.get("RestartCount", 0) for c in self.containers_by_role(role)}

    def failure_report(self, failed: list[tuple[str, str]]) -> str:
        services = [s for s, _ in failed][:4]
        # the coordinator's side too: a run that fails while nothing exited is usually explained there
        services += [s for s in ("run", "superlink", "serverapp") if s not in services]
        parts = [f"failing: {', '.join(f'{s} ({why})' for s, why in failed) or 'none exited; see run'}",
                 f"host load average (1, 5, 15 min): {' '.join(f'{x:.1f}' for x in os.getloadavg())}",
                 "containers: " + ", ".join(self._state(c) for c in self.containers() if c.labels.get("fedtune.role") != "supernode")]
        for service in services:
            parts.append(f"----- logs of {service} (last 80 lines) -----\n{self.logs(service)}")
        return "\n".join(parts)

    @staticmethod
    def _state(container) -> str:
        state = container.attrs["State"]
        health = state.get("Health", {}).get("Status")
        return (f"{container.labels.get('com.docker.compose.service', container.name)} {state['Status']}"
                f"{f' ({health})' if health else ''}{f' restarts {r}' if (r := container.attrs.get('RestartCount', 0)) else ''}")

    def phases(self, since: float) -> dict[str, float]:
        """Seconds from `since` (a time.time()) to each step of the start-up, from container state."""

        def at(stamp: str | None) -> float | None:
            if not stamp or stamp.startswith("0001-"):
                return None
            from datetime import datetime

            head, _, frac = stamp.rstrip("Z").partition(".")
            return datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}+00:00").timestamp() - since

        marks: dict[str, float] = {}
        nodes = []
        for c in self.containers():
            service, state = c.labels.get("com.docker.compose.service", c.name), c.attrs["State"]
            if service in ("certs", "model-cache", "register") and at(state.get("FinishedAt")) is not None:
                marks[f"{service} done"] = at(state["FinishedAt"])
            if service == "superlink":
                marks["superlink started"] = at(state.get("StartedAt"))
            if service == "register":
                # Compose starts `register` once the SuperLink's healthcheck passes (Docker keeps
                # only the last five health probes, so the first success is not on record).
                marks["superlink healthy (register started)"] = at(state.get("StartedAt"))
            if service.startswith("supernode-"):
                nodes.append(at(state.get("StartedAt")))
        if nodes and None not in nodes:
            marks["first supernode started"], marks["last supernode started"] = min(nodes), max(nodes)
        return {k: round(v, 1) for k, v in sorted(marks.items(), key=lambda kv: kv[1]) if v is not None}

    def memory_mib(self, containers: list) -> dict[str, dict[str, float]]:
        """Per container, in MiB: `stats`, as `docker stats` shows it (usage less inactive page
        cache), and `anonymous`, what the processes themselves hold (cgroup v1 total_rss, v2 anon)."""
        sizes: dict[str, dict[str, float]] = {}

        def one(c) -> None:
            mem = c.stats(stream=False).get("memory_stats", {})
            detail = mem.get("stats", {})
            cache = detail.get("total_inactive_file", detail.get("inactive_file", 0))
            sizes[c.labels.get("com.docker.compose.service", c.name)] = {
                "stats": (mem.get("usage", 0) - cache) / 2**20,
                "anonymous": detail.get("total_rss", detail.get("anon", 0)) / 2**20,
            }

        threads = [threading.Thread(target=one, args=(c,)) for c in containers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sizes


@dataclass
class SmokeResult:
    run_exit_code: int
    up_seconds: float  # `up` until the run service saw every SuperNode online
    total_seconds: float
    results_dir: Path
    run_dirs: list[Path]
    idle_memory_mib: dict[str, dict[str, float]]  # service -> Stack.memory_mib's figures
    users: dict[str, set[str]]  # service -> uids its processes ran as (host view, `docker top`)
    leftovers: dict[str, list[str]]
    log: str = ""
    phases: dict[str, float] = field(default_factory=dict)  # seconds after `up` (see Stack.phases)
    supernode_restarts: dict[str, int] = field(default_factory=dict)


def _ensure_results_dir(path: Path, uid: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid == uid:
        return
    if os.geteuid() == 0:
        os.chown(path, uid, uid)
        return
    if st.st_mode & 0o002:
        return
    raise StackError(f"{path} must be writable by the containers' uid {uid}: `sudo chown {uid} {path}`, "
                     f"or build the images with FEDTUNE_UID=$(id -u) (see docs/docker.md)")


def _image_uid(stack: Stack, image: str) -> int:
    import docker

    try:
        user = stack.client.images.get(image).attrs["Config"].get("User") or "0"
    except docker.errors.ImageNotFound:
        return int(os.environ.get("FEDTUNE_UID", UID))
    return int(user.split(":")[0]) if user.split(":")[0].isdigit() else UID


def smoke(
    nodes: int = DEFAULT_NODES, rounds: int = 2, results: Path | None = None, project: str = "fedtune-smoke",
    timeout: float = 1200.0, build: bool = False, keep: bool = False, check=None, out=sys.stdout, secure_aggregation: bool = False,
) -> SmokeResult:
    """Bring the stack up with the tiny profile and no GPU, run `rounds` rounds, tear it down.

    `check(stack)` (tests) runs while the finished stack is still up. Raises StackError with the
    failing service's logs if anything fails; the stack is torn down either way unless `keep`.
    """
    spec = smoke_spec(nodes, rounds, project)
    services = list(compose_spec(spec)["services"])
    work = Path(tempfile.mkdtemp(prefix="fedtune-stack-"))
    compose_file = work / "compose.smoke.yaml"
    compose_file.write_text(render_compose(spec))
    results = Path(results or REPO / "results").resolve()
    env = {"FEDTUNE_RESULTS": str(results), "FEDTUNE_SECURE_AGGREGATION": str(secure_aggregation).lower()}
    stack = Stack(compose_file, project, env=env, out=out)
    _ensure_results_dir(results, _image_uid(stack, app_image()))
    before = {p.name for p in results.glob("run-*")}
    stack.down()  # leftovers of an earlier, interrupted smoke run
    started, wall = time.monotonic(), time.time()
    up_seconds, idle, run, phases, restarts = None, {}, None, {}, {}
    try:
        if build:
            stack.compose("build")
        # Everything up to `run` first: `up --detach` would wait for `run` to finish before it
        # returns if it also had to start the services after it (evaluate, report).
        stack.compose("up", "--detach", "--quiet-pull", *(s for s in services if s not in AFTER_RUN), timeout=timeout)
        deadline = started + timeout
        seen = ""
        while True:
            failed = [f for f in stack.failed_services() if f[0] != "run"]
            if failed:
                raise StackError(stack.failure_report(failed))
            run = stack.container("run")
            if run is not None:
                run.reload()
                log = run.logs().decode(errors="replace")
                for line in log[len(seen):].splitlines():
                    print(f"run | {line}", file=out, flush=True)
                seen = log
                if up_seconds is None and f"SuperNodes online: {nodes}/{nodes}" in log:
                    up_seconds = time.monotonic() - started
                    idle = stack.memory_mib(stack.containers_by_role("supernode"))
                if run.status == "exited":
                    break
            if time.monotonic() > deadline:
                raise StackError(f"timed out after {timeout:.0f} s\n" + stack.failure_report(stack.failed_services()))
            time.sleep(1)
        code = run.attrs["State"]["ExitCode"]
        if code != 0:
            raise StackError(f"the run service exited with code {code}\n" + stack.failure_report(stack.failed_services()))
        for service in AFTER_RUN:  # what depends_on does in `docker compose up`, one step at a time
            stack.compose("up", "--detach", "--no-deps", service, timeout=max(deadline - time.monotonic(), 1))
            stack.wait_exit(service, deadline)
            print(f"{service} | " + stack.logs(service, tail=40).rstrip().replace("\n", f"\n{service} | "), file=out, flush=True)
        users = {
            c.labels["com.docker.compose.service"]: {row[0] for row in c.top(ps_args="-o uid,pid,comm")["Processes"]}
            for c in stack.containers() if c.status == "running"
        }
        phases, restarts = stack.phases(wall), stack.restarts("supernode")
        if up_seconds is not None:
            phases["all supernodes online (seen by run)"] = round(up_seconds, 1)
        if check is not None:
            check(stack)
        total = time.monotonic() - started
    finally:
        if not keep:
            stack.down()
            shutil.rmtree(work, ignore_errors=True)
    run_dirs = sorted(p for p in results.glob("run-*") if p.name not in before)
    return SmokeResult(code, up_seconds or float("nan"), total, results, run_dirs, idle, users, stack.leftovers(), seen, phases,
                       {k: v for k, v in restarts.items() if v})
