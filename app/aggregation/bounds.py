"""Bounded influence: every node's update is clipped to an L2 norm bound before it counts, and the
aggregate is checked before it is saved or sent. This is the one clipping mechanism of the
ServerApp (secure aggregation and differential privacy clip to the same bound).

The bound of a round (`norm_bound` in metrics.jsonl) is `strategy.update-norm-bound` when set,
else derived from the recipe: the farthest AdamW can move the adapter in one round, times
AUTO_BOUND_MARGIN. AdamW (weight decay 0, as app/training/train.py builds it) moves an element
by lr x |m_hat| / (sqrt(v_hat) + eps) per step, and for a step t that ratio is at most
adam_ratio_bound(t) whatever the gradients (Cauchy-Schwarz over the moment sums; 1.00-1.02 for
t <= 6), so an honest round's update satisfies
    ||update|| <= lr x sum_t adam_ratio_bound(t) x sqrt(adapter parameters).
Six steps at 5e-5 over the seed adapter's 13,795,328 parameters give 1.12 (2.24 with the margin).
Measured honest updates use a fraction of the bound: the seed recipe on the GPU 0.32 of 2.03 at
round 2 and 0.012 of 0.045 at round 10 (benchmarks/results/comm_gpu_round_h200.json); the tiny
profile at most 0.31 of it (3 sites, 4 rounds, at its own and at the seed's learning rates). With
`strategy.update-norm-median-multiple` > 0 the bound is also at most that multiple of the round's
median update norm (off by default: with secure aggregation the ServerApp sees no single norm,
and with fewer than three replies the median can be a hostile node's).

A clipped update keeps its direction: scaled by bound / norm (`update_scale`). The example-weighted
mean of clipped updates then moves the adapter by at most the bound; a node with a share w of
the round's examples moves it by at most w x bound.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

State = Mapping[str, np.ndarray]

ADAM_BETAS = (0.9, 0.999)  # torch's and bitsandbytes' AdamW defaults, which train.py keeps
# Room for what the analytic bound leaves out: 8-bit optimizer states (paged_adamw_8bit) and the
# int8 wire's rounding of the update (at most 1/254 of a block's largest value).
AUTO_BOUND_MARGIN = 2.0
# The float32 sum of clipped updates may exceed the bound by rounding, never by more than this.
AGGREGATE_SLACK = 1e-3


class AggregateRefused(ValueError):
    """The round's aggregate is not finite or moves the adapter farther than the bound allows."""


def update_norm(update: State) -> float:
    """The L2 norm of an update over all its tensors, in float64: finite for any finite float32
    values (3.4e38 squared fits), where a float32 sum of squares would overflow."""
    return math.sqrt(sum(_squares(v) for v in update.values()))


def _squares(values: np.ndarray) -> float:
    flat = np.asarray(values, dtype=np.float64).ravel()
    return float(np.dot(flat, flat))


def adam_ratio_bound(step: int, betas: tuple[float, float] = ADAM_BETAS) -> float:
    """The largest |m_hat| / sqrt(v_hat) AdamW can reach at `step` (1-based), for any gradients."""
    beta1, beta2 = betas
    decay_sum = sum((beta1 * beta1 / beta2) ** j for j in range(step))
    return (1 - beta1) / (1 - beta1**step) * math.sqrt((1 - beta2**step) / (1 - beta2) * decay_sum)


def recipe_norm_bound(steps: int, lr: float, parameters: int) -> float:
    """AUTO_BOUND_MARGIN x the farthest `steps` AdamW steps at `lr` can move `parameters` elements."""
    return AUTO_BOUND_MARGIN * lr * sum(adam_ratio_bound(t) for t in range(1, steps + 1)) * math.sqrt(parameters)


def round_norm_bound(fixed: float, recipe: float, median_multiple: float, norms: Sequence[float]) -> float:
    """The round's bound: `fixed` when > 0, else `recipe`; at most `median_multiple` x the median
    of `norms` when that multiple is > 0."""
    bound = fixed if fixed > 0 else recipe
    if median_multiple > 0 and norms:
        bound = min(bound, median_multiple * float(np.median(norms)))
    return bound


def clip_scale(norm: float, bound: float) -> float:
    """The factor that brings an update of L2 norm `norm` into `bound` (1.0: it is within)."""
    return 1.0 if norm <= bound else bound / norm


def clip(update: State, norm: float, bound: float) -> tuple[dict[str, np.ndarray], float]:
    """`update` scaled into the bound, and the factor applied (1.0: unchanged)."""
    scale = clip_scale(norm, bound)
    if scale == 1.0:
        return dict(update), 1.0
    return {k: (v * np.float32(scale)).astype(np.float32) for k, v in update.items()}, scale


def check_aggregate(master: State, new_master: State, bound: float) -> None:
    """The aggregate must be finite and within `bound` of `master`; AggregateRefused otherwise."""
    bad = [k for k, v in new_master.items() if not np.isfinite(v).all()]
    if bad:
        raise AggregateRefused(f"aggregate refused: {len(bad)} tensor(s) with non-finite values, e.g. {bad[0]!r}")
    step = math.sqrt(sum(_squares(np.asarray(new_master[k], np.float64) - master[k]) for k in master))
    if step > bound * (1 + AGGREGATE_SLACK):
        raise AggregateRefused(f"aggregate refused: it moves the adapter by {step:.6g}, beyond the norm bound {bound:.6g}")
