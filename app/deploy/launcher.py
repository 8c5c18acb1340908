"""`fedtune local up`: the whole federation as separate OS processes on one host (no Docker).

SuperLink (one HTTP port for the Fleet, Control and Runtime APIs), a SuperExec running the
ServerApp, and N SuperNodes (node i: partition i, GPU i mod G) each with its resident trainer.
It submits the run, shows per-round progress, exits with the run's status and leaves no
process behind, also on Ctrl-C or when a component dies. `fedtune run` is the submit-and-follow
half alone, for a federation that is already up (the compose stack's `run` service).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, suppress
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

from app.deploy.certs import CertPaths, ensure_certs, flower_tls_args
from app.config import ASSIGNED_GPU_ENV, ConfigError, Settings, load_settings, parse_overrides, with_explicit_keys
from app.node.fab_allowlist import ALLOWED_FABS_ENV, own_fab_sha256
from app.node.flwr_patches import GPU_POLL_SECONDS, POLL_ENV
from app.node.lifeline import die_with_parent
from app.results.metrics import read_jsonl_from
from app.evaluation.run_eval import add_eval_options, failures_by_reason
from app.node.read_policy import READ_DIRS_ENV, run_reads

APP_DIR = Path(__file__).resolve().parents[2]  # holds pyproject.toml: what `flwr run` builds
FEDERATION = "fedtune"
POLL_SECONDS = 2.0
# Restart policy for components that die: back-off 1, 2, 4, 5, 5 ... s (short: a killed node's
# restarts are refused for up to a minute, and it should rejoin as soon as it may); a crash loop
# is more than MAX_QUICK_FAILURES exits in a row, each within STABLE_SECONDS of its start.
RESTART_DELAY_MAX = 5.0
STABLE_SECONDS = 120.0
MAX_QUICK_FAILURES = 30
# Seconds `fedtune` waits for a SuperLink that does not answer (restarting, or too busy on a small
# host) before it gives up following the run; the run itself goes on on the SuperLink meanwhile.
SUPERLINK_PATIENCE = 600.0
# Seconds a SuperLink that nobody listens for (connection refused, unknown host) may take to
# appear before `fedtune run` says so: a wrong address fails in seconds, not after --connect-timeout.
UNREACHABLE_SECONDS = 15.0
# Seconds a submitted run may stay `pending`/`starting` (no ServerApp has begun it, e.g. a SuperExec
# refused for a wrong secret and restarting forever) before `fedtune run` gives up and stops it.
PENDING_TIMEOUT = 600.0
PENDING_TIMEOUT_ENV = "FEDTUNE_PENDING_TIMEOUT"
NOT_STARTED = ("pending", "starting")


class LaunchError(RuntimeError):
    """A component failed; the message says which and where its log is."""


class FlwrError(LaunchError):
    """The `flwr` CLI answered with an error: `flwr_message` is its own text."""

    def __init__(self, command: str, flwr_message: str) -> None:
        self.flwr_message = flwr_message
        super().__init__(f"`flwr {command}`: {flwr_message}")


def free_port() -> int:
    """A port free now. Flower binds its ports itself (no inherited socket), so another process
    may take it before Flower binds it: start_superlink and SuperNode restarts (a fresh port each
    start) detect that and draw again. What remains: a port taken between a SuperLink's crash
    and its restart on the same port (the nodes know that address) ends in a crash loop."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Flower 1.42 settings of the ServerApp's SuperExec unless the environment sets them (BENCHMARKS.md,
# "Transport (issue 16)", has the measured effect; benchmarks/bench_transport.py toggles them). Not
# the SuperNodes' own SuperExecs: 20 of them polling over TLS every 0.1 s starved a 2-core host.
FLOWER_SETTINGS = {
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",  # the SuperExec picks up a submitted run within 0.1 s, not 1 s
}


