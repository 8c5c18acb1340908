"""The `flwr-clientapp` shim's side of the node's ClientApp fork server
(app/node/clientapp_forkserver.py has the whole design): ask the fork server for a ClientApp,
forward signals to it, exit with its status; or, when it cannot be reached or refuses, tell the
caller to run the ClientApp itself. It runs at every ClientApp start, so it imports a few
standard modules only (not even `json`), and the fork server's own code stays out of it.

Wire format. Shim to fork server: a u32 length and the request as JSON ({"argv", "env", "umask",
"stdio"}), sent with the open descriptors among 0, 1, 2 and an O_PATH descriptor of the working
directory (SCM_RIGHTS); then one byte per signal to forward. Fork server to shim: frames of a u32
length and `kind value` in UTF-8: `pid N` once the child runs, then `exit CODE` or `signal N`;
or `refused WHY` instead of `pid`.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys

# The ClientApp's process start for its metrics: the shim's, in clock ticks since boot
# (/proc/PID/stat field 22), set by the fork server's child (app/client_app.py reads it).
PROCESS_START_TICKS_ENV = "FEDTUNE_CLIENTAPP_START_TICKS"
# When the ClientApp had pulled its message and bundle from the SuperNode (epoch s), set by the
# bundle check (app/node/fab_allowlist.py) for the handler's `t-pulled`.
PULLED_AT_ENV = "FEDTUNE_CLIENTAPP_PULLED_AT"
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
CONNECT_SECONDS = 5.0  # a Unix connect is immediate unless the fork server's backlog is full
FIRST_REPLY_SECONDS = 20.0  # request to child pid: a fork of a ~200 MB process takes milliseconds
MAX_REPLY_BYTES = 1 << 16
_LEN = struct.Struct("!I")


def run_shim(socket_path: str) -> int | None:
    """Have the fork server at `socket_path` run this process's ClientApp; its exit code (or this
    process dies of the child's signal), or None when the fork server cannot be reached or
    refused before starting one: the caller then runs the ClientApp itself."""
    pending: list[int] = []  # signals that came before a child was started: re-raised if none is
    state: dict[str, object] = {"conn": None, "started": False}

    def forward(signum, _frame) -> None:
        if not state["started"]:
            pending.append(signum)
        if state["conn"] is not None:
            try:
                state["conn"].send(bytes([signum]))
            except OSError:
                pass  # the fork server is gone: its children die with it, the wait below ends

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(CONNECT_SECONDS)
        conn.connect(socket_path)
        cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            stdio = [_is_open(fd) for fd in (0, 1, 2)]
            body = encode_request(sys.argv, dict(os.environ), _umask(), stdio)
            conn.settimeout(FIRST_REPLY_SECONDS)
            message = _LEN.pack(len(body)) + body
            sent = socket.send_fds(conn, [message], [fd for fd, is_open in zip((0, 1, 2), stdio) if is_open] + [cwd])
            if sent < len(message):  # not an empty send: after a quick refusal it would fail (EPIPE) and hide it
                conn.sendall(message[sent:])
        finally:
            os.close(cwd)
        state["conn"] = conn
        for signum in list(pending):
            conn.send(bytes([signum]))
        reply = _recv_frame(conn)
        if reply is None or reply[0] != "pid":
            raise ConnectionError(f"refused: {reply[1]}" if reply and reply[0] == "refused" else "no ClientApp started")
        child = int(reply[1])
        state["started"] = True
    except (OSError, ValueError) as exc:  # ConnectionError, FileNotFoundError, timeouts, a garbled reply
        state["conn"] = None
        conn.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        print(f"fedtune: ClientApp fork server unavailable ({exc}); starting the ClientApp in this process",
              file=sys.stderr, flush=True)
        for signum in pending:  # as if they came now, to the ClientApp this process becomes
            os.kill(os.getpid(), signum)
        return None
    conn.settimeout(None)
    try:
        status = _recv_frame(conn)
    except (OSError, ValueError):
        status = None
    conn.close()
    if status is not None and status[0] == "signal":
        signum = int(status[1])
        for handled in {*FORWARDED_SIGNALS, signum}:
            try:
                signal.signal(handled, signal.SIG_DFL)
            except (OSError, ValueError):  # SIGKILL, SIGSTOP: no handler to reset
                pass
        os.kill(os.getpid(), signum)  # die of what the ClientApp died of
        return 128 + signum
    if status is not None and status[0] == "exit":
        return int(status[1])
    print(f"fedtune: the ClientApp (pid {child}) was lost with its fork server", file=sys.stderr, flush=True)
    return 1


def encode_request(argv: list[str], env: dict[str, str], umask: int, stdio: list[bool]) -> bytes:
    """The request as JSON, without importing `json` (and with it `re`) into every shim: CPython's
    C string encoder is all it takes (ASCII only; lone surrogates of undecodable bytes as \\udcXX)."""
    try:
        from _json import encode_basestring_ascii as quote
    except ImportError:  # not CPython
        from json import dumps

        return dumps({"argv": argv, "env": env, "umask": umask, "stdio": stdio}).encode()
    return ('{"argv":[' + ",".join(map(quote, argv)) + '],"env":{' + ",".join(quote(k) + ":" + quote(v) for k, v in env.items())
            + '},"umask":' + str(int(umask)) + ',"stdio":[' + ",".join("true" if s else "false" for s in stdio) + "]}").encode("ascii")


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _recv_frame(conn: socket.socket) -> tuple[str, str] | None:
    """One reply of the fork server, (kind, value): ("pid", "1234"), ("exit", "0"), ("signal", "15")
    or ("refused", why); None on EOF before it. ValueError for anything else."""
    head = _recv_exact(conn, _LEN.size)
    if head is None:
        return None
    size = _LEN.unpack(head)[0]
    if size > MAX_REPLY_BYTES:
        raise ValueError(f"a reply of {size} bytes")
    body = _recv_exact(conn, size)
    if body is None:
        return None
    kind, _, value = body.decode("utf-8", "replace").partition(" ")
    if kind not in ("pid", "exit", "signal", "refused") or (kind != "refused" and not value.lstrip("-").isdigit()):
        raise ValueError(f"an unexpected reply {body[:80]!r}")
    return kind, value


def _recv_exact(conn: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _frame(kind: str, value: object) -> bytes:
    body = f"{kind} {value}".encode()
    return _LEN.pack(len(body)) + body
