"""A warm start for a node's ClientApp processes: one fork server per SuperNode.

flwr 1.42's SuperExec starts a fresh `flwr-clientapp` process for every message (fire and forget),
and that process spends most of its start importing flwr's ClientApp runtime and the libraries
every ClientApp uses (numpy, pydantic, cryptography, ...): ~0.8 s on a 2-core CPU host, 1.0-1.5 s
of the 2.2 s start on a 16-core GPU host (BENCHMARKS.md, "Process start"), on every round's
critical path, four times in a secure-aggregation round. flwr has no resident ClientApp mode, but
the command it starts is ours (app/node/fab_allowlist.py puts a `flwr-clientapp` shim first on the
SuperNode's PATH), so `fedtune supernode` runs a fork server beside the SuperNode that has
imported all of that once, and the shim asks it for a ClientApp instead of importing it again:

- The fork server (`serve`, started and restarted by the SuperNode's wrapper through
  `ForkServerKeeper`, dying with it) imports what every ClientApp process imports (`PRELOAD`,
  flwr's runtime through `import_clientapp_command`) but none of the app bundle's modules: the
  child still deletes `app.*` and loads the bundle flwr installs, as the shim always did. It
  listens on a Unix socket in the gate's private 0700 directory, refuses a peer of another uid
  (SO_PEERCRED), and runs a selector loop in one thread: it never has a thread when it forks
  (OPENBLAS_NUM_THREADS=1 while it imports numpy; checked before every fork).
- For each request it forks a child that becomes the shim's ClientApp: the shim's argv,
  environment, working directory (an O_PATH descriptor), umask and stdin/stdout/stderr (file
  descriptors passed with SCM_RIGHTS), Python's default signal handlers, its own process group,
  numpy's global RNG reseeded and OpenBLAS's threads back to a fresh process's count; then
  `gated_clientapp` exactly as the shim runs it (the bundle's hash is checked before it is
  installed, in the child) and the interpreter's own exit steps (non-daemon threads joined,
  atexit handlers, streams flushed), then os._exit with the exit status.
- The shim (app/node/clientapp_shim.py `run_shim`: a few standard modules, not even `json`)
  sends its request, learns the child's pid, forwards SIGTERM/SIGINT/SIGHUP to it through the
  fork server (the child's parent, so the signal cannot reach a reused pid), waits for the
  child's exit status and exits with it (or dies of the same signal). The child never outlives its shim: when the shim's connection closes
  (the shim was killed, even by SIGKILL) the fork server kills the child's process group, and
  the child dies with the fork server (PR_SET_PDEATHSIG). The ClientApp's `t_process_start` stays
  the shim's process start (clientapp_shim.PROCESS_START_TICKS_ENV, read by app/client_app.py).
- When the fork server cannot be reached, or refuses, the shim says so once on stderr and runs
  the gated ClientApp in its own process, as it did before the fork server existed.

What an attacker gets: the socket is reachable only by this node's user (0700 directory, 0600
socket, peer uid checked), who can already start the shim itself. A request is argv, environment,
umask and descriptors for the same gated ClientApp; nothing in it is executed otherwise, and it
must carry exactly the environment the fork server started with (the modules it imported read
theirs at import), or it is refused. A malformed request (bad JSON, too large, wrong descriptor
count, late descriptors, unknown fields, too slow) is refused and logged; it never stops the
fork server. A fork server that dies is restarted by the wrapper; meanwhile shims fall back.

`FEDTUNE_CLIENTAPP_FORKSERVER=0` (read by `fedtune supernode`) turns it off: the gate writes the
plain shim and no fork server starts.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys

from app.node.clientapp_shim import _LEN, FORWARDED_SIGNALS, _frame

FORKSERVER_ENV = "FEDTUNE_CLIENTAPP_FORKSERVER"  # "0" (or false/no/off): every ClientApp imports everything itself
MAX_REQUEST_BYTES = 4 << 20  # argv + environment: Linux's own limit for both is 2 MiB by default


def enabled(environ) -> bool:
    """Whether FEDTUNE_CLIENTAPP_FORKSERVER leaves the fork server on (the default)."""
    return environ.get(FORKSERVER_ENV, "").strip().lower() not in ("0", "false", "no", "off")


# What flwr 1.42's SuperNode process sets in its own environment while it imports (its ClientApps
# inherit it): flwr.supercore.grpc sets GRPC_VERBOSITY unless set, the browser-use connector
# BROWSER_USE_SETUP_LOGGING whatever it was. A request must bring the fork server's environment.
_FLWR_SETS_UNLESS_SET = {"GRPC_VERBOSITY": "error"}
_FLWR_SETS = {"BROWSER_USE_SETUP_LOGGING": "false"}


def supernode_environment(env: dict[str, str]) -> dict[str, str]:
    """`env` with what flwr's SuperNode would set in it at import already set: the one environment
    for the SuperNode (whose settings are then no-ops), hence its shims, and the fork server."""
    return {**_FLWR_SETS_UNLESS_SET, **env, **_FLWR_SETS}


# --- the fork server ------------------------------------------------------------------------

# Imported once by the fork server: what every ClientApp process imports besides the bundle
# (python -X importtime of a ClientApp: flwr's runtime ~0.75 s of ~0.85 s on a 2-core host).
# "module:attribute" for packages that import their parts lazily (pydantic).
PRELOAD = (
    "numpy",
    "pydantic:BaseModel", "pydantic:ConfigDict", "pydantic:Field", "pydantic:ValidationError",
    "pydantic:model_validator", "pydantic.fields",
    "pydantic_settings:BaseSettings",
    "cryptography.fernet", "cryptography.hazmat.primitives.asymmetric.ec",
    "safetensors.numpy",
    "flwr.app", "flwr.clientapp",
    "flwr.common.secure_aggregation.crypto.shamir", "flwr.common.secure_aggregation.crypto.symmetric_encryption",
    "flwr.common.secure_aggregation.secaggplus_utils",
    "tomllib", "shlex", "secrets", "base64",
)
# While the fork server imports numpy: OpenBLAS starts its threads at load, and a process with
# threads must not fork. A child sets the count back to a fresh process's (_restore_blas_threads).
_ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1"}
MAX_PENDING = 32  # connections still sending their request
REQUEST_SECONDS = 10.0  # to send a whole request
STOP_GRACE_SECONDS = 5.0  # SIGTERM to SIGKILL for the children when the fork server stops
RESTART_RETRY_SECONDS = 30.0  # the wrapper restarts a dead fork server at most this often
_REQUEST_KEYS = {"argv", "env", "umask", "stdio"}
_PR_SET_PDEATHSIG, _PR_SET_NAME = 1, 15


class RequestRefused(ValueError):
    """A request the fork server does not serve; the shim falls back to its own process."""


def peer_refusal(conn: socket.socket) -> str | None:
    """Why the peer of `conn` may not ask for a ClientApp (None: it may): it must be this user."""
    pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid_refusal(uid, pid)


def uid_refusal(uid: int, pid: int) -> str | None:
    return None if uid == os.getuid() else f"pid {pid} runs as uid {uid}, not this node's uid {os.getuid()}"


def parse_request(body: bytes, fds: int, start_env: dict[str, str]) -> dict:
    """The request in `body`, sent with `fds` descriptors, checked; RequestRefused otherwise."""
    import json

    try:
        request = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestRefused(f"not JSON: {exc}") from None
    if not isinstance(request, dict) or set(request) != _REQUEST_KEYS:
        raise RequestRefused(f"expected an object with exactly {sorted(_REQUEST_KEYS)}")
    argv, env, umask, stdio = request["argv"], request["env"], request["umask"], request["stdio"]
    if not (isinstance(argv, list) and 0 < len(argv) <= 4096 and all(isinstance(a, str) and "\0" not in a for a in argv)):
        raise RequestRefused("argv: expected 1 to 4096 strings without NUL")
    if not (isinstance(env, dict) and all(isinstance(k, str) and k and "=" not in k and "\0" not in k
                                          and isinstance(v, str) and "\0" not in v for k, v in env.items())):
        raise RequestRefused("env: expected names (no '=' or NUL) to strings (no NUL)")
    if not (type(umask) is int and 0 <= umask <= 0o777):
        raise RequestRefused("umask: expected 0 to 0o777")
    if not (isinstance(stdio, list) and len(stdio) == 3 and all(type(s) is bool for s in stdio)):
        raise RequestRefused("stdio: expected 3 booleans")
    if fds != sum(stdio) + 1:
        raise RequestRefused(f"sent {fds} file descriptors, expected {sum(stdio) + 1} (open stdio and the working directory)")
    if env != start_env:
        changed = sorted(set(env) ^ set(start_env) | {k for k in set(env) & set(start_env) if env[k] != start_env[k]})
        shown = ", ".join(changed[:10]) + (", ..." if len(changed) > 10 else "")
        raise RequestRefused(f"its environment differs from the one the fork server imported its modules under ({shown})")
    return request


def preload(modules=PRELOAD) -> None:
    """Import flwr's ClientApp runtime and `modules`, with OpenBLAS single-threaded."""
    import importlib

    from app.node.flwr_patches import import_clientapp_command

    saved = {k: os.environ.get(k) for k in _ONE_THREAD}
    os.environ.update(_ONE_THREAD)
    try:
        import_clientapp_command()
        for entry in modules:
            name, _, attribute = entry.partition(":")
            try:
                module = importlib.import_module(name)
                if attribute:
                    getattr(module, attribute)
            except (ImportError, AttributeError):
                pass  # not installed here: a ClientApp that needs it imports it (or fails) itself
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def threads() -> int:
    """This process's threads, as the kernel counts them (C libraries' too)."""
    return len(os.listdir("/proc/self/task"))


