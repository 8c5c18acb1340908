"""The ServerApp's differential privacy: the round's privacy fields, the ledger, and (secure
aggregation off) the noise it adds to the aggregate itself.

W, the weight cap the noise is calibrated to, is the per-node bound on `num-examples` that
check_reply enforces (strategy.max-num-examples, or the partition size of a dataset the server
knows): no node's weight in the sum can exceed it. With privacy on and no such bound the run is
refused before any node works, since one node could claim any weight.

The aggregate is checked against the norm bound before the noise (app/aggregation/bounds.py
check_aggregate). That is sound and costs no privacy: the example-weighted mean of updates each
clipped to C has norm at most C (triangle inequality), so for any replies that passed check_reply
the check passes; it catches a fault in our own aggregation, and its outcome does not depend on
the updates' values. Checked after the noise, it would test the noise (drawn here, by no node)
instead of the aggregation, or pass anything within the noise's reach.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from app.config import ConfigError, Settings
from app.privacy.accountant import ACCOUNTING, NEIGHBOURS, SAMPLING_ASSUMPTION, PrivacyLedger
from app.privacy.dp import SystemNormal, add_gaussian, sum_noise_std

State = Mapping[str, np.ndarray]


def require_weight_cap(settings: Settings, max_weight: int | None) -> None:
    """ConfigError when privacy is on and no node's weight is bounded (the noise is calibrated to W)."""
    if settings.privacy.noise_multiplier > 0 and max_weight is None:
        raise ConfigError(
            f"privacy.noise-multiplier={settings.privacy.noise_multiplier} needs a bound on each node's weight: set "
            f"strategy.max-num-examples (dataset {settings.dataset.path or settings.dataset.name} is not one the server knows)"
        )


class RoundPrivacy:
    """Differential privacy across a run's rounds; `on` when privacy.noise-multiplier > 0."""

    def __init__(self, settings: Settings, max_weight: int | None, releases: Iterable[float] = ()) -> None:
        privacy = settings.privacy
        require_weight_cap(settings, max_weight)
        self.noise_multiplier = privacy.noise_multiplier
        self.on = self.noise_multiplier > 0
        self.max_weight = max_weight
        self.ledger = PrivacyLedger(privacy.delta, releases)
        self.normal = SystemNormal()

    def fields(self) -> dict[str, Any]:
        """The run's privacy so far, for every round's metrics line (none when off)."""
        if not self.on:
            return {}
        epsilon = self.ledger.epsilon()
        return {"dp_epsilon": epsilon if np.isfinite(epsilon) else None, "dp_delta": self.ledger.delta,
                "dp_releases": len(self.ledger.releases), "dp_spent": False}

    def spend(self, noise_multiplier: float | None = None, guaranteed_shares: int | None = None) -> dict[str, Any]:
        """Account a round whose aggregate was computed from the updates (released or refused).
        The secure path passes the multiplier its guaranteed shares carry
        (dp.guaranteed_noise_multiplier) and their count; the central path the configured one."""
        accounted = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        self.ledger.spend(accounted)  # 0 when off: a run resumed with privacy on then reports no guarantee
        if not self.on:
            return {}
        return {**self.fields(), "dp_spent": True, "dp_noise_multiplier": accounted, "dp_noise_shares": guaranteed_shares}

    def noised(self, new_master: State, bound: float, total_weight: float) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """`new_master` (master + the weighted mean update) with the sum's noise, N(0, (z W C)^2)
        per coordinate of the weighted sum, i.e. that std / total weight on the mean."""
        if not self.on:
            return dict(new_master), {}
        std = sum_noise_std(self.noise_multiplier, bound, self.max_weight)
        return add_gaussian(new_master, std / total_weight, self.normal), {"dp_sum_noise_std": std, "dp_max_weight": self.max_weight,
                                                                           "dp_noise_std": std / total_weight}

    def summary(self) -> dict[str, Any]:
        """What summary.json says of the run's privacy."""
        if not self.on:
            return {"noise_multiplier": 0.0, "epsilon": None, "guarantee": "none (privacy.noise-multiplier = 0)"}
        epsilon = self.ledger.epsilon()
        return {"noise_multiplier": self.noise_multiplier, "epsilon": epsilon if np.isfinite(epsilon) else None, "delta": self.ledger.delta,
                "rounds_accounted": len(self.ledger.releases), "max_weight": self.max_weight,
                "neighbours": NEIGHBOURS, "sampling": SAMPLING_ASSUMPTION, "accounting": ACCOUNTING}
