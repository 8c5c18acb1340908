"""Whether a run that went through all its rounds trained: a run in which no round aggregated, or
more than `strategy.max-skipped-fraction` of the rounds was skipped, ends failed, with the
distinct reasons its rounds recorded (node failures and skipped aggregates)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

# Distinct reasons listed in summary.json, most frequent first.
MAX_REASONS = 20


def failure_reasons(rounds: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each distinct reason of the rounds' node failures and skips, with how often it occurred."""
    counts: Counter[str] = Counter()
    for record in rounds:
        counts.update(str(f.get("reason")) for f in record.get("failed", []))
        if record.get("skip_reason"):
            counts[str(record["skip_reason"])] += 1
    return [{"reason": reason, "count": count} for reason, count in counts.most_common(MAX_REASONS)]


def run_failure(rounds: list[Mapping[str, Any]], max_skipped_fraction: float) -> str | None:
    """Why a run whose rounds are `rounds` failed although it went through all of them, or None."""
    if not rounds:
        return None
    aggregated = sum(1 for r in rounds if r.get("status") == "aggregated")
    skipped = len(rounds) - aggregated
    if aggregated == 0:
        return f"no round aggregated ({len(rounds)} round(s) skipped): the adapter is untrained"
    if skipped / len(rounds) > max_skipped_fraction:
        return f"{skipped} of {len(rounds)} rounds skipped, more than strategy.max-skipped-fraction={max_skipped_fraction:g}"
    return None
