"""Runtime patches of flwr 1.42.0 for round latency (issue 16), applied to that version only: on
any other flwr the poll setting is refused with an error and the other two are left out.

1. `flower-supernode` with shorter waits. flwr 1.42's SuperNode (`flwr.supernode.start_client_internal`)
   cannot be told how often to poll:
   - idle, it asks the SuperLink for a message, then sleeps a fixed 3 s: a pushed round waits
     1.5 s on average before the node sees it;
   - while its ClientApp runs it looks for the reply every 0.5 s, and for each object of the
     reply every 0.5 s: 0.25 s or more on average before the reply leaves.
   `python -m app.node.flwr_patches` runs the stock `flower-supernode` with the idle sleep set to
   FEDTUNE_SUPERNODE_POLL_SECONDS and the reply waits to REPLY_WAIT_SECONDS; nothing else changes.
   The idle poll is a request to the SuperLink per node and period (20 nodes at 0.5 s: 40 a
   second), so the launcher and the compose files set it for GPU deployments only.
2. A short first retry when a message's objects are not uploaded yet. A SuperLink publishes a
   message before its objects arrive, and flwr's `pull_objects` first waits a fixed 1 s (then 2,
   4, ... 10 s) when it finds one missing: on the H200 the ServerApp's pull of a reply hit that
   1 s in 2 rounds of 3. `shorten_pull_retry` makes the first wait PULL_RETRY_SECONDS (the
   doubling and the cap stay), in the ServerApp's process and in the patched SuperNode's.
3. A ClientApp process that does not import the SuperNode. `flwr-clientapp` lives in
   `flwr.supernode.cli`, whose package imports `flower_supernode` and with it the SuperNode's
   object store (sqlalchemy, alembic), which a ClientApp process never uses; a process starts
   per message. `import_clientapp_command` imports the command's own module alone.
BENCHMARKS.md ("Transport") has the measured effect of each; docs/upstream-transport.md proposes
each upstream.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import time

POLL_ENV = "FEDTUNE_SUPERNODE_POLL_SECONDS"
PATCHED_VERSION = "1.42.0"
IDLE_SLEEP, REPLY_SLEEP = 3, 0.5  # flwr 1.42.0's literals, checked against its source below
REPLY_WAIT_SECONDS = 0.1  # local: the SuperNode's own state, no request leaves the node
PULL_RETRY_SECONDS = 0.1  # then 0.2, 0.4, ...: four requests more than flwr's before its own 1 s
POLL_RANGE = (0.2, 3.0)
GPU_POLL_SECONDS = "0.5"  # what the launcher and compose files set for GPU nodes unless the environment does


class PatchRefused(RuntimeError):
    pass


def poll_seconds(environ: dict[str, str]) -> float | None:
    """FEDTUNE_SUPERNODE_POLL_SECONDS, checked; None when unset or empty (Flower's own waits)."""
    raw = environ.get(POLL_ENV, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not POLL_RANGE[0] <= value <= POLL_RANGE[1]:
        raise PatchRefused(f"{POLL_ENV}={raw!r}: expected seconds between {POLL_RANGE[0]:g} and {POLL_RANGE[1]:g}")
    return value


class _Waits:
    """Stands in for the `time` module inside start_client_internal: its two fixed waits shortened."""

    def __init__(self, idle: float) -> None:
        self._replace = {IDLE_SLEEP: idle, REPLY_SLEEP: REPLY_WAIT_SECONDS}

    def sleep(self, seconds: float) -> None:
        time.sleep(self._replace.get(seconds, seconds))

    def __getattr__(self, name: str):
        return getattr(time, name)


def installed_flwr() -> str:
    from importlib.metadata import version  # not `import flwr`: the SuperNode's wrapper stays small

    return version("flwr")


def _check_version() -> None:
    if (installed := installed_flwr()) != PATCHED_VERSION:
        raise PatchRefused(f"{POLL_ENV} patches flwr {PATCHED_VERSION}'s SuperNode; this is flwr {installed}: "
                           f"unset {POLL_ENV} to run Flower's own polling")


def apply(idle: float) -> None:
    """Shorten the SuperNode's waits in this process; PatchRefused on any other flwr."""
    _check_version()
    from flwr.supernode import start_client_internal as target

    source = inspect.getsource(target)
    if source.count(f"time.sleep({IDLE_SLEEP})") != 1 or source.count(f"time.sleep({REPLY_SLEEP})") != 2:
        raise PatchRefused(f"{target.__file__} is not flwr {PATCHED_VERSION}'s: unset {POLL_ENV}")
    target.time = _Waits(idle)
    shorten_pull_retry(target)


def shorten_pull_retry(module) -> bool:
    """`module.pull_objects` (flwr's, as the SuperNode and the ServerApp's grid import it) with
    its first retry after PULL_RETRY_SECONDS; False, and nothing changed, on any other flwr."""
    from flwr.supercore.inflatable import inflatable_utils

    if installed_flwr() != PATCHED_VERSION or getattr(module, "pull_objects", None) is not inflatable_utils.pull_objects:
        return False
    module.pull_objects = functools.partial(inflatable_utils.pull_objects, initial_backoff=PULL_RETRY_SECONDS)
    return True


def import_clientapp_command():
    """flwr's `flwr_clientapp` entry, without `flwr.supernode.cli`'s package imports on flwr
    1.42.0 (its package module is registered unexecuted); the ordinary import on another flwr."""
    import importlib.util

    package = "flwr.supernode.cli"
    if installed_flwr() == PATCHED_VERSION and package not in sys.modules:
        sys.modules[package] = importlib.util.module_from_spec(importlib.util.find_spec(package))
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    return flwr_clientapp


def supernode_command(environ: dict[str, str]) -> list[str]:
    """The command that starts the SuperNode: the patched one when FEDTUNE_SUPERNODE_POLL_SECONDS is
    set (PatchRefused, before anything starts, for a bad value or another flwr)."""
    if poll_seconds(environ) is None:
        return ["flower-supernode"]
    _check_version()
    return [sys.executable, "-m", __name__]


def main() -> int:
    """`python -m app.node.flwr_patches <flower-supernode arguments>`, FEDTUNE_SUPERNODE_POLL_SECONDS set."""
    try:
        idle = poll_seconds(os.environ)
        if idle is None:
            raise PatchRefused(f"{POLL_ENV} is not set: run flower-supernode itself")
        apply(idle)
    except PatchRefused as exc:
        print(f"fedtune: {exc}", file=sys.stderr)
        return 2
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
