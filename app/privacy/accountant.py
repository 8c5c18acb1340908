"""The run's privacy loss: (epsilon, delta) after every round, from Google's dp-accounting (RDP).

What is protected: one node's whole round update (node level, not record level). Neighbouring
runs differ in one node's contribution to a round's sum, replaced by zero ("zero-out"); every
update is clipped to C and every weight capped at W, so that moves the weighted sum by at most
W x C and the sum's noise N(0, (z W C)^2) is a Gaussian mechanism with noise multiplier z
(app/privacy/dp.py). Which nodes took part and their example counts are not protected: they are
in metrics.jsonl, and dividing by the round's total weight is post-processing given them.

Sampling assumption: none is used. Our sampler draws a fixed-size sample without replacement, but
from the run seed (app/server_app.py sample_nodes, so a resumed run draws the same nodes), and
metrics.jsonl names every round's nodes: the sample is public. Amplification by subsampling
holds only for a sample the adversary cannot know, so every round is accounted as the full
Gaussian mechanism: conservative (the true loss against an adversary who does not know the
sample is smaller), and sound whoever knows the sample.

Which rounds spend: a round spends when an aggregate was computed from the updates' values,
released or refused (the refusal is itself computed from them). A skipped round (fewer usable
replies than strategy.min-replies) computed nothing from update values: it spends nothing.
Under secure aggregation the round is accounted with the noise guaranteed in the sum
(dp.guaranteed_noise_multiplier): only the shares of nodes certain to be in it count.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from dp_accounting import dp_event
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant

SAMPLING_ASSUMPTION = (
    "no amplification by sampling: the fixed-size sample drawn without replacement is seeded by the run seed "
    "and listed in metrics.jsonl, so it is public; every round is accounted as the full Gaussian mechanism (conservative)"
)
NEIGHBOURS = "node level: one node's whole round update replaced by zero (clipped to the norm bound, weight capped at W)"
ACCOUNTING = "RDP (dp-accounting)"


class PrivacyLedger:
    """The noise multipliers of the rounds that spent privacy, and the (epsilon, delta) they add to."""

    def __init__(self, delta: float, releases: Iterable[float] = ()) -> None:
        if not 0 < delta < 1:
            raise ValueError(f"privacy.delta must be in (0, 1), got {delta}")
        self.delta = delta
        self.releases = [float(z) for z in releases]
        if any(not z >= 0 for z in self.releases):
            raise ValueError(f"noise multipliers must be >= 0, got {self.releases}")

    def spend(self, noise_multiplier: float) -> float:
        """Account one round whose sum carried noise_multiplier x W x C; the run's epsilon after it."""
        if not noise_multiplier >= 0:
            raise ValueError(f"noise multiplier must be >= 0, got {noise_multiplier}")
        self.releases.append(float(noise_multiplier))
        return self.epsilon()

    def epsilon(self) -> float:
        """The run's epsilon at self.delta so far; inf when a round carried no noise."""
        if not self.releases:
            return 0.0
        if min(self.releases) == 0:
            return float("inf")
        accountant = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_SPECIAL)  # zero-out
        for z, count in Counter(self.releases).items():
            accountant.compose(dp_event.GaussianDpEvent(z), count)
        return float(accountant.get_epsilon(self.delta))
