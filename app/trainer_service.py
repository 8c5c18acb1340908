"""The resident trainer: one long-lived process per SuperNode that keeps the base model loaded.

Flower 1.42 starts a fresh ClientApp process for every message; importing torch and loading a
4-bit 8B model each round costs more than the round's training. `fedtune supernode -- ARGS`
runs `flower-supernode ARGS` and a trainer process as children; the trainer serves a Unix socket
in a 0700 directory (only this node's user can reach it; the peer's uid is checked too). A
trainer that dies is restarted; a round it was running falls back to in-process training. The ClientApp finds the socket through
`FEDTUNE_TRAINER_SOCKET`, which every process under the SuperNode inherits, and hands it the
round. torch is imported on the first request only, so an idle node stays small, and the
ClientApp side needs only numpy (arrays travel as safetensors-numpy). When the
SuperNode exits (or the wrapper is signalled) both stop.

Wire format, both directions: u64 length + JSON header, u64 length + safetensors bytes.
"""

from __future__ import annotations

import argparse
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
    import numpy as np  # here, not at the top: the SuperNode wrapper imports this module too
    from safetensors.numpy import save

    payload = save({k: np.ascontiguousarray(v) for k, v in tensors.items()}) if tensors else b""
    head = json.dumps(header).encode()
    conn.sendall(_LEN.pack(len(head)) + head + _LEN.pack(len(payload)))
    conn.sendall(payload)


def recv_message(conn: socket.socket) -> tuple[dict[str, Any], dict]:
    from safetensors.numpy import load

    header = json.loads(_recv_exact(conn, _LEN.unpack(_recv_exact(conn, _LEN.size))[0]))
    size = _LEN.unpack(_recv_exact(conn, _LEN.size))[0]
    return header, (load(_recv_exact(conn, size)) if size else {})


# --- client side (inside the ClientApp process) -------------------------------------------


def call_trainer(path: str, header: dict[str, Any], tensors: dict | None, connect_timeout: float):
    """Send one request; TrainerUnavailable if the trainer cannot be reached or dies mid-way."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(connect_timeout)
        conn.connect(path)
        conn.settimeout(None)  # a round takes as long as it takes
        send_message(conn, header, tensors)
        reply, reply_tensors = recv_message(conn)
    except OSError as exc:  # ConnectionError, FileNotFoundError, timeouts
        raise TrainerUnavailable(f"resident trainer at {path}: {exc}") from exc
    finally:
        conn.close()
    if "error" in reply:
        raise RuntimeError(f"resident trainer failed: {reply['error']}")
    return reply, reply_tensors


# --- server side (the resident process) ---------------------------------------------------


class TrainerServer:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.is_socket():
            path.unlink()  # left by a killed predecessor
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        os.chmod(path, 0o600)
        self._sock.listen(4)
        self._worker = None  # created (torch imported) on the first request
        self._stopping = threading.Event()
        self._device_reported = False

    def serve_forever(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                break  # closed by stop()
            with conn:
                self._handle(conn)

    def stop(self) -> None:
        self._stopping.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    def _handle(self, conn: socket.socket) -> None:
        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        if uid != os.getuid():
            log.warning("refused a trainer connection from uid %d", uid)
            return
        try:
            header, tensors = recv_message(conn)
            reply, reply_tensors = self._dispatch(header, tensors)
            self._report_device()
        except Exception as exc:  # report to the ClientApp, keep serving
            log.exception("resident trainer request failed")
            reply, reply_tensors = {"error": f"{type(exc).__name__}: {exc}"}, None
        try:
            send_message(conn, reply, reply_tensors)
        except OSError as exc:
            log.warning("could not reply to the ClientApp: %s", exc)

    def _report_device(self) -> None:
        """Once, after the first request put the model on its device: the physical GPU this
        process computes on (pid, CUDA_VISIBLE_DEVICES, UUID, PCI bus id), for the node's log."""
        if self._device_reported or "torch" not in sys.modules:
            return
        from app.deploy.gpu_plan import DEVICE_LOG_PREFIX, describe_cuda_device

        self._device_reported = True
        print(DEVICE_LOG_PREFIX + json.dumps(describe_cuda_device()), file=sys.stderr, flush=True)

    def _dispatch(self, header: dict[str, Any], tensors: dict):
        from app.worker import NodeData, RoundWorker, TrainRequest

        if self._worker is None:
            self._worker = RoundWorker()
        if header["op"] == "init":
            return {"ok": True}, self._worker.initial_adapter(header["run_config"])
        if header["op"] == "train":
            request = TrainRequest(
                run_config=header["run_config"],
                node=NodeData(**header["node"]),
                server_round=header["server_round"],
                lr=header["lr"],
                proximal_mu=header["proximal_mu"],
            )
            adapter, metrics = self._worker.train(request, tensors)
            return {"metrics": metrics}, adapter
        raise ValueError(f"unknown trainer op {header['op']!r}")