def flower_env(flwr_home: Path) -> dict[str, str]:
    return {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def serverapp_env(env: dict[str, str]) -> dict[str, str]:
    """The ServerApp's SuperExec: FLOWER_SETTINGS, unless the environment sets them."""
    return {**FLOWER_SETTINGS, **env}


def write_cli_config(flwr_home: Path, address: str, root_certificates: str | None) -> None:
    """The `flwr` CLI reads SuperLink connections from $FLWR_HOME/config.toml."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    tls = f'root-certificates = "{root_certificates}"' if root_certificates else "insecure = true"
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\naddress = "{address}"\n{tls}\n'
    )


def flwr_json(args: list[str], env: dict[str, str], timeout: float = 60) -> Any:
    try:
        done = subprocess.run(["flwr", *args, "--format", "json"], env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LaunchError(f"`flwr {' '.join(args)}` did not answer within {timeout:.0f} s") from None
    try:
        reply = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise LaunchError(f"`flwr {' '.join(args)}` failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}") from None
    if isinstance(reply, dict) and reply.get("success") is False:
        # flwr prefixes its error with what it was doing ("Using SuperLink: ...\n Listing all
        # nodes...\n\n"); the last paragraph is the error itself
        text = str(reply.get("error-message", reply)).strip()
        raise FlwrError(" ".join(args), " ".join(text.rsplit("\n\n", 1)[-1].split()))
    return reply


def node_statuses(env: dict[str, str]) -> dict[str, int]:
    """How many SuperNodes the SuperLink knows per status (online, registered, offline ...)."""
    reply = flwr_json(["supernode", "list", FEDERATION], env)
    counts: dict[str, int] = {}
    for node in reply.get("nodes", []):
        status = str(node.get("status", "unknown"))
        counts[status] = counts.get(status, 0) + 1
    return counts


def online_nodes(env: dict[str, str]) -> int:
    return node_statuses(env).get("online", 0)


def run_row(run_id: str, env: dict[str, str]) -> dict[str, Any]:
    """The run's row of `flwr ls --run-id` (status, status-details, pending-at ...)."""
    runs = flwr_json(["ls", FEDERATION, "--run-id", run_id], env).get("runs", [])
    return runs[0] if runs else {"status": "unknown"}


def run_status(run_id: str, env: dict[str, str]) -> str:
    return str(run_row(run_id, env).get("status", "unknown"))


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise LaunchError(f"--superlink {address!r}: expected host:port")
    return host.strip("[]"), int(port)


def probe_superlink(address: str, root_certificates: str | None, timeout: float = 5.0) -> tuple[str, str] | None:
    """Why a SuperLink that flwr calls "unavailable" is so, as (kind, reason): `unreachable`
    (nothing listens there, unknown host) or `tls` (its certificate is not from
    `root_certificates`, it does not speak TLS, or it does and --insecure was given); None when a
    TLS session can be set up as configured (the cause is elsewhere: flwr's message says it)."""
    host, port = _split_address(address)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        return "unreachable", f"cannot connect to {address}: {exc.strerror or exc}"
    with sock:
        if root_certificates:
            try:
                context = ssl.create_default_context(cafile=root_certificates)
            except (OSError, ssl.SSLError) as exc:
                return "tls", f"cannot read --root-certificates {root_certificates}: {exc}"
        else:  # --insecure: does the SuperLink speak TLS all the same?
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        try:
            with context.wrap_socket(sock, server_hostname=host):
                pass
        except TimeoutError:
            return None  # it listens but is too busy to answer in time: not a TLS problem
        except ssl.SSLCertVerificationError as exc:
            return "tls", (f"the SuperLink's certificate at {address} does not verify against --root-certificates "
                           f"{root_certificates} ({exc.verify_message}): use the CA that issued it (ca.crt of its certificates)")
        except (ssl.SSLError, OSError) as exc:
            if root_certificates:
                return "tls", f"no TLS session with {address} ({exc}): is the SuperLink running with --insecure?"
            return None  # a plaintext SuperLink, as --insecure expects
        if not root_certificates:
            return "tls", f"the SuperLink at {address} serves TLS: give --root-certificates (its CA) instead of --insecure"
    return None


@dataclass
class Federation:
    """Processes started by the launcher, each in its own session so it can be stopped whole."""

    log_dir: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    # name -> (command maker, env): each (re)start makes the command anew (a SuperNode draws a new port)
    commands: dict[str, tuple[Callable[[], list[str]], dict[str, str]]] = field(default_factory=dict)
    started: dict[str, float] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)
    quick_failures: dict[str, int] = field(default_factory=dict)
    pending: dict[str, float] = field(default_factory=dict)  # name -> when to restart it
    watchers: list[Callable[[], None]] = field(default_factory=list)  # called at each check (progress from logs)

    def start(self, name: str, command: list[str] | Callable[[], list[str]], env: dict[str, str]) -> None:
        make = command if callable(command) else lambda: command
        log = open(self.log_dir / f"{name}.log", "ab")
        # Own session: a terminal's Ctrl-C reaches the launcher only, which stops them in order.
        # SIGTERM when the launcher dies, even by SIGKILL (OOM killer), so nothing is orphaned.
        self.processes[name] = subprocess.Popen(
            make(), env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
        log.close()
        self.commands[name], self.started[name] = (make, env), time.monotonic()

    def check(self, essential: tuple[str, ...], out=None) -> None:
        """Raise if an essential component exited; restart any other (SuperLink, SuperNode) that
        did, after a back-off: a killed SuperNode is refused until the SuperLink has seen its
        heartbeats stop (up to a minute), so its first restarts may fail fast."""
        out = out or sys.stdout
        for watch in self.watchers:
            watch()
        now = time.monotonic()
        for name, proc in list(self.processes.items()):
            if name in self.pending:
                if now >= self.pending[name]:
                    del self.pending[name]
                    self.restarts[name] = self.restarts.get(name, 0) + 1
                    print(f"{name} restarted (restart {self.restarts[name]})", file=out, flush=True)
                    self.start(name, *self.commands[name])
                continue
            code = proc.poll()
            if code is None:
                continue
            if name in essential:
                raise LaunchError(f"{name} exited with code {code}; see {self.log_dir / (name + '.log')}:\n{self.tail(name)}")
            # Its session may outlive it (flower-supernode, ClientApp, trainer): stop it whole first.
            _signal_group(proc, signal.SIGKILL)
            quick = now - self.started[name] < STABLE_SECONDS
            self.quick_failures[name] = self.quick_failures.get(name, 0) + 1 if quick else 0
            if self.quick_failures[name] > MAX_QUICK_FAILURES:
                raise LaunchError(f"{name} keeps exiting (code {code}, {MAX_QUICK_FAILURES} quick restarts); see {self.log_dir / (name + '.log')}:\n{self.tail(name)}")
            delay = min(RESTART_DELAY_MAX, 2.0 ** self.quick_failures[name])
            print(f"{name} exited with code {code}; restarting it in {delay:.0f} s", file=out, flush=True)
            self.pending[name] = now + delay

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every process and its descendants (some start their own sessions), then SIGKILL."""
        import psutil

        # The launcher's own children too: a `flwr ls` that a Ctrl-C caught while it was being
        # started has no Popen object left to kill it, and outlived the launcher under load.
        tree = psutil.Process().children(recursive=True)
        for proc in self.processes.values():
            try:
                tree += [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        tree = list(dict.fromkeys(tree))  # each once (psutil.Process hashes by pid and start time)
        for proc in self.processes.values():
            _signal_group(proc, signal.SIGTERM)
        for proc in tree:
            with suppress(psutil.NoSuchProcess):
                proc.terminate()
        _, alive = psutil.wait_procs(tree, timeout=grace)
        for proc in alive:
            with suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)
        for proc in self.processes.values():
            proc.wait()
        self.processes.clear()


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except ProcessLookupError:
        pass


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # SIGHUP: the SSH session dropped


def _raise_on_stop_signals() -> dict[int, Any]:
    """The first Ctrl-C, SIGTERM or SIGHUP stops the federation; later ones are ignored, so
    they cannot break off the stop half-way and leave processes behind. Returns the handlers
    it replaced."""
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}

    def handler(signum, _frame):
        _ignore_stop_signals()
        raise KeyboardInterrupt(f"signal {signum}")

    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)
    return previous


def _ignore_stop_signals() -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def start_superlink(federation: Federation, command: Callable[[int], list[str]], env: dict[str, str], attempts: int = 5,
                    timeout: float = 120.0) -> int:
    """Start the SuperLink on a free port and return the port once it listens there; if another
    process took the port first (Flower binds it itself), try another one."""
    import psutil

    for _ in range(attempts):
        port = free_port()
        federation.start("superlink", command(port), env)
        proc, deadline = federation.processes["superlink"], time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            with suppress(psutil.Error):
                if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in psutil.Process(proc.pid).net_connections("tcp")):
                    return port
            time.sleep(0.2)
        log = federation.tail("superlink")
        if proc.poll() is None:
            raise LaunchError(f"superlink did not listen on port {port} within {timeout:.0f} s; see {federation.log_dir / 'superlink.log'}:\n{log}")
        if "already in use" not in log:
            raise LaunchError(f"superlink exited with code {proc.returncode}; see {federation.log_dir / 'superlink.log'}:\n{log}")
        print(f"superlink: port {port} was taken by another process; trying another", flush=True)
    raise LaunchError(f"superlink: {attempts} free ports were taken before it could bind them")


def follow_run(run_id: str, env: dict[str, str], run_dir: Path, federation: Federation | None, essential: tuple[str, ...], out=None,
               pending_timeout: float = PENDING_TIMEOUT) -> str:
    """Print one line per finished round until the run ends; return its final status. A run that
    no ServerApp has begun (`pending`/`starting`) after `pending_timeout` seconds is stopped and
    reported with what `flwr ls` says of it."""
    out = out or sys.stdout  # looked up per call: a default bound at import outlives a replaced stdout
    metrics = run_dir / "metrics.jsonl"
    offset, lines_read, skipped, answered = 0, 0, 0, time.monotonic()
    submitted = answered
    while True:
        if federation:
            federation.check(essential)
        try:
            status = run_status(run_id, env)
            answered = time.monotonic()
        except LaunchError as exc:  # the SuperLink restarting (flwr_json also turns timeouts into this): wait for it
            silent = time.monotonic() - answered
            if silent > SUPERLINK_PATIENCE:
                raise LaunchError(f"SuperLink unreachable for {silent:.0f} s: {exc}") from None
            print(f"warning: no answer from the SuperLink for {silent:.0f} s (giving up after {SUPERLINK_PATIENCE:.0f} s): {exc}",
                  file=out, flush=True)
            status = "unknown"
        if status in NOT_STARTED and answered - submitted > pending_timeout:
            raise LaunchError(_not_started(run_id, answered - submitted, env))
        if metrics.exists():
            chunk = read_jsonl_from(metrics, offset, lines_read + 1)
            offset, lines_read = chunk.end, lines_read + chunk.lines
            for problem in chunk.bad:
                skipped += 1
                print(f"warning: skipped {problem} ({skipped} skipped so far)", file=out, flush=True)
            for r in chunk.records:
                print(_round_line(r, metrics), file=out, flush=True)
        if status.startswith("finished"):
            if metrics.exists() and metrics.stat().st_size > offset:
                print(f"warning: skipped {metrics}'s unfinished last line (line {lines_read + 1})", file=out, flush=True)
            return status
        time.sleep(POLL_SECONDS)


def _not_started(run_id: str, waited: float, env: dict[str, str]) -> str:
    """Why a run never began, and the attempt to stop it (so it does not start unattended later)."""
    try:
        row = run_row(run_id, env)
    except LaunchError as exc:
        row = {"status": f"unknown ({exc})"}
    try:
        flwr_json(["stop", run_id, FEDERATION], env)
        stopped = "stopped it"
    except LaunchError as exc:
        stopped = f"could not stop it ({exc})"
    seen = {k: row[k] for k in ("status", "status-details", "pending-at", "starting-at") if row.get(k)}
    return (f"run {run_id} was not begun by any ServerApp within {waited:.0f} s (--pending-timeout, {PENDING_TIMEOUT_ENV}); "
            f"`flwr ls` says: {json.dumps(seen)}; {stopped}. Is the ServerApp's SuperExec running and accepted by the "
            "SuperLink (its secret)? `docker compose logs serverapp superlink`")


def _round_line(r: dict[str, Any], metrics: Path) -> str:
    """The round's line, then a line per node failure reason this run has not shown before."""
    try:
        loss = "skipped    " if r["train_loss"] is None else f"loss {r['train_loss']:.4f}"
        line = (f"round {r['round']:>3}: {loss}  clients {len(r['clients'])}"
                f"  failures {r['failures']}  {r['bytes_round'] / 2**20:8.2f} MiB"
                f"  (total {r['cumulative_mib']:.2f} MiB)  {r['round_seconds']:.1f} s" + _privacy_note(r))
    except (KeyError, TypeError, ValueError) as exc:  # a record of another version, or edited by hand
        line = f"round {r.get('round', '?')}: (record in {metrics} lacks or mistypes a field: {type(exc).__name__}: {exc})"
    return "\n".join([line, *new_failure_lines(r, metrics)])


def _privacy_note(r: dict[str, Any]) -> str:
    """The run's epsilon so far, when differential privacy is on (app/privacy/accountant.py)."""
    if "dp_delta" not in r:
        return ""
    return f"  epsilon {r['dp_epsilon']:.3g} (delta {r['dp_delta']:g})" if r["dp_epsilon"] is not None else "  epsilon: no guarantee"


def new_failure_lines(record: dict[str, Any], metrics: Path) -> list[str]:
    """`  <node> failed: <reason>` for each reason of `record` that no earlier round of the run
    had. Earlier rounds come from metrics.jsonl itself (a few KB a round), so this holds no state
    across calls and a resumed run does not repeat the reasons of the rounds it continues."""
    if not record.get("failed") or not isinstance(record.get("round"), int):
        return []
    earlier = [r for r in read_jsonl_from(metrics).records if isinstance(r.get("round"), int) and r["round"] < record["round"]] \
        if metrics.exists() else []
    seen = failures_by_reason(earlier)
    lines = []
    for reason, nodes in failures_by_reason([record]).items():
        if reason not in seen:
            more = f" (and {len(nodes) - 1} more node{'s' * (len(nodes) > 2)})" if len(nodes) > 1 else ""
            lines.append(f"  {nodes[0]}{more} failed: {reason}")
    return lines


def submit(env: dict[str, str], run_config: dict[str, Any], app_dir: Path = APP_DIR) -> str:
    items = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
    reply = flwr_json(["run", str(app_dir), FEDERATION, "--run-config", items], env, timeout=300)
    if not reply.get("success"):
        raise LaunchError(f"run submission failed: {reply}")
    return str(reply["run-id"])


def wait_for_nodes(expected: int, env: dict[str, str], federation: Federation | None, essential: tuple[str, ...], timeout: float,
                   out=None, *, address: str | None = None, root_certificates: str | None = None,
                   unreachable_seconds: float | None = None) -> None:
    """Wait until `expected` SuperNodes are online. With `address`, a SuperLink that cannot be
    reached at all fails within `unreachable_seconds` and a TLS mismatch at once, each with
    flwr's own message; otherwise the error names the SuperNodes and what the SuperLink knows."""
    out = out or sys.stdout
    unreachable_seconds = UNREACHABLE_SECONDS if unreachable_seconds is None else unreachable_seconds
    started = time.monotonic()
    deadline, last, count, error, reached = started + timeout, -1, 0, None, False
    while True:
        try:  # a SuperLink still starting, or a host too busy to answer in time: ask again
            count, error, reached = online_nodes(env), None, True
        except LaunchError as exc:
            error = exc
            if address is not None and isinstance(exc, FlwrError):
                if (problem := probe_superlink(address, root_certificates)) is not None:
                    kind, reason = problem
                    if kind == "tls":
                        raise LaunchError(f"TLS with the SuperLink failed: {reason}. flwr: {exc.flwr_message}") from None
                    if not reached and time.monotonic() - started > unreachable_seconds:
                        raise LaunchError(f"the SuperLink is unreachable: {reason} (for {time.monotonic() - started:.0f} s); "
                                          f"check --superlink and that the SuperLink is up. flwr: {exc.flwr_message}") from None
        if count >= expected:
            break
        if federation:
            federation.check(essential)
        if count != last:
            print(f"SuperNodes online: {count}/{expected}", file=out, flush=True)
            last = count
        if time.monotonic() > deadline:
            raise LaunchError(f"only {count} of {expected} SuperNodes connected within {timeout:.0f} s; "
                              + (_known_nodes(env) if reached else "the SuperLink never answered")
                              + (f"; last error: {error}" if error else ""))
        time.sleep(POLL_SECONDS)
    print(f"SuperNodes online: {count}/{expected}", file=out, flush=True)


def _known_nodes(env: dict[str, str]) -> str:
    """What the SuperLink knows of the nodes that are not online, for a too-few-nodes error."""
    try:
        statuses = node_statuses(env)
    except (LaunchError, OSError) as exc:
        return f"the SuperLink answered before ({exc} now)"
    known = ", ".join(f"{n} {status}" for status, n in sorted(statuses.items()) if status != "online")
    if not known:
        return "the SuperLink answers and knows no other SuperNode (are their keys registered?); see the SuperNodes' logs"
    return (f"the SuperLink answers and also knows {known} (registered: its key is known but it never connected; "
            "offline: it stopped sending heartbeats); see those SuperNodes' logs")


def build_run_config(profile: str, rounds: int | None, data: str | None, results: Path, extra: str, resume_from: str = "") -> dict[str, Any]:
    config: dict[str, Any] = {"profile": profile, "results.dir": str(results.resolve())}
    if rounds is not None:
        config["num-server-rounds"] = rounds
    if data:
        config["dataset.path"] = str(Path(data).resolve())
    config.update(parse_overrides(extra))
    if resume_from:
        config["resume-from"] = resume_from
    return with_explicit_keys(config)


def check_resume(run_config: dict[str, Any], results: Path) -> str | None:
    """Resolve `resume-from` (`latest`: the checkpoint saved last under `results`) to an absolute
    path, since the ServerApp runs elsewhere; a checkpoint that cannot continue this run is
    refused (the reason returned) before anything starts."""
    from app.results.checkpoint import CheckpointError, latest_checkpoint, load_resume_point

    if not (wanted := run_config.get("resume-from")):
        return None
    try:
        path = latest_checkpoint(results) if wanted == "latest" else Path(wanted)
        run_config["resume-from"] = str(path.resolve())
        load_resume_point(path, load_settings(run_config).flat())
    except CheckpointError as exc:
        return str(exc)
    return None


def _one_line(text: str) -> str:
    """A multi-line message (a list under a heading) as one line."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return "".join(line + ("" if i == len(lines) - 1 else " " if line.endswith(":") else "; ") for i, line in enumerate(lines))


def check_results_dir(results: Path) -> str | None:
    """Why `--results` cannot hold this run's outputs, or None (checked before anything starts)."""
    try:
        results.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=results):
            pass
    except OSError as exc:
        return f"--results {results}: cannot write there ({exc.strerror or exc}); expected a directory you may write to"
    return None


