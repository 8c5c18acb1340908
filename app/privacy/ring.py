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
from collections.abc import Iterable

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
CHUNK = 1 << 16  # values quantize works on at a time: its three float32 buffers (768 KiB) stay in cache


def levels(nodes: int) -> int:
    """Grid levels L: n values in [-L, L] sum within the ring's signed range."""
    if not 1 <= nodes <= MAX_ROUND_NODES:
        raise ValueError(f"{nodes} nodes a round: secure aggregation takes 1..{MAX_ROUND_NODES}")
    return SIGNED_LIMIT // nodes


def coordinate_range(norm_bound: float, parameters: int) -> float:
    """R: the grid's per-coordinate range for an L2 bound over `parameters` values."""
    return norm_bound / math.sqrt(parameters)


def quantize(values: np.ndarray | Iterable[np.ndarray], value_range: float, grid_levels: int, rng: np.random.Generator,
             *, scale: float = 1.0, noise_std: float = 0.0) -> np.ndarray:
    """float values -> ring elements: each value v (of one array, or of several read in order as
    one vector) becomes x = v x scale (+ N(0, noise_std^2) when noise_std > 0), clipped to
    [-R, R], scaled to [-L, L] and stochastically rounded (unbiased: E[k] = x / R x L).

    In float32, CHUNK values at a time, so every pass over the update (scale, noise, clip,
    round) runs in the CPU's cache instead of over hundreds of MB of float64 temporaries; it is
    on the critical path of every secure round (BENCHMARKS.md: a node's masking of the seed
    update, 2.42 s -> 0.70 s in the H100 runs, 0.37 s -> 0.23 s on a quiet CPU). The rounding is exact
    for the float32 x (floor plus a comparison of the exact fraction with a uniform draw), and
    float32 keeps x within 2**-24 of its value: a thousandth of a grid step at most."""
    arrays = [np.ravel(values)] if isinstance(values, np.ndarray) else [np.ravel(v) for v in values]
    out = np.empty(sum(a.size for a in arrays), dtype=RING_DTYPE)
    signed = out.view(np.int16)  # two's complement: negative values wrap into the ring
    scaled, floor, draws = (np.empty(CHUNK, np.float32) for _ in range(3))
    limit, step = np.float32(value_range), np.float32(grid_levels / value_range)
    position = 0
    for array in arrays:
        for start in range(0, array.size, CHUNK):
            part = array[start:start + CHUNK]
            n = part.size
            x, k, u = scaled[:n], floor[:n], draws[:n]
            np.multiply(part, np.float32(scale), out=x, casting="unsafe")
            if noise_std > 0:
                rng.standard_normal(n, dtype=np.float32, out=u)
                u *= np.float32(noise_std)
                x += u
            np.clip(x, -limit, limit, out=x)
            x *= step
            np.floor(x, out=k)
            x -= k  # the fraction, exact in float32: rounded up with that probability
            rng.random(n, dtype=np.float32, out=u)
            k += u < x
            np.copyto(signed[position:position + n], k, casting="unsafe")
            position += n
    return out


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
