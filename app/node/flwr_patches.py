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
3. A bound on what the ServerApp pulls for one reply (issue 24). The SuperLink answers the
   grid's PullMessages with each reply's object tree (object ids and children, no sizes) and the
   grid then pulls every object (`pull_objects`) before anything can look at the reply.
   `bound_reply_pulls` refuses, as an error reply of its own, a reply whose tree has more objects
   than one of the expected size can have, before pulling any, and stops pulling one whose
   objects add up to more than the expected bytes. The tree declares no sizes, so one object is
   held whole before it can be counted: what the SuperLink accepted in one request, the edge's
   body limit.
4. A ClientApp process that does not import the SuperNode. `flwr-clientapp` lives in
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
import threading
import time

POLL_ENV = "FEDTUNE_SUPERNODE_POLL_SECONDS"
PATCHED_VERSION = "1.42.0"
IDLE_SLEEP, REPLY_SLEEP = 3, 0.5  # flwr 1.42.0's literals, checked against its source below
REPLY_WAIT_SECONDS = 0.1  # local: the SuperNode's own state, no request leaves the node
PULL_RETRY_SECONDS = 0.1  # then 0.2, 0.4, ...: four requests more than flwr's before its own 1 s
POLL_RANGE = (0.2, 3.0)
REPLY_RECORD_OBJECTS = 16  # a reply's objects besides arrays and chunks: Message, RecordDict, records (ours: 5)
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


def _flwr_pull(module):
    """`module.pull_objects` as flwr 1.42.0 has it, under these patches (unwrapped), or None."""
    from flwr.supercore.inflatable import inflatable_utils

    pull = getattr(module, "pull_objects", None)
    pull = pull.pull if isinstance(pull, _BoundedPull) else pull
    flwr_own = pull is inflatable_utils.pull_objects or (
        isinstance(pull, functools.partial) and pull.func is inflatable_utils.pull_objects)
    return pull if installed_flwr() == PATCHED_VERSION and flwr_own else None


def shorten_pull_retry(module) -> bool:
    """`module.pull_objects` (flwr's, as the SuperNode and the ServerApp's grid import it) with
    its first retry after PULL_RETRY_SECONDS; False, and nothing changed, on any other flwr."""
    from flwr.supercore.inflatable import inflatable_utils

    if _flwr_pull(module) is None:
        return False
    shortened = functools.partial(inflatable_utils.pull_objects, initial_backoff=PULL_RETRY_SECONDS)
    if isinstance(module.pull_objects, _BoundedPull):
        module.pull_objects.pull = shortened
    else:
        module.pull_objects = shortened
    return True


class _BoundedPull:
    """flwr's `pull_objects(object_ids, pull_object_fn, ...)` for one reply's objects, refusing
    too many objects before pulling any and too many bytes as they arrive (ObjectPullError, which
    flwr's grid turns into an error reply for that message alone)."""

    def __init__(self, pull, max_bytes: int, max_objects: int) -> None:
        self.pull, self.max_bytes, self.max_objects = pull, max_bytes, max_objects

    def __call__(self, object_ids, pull_object_fn, **kwargs):
        from flwr.supercore.inflatable.inflatable_utils import ObjectPullError

        if len(object_ids) > self.max_objects:
            raise ObjectPullError(object_ids[0], f"fedtune refused the reply: its tree has {len(object_ids)} objects, more "
                                                 f"than the {self.max_objects} of a reply of {self.max_bytes} bytes; none pulled")
        pulled, lock = [0], threading.Lock()

        def counted(object_id: str) -> bytes:
            content = pull_object_fn(object_id)
            with lock:
                pulled[0] += len(content)
                total = pulled[0]
            if total > self.max_bytes:  # pull_objects stops the other pulls on this error
                raise ObjectPullError(object_id, f"fedtune refused the reply: its objects exceed {self.max_bytes} bytes; "
                                                 "the rest were not pulled")
            return content

        return self.pull(object_ids, counted, **kwargs)


def bound_reply_pulls(module, max_bytes: int, max_arrays: int = 1) -> bool:
    """Bound what `module.pull_objects` (the ServerApp's grid module, flwr.superlink.grid.http_grid)
    pulls for each reply: at most `max_bytes` of object contents (everything a reply holds, its
    arrays' bytes plus a few hundred bytes per record), in at most the objects a reply of that
    size with `max_arrays` arrays can have. A reply past either is an error reply ("fedtune
    refused the reply: ..."), the other replies are untouched. Call again to change the bound;
    composes with shorten_pull_retry in either order. False, and nothing changed, on any other flwr."""
    from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE

    if max_bytes < 1 or max_arrays < 1:
        raise ValueError(f"bound_reply_pulls: max_bytes ({max_bytes}) and max_arrays ({max_arrays}) must be positive")
    if (pull := _flwr_pull(module)) is None:
        return False
    # flwr cuts each array into chunks of at most FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE: one Array object
    # per array, its chunks, and the records holding them.
    chunks = max_bytes // FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE + max_arrays
    module.pull_objects = _BoundedPull(pull, max_bytes, chunks + max_arrays + REPLY_RECORD_OBJECTS)
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
