"""Polling helper for tests that watch real processes."""

from __future__ import annotations

import time


def wait_until(condition, timeout: float, what: str):
    """`condition()`'s first truthy value, polled every 0.2 s; fails naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value
