"""A typed, tolerant reading of `metrics.jsonl` lines for the plot and the report.

The lines carry what nodes reported (train loss, their clocks, GPU figures, update norms): any
value may be missing, of the wrong type or extreme. Each field is read once here into a finite
number, a bounded integer or a short printable string, or None when it is absent or unusable, so
that the figures downstream never meet a string where a number should be, an infinity, an
integer too big for a float or a 10 MB reason. Extreme finite values (train-loss=1.7e308) are
kept: the charts decide how to draw them.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass, field
from typing import Any

TEXT_LIMIT = 300  # characters of a node-chosen string (a failure reason, a node name) shown
NODE_EVENTS = ("t_process_start", "t_pulled", "t_handler_start", "t_turn_start", "t_train_start", "t_train_end", "t_turn_end", "t_reply")
SERVER_EVENTS = ("t_sent", "t_received")
GPU_FIELDS = ("gpu_mem_peak_bytes", "gpu_mem_mean_bytes", "gpu_util_mean", "gpu_samples")
ROUND_LIMIT = 2**31  # a round number beyond this is not one
NODE_ID_LIMIT = 2**64  # flwr's node ids are unsigned 64-bit
PARTITION_LIMIT = 2**31


def number(value: Any) -> float | None:
    """A finite float, or None (absent, a bool, a string, NaN, an infinity, an int beyond float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        result = float(value)
    except OverflowError:
        return None
    return result if math.isfinite(result) else None


def integer(value: Any, limit: int) -> int | None:
    """A whole number in [0, limit), given as an int or an integral float, or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and 0 <= value < limit else None


def text(value: Any, limit: int = TEXT_LIMIT) -> str | None:
    """A printable one-line string of at most `limit` characters, or None when not a string.
    Control characters become spaces; unpaired surrogates (valid JSON, not UTF-8) become '?'."""
    if not isinstance(value, str):
        return None
    value = value.encode("utf-8", "replace").decode("utf-8")
    if len(value) > limit:
        value = value[: limit - 1] + "…"
    return "".join(" " if unicodedata.category(c) in ("Cc", "Zl", "Zp") else c for c in value)


@dataclass
class Client:
    """One client's reply that counted in a round."""

    node_id: int | None
    partition_id: int | None
    train_loss: float | None
    num_examples: float | None
    events: dict[str, float]  # the t_* stamps that are usable: the ServerApp's and the node's
    gpu: dict[str, float]  # GPU_FIELDS that are usable
    update_norm: float | None  # L2 norm of the update before clipping
    update_scale: float | None  # 1.0: not clipped
    trainer_id: str | None = None  # placement:device:process that ran the round (older metrics: none)

    @property
    def site(self) -> str:
        return site_label(self.partition_id)

    @property
    def clipped(self) -> bool:
        return self.update_scale is not None and self.update_scale < 1.0


@dataclass
class Failure:
    """A sampled node whose reply did not count: no reply, an error, or refused (with why)."""

    node_id: int | None
    node: str | None  # the node's name as the ServerApp knew it
    reason: str
    attempt: int | None


@dataclass
class Round:
    number: int | None
    status: str
    train_loss: float | None
    clients: list[Client] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    cumulative_mib: float | None = None
    bytes_round: float | None = None
    round_seconds: float | None = None
    aggregate_seconds: float | None = None
    t_start: float | None = None
    t_end: float | None = None
    comm_format: str | None = None
    norm_bound: float | None = None
    clipped: int | None = None
    dp_epsilon: float | None = None  # the run's epsilon after this round (None: off, or no guarantee)
    dp_delta: float | None = None  # None: differential privacy off

    @property
    def aggregated(self) -> bool:
        return self.status == "aggregated"


def site_label(partition_id: int | None) -> str:
    return f"site {partition_id}" if partition_id is not None else "site ?"


def parse_client(raw: Any) -> Client | None:
    if not isinstance(raw, dict):
        return None
    events = {key: v for key in (*SERVER_EVENTS, *NODE_EVENTS) if (v := number(raw.get(key))) is not None}
    gpu = {key: v for key in GPU_FIELDS if (v := number(raw.get(key))) is not None}
    return Client(
        node_id=integer(raw.get("node_id"), NODE_ID_LIMIT),
        partition_id=integer(raw.get("partition_id"), PARTITION_LIMIT),
        train_loss=number(raw.get("train_loss")),
        num_examples=number(raw.get("num_examples")),
        events=events, gpu=gpu,
        update_norm=number(raw.get("update_norm")),
        update_scale=number(raw.get("update_scale")),
        trainer_id=text(raw.get("trainer_id"), 100),
    )


def parse_failure(raw: Any) -> Failure | None:
    if not isinstance(raw, dict):
        return None
    return Failure(integer(raw.get("node_id"), NODE_ID_LIMIT), text(raw.get("node"), 80),
                   text(raw.get("reason")) or "no reason recorded", integer(raw.get("attempt"), ROUND_LIMIT))


def _items(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def parse_round(raw: dict[str, Any]) -> Round:
    """One metrics line. A line from before a field existed (no status: every round then
    aggregated) reads the same as today's with that field missing."""
    return Round(
        number=integer(raw.get("round"), ROUND_LIMIT),
        status=text(raw.get("status"), 40) or "aggregated",
        train_loss=number(raw.get("train_loss")),
        clients=[c for c in map(parse_client, _items(raw.get("clients"))) if c is not None],
        failed=[f for f in map(parse_failure, _items(raw.get("failed"))) if f is not None],
        cumulative_mib=number(raw.get("cumulative_mib")),
        bytes_round=number(raw.get("bytes_round")),
        round_seconds=number(raw.get("round_seconds")),
        aggregate_seconds=number(raw.get("aggregate_seconds")),
        t_start=number(raw.get("t_start")),
        t_end=number(raw.get("t_end")),
        comm_format=text(raw.get("comm_format"), 40),
        norm_bound=number(raw.get("norm_bound")),
        clipped=integer(raw.get("clipped"), 2**31),
        dp_epsilon=number(raw.get("dp_epsilon")),
        dp_delta=number(raw.get("dp_delta")),
    )


def parse_rounds(raw: list[dict[str, Any]]) -> list[Round]:
    return [parse_round(record) for record in raw]


def site_names(rounds: list[Round]) -> dict[int, str]:
    """node id -> "site N", from the replies that counted (a node's partition is known only from
    its own metrics); other nodes keep their name."""
    names: dict[int, str] = {}
    for record in rounds:
        for client in record.clients:
            if client.node_id is not None and client.partition_id is not None:
                names.setdefault(client.node_id, client.site)
    return names
