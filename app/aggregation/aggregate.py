"""The example-weighted mean: of the nodes' updates onto the float32 master, and of their scalars."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

State = Mapping[str, np.ndarray]


def apply_mean_update(master: State, updates: list[State], weights: list[float]) -> dict[str, np.ndarray]:
    """The float32 master plus the example-weighted mean of the nodes' updates."""
    total = float(sum(weights))
    if not updates or total <= 0:
        raise ValueError("cannot aggregate: no reply with a positive number of examples")
    return {
        key: master[key] + sum(u[key] * np.float32(w / total) for u, w in zip(updates, weights, strict=True)).astype(np.float32)
        for key in master
    }


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    """The weighted mean of finite values, finite however large they are: a node may report a
    loss of 1.7e308, and 1.7e308 x 10 examples overflows to inf. Scaled by the largest value
    first, no intermediate sum exceeds the count of values."""
    scale = max(abs(v) for v in values) or 1.0
    total = float(sum(weights))
    return scale * sum((v / scale) * (w / total) for v, w in zip(values, weights, strict=True))
