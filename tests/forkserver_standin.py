"""Tests only: a ClientApp fork server (app/node/clientapp_forkserver.py `serve`, the production
loop and preload) whose children run `standin` instead of the gated ClientApp. The production
fork server has no way to run anything else: its script in the gate calls `serve_gated`.

`python tests/forkserver_standin.py SOCKET`; a shim's argv picks what the child does:
  report CODE       print what the child got (argv, env, cwd, stdin, ...) as JSON, a line on
                    stderr, exit CODE
  wait PIDFILE      write its pid to PIDFILE, print "terminated" on SIGTERM and exit 43
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.node.clientapp_forkserver import PRELOAD, serve  # noqa: E402


def standin(process_start_ticks: int | None = None) -> None:
    mode = sys.argv[1]
    if mode == "report":
        import numpy as np

        blas = None
        try:
            import ctypes

            with open("/proc/self/maps") as maps:
                [path] = {line.split()[-1] for line in maps if "openblas" in line.rsplit("/", 1)[-1]}
            blas = ctypes.CDLL(path).scipy_openblas_get_num_threads64_()
        except (ValueError, OSError, AttributeError):
            pass
        print(json.dumps({
            "argv": sys.argv, "env": dict(os.environ), "cwd": os.getcwd(), "stdin": sys.stdin.read(),
            "pid": os.getpid(), "ppid": os.getppid(), "pgid": os.getpgid(0), "ticks": process_start_ticks,
            "umask": os.umask(0), "random": float(np.random.random()), "blas_threads": blas,
            "sigint": repr(signal.getsignal(signal.SIGINT)), "sigterm": repr(signal.getsignal(signal.SIGTERM)),
            "comm": open("/proc/self/comm").read().strip(), "open_fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
            "sys_path": sys.path, "app_modules": sorted(m for m in sys.modules if m == "app" or m.startswith("app.")),
        }))
        print("stand-in on stderr", file=sys.stderr)
        sys.exit(int(sys.argv[2]))
    if mode == "wait":
        def terminated(*_):
            print("terminated", flush=True)
            sys.exit(43)

        signal.signal(signal.SIGTERM, terminated)
        Path(sys.argv[2]).write_text(str(os.getpid()))
        while True:
            time.sleep(0.1)
    raise SystemExit(f"stand-in: unknown mode {mode!r}")


if __name__ == "__main__":
    # numpy.random too (numpy loads it lazily, the production preload does not): the children reseed it
    sys.exit(serve(sys.argv[1], standin, (*PRELOAD, "numpy.random")))
