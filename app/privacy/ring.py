"""The ring and the grid of secure aggregation: how a node's clipped, weighted update becomes
integers that can be masked and summed without overflow, and how masks are drawn.

Ring: integers mod 2**16 (numpy uint16 arithmetic wraps there), 2 bytes per adapter parameter
on the wire (issue 27 item 4: 27.6 MB for the seed's 13.8 M-value adapter, as bfloat16).

Grid: a node sends k = stochastic_round(v / R x L) for each coordinate v of its update scaled by
w / W (w its example count, capped at the announced max weight W), clipped to [-R, R]. With n
nodes a round L = (2**15 - 1) // n, so the sum of n values in [-L, L] fits the ring's signed
range and reads back exactly: 16 nodes get L = 2047 (12-bit values), 3 nodes L = 10922.

Why R is per coordinate, not the L2 bound: a grid over the whole clip range [-C, C] has a step of
C / L, while a coordinate of an update of norm C over d = 13.8 M values is about C / sqrt(d)
(3,700 times smaller): every value would round to 0 or one step. The recipe's norm bound is
itself a per-coordinate bound times sqrt(d) (app/aggregation/bounds.py: AdamW moves each value by
at most lr x sum of the Adam ratios), so R = C / sqrt(d) never clips an honest coordinate and
measured updates use 15-30 % of it (hundreds to thousands of grid steps per value at n <= 16).

The weight travels as WEIGHT_DIGITS more ring elements, its base-256 digits, so the round's
total weight is summed under the same masks and recovered exactly.

Masks are AES-256-CTR keystreams (`cryptography`) keyed by a 32-byte seed: uniform over the ring,
and a seed is used for one session only, so a fixed nonce is safe.
"""

from __future__ import annotations

import math

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

RING_BITS = 16
RING_DTYPE = np.dtype("<u2")
SIGNED_LIMIT = 2 ** (RING_BITS - 1) - 1
DIGIT_BASE = 256
WEIGHT_DIGITS = 4  # weights below 2**32
# 255 x nodes must fit the ring's signed range for the weight digits to sum exactly.
MAX_ROUND_NODES = SIGNED_LIMIT // (DIGIT_BASE - 1)
SEED_BYTES = 32
_NONCE = bytes(16)


def levels(nodes: int) -> int:
    """Grid levels L: n values in [-L, L] sum within the ring's signed range."""
    if not 1 <= nodes <= MAX_ROUND_NODES:
        raise ValueError(f"{nodes} nodes a round: secure aggregation takes 1..{MAX_ROUND_NODES}")
    return SIGNED_LIMIT // nodes


def coordinate_range(norm_bound: float, parameters: int) -> float:
    """R: the grid's per-coordinate range for an L2 bound over `parameters` values."""
    return norm_bound / math.sqrt(parameters)


def quantize(values: np.ndarray, value_range: float, grid_levels: int, rng: np.random.Generator) -> np.ndarray:
    """float values -> ring elements: clipped to [-R, R], scaled to [-L, L], stochastically
    rounded (unbiased: E[k] = v / R x L)."""
    scaled = np.clip(np.asarray(values, dtype=np.float64), -value_range, value_range) * (grid_levels / value_range)
    floor = np.floor(scaled)
    scaled -= floor  # the fraction: rounded up with that probability
    rounded = floor.astype(np.int32)
    rounded += rng.random(scaled.shape) < scaled
    return rounded.astype(RING_DTYPE)  # two's complement: negative values wrap into the ring


def dequantize_sum(ring_sum: np.ndarray, value_range: float, grid_levels: int) -> np.ndarray:
    """The float sum of the values that summed to `ring_sum` (read as signed)."""
    return ring_sum.astype(RING_DTYPE).view(np.int16).astype(np.float64) * (value_range / grid_levels)


def weight_digits(weight: int) -> np.ndarray:
    if not 0 <= weight < DIGIT_BASE**WEIGHT_DIGITS:
        raise ValueError(f"weight {weight} outside 0..{DIGIT_BASE**WEIGHT_DIGITS - 1}")
    return np.array([(weight // DIGIT_BASE**i) % DIGIT_BASE for i in range(WEIGHT_DIGITS)], dtype=RING_DTYPE)


def digits_total(digit_sums: np.ndarray) -> int:
    """The total weight from the summed digits (each sum below the ring's signed limit)."""
    return sum(int(s) * DIGIT_BASE**i for i, s in enumerate(digit_sums.astype(np.int64)))


def mask(seed: bytes, count: int) -> np.ndarray:
    """`count` ring elements uniform over the ring, drawn from `seed` (32 bytes)."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"mask seed of {len(seed)} bytes, expected {SEED_BYTES}")
    stream = Cipher(algorithms.AES(seed), modes.CTR(_NONCE)).encryptor().update(bytes(count * RING_DTYPE.itemsize))
    return np.frombuffer(stream, dtype=RING_DTYPE)