def _say(message: str) -> None:
    # Not the logging module: a root handler set up here would be inherited by every ClientApp.
    try:
        sys.stderr.write(f"fedtune: ClientApp fork server: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


class _Conn:
    """One shim's connection: receiving its request, then its child's (signals in, status out)."""

    def __init__(self, sock: socket.socket, peer_pid: int, deadline: float) -> None:
        self.sock, self.peer_pid, self.deadline = sock, peer_pid, deadline
        self.data = bytearray()
        self.fds: list[int] = []
        self.child: int | None = None
        self.shim_gone = False

    def close_fds(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []


class ForkServer:
    """The selector loop; `target(process_start_ticks=...)` is what a child runs (gated_clientapp)."""

    def __init__(self, socket_path: str, target, start_env: dict[str, str], start_path: list[str]) -> None:
        import selectors

        from app.node.lifeline import _prctl  # resolved before any fork

        self._prctl = _prctl
        self.path, self.target = socket_path, target
        self.start_env, self.start_path = start_env, start_path
        self.pid = os.getpid()
        self.conns: dict[int, _Conn] = {}  # by socket fd
        self.children: dict[int, _Conn] = {}  # by child pid
        self.stopping = False
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    # setup and teardown

    def listen(self) -> None:
        directory = os.path.dirname(self.path)
        info = os.stat(directory)
        if info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise PermissionError(f"{directory} is not private to this user (mode {info.st_mode & 0o777:o}, uid {info.st_uid})")
        try:
            os.unlink(self.path)  # a killed predecessor's
        except FileNotFoundError:
            pass
        self.listener.bind(self.path)
        os.chmod(self.path, 0o600)
        self.inode = os.stat(self.path).st_ino
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.selector.register(self.listener, 1, "accept")
        self.selector.register(self.wake_r, 1, "wake")
        signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a Python handler, so that the wakeup fd hears it
        signal.signal(signal.SIGTERM, self._stop)
        for signum in (signal.SIGINT, signal.SIGHUP):  # the terminal's: the wrapper stops it after the SuperNode
            signal.signal(signum, signal.SIG_IGN)

    def _stop(self, *_) -> None:
        self.stopping = True

    def serve_forever(self) -> int:
        import time

        while not self.stopping:
            now = time.monotonic()
            pending = [c.deadline for c in self.conns.values() if c.child is None]
            timeout = max(0.0, min([1.0, *[d - now for d in pending]]))
            for key, _events in self.selector.select(timeout):
                if key.data == "accept":
                    self._accept()
                elif key.data == "wake":
                    self._drain_wake()
                else:
                    self._readable(key.data)
            self._reap()
            now = time.monotonic()
            for conn in [c for c in self.conns.values() if c.child is None and c.deadline < now]:
                self._refuse(conn, f"incomplete after {REQUEST_SECONDS:.0f} s")
        return self._shutdown()

    def _shutdown(self) -> int:
        import time

        self._unlink()
        self.listener.close()
        for pid in list(self.children):
            self._kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while self.children and time.monotonic() < deadline:
            time.sleep(0.05)
            self._reap()
        for pid in list(self.children):
            self._kill(pid, signal.SIGKILL)
        while self.children:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            self._exited(pid, status)
        for conn in list(self.conns.values()):
            self._close(conn)
        return 0

    def _unlink(self) -> None:
        try:
            if os.stat(self.path).st_ino == self.inode:  # not a successor's
                os.unlink(self.path)
        except OSError:
            pass

    # the loop's events

    def _drain_wake(self) -> None:
        try:
            while self.wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _accept(self) -> None:
        import time

        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: the shim falls back
                _say(f"accept failed: {exc}")
                return
            sock.setblocking(False)
            pid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]
            conn = _Conn(sock, pid, time.monotonic() + REQUEST_SECONDS)
            if (why := peer_refusal(sock)) is not None:
                _say(f"refused a connection: {why}")
                sock.close()
                continue
            self.conns[sock.fileno()] = conn
            self.selector.register(sock, 1, conn)
            if sum(c.child is None for c in self.conns.values()) > MAX_PENDING:
                self._refuse(conn, f"more than {MAX_PENDING} requests at once")

    def _readable(self, conn: _Conn) -> None:
        if conn.child is not None or conn.shim_gone:
            self._from_shim(conn)
            return
        try:
            data, ancillary, flags, _ = conn.sock.recvmsg(1 << 16, socket.CMSG_SPACE(8 * 4), socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._refuse(conn, f"receive failed: {exc}")
            return
        fds = []
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(struct.unpack(f"{len(payload) // 4}i", payload[: len(payload) - len(payload) % 4]))
        late = bool(fds) and bool(conn.data)
        conn.fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            self._refuse(conn, "too many file descriptors")
            return
        if late:
            self._refuse(conn, "file descriptors after the start of the request")
            return
        if not data:
            self._close(conn)  # the shim went away before its request was whole
            return
        conn.data += data
        if len(conn.data) >= _LEN.size:
            size = _LEN.unpack(conn.data[: _LEN.size])[0]
            if size > MAX_REQUEST_BYTES:
                self._refuse(conn, f"{size} bytes, more than {MAX_REQUEST_BYTES}")
                return
            if len(conn.data) >= _LEN.size + size:
                body = bytes(conn.data[_LEN.size: _LEN.size + size])
                signals = bytes(conn.data[_LEN.size + size:])  # sent before the pid came back
                conn.data = bytearray()
                try:
                    request = parse_request(body, len(conn.fds), self.start_env)
                except RequestRefused as exc:
                    self._refuse(conn, str(exc))
                    return
                self._start(conn, request, signals)

    def _from_shim(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(256)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the shim is gone (killed, even by SIGKILL): its ClientApp goes too
            conn.shim_gone = True
            self.selector.unregister(conn.sock)
            if conn.child is not None:
                self._kill(conn.child, signal.SIGKILL)
            return
        self._forward(conn, data)

    def _forward(self, conn: _Conn, data: bytes) -> None:
        for signum in data:
            if signum in FORWARDED_SIGNALS and conn.child is not None:
                self._kill(conn.child, signum)

    def _kill(self, pid: int, signum: int) -> None:
        """Signal the child's process group (the ClientApp and what it started); only ever a pid not
        yet reaped, so never someone else's."""
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signum)
                return
            except ProcessLookupError:
                continue
            except OSError:
                return

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._exited(pid, status)

    def _exited(self, pid: int, status: int) -> None:
        conn = self.children.pop(pid, None)
        if conn is None:
            return
        code = os.waitstatus_to_exitcode(status)
        if not conn.shim_gone:
            self._send(conn, ("signal", -code) if code < 0 else ("exit", code))
        self._close(conn)

    # requests

    def _refuse(self, conn: _Conn, why: str) -> None:
        _say(f"refused a request from pid {conn.peer_pid}: {why}")
        self._send(conn, ("refused", why))
        self._close(conn)

    def _send(self, conn: _Conn, frame: tuple[str, object]) -> None:
        try:
            conn.sock.send(_frame(*frame))  # a few bytes into an empty socket buffer
        except OSError:
            pass

    def _close(self, conn: _Conn) -> None:
        conn.close_fds()
        self.conns.pop(conn.sock.fileno(), None)
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    def _start(self, conn: _Conn, request: dict, signals: bytes) -> None:
        if (count := threads()) != 1:  # a C library started one: forking now could deadlock the child
            self._refuse(conn, f"the fork server has {count} threads; it forks only with one")
            return
        ticks = _start_ticks(conn.peer_pid)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD, *FORWARDED_SIGNALS})
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()  # or the child writes what the fork server had buffered
            except (OSError, ValueError):
                pass
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            self._refuse(conn, f"fork failed: {exc}")
            return
        if pid == 0:
            self._child(conn, request, ticks, blocked)  # never returns
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        try:
            os.setpgid(pid, pid)  # also in the child: whichever runs first, the group exists before a kill
        except OSError:
            pass
        conn.close_fds()
        conn.child = pid
        self.children[pid] = conn
        self._send(conn, ("pid", pid))
        self._forward(conn, signals)

    # the child

    def _child(self, conn: _Conn, request: dict, ticks: int | None, mask) -> None:
        code = 1
        try:
            try:
                self._become(conn, request, mask)
            except BaseException as exc:  # noqa: BLE001 - set-up failed: no ClientApp ran
                try:
                    os.write(2, f"fedtune: ClientApp fork server: could not start the ClientApp: {exc!r}\n".encode())
                except OSError:
                    pass
                os._exit(1)
            code = run_as_main(self.target, ticks)
        finally:
            os._exit(code)

    def _become(self, conn: _Conn, request: dict, mask) -> None:
        _prctl = self._prctl
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != self.pid:
            os._exit(1)  # the fork server died already
        try:
            os.setpgid(0, 0)  # signals reach it through its shim only, once
        except OSError:
            pass  # the fork server's setpgid(pid, pid) came first
        # Nothing of the fork server's stays open in the ClientApp: its socket, its loop, the
        # other shims' connections and descriptors (a shim waits for EOF on them).
        signal.set_wakeup_fd(-1)
        self.selector.close()
        for sock in (self.listener, self.wake_r, self.wake_w):
            sock.close()
        fds = conn.fds
        conn.fds = []
        for other in list(self.conns.values()):
            other.close_fds()
            other.sock.close()
        # Python's defaults, as a fresh interpreter has them; the mask stays until they are set.
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        stdio = iter(fds)
        for target, present in zip((0, 1, 2), request["stdio"]):
            if present:
                fd = next(stdio)
                os.dup2(fd, target)
                os.close(fd)
            else:
                try:
                    os.close(target)
                except OSError:
                    pass
        cwd = next(stdio)
        os.fchdir(cwd)
        os.close(cwd)
        os.umask(request["umask"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = list(request["argv"])
        sys.path[:] = self.start_path
        _fresh_streams()
        if "numpy.random" in sys.modules:  # numpy loads it lazily: only if something preloaded did
            sys.modules["numpy.random"].seed()  # as a fresh process's global RNG: from OS entropy
        _restore_blas_threads()
        name = os.path.basename(sys.argv[0]).encode()[:15]
        if name:
            _prctl(_PR_SET_NAME, name, 0, 0, 0)
        signal.pthread_sigmask(signal.SIG_SETMASK, {s for s in mask})


def run_as_main(target, ticks: int | None) -> int:
    """Run `target` as a script's top level runs, then the interpreter's own exit steps (a forked
    child ends with os._exit, which skips them); the exit status."""
    import threading
    import traceback

    died_of = None
    try:
        target(process_start_ticks=ticks)
        code = 0
    except SystemExit as exc:
        code = _system_exit_code(exc.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        code, died_of = 130, signal.SIGINT  # Python exits by SIGINT on an uncaught KeyboardInterrupt
    except BaseException:  # noqa: BLE001 - printed as the interpreter would
        sys.excepthook(*sys.exc_info())
        code = 1
    try:
        shutdown = getattr(threading, "_shutdown", None)  # joins non-daemon threads, as at exit
        if shutdown is not None:
            shutdown()
        import atexit

        atexit._run_exitfuncs()
    except SystemExit as exc:  # e.g. flwr's signal handler during the exit steps
        code = _system_exit_code(exc.code)
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    if died_of is not None:
        signal.signal(died_of, signal.SIG_DFL)
        os.kill(os.getpid(), died_of)
    return code


def _system_exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        print(code, file=sys.stderr)
    except (OSError, ValueError):
        pass
    return 1


def _fresh_streams() -> None:
    """sys.stdout's buffering as a fresh interpreter sets it for the descriptor it now writes to."""
    if getattr(sys.stdout, "write_through", False):
        return  # -u or PYTHONUNBUFFERED (the same as the shim's: same environment): whatever the descriptor
    for stream, fd in ((sys.stdout, 1), (sys.stderr, 2)):
        try:
            stream.reconfigure(line_buffering=fd == 2 or os.isatty(fd))
        except (OSError, ValueError, AttributeError):
            pass


def _restore_blas_threads() -> None:
    """OpenBLAS's thread count back to what it would be in a fresh process: its environment
    variables', else the usable CPUs (the fork server loaded it with one)."""
    if "numpy" not in sys.modules:
        return
    count = None
    for name in ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS"):
        try:
            value = int(os.environ.get(name, "").split(",")[0])
        except ValueError:
            continue
        if value > 0:
            count = value
            break
    cpus = len(os.sched_getaffinity(0))
    count = min(count or cpus, cpus)
    if count <= 1:
        return
    try:
        import ctypes

        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.rsplit("/", 1)[-1]}
        for path in paths:
            library = ctypes.CDLL(path)
            for symbol in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads64_",
                           "openblas_set_num_threads"):
                setter = getattr(library, symbol, None)
                if setter is not None:
                    setter.argtypes, setter.restype = [ctypes.c_int], None
                    setter(count)
                    break
    except (OSError, ValueError, IndexError):
        pass  # single-threaded BLAS: slower, not wrong


def _start_ticks(pid: int) -> int | None:
    """The kernel's start time of process `pid` (clock ticks since boot), or None."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def serve(socket_path: str, target, modules=PRELOAD) -> int:
    """The fork server process: import `modules` once, then serve `socket_path` until SIGTERM,
    each request forking a child that runs `target(process_start_ticks=...)`. Production runs it
    through `serve_gated` (target: the gated ClientApp); tests give a stand-in."""
    start_env, start_path = dict(os.environ), list(sys.path)
    preload(modules)
    if (count := threads()) != 1:
        _say(f"importing its modules started {count - 1} thread(s); a process with threads must not fork: not serving")
        return 3
    server = ForkServer(socket_path, target, start_env, start_path)
    try:
        server.listen()
    except OSError as exc:
        _say(f"cannot listen on {socket_path}: {exc}")
        return 2
    code = server.serve_forever()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    # Not the interpreter's finalization: it restores the default signal handlers first, and a
    # second SIGTERM then (the launcher signals a node's group and then each of its processes)
    # would end the process by the signal, which its keeper takes for a death.
    os._exit(code)


def serve_gated(socket_path: str, site_listed: set[str], own_hash_cache: str) -> int:
    """`serve` with the site's gated ClientApp as every child's program (written into the gate's
    fork-server script by app/node/fab_allowlist.py, beside the shim with the same arguments)."""
    import functools
    from pathlib import Path

    from app.node.fab_allowlist import gated_clientapp

    return serve(socket_path, functools.partial(gated_clientapp, site_listed, Path(own_hash_cache)))


# --- in the SuperNode's wrapper -----------------------------------------------------------


class ForkServerKeeper:
    """Runs the fork server beside the SuperNode (dying with the wrapper) and restarts it when it
    dies, at once and then at most once per RESTART_RETRY_SECONDS; meanwhile the shims start
    ClientApps themselves. One that stopped (SIGTERM: exit 0) or cannot serve here (2, 3) stays down."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        import time

        self.command, self.env = command, env
        self.proc = None
        self.restarts = 0
        self._start()
        self.next_start = time.monotonic()  # the first restart at once, the next ones RESTART_RETRY_SECONDS apart

    def _start(self) -> None:
        import subprocess
        import time

        from app.node.lifeline import die_with_parent

        self.next_start = time.monotonic() + RESTART_RETRY_SECONDS
        try:  # SIGTERM when the wrapper dies: it stops its children, which die with it anyway
            self.proc = subprocess.Popen(self.command, env=self.env, stdin=subprocess.DEVNULL,
                                         preexec_fn=die_with_parent(signal.SIGTERM))
        except OSError as exc:
            self.proc = None
            _wrapper_says(f"ClientApp fork server could not start ({exc}); ClientApps start in their own process")

    def check(self) -> None:
        import time

        if self.proc is not None and self.proc.poll() is None:
            return
        if self.proc is not None and self.proc.returncode == 0:  # stopped by a SIGTERM: the node is stopping
            self.proc, self.next_start = None, float("inf")
            return
        if self.proc is not None and self.proc.returncode in (2, 3):  # it cannot serve here (its socket, threads): it said why
            _wrapper_says("ClientApps start in their own process (no ClientApp fork server)")
            self.proc, self.next_start = None, float("inf")
            return
        if time.monotonic() < self.next_start:
            return
        if self.proc is not None:
            _wrapper_says(f"ClientApp fork server exited with code {self.proc.returncode}; restarting it "
                          "(ClientApps start in their own process meanwhile)")
        self.restarts += 1
        self._start()

    def stop(self, grace: float = STOP_GRACE_SECONDS + 5) -> None:
        import subprocess

        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _wrapper_says(message: str) -> None:
    print(f"fedtune: {message}", file=sys.stderr, flush=True)
