"""Children that die with their parent, also when the parent is SIGKILLed (OOM killer) and gets
no chance to stop them: Linux's PR_SET_PDEATHSIG, set in the child between fork and exec."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1
# Resolved here, in the parent: looking a symbol up between fork and exec can deadlock.
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def die_with_parent(signum: int) -> Callable[[], None]:
    """A `preexec_fn` for subprocess.Popen: the child gets `signum` when this process exits.

    Linux sends it when the thread that forked the child exits, so start children from the
    main thread (the launcher and the SuperNode wrapper do). Not inherited by grandchildren:
    each parent sets it for its own children (the wrapper for its trainer and flower-supernode;
    flower-supernode's own SuperExec watches its parent through `--parent-pid`)."""
    parent = os.getpid()

    def preexec() -> None:
        if _prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
            os._exit(126)  # no lifeline, no child: better than an orphan that holds a GPU
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signum)

    return preexec
