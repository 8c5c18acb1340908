"""Differential privacy for a round's aggregate: Gaussian noise calibrated to the norm bound.

One mechanism with the hostile-sites bound (app/aggregation/bounds.py): every update is clipped
to the round's L2 bound C and every node's weight (its example count) is capped at W, so adding
or removing one node moves the weighted sum sum_i w_i u_i by at most W x C. The Gaussian mechanism
adds N(0, (z W C)^2) to every coordinate of that sum (z = privacy.noise-multiplier); dividing by
the total weight afterwards is post-processing. Under secure aggregation the nodes add the noise
in shares, each N(0, (z W C)^2 / m) where m is the fewest nodes whose shares reach the sum, so no
party ever sees an un-noised update.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

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


def add_gaussian(arrays: Mapping[str, np.ndarray], std: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """`arrays` plus independent N(0, std^2) on every value (float32 out)."""
    if std == 0:
        return {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}
    return {k: (np.asarray(v, dtype=np.float64) + rng.normal(0.0, std, size=np.shape(v))).astype(np.float32) for k, v in arrays.items()}