def check_training_data(settings: Settings, data_flag: str | None) -> str | None:
    """Why the run's own dataset file (`--data`, or `dataset.path` in --run-config) cannot be
    trained on, or None; read with the nodes' own code, before any process starts."""
    from app.training.data import DataError, check_dataset_file

    if not settings.dataset.path:
        return None
    flag = "--data" if data_flag else "--run-config dataset.path"
    try:
        check_dataset_file(Path(settings.dataset.path))
    except DataError as exc:
        return f"{flag}: {exc}"
    return None


def check_local_up(args) -> tuple[dict[str, Any], Settings] | str:
    """The run config and settings of `fedtune local up`, or the one line that says which flag or
    file is wrong and what was expected."""
    try:
        run_config = build_run_config(args.profile, args.rounds, args.data, Path(args.results), args.run_config, args.resume_from)
        settings = load_settings(run_config)
        if settings.dataset.num_partitions != args.supernodes and "dataset.num-partitions" not in run_config:
            run_config["dataset.num-partitions"] = args.supernodes  # one partition per SuperNode
            settings = load_settings(run_config)
        check_privacy(settings)
    except ConfigError as exc:  # the flags are checked by argparse: what is left came with --run-config
        return f"--run-config: {_one_line(exc)}"
    gpus = gpu_ids(args.gpus)
    if gpus:  # issue 7: refuse before anything starts when the nodes' models do not fit
        from app.deploy.gpu_plan import choose_placement

        refused, placement = choose_placement(settings, args.supernodes, gpus, "trainer.placement" not in run_config)
        if refused is not None:
            return f"--gpus {args.gpus}: {_one_line(refused)}"
        if placement != settings.trainer.placement:  # the plan chose device placement: the run and its nodes say so
            run_config = with_explicit_keys({**run_config, "trainer.placement": placement})
            settings = load_settings(run_config)
    if (refused := check_resume(run_config, Path(args.results))) is not None:
        refused = _one_line(refused)
        return f"--{refused}" if refused.startswith("resume-from") else f"--resume-from {args.resume_from}: {refused}"
    if (refused := check_training_data(settings, args.data)) is not None:
        return refused
    # last: it makes the directory, which a refused launch leaves alone
    if (refused := check_results_dir(Path(args.results).resolve())) is not None:
        return refused
    return run_config, settings


