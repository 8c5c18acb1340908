"""Differential privacy for a round's aggregate: Gaussian noise calibrated to the norm bound.

One mechanism with the hostile-sites bound (app/aggregation/bounds.py): every update is clipped
to the round's L2 bound C and every node's weight (its example count) is capped at W, so adding
or removing one node moves the weighted sum sum_i w_i u_i by at most W x C. The Gaussian mechanism
adds N(0, (z W C)^2) to every coordinate of that sum (z = privacy.noise-multiplier); dividing by
the total weight afterwards is post-processing. Under secure aggregation the nodes add the noise
in shares, each N(0, (z W C)^2 / m) where m is the fewest nodes whose shares reach the sum, so no
party ever sees an un-noised update.

The noise comes from the operating system's CSPRNG (`SystemNormal`), never from the run seed: a
known seed would let anyone who reads config.json regenerate the noise and subtract it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Protocol

import numpy as np


def sum_noise_std(noise_multiplier: float, bound: float, max_weight: float) -> float:
    """Per-coordinate standard deviation of the noise on the weighted sum of clipped updates."""
    if noise_multiplier < 0 or bound < 0 or max_weight < 0:
        raise ValueError(f"noise multiplier, bound and weight must be >= 0, got {noise_multiplier}, {bound}, {max_weight}")
    return noise_multiplier * bound * max_weight


def node_noise_std(noise_multiplier: float, bound: float, max_weight: float, min_nodes: int) -> float:
    """One node's share of the sum's noise when at least `min_nodes` shares reach the sum."""
    if min_nodes < 1:
        raise ValueError(f"min_nodes must be >= 1, got {min_nodes}")
    return sum_noise_std(noise_multiplier, bound, max_weight) / math.sqrt(min_nodes)


def guaranteed_noise_multiplier(noise_multiplier: float, min_nodes: int, guaranteed_nodes: int) -> float:
    """The noise multiplier the sum is known to carry when each node added its share for
    `min_nodes` (node_noise_std) and `guaranteed_nodes` of those shares are certain to be in it
    (not dropped, not known to a colluding party): variances add, so z x sqrt(guaranteed / min)."""
    if min_nodes < 1 or guaranteed_nodes < 0:
        raise ValueError(f"min_nodes must be >= 1 and guaranteed_nodes >= 0, got {min_nodes}, {guaranteed_nodes}")
    return noise_multiplier * math.sqrt(guaranteed_nodes / min_nodes)


class NormalSource(Protocol):
    def normal(self, loc: float, scale: float, size: tuple[int, ...]) -> np.ndarray: ...


class SystemNormal:
    """N(loc, scale^2) draws from os.urandom (the kernel's CSPRNG) by the Box-Muller transform.
    numpy's generators are fast but predictable from their output or seed; this is not."""

    def normal(self, loc: float, scale: float, size: tuple[int, ...] | int) -> np.ndarray:
        count = math.prod(size) if isinstance(size, tuple) else int(size)
        pairs = (count + 1) // 2
        words = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64).reshape(2, pairs) >> np.uint64(11)
        radius = np.sqrt(-2.0 * np.log((words[0] + 1.0) / 2.0**53))  # uniform on (0, 1]: log is finite
        angle = (2.0 * math.pi / 2.0**53) * words[1]  # uniform on [0, 2 pi)
        draws = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]
        return (loc + scale * draws).reshape(size)


def add_gaussian(arrays: Mapping[str, np.ndarray], std: float, rng: NormalSource) -> dict[str, np.ndarray]:
    """`arrays` plus independent N(0, std^2) on every value (float32 out)."""
    if std == 0:
        return {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}
    return {k: (np.asarray(v, dtype=np.float64) + rng.normal(0.0, std, size=np.shape(v))).astype(np.float32) for k, v in arrays.items()}
