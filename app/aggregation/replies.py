"""One node's reply, checked before it counts. Whatever a reply holds, checking it either returns
the update and the metrics to keep or raises ReplyRejected naming why: never anything else.

Metrics a node chooses are bounded before they reach metrics.jsonl: the keys the ClientApp
sends (KNOWN_METRICS) are kept, plus at most MAX_EXTRA_METRICS other keys with short names
(EXTRA_METRIC_NAME) and finite numeric values, the first ones by name; everything else is
dropped (counted as the client's `dropped_metrics`). Extreme finite values are kept as sent.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from app import comm

State = Mapping[str, np.ndarray]

# Metrics every reply must carry (finite numbers), and the others the ClientApp may send.
CLIENT_METRICS = ("partition-id", "train-loss", "proximal-term", "num-examples", "train-seconds", "clientapp-seconds", "model-load-seconds", "resident")
KNOWN_METRICS = frozenset(CLIENT_METRICS) | {
    "skipped-rows", "client-round-seconds", "tokens", "steady-step-seconds", "t-train-start", "t-train-end", "t-process-start",
    "t-turn-start", "t-turn-end", "clientapp-forked",
    "t-pulled", "t-handler-start", "t-reply", "gpu-mem-peak-bytes", "gpu-mem-mean-bytes", "gpu-util-mean", "gpu-samples", "peak-gpu-bytes",
    "secagg-mask-seconds",
}
# A newer ClientApp's metrics still reach metrics.jsonl, a few and short-named (a node choosing
# thousands of long keys would otherwise grow every metrics line without limit).
MAX_EXTRA_METRICS = 8
EXTRA_METRIC_NAME = re.compile(r"[a-z][a-z0-9-]{0,31}")
# What a refusal or error reason may quote of what a node sent: room for a node's own actionable
# errors (a corrupt model cache's, with its cause and the command that fixes it, is ~450
# characters), not for a hostile node to grow every metrics line.
MAX_QUOTE = 1000


# The trainer a node names (`placement:device:process`): short, and only characters a trainer id
# is made of, so metrics.jsonl and the report show it as it is; anything else is dropped (None).
TRAINER_ID = re.compile(r"[a-z-]{1,16}:[A-Za-z0-9._-]{1,64}:[a-z0-9-]{1,16}")


class ReplyRejected(ValueError):
    """A reply that cannot be aggregated; the node counts as failed for the round."""


def quote(text: object) -> str:
    """A node-chosen string, cut to MAX_QUOTE characters for logs and metrics.jsonl."""
    text = str(text)
    return text if len(text) <= MAX_QUOTE else text[:MAX_QUOTE] + f"... ({len(text)} chars)"


# In a `flwr run .` simulation a ClientApp's exception reaches the ServerApp as Ray's traceback
# around flwr's ClientAppException; the ClientApp's own message follows this.
_SIMULATED_NODE_MESSAGE = " occurred. Message: "


def error_reason(reason: str) -> str:
    """A node's error reason, quoted: a simulated node's is its ClientApp's message, not the
    Ray traceback before it (whose first MAX_QUOTE characters say nothing)."""
    if _SIMULATED_NODE_MESSAGE in reason:
        reason = reason.rsplit(_SIMULATED_NODE_MESSAGE, 1)[1].removesuffix("'>")
    return quote(reason)


def check_reply(
    reply: Message, shapes: Mapping[str, tuple[int, ...]], fmt: str, max_examples: int | None, num_partitions: int | None = None
) -> tuple[State, dict[str, float]]:
    """A node's update and the metrics to keep, or ReplyRejected naming why it cannot count.
    Sizes are checked before anything is decoded (app/comm.py); nothing from a node is trusted.
    Any unexpected failure while checking is a refusal naming the exception's type."""
    try:
        return _check(reply, shapes, fmt, max_examples, num_partitions)
    except ReplyRejected:
        raise
    except Exception as exc:  # noqa: BLE001 - a hostile reply must never end the round
        raise ReplyRejected(f"unreadable reply ({type(exc).__name__}: {quote(exc)})") from None


def _check(reply: Message, shapes, fmt: str, max_examples: int | None, num_partitions: int | None) -> tuple[State, dict[str, float]]:
    content = reply.content
    metrics = check_metrics(content, {"arrays": ArrayRecord, "wire": ConfigRecord, "metrics": MetricRecord}, max_examples, num_partitions)
    try:
        update = comm.decode(content["arrays"], content["wire"], expect_shapes=shapes, expect_format=fmt, expect_content=comm.UPDATE)
    except comm.WireError as exc:
        raise ReplyRejected(f"update refused: {quote(exc)}") from None
    return update, metrics


def check_metrics(content: RecordDict, kinds: Mapping[str, type], max_examples: int | None, num_partitions: int | None) -> dict[str, float]:
    """The metrics to keep of a reply that must hold records of `kinds`, its example count and
    partition checked; ReplyRejected naming why not."""
    missing = [k for k in kinds if k not in content]
    if missing:
        raise ReplyRejected(f"reply lacks {missing}; has {quote(sorted(content.keys()))}")
    if wrong := [k for k, kind in kinds.items() if not isinstance(content[k], kind)]:
        raise ReplyRejected(f"reply records {wrong} are not of the expected kinds ({', '.join(k.__name__ for k in kinds.values())})")
    metrics = kept_metrics(dict(content["metrics"]))
    examples = metrics["num-examples"]
    if examples <= 0 or examples != int(examples):
        raise ReplyRejected(f"num-examples {examples!r} is not a positive integer")
    if max_examples is not None and examples > max_examples:
        raise ReplyRejected(f"num-examples {int(examples)} exceeds the bound {max_examples} (strategy.max-num-examples)")
    partition = metrics["partition-id"]
    if partition < 0 or partition != int(partition) or (num_partitions is not None and partition >= num_partitions):
        raise ReplyRejected(f"partition-id {partition!r} is not one of 0..{num_partitions - 1 if num_partitions else 'n'} (dataset.num-partitions)")
    return metrics


def kept_metrics(metrics: dict) -> dict[str, float]:
    """The metrics to keep (the module's docstring says which); a required or known one that is
    not a finite number refuses the reply."""
    if lacking := [k for k in CLIENT_METRICS if k not in metrics]:
        raise ReplyRejected(f"metrics lack {lacking}")
    kept: dict[str, float] = {}
    extra = 0
    for key in sorted(metrics):
        value = metrics[key]
        finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if key in KNOWN_METRICS:
            if not finite:
                raise ReplyRejected(f"metric {key!r} is not a finite number")
            kept[key] = float(value)
        elif finite and extra < MAX_EXTRA_METRICS and isinstance(key, str) and EXTRA_METRIC_NAME.fullmatch(key):
            kept[key] = float(value)
            extra += 1
    return kept


def reply_trainer_id(reply: Message) -> str | None:
    """The trainer the node says ran its round, if its reply names one in the expected shape."""
    record = reply.content.get(comm.TRAINER_RECORD) if comm.TRAINER_RECORD in reply.content else None
    if not isinstance(record, ConfigRecord) or len(record) != 1:
        return None
    value = record.get(comm.TRAINER_ID_KEY)
    return value if isinstance(value, str) and TRAINER_ID.fullmatch(value) else None