def check_privacy(settings: Settings) -> None:
    """The ServerApp's refusal of differential privacy without a weight cap, before anything starts
    (the ServerApp would fail before writing a summary, so the launch could not say why)."""
    if settings.privacy.noise_multiplier == 0:
        return  # spares the CLI the ServerApp's imports
    from app.privacy.central import require_weight_cap
    from app.server_app import known_weight_cap

    require_weight_cap(settings, known_weight_cap(settings))


def gpu_ids(text: str) -> list[str]:
    return [g.strip() for g in text.split(",") if g.strip()] if text else []


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value <= 0:
            import argparse

            raise argparse.ArgumentTypeError(f"expected a positive {'integer' if kind is int else 'number'}, got {text!r}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _gpu_list(text: str) -> str:
    """`0,1,3` (or GPU UUIDs, as CUDA_VISIBLE_DEVICES takes them)."""
    import argparse
    import re

    if not all(re.fullmatch(r"\d+|(GPU|MIG)-[0-9A-Za-z/-]+", g.strip()) for g in text.split(",") if g.strip()):
        raise argparse.ArgumentTypeError(f"expected comma-separated GPU ids like 0,1,2 (or GPU UUIDs), got {text!r}")
    return text


class Progress:
    """`label k/n` while a phase runs: redrawn in place on a terminal, else a line at the first
    and last step and at most one every `every` seconds between."""

    def __init__(self, label: str, total: int, out=None, every: float = 10.0) -> None:
        self.label, self.total, self.every = label, total, every
        self.out = out or sys.stdout
        self.tty = self.out.isatty()
        self.last = -every

    def step(self, done: int, note: str = "") -> None:
        text = f"{self.label}: {done}/{self.total}{note}"
        if self.tty:
            print("\r" + text, end="\n" if done >= self.total else "", file=self.out, flush=True)
        elif done in (1, self.total) or time.monotonic() - self.last >= self.every:
            print(text, file=self.out, flush=True)
            self.last = time.monotonic()


class NodeLogWatcher:
    """Shows the model-loading lines of the SuperNodes' and device trainers' logs (app/training/worker.py
    writes them): on a big model that is minutes in which the run shows no round yet."""

    def __init__(self, log_dir: Path, names: list[str], out=None) -> None:
        self.logs = {name: log_dir / f"{name}.log" for name in names}
        self.offsets = dict.fromkeys(self.logs, 0)
        self.out = out or sys.stdout

    def __call__(self) -> None:
        from app.training.worker import MODEL_LOG_PREFIX

        for name, path in self.logs.items():
            try:
                with open(path, "rb") as handle:
                    handle.seek(self.offsets[name])
                    data = handle.read()
            except OSError:
                continue
            complete = data[: data.rfind(b"\n") + 1]
            self.offsets[name] += len(complete)
            for line in complete.decode("utf-8", "replace").splitlines():
                if MODEL_LOG_PREFIX in line:
                    print(f"{name}: {line.split(MODEL_LOG_PREFIX, 1)[1].strip()}", file=self.out, flush=True)


def local_up(args) -> int:
    checked = check_local_up(args)
    if isinstance(checked, str):
        print(f"fedtune: {checked}", file=sys.stderr)
        return 2
    run_config, settings = checked
    gpus = gpu_ids(args.gpus)
    if args.insecure:
        print("WARNING: --insecure: Flower APIs run without TLS or SuperNode authentication", file=sys.stderr)

    results = Path(args.results).resolve()
    # Flower state, CLI config and logs of this launch; every process gets FLWR_HOME inside it.
    # A fresh directory per launch (mkdtemp): two launches in one second share nothing.
    (results / ".local").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=results / ".local"))
    log_dir = work / "logs"
    log_dir.mkdir()
    print(f"logs: {log_dir}", flush=True)
    env = flower_env(work / "flwr-home")
    # The nodes' own app is this installation's: hashed once, here, while the SuperLink starts, and
    # listed for them, instead of by each node's first ClientApp (flwr's build walks the whole
    # checkout: ~4 s with a .venv in it on a 2-core host, per node).
    pool = ThreadPoolExecutor(1)
    own_app = pool.submit(own_fab_sha256)
    pool.shutdown(wait=False)  # the hash is still computed; read before the nodes start
    # a local launch is its own site: its nodes may read what its command line names
    env[READ_DIRS_ENV] = os.pathsep.join([*(str(Path(v).expanduser().resolve().parent) for _, v in run_reads(settings)),
                                          os.environ.get(READ_DIRS_ENV, "")])
    # Keys live outside the results directory, which users archive and share: a private (0700)
    # directory of their own, removed on exit unless --keep-keys.
    keys = None if args.insecure else Path(tempfile.mkdtemp(prefix="fedtune-keys-"))
    if keys is not None:
        started = time.monotonic()
        paths = ensure_certs(keys, ["127.0.0.1"], num_supernodes=args.supernodes)
        print(f"certificates: a CA, the SuperLink's and {args.supernodes} SuperNode keys ({time.monotonic() - started:.0f} s)", flush=True)
    else:
        paths = None
    security = _INSECURE if paths is None else _secure(paths)
    federation = Federation(log_dir)
    trainers = DeviceTrainers.issue(settings, run_config, args.supernodes, gpus) if device_placement(settings) else None
    federation.watchers.append(NodeLogWatcher(log_dir, [*(trainers.names() if trainers else []),
                                                        *(f"supernode-{i}" for i in range(args.supernodes))]))
    # The SuperLink restarts on its state database and the SuperNodes reconnect by themselves;
    # the SuperExec holds the ServerApp: if it dies the run is lost (resume-from continues it).
    essential = ("superexec",)
    previous_handlers = _raise_on_stop_signals()
    status, run_dir = "not started", None
    try:
        port = start_superlink(
            federation,
            lambda port: ["flower-superlink", *security["superlink"], "--host", "127.0.0.1", "--port", str(port),
                          "--database", str(work / "state.db"), "--disable-runtime-dependency-installation"],
            env,
        )
        address = f"127.0.0.1:{port}"
        print(f"SuperLink: listening on {address}", flush=True)
        write_cli_config(work / "flwr-home", address, security["root"])
        federation.start("superexec", ["flower-superexec", *security["superexec"], "--runtime-api-address", address], serverapp_env(env))
        if trainers is not None:
            trainers.start(federation, env)
        if paths is not None:  # only registered keys may join: register before the nodes start
            register_nodes(paths, args.supernodes, address, env)
        listed = " ".join(filter(None, [env.get(ALLOWED_FABS_ENV, "").strip(), own_app.result()]))
        for i in range(args.supernodes):
            node_env = dict(env, FLWR_HOME=str(work / f"node-{i}"))
            node_env[ALLOWED_FABS_ENV] = listed
            if gpus:
                node_env["CUDA_VISIBLE_DEVICES"] = node_env[ASSIGNED_GPU_ENV] = gpus[i % len(gpus)]
                node_env.setdefault(POLL_ENV, GPU_POLL_SECONDS)  # set empty: Flower's own 3 s (app/node/flwr_patches.py)
            federation.start(
                f"supernode-{i}",
                lambda i=i: [sys.executable, "-m", "app.cli", "supernode", *(trainers.node_args(i) if trainers else []), "--",
                             *security["supernode"](i), "--superlink", address,
                             "--port", str(free_port()),  # drawn anew at each restart: one taken meanwhile is left behind
                             "--node-config", f"partition-id={i} num-partitions={settings.dataset.num_partitions}"],
                node_env,
            )
        wait_for_nodes(args.supernodes, env, federation, essential, args.connect_timeout)
        run_id = submit(env, run_config)
        run_dir = results / f"run-{run_id}"
        print(f"run {run_id} submitted; results in {run_dir}", flush=True)
        status = follow_run(run_id, env, run_dir, federation, essential)
        print(f"run {run_id}: {status}", flush=True)
    except LaunchError as exc:
        print(f"fedtune: {exc}", file=sys.stderr)
        status = "failed"
    except KeyboardInterrupt:
        status = "interrupted"
        with suppress(OSError):  # after SIGHUP the terminal is gone
            print("fedtune: interrupted; stopping the federation (further signals are ignored)", file=sys.stderr)
    finally:
        _ignore_stop_signals()
        federation.stop()
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        if keys is not None and args.keep_keys:
            print(f"keys kept in {keys} (private; remove them when done)", flush=True)
        elif keys is not None:
            shutil.rmtree(keys, ignore_errors=True)
        if trainers is not None:
            trainers.remove()
    if run_dir is not None and status.startswith("finished"):  # the federation is down: its GPUs are free for the evaluation
        from app.evaluation.run_eval import finish_run

        return finish_run(run_dir, args, gpus, status)
    return 1