TRAINER_START_SECONDS = 60.0


def serve(socket_path: str) -> None:
    """The resident trainer process: serve `socket_path` until SIGTERM."""
    server = TrainerServer(Path(socket_path))
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    server.serve_forever()


def _start_trainer(socket_path: str) -> subprocess.Popen:
    """A trainer process, returned once its socket accepts connections."""
    if os.path.exists(socket_path):
        os.unlink(socket_path)  # a dead predecessor's: wait for the new one's
    trainer = subprocess.Popen([sys.executable, "-m", "app.trainer_service", "serve", socket_path])
    deadline = time.monotonic() + TRAINER_START_SECONDS
    while not os.path.exists(socket_path):
        if trainer.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"resident trainer did not start (exit code {trainer.poll()}); socket {socket_path}")
        time.sleep(0.05)
    return trainer


def run_supernode(flower_args: list[str], socket_path: str | None = None) -> int:
    """Run `flower-supernode flower_args` with a resident trainer process beside it; restart the
    trainer if it dies (its ClientApp meanwhile trains in-process); stop both together."""
    # Before torch is imported here or in a ClientApp child: several trainers sharing one GPU
    # must not strand memory in fragments (the 3.5 GiB logits change size every step).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    # `--gpus` ids are nvidia-smi's indices (what the launcher's memory plan reads): make CUDA
    # number the GPUs the same way rather than fastest-first.
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    private_dir = None
    if socket_path is None:
        private_dir = tempfile.mkdtemp(prefix="fedtune-trainer-")  # mode 0700
        socket_path = os.path.join(private_dir, "trainer.sock")
    Path(socket_path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    from app.fab_allowlist import ClientAppGate

    gate = ClientAppGate.install()  # only bundles the site approved get installed (app/fab_allowlist.py)
    trainer = _start_trainer(socket_path)
    env = dict(os.environ, **{SOCKET_ENV: socket_path}, **gate.env)
    child = subprocess.Popen(["flower-supernode", *flower_args], env=env)

    def forward(signum, _frame):
        child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    try:
        while (code := child.poll()) is None:
            if trainer.poll() is not None:
                log.warning("resident trainer exited with code %s; restarting it", trainer.returncode)
                print(f"fedtune: resident trainer exited with code {trainer.returncode}; restarting it", file=sys.stderr, flush=True)
                trainer = _start_trainer(socket_path)
            time.sleep(0.5)
    finally:
        trainer.terminate()
        try:
            trainer.wait(timeout=10)
        except subprocess.TimeoutExpired:
            trainer.kill()
        gate.close()
        if private_dir:
            shutil.rmtree(private_dir, ignore_errors=True)
        elif os.path.exists(socket_path):
            os.unlink(socket_path)
    return code


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "supernode",
        help="run flower-supernode with a resident trainer beside it",
        description="fedtune supernode [--trainer-socket PATH] -- <flower-supernode arguments>",
    )
    parser.add_argument("--trainer-socket", help="socket path (default: a private temporary directory)")
    parser.add_argument("flower_args", nargs=argparse.REMAINDER, help="arguments for flower-supernode")
    parser.set_defaults(func=lambda args: run_supernode(_strip_dashdash(args.flower_args), args.trainer_socket))


def _strip_dashdash(args: list[str]) -> list[str]:
    return args[1:] if args[:1] == ["--"] else args


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2])
    else:
        sys.exit(run_supernode(_strip_dashdash(sys.argv[1:])))
