"""The resident trainer: one long-lived process per SuperNode that keeps the base model loaded.

Flower 1.42 starts a fresh ClientApp process for every message; importing torch and loading a
4-bit 8B model each round costs more than the round's training. `fedtune supernode -- ARGS`
runs `flower-supernode ARGS` and a trainer process as children; the trainer serves a Unix socket
in a 0700 directory (only this node's user can reach it; the peer's uid is checked too). A
trainer that dies or stops answering is restarted (see _Watchdog); a round it was running falls
back to in-process training. The ClientApp finds the socket through
`FEDTUNE_TRAINER_SOCKET`, which every process under the SuperNode inherits, and hands it the
round. torch is imported on the first request only, so an idle node stays small, and the
ClientApp side needs only numpy (arrays travel as safetensors-numpy). When the
SuperNode exits (or the wrapper is signalled) both stop.

Wire format, both directions: u64 length + JSON header, u64 length + safetensors bytes.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from app.node.lifeline import die_with_parent

log = logging.getLogger(__name__)

SOCKET_ENV = "FEDTUNE_TRAINER_SOCKET"
_LEN = struct.Struct("!Q")


class TrainerUnavailable(ConnectionError):
    """The resident trainer cannot be reached; the caller falls back to in-process training."""


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    chunks, remaining = [], size
    while remaining:
        chunk = conn.recv(min(remaining, 1 << 20))
        if not chunk:
            raise ConnectionError("peer closed the connection mid-message")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def send_message(conn: socket.socket, header: dict[str, Any], tensors: dict | None = None) -> None:
    payload = b""
    if tensors:  # imported here, not at the top: the SuperNode wrapper (pings only) stays small
        import numpy as np
        from safetensors.numpy import save

        payload = save({k: np.ascontiguousarray(v) for k, v in tensors.items()})
    head = json.dumps(header).encode()
    conn.sendall(_LEN.pack(len(head)) + head + _LEN.pack(len(payload)))
    if payload:  # an empty send after a quick reply (a ping's) would meet a closed peer: EPIPE
        conn.sendall(payload)


def recv_message(conn: socket.socket) -> tuple[dict[str, Any], dict]:
    header = json.loads(_recv_exact(conn, _LEN.unpack(_recv_exact(conn, _LEN.size))[0]))
    size = _LEN.unpack(_recv_exact(conn, _LEN.size))[0]
    if not size:
        return header, {}
    from safetensors.numpy import load

    return header, load(_recv_exact(conn, size))


# --- client side (inside the ClientApp process) -------------------------------------------


def _connect(path: str, timeout: float, wait: bool) -> socket.socket:
    """A connection to the trainer's socket; with `wait`, a missing or refusing socket (a trainer
    being restarted after a crash: the watchdog unlinks the old socket, the new process binds it
    within seconds) is tried again until `timeout` has passed."""
    deadline = time.monotonic() + timeout
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(max(deadline - time.monotonic(), CONNECT_RETRY_SECONDS))
        try:
            conn.connect(path)
            return conn
        except OSError as exc:
            conn.close()
            not_listening = isinstance(exc, (FileNotFoundError, ConnectionRefusedError))
            if not (wait and not_listening) or time.monotonic() + CONNECT_RETRY_SECONDS > deadline:
                raise
        time.sleep(CONNECT_RETRY_SECONDS)


def call_trainer(path: str, header: dict[str, Any], tensors: dict | None, connect_timeout: float, read_timeout: float | None = None,
                 *, wait_for_restart: bool = False):
    """Send one request; TrainerUnavailable if the trainer cannot be reached, dies mid-way, or
    does not answer in time (a hung trainer: its watchdog kills it; the caller trains
    in-process meanwhile). With `wait_for_restart` (a ClientApp's work request), a trainer that
    is not listening is waited for up to `connect_timeout`: one restarting after a crash is back
    in seconds, and training in-process meanwhile would load a second model beside it. A work
    request waits its turn in the trainer's queue: while it waits the trainer says so every
    QUEUE_HEARTBEAT_SECONDS, and only QUEUE_SILENCE_SECONDS without a word count as a hang.
    `read_timeout` counts from the moment its turn starts (the trainer's `started`), not from
    the send; the trainer learns the deadline too."""
    try:
        conn = _connect(path, connect_timeout, wait_for_restart)
    except OSError as exc:
        raise TrainerUnavailable(f"resident trainer at {path}: {exc}") from exc
    try:
        conn.settimeout(QUEUE_SILENCE_SECONDS if read_timeout is None else min(read_timeout, QUEUE_SILENCE_SECONDS))
        send_message(conn, dict(header, timeout=read_timeout), tensors)
        while True:
            reply, reply_tensors = recv_message(conn)
            if "queued" in reply:
                continue
            if reply.get("started"):
                conn.settimeout(read_timeout)
                continue
            break
    except OSError as exc:  # ConnectionError, FileNotFoundError, timeouts
        raise TrainerUnavailable(f"resident trainer at {path}: {exc}") from exc
    finally:
        conn.close()
    if reply.get("unavailable"):
        raise TrainerUnavailable(f"resident trainer at {path}: {reply['unavailable']}")
    if "error" in reply:
        raise RuntimeError(f"resident trainer failed: {reply['error']}")
    return reply, reply_tensors


def request_timeout(settings, op: str) -> float:
    """Seconds a resident trainer may take for one request before it counts as hung: loading the
    model (`trainer.load-seconds`, also paid by the first round of a restarted trainer) plus,
    for a round, `trainer.step-seconds` per optimizer step (max-steps x gradient-accumulation).
    Both defaults are several times the measured figures (BENCHMARKS.md), so only a trainer that
    stopped making progress reaches them."""
    if op != "train":
        return settings.trainer.load_seconds
    args = settings.train.training_arguments
    return settings.trainer.load_seconds + args.max_steps * args.gradient_accumulation_steps * settings.trainer.step_seconds


# --- server side (the resident process) ---------------------------------------------------


class TrainerServer:
    """Serves work requests (init, train) one at a time in arrival order, each connection in its
    own thread, and answers `ping` at once even while one runs: the watchdog asks whether it is
    alive and whether the running request is past the deadline its ClientApp gave it. A request
    that waits its turn is told so every QUEUE_HEARTBEAT_SECONDS (a ClientApp that gave up
    leaves the queue when that send fails) and `started` when its turn comes: its deadline runs
    from then. With a `registry` (device placement, app/training/device_trainer.py) a request's
    node is the one its token is registered for, whatever the request says."""

    def __init__(self, path: Path, placement: str = "node", registry=None) -> None:
        self.path = path
        self.registry, self.placement = registry, placement
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.is_socket():
            path.unlink()  # left by a killed predecessor
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        os.chmod(path, 0o600)
        self._sock.listen(64)  # every SuperNode of a GPU may hand in its round at once
        # Wake up twice a second: a Python signal handler runs only when the main thread runs
        # bytecode, and a blocking accept() may never return (torch's threads can take the signal).
        self._sock.settimeout(0.5)
        self._worker = None  # created (torch imported) on the first request
        self._stopping = threading.Event()
        self._turns = threading.Condition()
        self._queue: collections.deque[object] = collections.deque()  # tickets of waiting requests, first = running
        self._busy: tuple[float, float | None] | None = None  # (turn started, timeout) of the running request
        self._device_reported = False

    def serve_forever(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                break  # closed by stop()
            conn.settimeout(None)
            threading.Thread(target=self._serve_connection, args=(conn,), daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    def _serve_connection(self, conn: socket.socket) -> None:
        with conn:
            self._handle(conn)

    def _handle(self, conn: socket.socket) -> None:
        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        if uid != os.getuid():
            log.warning("refused a trainer connection from uid %d", uid)
            return
        try:
            header, tensors = recv_message(conn)
        except (OSError, ValueError) as exc:
            log.warning("unreadable trainer request: %s", exc)
            return
        reply, reply_tensors = self._answer(conn, header, tensors)
        if reply is None:
            return  # its ClientApp left the queue
        try:
            send_message(conn, reply, reply_tensors)
        except OSError as exc:
            log.warning("could not reply to the ClientApp: %s", exc)
        if header.get("op") == "train":
            self._release_when_idle()

    def _release_when_idle(self) -> None:
        """Give the round's cached GPU memory back once nobody waits (in a turn of its own, after
        the reply went out: not on the round's critical path). A request that is already queued
        trains in the same memory instead of allocating it again."""
        with self._turns:
            if self._queue or self._worker is None:
                return
            ticket = object()
            self._queue.append(ticket)
        try:
            self._worker.release_memory()
        finally:
            self._leave_queue(ticket)

    def _answer(self, conn: socket.socket, header: dict[str, Any], tensors: dict):
        if header.get("op") == "ping":
            return self._health(), None
        try:
            node = self.registry.node_for(header.get("token")) if self.registry is not None else None
        except (PermissionError, ValueError) as exc:  # an unknown token, a data-path the site does not allow
            log.warning("refused a trainer request: %s", exc)
            return {"error": str(exc)}, None
        if not self._wait_for_turn(conn):
            return None, None
        self._busy = (time.monotonic(), header.get("timeout"))
        try:
            reply, reply_tensors = self._dispatch(header, tensors, node)
            reply["trainer_id"] = self.trainer_id
            self._report_device()
        except Exception as exc:  # report to the ClientApp, keep serving
            log.exception("resident trainer request failed")
            reply, reply_tensors = {"error": f"{type(exc).__name__}: {exc}"}, None
        finally:
            self._busy = None
            self._leave_queue(self._queue[0])
        return reply, reply_tensors

    @property
    def trainer_id(self) -> str:
        return trainer_id(self.placement, os.getpid())  # not in __init__: it imports pydantic, an idle node stays small

    def preload(self, run_config: dict[str, Any]) -> None:
        """Load the run's model now, in the first turn, while the SuperNodes connect: a device
        trainer's launcher knows the run, so its first request need not wait for the load.
        Requests that come meanwhile queue behind it; a failure leaves the load to them."""
        from app.config import load_settings

        ticket = object()
        with self._turns:
            self._queue.append(ticket)
        self._busy = (time.monotonic(), None)

        def load() -> None:
            try:
                self._busy = (self._busy[0], request_timeout(load_settings(run_config), "init"))
                self._dispatch({"op": "init", "run_config": run_config}, {})
                self._report_device()
            except Exception:  # noqa: BLE001 - the first request loads it and reports why it cannot
                log.exception("preloading the model failed; the first request loads it")
            finally:
                self._busy = None
                self._leave_queue(ticket)

        threading.Thread(target=load, daemon=True).start()

    def _wait_for_turn(self, conn: socket.socket) -> bool:
        """Queue this request; tell its ClientApp where it stands until its turn, then `started`.
        False when the ClientApp is gone meanwhile (it gave up, or fell back in-process)."""
        ticket = object()
        with self._turns:
            self._queue.append(ticket)
            try:
                while self._queue[0] is not ticket:
                    send_message(conn, {"queued": self._queue.index(ticket)})
                    self._turns.wait(QUEUE_HEARTBEAT_SECONDS)
                send_message(conn, {"started": True})
                return True
            except OSError:
                self._leave_queue(ticket)
                return False

    def _leave_queue(self, ticket: object) -> None:
        with self._turns:
            self._queue.remove(ticket)
            self._turns.notify_all()

    def _health(self) -> dict[str, Any]:
        busy, waiting = self._busy, max(0, len(self._queue) - 1)
        if busy is None:
            return {"ok": True, "busy_seconds": 0.0, "overdue": False, "waiting": waiting}
        elapsed, timeout = time.monotonic() - busy[0], busy[1]
        return {"ok": True, "busy_seconds": elapsed, "overdue": timeout is not None and elapsed > timeout + OVERDUE_GRACE_SECONDS,
                "waiting": waiting}

    def _report_device(self) -> None:
        """Once, after the first request put the model on its device: the physical GPU this
        process computes on (pid, CUDA_VISIBLE_DEVICES, UUID, PCI bus id), for the node's log."""
        if self._device_reported or "torch" not in sys.modules:
            return
        from app.deploy.gpu_plan import DEVICE_LOG_PREFIX, describe_cuda_device

        self._device_reported = True
        print(DEVICE_LOG_PREFIX + json.dumps(describe_cuda_device()), file=sys.stderr, flush=True)

    def _dispatch(self, header: dict[str, Any], tensors: dict, registered=None):
        from app.training.worker import NodeData, RoundWorker, TrainRequest

        if self._worker is None:
            self._worker = RoundWorker()
        if header["op"] == "init":
            return {"ok": True}, self._worker.initial_adapter(header["run_config"])
        if header["op"] == "train":
            request = TrainRequest(
                run_config=header["run_config"],
                node=registered or NodeData(**header["node"]),
                server_round=header["server_round"],
                lr=header["lr"],
                proximal_mu=header["proximal_mu"],
            )
            adapter, metrics = self._worker.train(request, tensors, release_memory=False)  # _release_when_idle
            return {"metrics": metrics}, adapter
        raise ValueError(f"unknown trainer op {header['op']!r}")


def trainer_id(placement: str, pid: int | None) -> str:
    """`placement:device:process` of whoever trains a round, for metrics.jsonl and the report:
    e.g. `device:gpu0:4242`, `node:cpu:77`, `node:gpu1:in-process` (the ClientApp itself)."""
    from app.config import ASSIGNED_GPU_ENV  # not at the top: the SuperNode wrapper stays without pydantic

    gpu = os.environ.get(ASSIGNED_GPU_ENV, "").strip()
    return f"{placement}:{'gpu' + gpu if gpu else 'cpu'}:{pid if pid is not None else 'in-process'}"


# Queue: a waiting request hears from the trainer every QUEUE_HEARTBEAT_SECONDS; a ClientApp that
# hears nothing for QUEUE_SILENCE_SECONDS before its turn counts the trainer as hung.
QUEUE_HEARTBEAT_SECONDS = 2.0
QUEUE_SILENCE_SECONDS = 30.0
CONNECT_RETRY_SECONDS = 0.1
TRAINER_START_SECONDS = 60.0
# Watchdog (in the SuperNode wrapper): ping the trainer every WATCHDOG_SECONDS; kill and restart
# it when PING_MISSES pings in a row get no answer within PING_TIMEOUT_SECONDS (it hangs so hard
# that its ping thread cannot run), or when its running request is OVERDUE_GRACE_SECONDS past the
# deadline its ClientApp gave it (request_timeout; the ClientApp has given up and trains in-process).
WATCHDOG_SECONDS = 10.0
PING_TIMEOUT_SECONDS = 20.0
PING_MISSES = 3
OVERDUE_GRACE_SECONDS = 30.0
RESTART_RETRY_SECONDS = 30.0  # after a failed restart; rounds train in-process meanwhile
SUPERNODE_STOP_SECONDS = 15.0  # flower-supernode's grace after a forwarded stop signal


def serve(socket_path: str, registry_path: str | None = None) -> None:
    """The resident trainer process: serve `socket_path` until SIGTERM, which ends it at once,
    also in the middle of a round (its ClientApp then trains in-process). With a registry it is
    a device trainer (app/training/device_trainer.py)."""
    registry = None
    if registry_path:
        from app.training.node_tokens import NodeRegistry

        registry = NodeRegistry.load(Path(registry_path))
    server = TrainerServer(Path(socket_path), "device" if registry else "node", registry)
    if registry is not None and registry.preload is not None:
        server.preload(registry.preload)

    def stop(*_):
        server.stop()
        with contextlib.suppress(OSError):
            os.unlink(socket_path)
        os._exit(0)  # not sys.exit: a round running in another thread would keep the process alive

    signal.signal(signal.SIGTERM, stop)
    server.serve_forever()


def _start_trainer(socket_path: str, registry_path: str | None = None) -> subprocess.Popen:
    """A trainer process, returned once it answers a ping; one that does not is killed."""
    if os.path.exists(socket_path):
        os.unlink(socket_path)  # a dead predecessor's: wait for the new one's
    # SIGKILL when the wrapper dies, even by SIGKILL: an orphaned trainer holds its GPU memory.
    command = [sys.executable, "-m", "app.training.trainer_service", "serve", socket_path, *([registry_path] if registry_path else [])]
    trainer = subprocess.Popen(command, preexec_fn=die_with_parent(signal.SIGKILL))
    deadline = time.monotonic() + TRAINER_START_SECONDS
    while not _answers(socket_path):
        if (code := trainer.poll()) is not None or time.monotonic() > deadline:
            _kill(trainer)
            why = f"exited with code {code}" if code is not None else f"did not answer within {TRAINER_START_SECONDS:.0f} s (killed)"
            raise RuntimeError(f"resident trainer {why} while starting; socket {socket_path}")
        time.sleep(0.05)
    return trainer


def _answers(socket_path: str) -> dict[str, Any] | None:
    """The trainer's health reply, or None if it does not answer in time."""
    try:
        reply, _ = call_trainer(socket_path, {"op": "ping"}, None, PING_TIMEOUT_SECONDS, PING_TIMEOUT_SECONDS)
    except (TrainerUnavailable, RuntimeError):
        return None
    return reply


def _kill(proc: subprocess.Popen, grace: float = 0.0) -> None:
    if proc.poll() is None and grace:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


class _Watchdog:
    """Keeps one trainer process alive and answering; see WATCHDOG_SECONDS."""

    def __init__(self, socket_path: str, registry_path: str | None = None) -> None:
        self.socket_path, self.registry_path = socket_path, registry_path
        self.trainer: subprocess.Popen | None = _start_trainer(socket_path, registry_path)
        self.misses, self.next_check = 0, time.monotonic() + WATCHDOG_SECONDS

    def check(self) -> None:
        now = time.monotonic()
        if self.trainer is not None and self.trainer.poll() is not None:
            self._restart(f"resident trainer exited with code {self.trainer.returncode}")
            return
        if now < self.next_check:
            return
        self.next_check = now + WATCHDOG_SECONDS
        if self.trainer is None:
            self._restart("no resident trainer (its restart failed)")
            return
        health = _answers(self.socket_path)
        self.misses = 0 if health else self.misses + 1
        if self.misses >= PING_MISSES:
            self._restart(f"resident trainer did not answer {PING_MISSES} pings within {PING_TIMEOUT_SECONDS:.0f} s each")
        elif health and health["overdue"]:
            self._restart(f"resident trainer busy for {health['busy_seconds']:.0f} s, past its request's deadline")

    def _restart(self, why: str) -> None:
        _say(f"{why}; restarting it")
        if self.trainer is not None:
            _kill(self.trainer)
        self.trainer, self.misses = None, 0
        try:
            self.trainer = _start_trainer(self.socket_path, self.registry_path)
        except RuntimeError as exc:  # rounds train in-process until a later attempt works
            _say(f"{exc}; retrying in {RESTART_RETRY_SECONDS:.0f} s, rounds train in-process meanwhile")
            self.next_check = time.monotonic() + RESTART_RETRY_SECONDS

    def stop(self) -> None:
        if self.trainer is not None:
            _kill(self.trainer, grace=10)


def _say(message: str) -> None:
    log.warning(message)
    print(f"fedtune: {message}", file=sys.stderr, flush=True)


def run_supernode(flower_args: list[str], socket_path: str | None = None, token_file: str | None = None) -> int:
    """Run `flower-supernode flower_args` with a resident trainer process beside it; restart the
    trainer if it dies or hangs (its ClientApp meanwhile trains in-process); stop both together.
    With `token_file`, `socket_path` is a device trainer's (app/training/device_trainer.py),
    started and watched by whoever started this node: no trainer of its own."""
    # Before torch is imported here or in a ClientApp child: several trainers sharing one GPU
    # must not strand memory in fragments (the 3.5 GiB logits change size every step).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    # `--gpus` ids are nvidia-smi's indices (what the launcher's memory plan reads): make CUDA
    # number the GPUs the same way rather than fastest-first.
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    from app.node.clientapp_forkserver import ForkServerKeeper, supernode_environment
    from app.node.clientapp_forkserver import enabled as forkserver_enabled
    from app.node.fab_allowlist import TaskCommandGate, superexec_elsewhere
    from app.node.flwr_patches import PatchRefused, supernode_command

    if superexec_elsewhere(flower_args):
        _say("refusing --isolation process: a separate SuperExec would start bundles outside this node's "
             "bundle allowlist; fedtune supernode runs its own (--isolation subprocess)")
        return 2
    try:
        command = supernode_command(os.environ)  # Flower's own, or with shorter waits (app/node/flwr_patches.py)
    except PatchRefused as exc:
        _say(str(exc))
        return 2
    private_dir = None
    if token_file is not None and socket_path is None:
        _say("--trainer-token needs --trainer-socket (the device trainer's socket)")
        return 2
    if socket_path is None:
        private_dir = tempfile.mkdtemp(prefix="fedtune-trainer-")  # mode 0700
        socket_path = os.path.join(private_dir, "trainer.sock")
    Path(socket_path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # ClientApp bundles the site approved, no other task (app/node/fab_allowlist.py); ClientApps
    # started warm by a fork server unless FEDTUNE_CLIENTAPP_FORKSERVER=0 (app/node/clientapp_forkserver.py).
    gate = TaskCommandGate.install(forkserver=forkserver_enabled(os.environ))
    watchdog = _Watchdog(socket_path) if token_file is None else None
    child = forkserver = None
    try:
        env = dict(os.environ, **{SOCKET_ENV: socket_path}, **gate.env)
        if token_file is not None:
            from app.training.node_tokens import TOKEN_ENV

            env[TOKEN_ENV] = os.path.abspath(token_file)
        if gate.forkserver_command is not None:  # one environment for the SuperNode, its shims and the fork server
            env = supernode_environment(env)
            forkserver = ForkServerKeeper(gate.forkserver_command, env)
        # SIGTERM when the wrapper dies: it stops its own SuperExec and ClientApps.
        child = subprocess.Popen([*command, *flower_args], env=env, preexec_fn=die_with_parent(signal.SIGTERM))

        stop_requested: list[float] = []

        def forward(signum, _frame):
            child.send_signal(signum)
            stop_requested.append(time.monotonic())

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, forward)
        while (code := child.poll()) is None:
            if stop_requested and time.monotonic() - stop_requested[0] > SUPERNODE_STOP_SECONDS:
                child.kill()  # it ignored the signal: nobody else may be left to kill it (launcher gone)
            if watchdog is not None:
                watchdog.check()
            if forkserver is not None:
                forkserver.check()
            time.sleep(0.5)
    finally:
        if child is not None:  # also when the wrapper itself fails: never leave the SuperNode behind
            _kill(child, grace=10)
        if forkserver is not None:  # after the SuperNode: a ClientApp still running gets SIGTERM
            forkserver.stop()
        if watchdog is not None:
            watchdog.stop()
        gate.close()
        if private_dir:
            shutil.rmtree(private_dir, ignore_errors=True)
        elif watchdog is not None and os.path.exists(socket_path):
            os.unlink(socket_path)
    return code


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "supernode",
        help="run flower-supernode with a resident trainer beside it",
        description="fedtune supernode [--trainer-socket PATH [--trainer-token FILE]] -- <flower-supernode arguments>",
    )
    parser.add_argument("--trainer-socket", help="socket path (default: a private temporary directory)")
    parser.add_argument("--trainer-token", metavar="FILE",
                        help="use the device trainer at --trainer-socket (`fedtune trainer`) with this node's token file "
                             "instead of a trainer of its own")
    parser.add_argument("flower_args", nargs=argparse.REMAINDER, help="arguments for flower-supernode")
    parser.set_defaults(func=lambda args: run_supernode(_strip_dashdash(args.flower_args), args.trainer_socket,
                                                                args.trainer_token))


def _strip_dashdash(args: list[str]) -> list[str]:
    return args[1:] if args[:1] == ["--"] else args


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    if sys.argv[1:2] == ["serve"]:
        serve(*sys.argv[2:4])
    else:
        sys.exit(run_supernode(_strip_dashdash(sys.argv[1:])))