def device_placement(settings: Settings) -> bool:
    return settings.trainer.resident and settings.trainer.placement == "device"


@dataclass
class DeviceTrainers:
    """With trainer.placement=device: one `fedtune trainer` per device used (GPU i mod G, or the
    CPU), each with the registry of its own nodes' tokens, all in a private (0700) directory
    removed at exit. A trainer that exits is restarted like a SuperNode (Federation.check); one
    that hangs or whose trainer process dies is restarted by its own watchdog."""

    root: Path
    devices: list[str]  # "cpu" or the GPU ids, one trainer each
    node_device: list[str]  # the device of node i

    @classmethod
    def issue(cls, settings: Settings, run_config: dict[str, Any], nodes: int, gpus: list[str]) -> DeviceTrainers:
        from app.training.node_tokens import Binding, issue_tokens

        node_device = [gpus[i % len(gpus)] if gpus else "cpu" for i in range(nodes)]
        trainers = cls(Path(tempfile.mkdtemp(prefix="fedtune-trainers-")), list(dict.fromkeys(node_device)), node_device)
        parts = settings.dataset.num_partitions
        for device in trainers.devices:
            # preload: each trainer loads the run's model while the SuperNodes start (not in round 1's way)
            issue_tokens(trainers.directory(device), {i: Binding(i, parts) for i, d in enumerate(node_device) if d == device},
                         preload=run_config)
        return trainers

    @staticmethod
    def name(device: str) -> str:
        return "trainer-cpu" if device == "cpu" else f"trainer-gpu{device}"

    def names(self) -> list[str]:
        return [self.name(d) for d in self.devices]

    def directory(self, device: str) -> Path:
        return self.root / self.name(device)

    def socket(self, device: str) -> Path:
        return self.directory(device) / "trainer.sock"

    def node_args(self, node: int) -> list[str]:
        device = self.node_device[node]
        return ["--trainer-socket", str(self.socket(device)), "--trainer-token", str(self.directory(device) / f"token-{node}")]

    def start(self, federation: Federation, env: dict[str, str]) -> None:
        for device in self.devices:
            trainer_env = dict(env)
            if device != "cpu":
                trainer_env["CUDA_VISIBLE_DEVICES"] = trainer_env[ASSIGNED_GPU_ENV] = device
            federation.start(self.name(device), [sys.executable, "-m", "app.cli", "trainer", "--socket", str(self.socket(device)),
                                                 "--registry", str(self.directory(device) / "registry.json")], trainer_env)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


_INSECURE: dict[str, Any] = {
    "superlink": ["--insecure", "--isolation", "process"],
    "superexec": ["--insecure"],
    "supernode": lambda i: ["--insecure"],
    "root": None,
}


def _secure(paths: CertPaths) -> dict[str, Any]:
    """TLS on every Flower API and SuperNode authentication, from app.deploy.certs' one definition."""
    return {
        "superlink": flower_tls_args("superlink", paths, isolation="process"),
        "superexec": flower_tls_args("superexec-serverapp", paths),
        "supernode": lambda i: flower_tls_args("supernode", paths, i),
        "root": str(paths.ca_cert.resolve()),
    }


def register_nodes(paths: CertPaths, count: int, address: str, env: dict[str, str], timeout: float = 300) -> None:
    """Register the public keys of SuperNodes 0..count-1 in one `fedtune stack register` process
    (the Compose stack's register step, app/deploy/stack.py): one Python start for all keys
    instead of one `flwr supernode register` per key, which took ~4 s each on a busy 2-core host
    (80 s of a 20-node start-up). It retries while the SuperLink starts; a key already
    registered counts as registered."""
    command = [sys.executable, "-m", "app.cli", "stack", "register", "--superlink", address, "--certs", str(paths.directory),
               "--nodes", str(count), "--timeout", str(timeout)]
    progress, done, lines = Progress("SuperNode keys registered", count), 0, []
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=die_with_parent(signal.SIGTERM))
    for line in proc.stdout:
        lines.append(line)
        if ": registered" in line or ": already registered" in line:
            done += 1
            progress.step(done)
    if proc.wait() != 0 or done < count:
        raise LaunchError(f"could not register the SuperNode keys ({done} of {count}): {''.join(lines)[-1000:]}")


def run_submit(args) -> int:
    """`fedtune run`: wait for the federation, submit, follow (for the compose `run` service)."""
    try:
        run_config = build_run_config(args.profile, args.rounds, None, Path(args.results), args.run_config, args.resume_from)
        settings = load_settings(run_config)
        # the nodes and the run agree on the partitions: --nodes sets them unless the run config
        # does, and by default the run's partitions say how many nodes to wait for
        if args.nodes is not None and "dataset.num-partitions" not in run_config:
            run_config["dataset.num-partitions"] = args.nodes
            settings = load_settings(run_config)
        nodes = settings.dataset.num_partitions if args.nodes is None else args.nodes
        check_privacy(settings)
        pending_timeout = _pending_timeout(args.pending_timeout)
        _split_address(args.superlink)
    except (ConfigError, LaunchError) as exc:
        print(f"fedtune: {exc}", file=sys.stderr)
        return 2
    if (refused := check_resume(run_config, Path(args.results))) is not None:
        print(f"fedtune: {refused}", file=sys.stderr)
        return 2
    if not (args.insecure or args.root_certificates):
        print("fedtune: --root-certificates is required (or --insecure, which disables TLS)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="fedtune-run-"))
    env = flower_env(work / "flwr-home")
    write_cli_config(work / "flwr-home", args.superlink, args.root_certificates)
    try:
        wait_for_nodes(nodes, env, None, (), args.connect_timeout, address=args.superlink, root_certificates=args.root_certificates)
        run_id = submit(env, run_config)
        print(f"run {run_id} submitted", flush=True)
        status = follow_run(run_id, env, Path(args.results).resolve() / f"run-{run_id}", None, (), pending_timeout=pending_timeout)
    except LaunchError as exc:
        print(f"fedtune: {exc}", file=sys.stderr)
        return 1
    print(f"run {run_id}: {status}", flush=True)
    return 0 if status == "finished:completed" else 1


def _pending_timeout(flag: float | None) -> float:
    """--pending-timeout, else FEDTUNE_PENDING_TIMEOUT, else PENDING_TIMEOUT seconds."""
    if flag is None:
        text = os.environ.get(PENDING_TIMEOUT_ENV, "").strip()
        try:
            flag = float(text) if text else PENDING_TIMEOUT
        except ValueError:
            raise LaunchError(f"{PENDING_TIMEOUT_ENV}={text!r}: expected seconds, e.g. {PENDING_TIMEOUT:.0f}") from None
    if not flag > 0:
        raise LaunchError(f"--pending-timeout / {PENDING_TIMEOUT_ENV} {flag}: expected seconds above 0")
    return flag


def _common(parser) -> None:
    from app.config import PROFILES, SEED_PROFILE

    parser.add_argument("--profile", default=SEED_PROFILE, choices=sorted(PROFILES),
                        help="what to train: `tiny` (a 2-layer model on the CPU, no downloads; minutes) or "
                             "`bio-medical-llama3-8b` (the FlowerTune seed recipe: the 8B model in 4 bits, one GPU per few nodes)")
    parser.add_argument("--rounds", type=_positive(int), help="federated rounds (default: the profile's, 10 for the seed recipe)")
    parser.add_argument("--results", default="results", help="directory for the run's outputs (run-<id>/, and .local/ for logs)")
    parser.add_argument("--run-config", default="", metavar='"KEY=VALUE ..."',
                        help="more settings, e.g. \"strategy.fraction-train=0.5 train.seq-length=256\" (README, Configuration)")
    parser.add_argument("--connect-timeout", type=_positive(float), default=600.0, metavar="SECONDS",
                        help="how long to wait for every SuperNode to connect")
    parser.add_argument("--resume-from", default="", metavar="PEFT_DIR|latest",
                        help="continue a stopped run from a checkpoint <results>/run-<id>/peft_<round>; `latest`: the one "
                             "saved last under --results (empty: a new run)")


def register(subparsers) -> None:
    local = subparsers.add_parser("local", help="run the whole federation as processes on this machine",
                                  description="Run the whole federation as processes on this machine.")
    local = local.add_subparsers(dest="local_command", required=True, title="commands")
    up = local.add_parser("up", help="start SuperLink, ServerApp and N SuperNodes; train; evaluate; report; stop",
                          description="Start a SuperLink, the ServerApp and N SuperNodes on this machine, run the federated "
                                      "training, evaluate the final adapter, write the report, and stop everything. "
                                      "Try: fedtune local up --profile tiny --supernodes 2 --rounds 1")
    _common(up)
    up.add_argument("--supernodes", "--nodes", type=_positive(int), default=20, dest="supernodes",
                    help="SuperNodes (hospitals) to start; node i trains on partition i of the data")
    up.add_argument("--gpus", type=_gpu_list, default="", metavar="IDS",
                    help="comma-separated GPU ids; node i uses GPU i mod G (default: none, train on the CPU)")
    up.add_argument("--data", metavar="FILE",
                    help="training data: a .json, .jsonl or .parquet file with `input` and `output` columns, split "
                         "into one partition per SuperNode (default: the profile's dataset)")
    up.add_argument("--insecure", action="store_true", help="no TLS, no SuperNode authentication (prints a warning); both are on by default")
    up.add_argument("--no-eval", action="store_true", help="skip the evaluation of the final adapter (the report is still written)")
    add_eval_options(up, prefix="eval-")
    up.add_argument("--keep-keys", action="store_true", help="keep this launch's CA and keys (a private temporary directory) after exit")
    up.set_defaults(func=local_up)

    run = subparsers.add_parser("run", help="submit a run to a running federation and follow it",
                                description="Submit a run to a federation that is already up (e.g. the Compose stack) and follow it.")
    _common(run)
    run.add_argument("--superlink", required=True, help="SuperLink Control API address, host:port")
    run.add_argument("--supernodes", "--nodes", dest="nodes", type=_positive(int),
                     help="wait for this many SuperNodes before submitting; sets dataset.num-partitions "
                          "unless --run-config does (default: the run's dataset.num-partitions)")
    run.add_argument("--root-certificates", help="CA certificate of the SuperLink (omit only with --insecure)")
    run.add_argument("--insecure", action="store_true", help="connect without TLS (only to a SuperLink started with --insecure)")
    run.add_argument("--pending-timeout", type=float, metavar="SECONDS",
                     help=f"stop and fail a run that no ServerApp has begun after this long (default: {PENDING_TIMEOUT_ENV}, "
                          f"else {PENDING_TIMEOUT:.0f})")
    run.set_defaults(func=run_submit)
