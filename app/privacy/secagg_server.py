"""The ServerApp's side of secure aggregation: one attempt of a round, in four message stages
(setup, share-keys, the masked `train`, unmask; app/privacy/secagg_node.py says what a node
does in each). The ServerApp relays keys and encrypted shares it cannot read, sums the masked
inputs, and learns only the sum: it reconstructs the mask seed b of each node whose masked
input it counted and the mask key of each node that dropped after share-keys, never both for one
node (each node answers for a node one way only, and the threshold is more than half).

What it still checks: every reply's fields, sizes and types before decoding (masked inputs:
uint16, exactly parameters + weight digits); reconstructed secrets against the hash of b and the
public mask key each node sent at setup (a wrong share fails that check: other subsets of the
shares are tried); the unmasked sum against what the survivors' clipped, weighted updates can
reach (their total weight x the norm bound, plus the grid's rounding and the DP noise), and the
total weight against the replies' example counts. A refused sum refuses the round's aggregate.

Setup and share-keys need no update: while round r's masked updates are out, the ServerApp runs
round r+1's (`Prepared`, a thread; the two threads take turns on the grid) for the sample
configure_round will draw, so round r+1 starts at train. Their bytes count in round r+1's (those
of a preparation left unused too), their failures among its failed nodes. A SuperNode handles one message at a time, so
a node sampled in both rounds answers setup(r+1) only once it has replied to train(r) (and may
answer unmask(r) before share-keys(r+1)): until round r+1 starts, a prepared stage waits up to
round r's timeout longer than an inline one; from then on, a stage's seconds, as inline. Round
r+1 runs its key stages inline when the prepared ones are unusable: another sample (the online
nodes changed), fewer nodes than the threshold through share-keys, an error; so does every retry.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares

from app import comm
from app.aggregation.bounds import AGGREGATE_SLACK, AggregateRefused
from app.aggregation.replies import ReplyRejected, error_reason, quote
from app.privacy import ring
from app.privacy.dp import node_noise_std
from app.privacy.secagg_node import pairwise_seed, private_key
from app.privacy.secagg_records import (
    HASH_BYTES, MAX_CIPHERTEXT_BYTES, PUBLIC_KEY_BYTES, RECORD, SETUP, SHARE_BYTES, SHARE_KEYS, UNMASK, Announcement, ProtocolError,
    byte_strings, content_of, encode_public_key, mapping, node_ids, public_key, read_masked,
)

# The fewest nodes a round samples: with a majority threshold, three tolerate one dropout.
MIN_NODES = 3
# What a masked reply may hold: the masked update, its metrics and which trainer ran it (checked
# like a plain reply's, app/aggregation/replies.py reply_trainer_id).
MASKED_REPLY_RECORDS = {"arrays", "metrics", comm.TRAINER_RECORD}
# Setup, share-keys and unmask do no training: they wait at most this (or strategy.round-timeout).
STAGE_SECONDS = 120.0
# With DP noise on, the grid reaches this many standard deviations of a node's noise share beyond
# the clip range (a coordinate beyond it is clipped: about 2e-9 of them).
NOISE_TAILS = 6.0
# Subsets of shares tried per secret when some shares are wrong (C(16, 9) = 11440 would be slow).
MAX_SHARE_SUBSETS = 64

Exchange = Callable[..., tuple[list[Message], float, dict[str, float], str | None]]
GiveUp = Callable[[float], str | None]  # given when a stage began (monotonic s): why it stops waiting now, or None
log = logging.getLogger(__name__)


@dataclass
class Attempt:
    """One attempt's outcome, in the shape of FedTuneProx.collect's plus the unmasked sum."""

    valid: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0
    bytes_down_unconfirmed: int = 0
    bytes_keys: int = 0
    bytes_shares: int = 0
    bytes_masked: int = 0
    sent: float = 0.0
    arrived: dict = field(default_factory=dict)
    total: np.ndarray | None = None  # the weighted sum of the survivors' updates, flat float64
    total_weight: int = 0
    announced: Announcement | None = None
    problem: str | None = None
    seconds: dict = field(default_factory=dict)  # per stage, and the ServerApp's unmasking
    hidden: float | None = None  # of setup and share-keys, the seconds that ran during the previous round (None: inline)

    def add_traffic(self, other: Attempt) -> None:
        """Count `other`'s bytes in this attempt's (a prepared session that went unused moved them too)."""
        for key in ("bytes_down", "bytes_up", "bytes_keys", "bytes_shares"):
            setattr(self, key, getattr(self, key) + getattr(other, key))


def announcement(nodes: list[int], server_round: int, parameters: int, norm_bound: float, grid_bound: float,
                 max_weight: int, min_replies: int, noise_multiplier: float) -> Announcement:
    """The session's parameters. The threshold is a majority of the sampled nodes; the grid's
    range covers the larger of the round's bound and the recipe's (app/privacy/ring.py says why
    per coordinate) plus NOISE_TAILS of a node's noise share."""
    n = len(nodes)
    threshold = n // 2 + 1
    min_nodes = max(threshold, min(min_replies, n))
    noise = node_noise_std(noise_multiplier, norm_bound, max_weight, min_nodes) if noise_multiplier > 0 else 0.0
    value_range = ring.coordinate_range(max(norm_bound, grid_bound), parameters) + NOISE_TAILS * noise / max_weight
    return Announcement(session=secrets.token_hex(16), server_round=server_round, nodes=tuple(sorted(nodes)), threshold=threshold,
                        min_nodes=min_nodes, parameters=parameters, norm_bound=norm_bound, max_weight=max_weight,
                        grid_levels=ring.levels(n), value_range=value_range)


KEY_FIELDS = ("pk_c", "pk_s", "b_hash")  # the rest of a record's bytes are shares (encrypted or not)


def payload_bytes(content: object, keys: bool) -> int:
    """Bytes of public keys and hashes (`keys`), else of shares, in a message's `secagg` record."""
    record = content.get(RECORD) if isinstance(content, RecordDict) else None
    if not isinstance(record, ConfigRecord):
        return 0
    values = [v for name, value in record.items() if (name in KEY_FIELDS) == keys for v in (value if isinstance(value, list) else [value])]
    return sum(len(v) for v in values if isinstance(v, bytes))


class SecureAttempt:
    """One attempt's four stages over `grid` with `exchange` (app/server_app.py's): `keys` (setup,
    share-keys), then `finish` (the masked train, unmask)."""

    def __init__(self, grid: Any, exchange: Exchange, names: Mapping[int, str], round_timeout: float, announced: Announcement) -> None:
        self.grid, self.exchange, self.names, self.round_timeout = grid, exchange, names, round_timeout
        self.stage_seconds = min(STAGE_SECONDS, round_timeout)
        self.out = Attempt(announced=announced)
        self.keys_by_node: dict[int, tuple[bytes, bytes, bytes]] = {}
        self.sent_shares: dict[int, dict[int, bytes]] = {}

    def keys(self, busy: float = 0.0, give_up: GiveUp | None = None) -> bool:
        """Setup and share-keys; False (out.problem says why) when fewer nodes than the threshold got
        through. `busy`: how long a node may still be training the previous round before it takes
        setup; `give_up` may end a stage's wait sooner."""
        a, stage = self.out.announced, self.stage_seconds
        keys = self._stage(SETUP, "setup", {n: a.record() for n in a.nodes}, self._read_keys, stage + busy, give_up)
        if len(keys) < a.threshold:
            self._stop(f"{len(keys)} node(s) answered setup, the threshold is {a.threshold}")
            return False
        forwarded = ConfigRecord({"session": a.session, "nodes": [str(n) for n in keys], "pk_c": [k[0] for k in keys.values()],
                                  "pk_s": [k[1] for k in keys.values()]})
        # A node that answered setup is past the previous round's train: at most its unmask (a stage) is ahead.
        sent_shares = self._stage(SHARE_KEYS, "share-keys", {n: forwarded for n in keys}, lambda n, c: self._read_shares(c, set(keys)),
                                  stage + (stage if busy else 0.0), give_up)
        if len(sent_shares) < a.threshold:
            self._stop(f"{len(sent_shares)} node(s) sent their shares, the threshold is {a.threshold}")
            return False
        self.keys_by_node, self.sent_shares = keys, sent_shares
        return True

    def finish(self, train_messages: list[Message], check: Callable[[RecordDict], dict[str, float]], pushed: Callable[[], None] | None = None) -> Attempt:
        """The masked train and unmask, after `keys`. `train_messages` are the round's (one per
        sampled node); `check` returns a masked reply's metrics or raises ReplyRejected; `pushed`
        is called once the train messages are out."""
        a, keys, sent_shares = self.out.announced, self.keys_by_node, self.sent_shares
        holders = sorted(sent_shares)  # the nodes whose shares went out: each masks with all of them
        masked = self._train(train_messages, ConfigRecord({"session": a.session, "nodes": [str(n) for n in holders],
                                                           "pk_s": [keys[n][1] for n in holders]}), check, pushed)
        if len(masked) < a.min_nodes:
            return self._stop(f"{len(masked)} masked input(s), at least {a.min_nodes} are needed to unmask the sum")
        dropped = [n for n in holders if n not in masked]
        asks = {n: ConfigRecord({"session": a.session, "survivors": [str(m) for m in sorted(masked)], "dropped": [str(d) for d in dropped],
                                 "nodes": [str(h) for h in holders],
                                 "pk_c": [keys[h][0] for h in holders], "ciphertexts": [sent_shares[h][n] for h in holders]})
                for n in masked}
        shares = self._stage(UNMASK, "unmask", asks, lambda n, c: self._read_unmask(c, set(holders)), self.stage_seconds)
        started = time.perf_counter()
        try:
            self._unmask(masked, dropped, shares, keys)
        except ProtocolError as exc:
            return self._stop(str(exc))
        finally:
            self.out.seconds["unmask-sum"] = time.perf_counter() - started
        return self.out

    def _stop(self, reason: str) -> Attempt:
        self.out.problem = f"secure aggregation: {reason}"
        self.out.valid = []
        return self.out

    def _fail(self, node: int, stage: str, reason: str) -> None:
        self.out.failed.append({"node_id": node, "node": self.names[node], "reason": f"secure aggregation {stage}: {reason}"})

    def _stage(self, message_type: str, stage: str, records: Mapping[int, ConfigRecord], read: Callable[[int, RecordDict], Any],
               timeout: float, give_up: GiveUp | None = None) -> dict[int, Any]:
        messages = [Message(RecordDict({RECORD: r}), message_type=message_type, dst_node_id=n) for n, r in records.items()]
        started, since = time.perf_counter(), time.monotonic()
        replies, _, _, problem = self.exchange(self.grid, messages, timeout, enough=give_up and (lambda _: give_up(since) is not None))
        problem = problem or (give_up and give_up(since))
        self.out.seconds[stage] = time.perf_counter() - started
        self._count_down(messages)
        got = {}
        for msg, reply, reason in self._pair(messages, replies, problem, timeout):
            node = msg.metadata.dst_node_id
            if reply is not None:
                keys, shares = payload_bytes(reply.content, keys=True), payload_bytes(reply.content, keys=False)
                self.out.bytes_up += keys + shares
                self.out.bytes_keys += keys
                self.out.bytes_shares += shares
                try:
                    got[node] = read(node, reply.content)
                    continue
                except ProtocolError as exc:
                    reason = f"refused: {quote(exc)}"
                except Exception as exc:  # noqa: BLE001 - one hostile reply must never end the round
                    reason = f"refused: unreadable reply ({type(exc).__name__}: {quote(exc)})"
            self._fail(node, stage, reason)
        return got

    def _count_down(self, messages: list[Message]) -> None:
        """The keys and shares a stage's messages forward (counted when pushed: they are small)."""
        keys, shares = (sum(payload_bytes(m.content, keys=k) for m in messages) for k in (True, False))
        self.out.bytes_down += keys + shares
        self.out.bytes_keys += keys
        self.out.bytes_shares += shares

    def _pair(self, messages: list[Message], replies: list[Message], problem: str | None, timeout: float):
        """Each message with its node's usable reply (None if none) and the reason it has none."""
        by_request = {r.metadata.reply_to_message_id: r for r in replies}
        for msg in messages:
            reply = by_request.get(msg.metadata.message_id)
            if reply is None:
                yield msg, None, problem or f"no reply within {timeout:g} s"
            elif reply.metadata.src_node_id != msg.metadata.dst_node_id or reply.has_error():
                yield msg, None, f"error {reply.error.code}: {error_reason(reply.error.reason)}"
            else:
                yield msg, reply, None

    def _read_keys(self, node: int, content: RecordDict) -> tuple[bytes, bytes, bytes]:
        fields = content_of(content, {"session": str, "pk_c": bytes, "pk_s": bytes, "b_hash": bytes})
        self._same_session(fields)
        pk_c, pk_s, b_hash = (byte_strings([fields[k]], k, size=s)[0] for k, s in (("pk_c", PUBLIC_KEY_BYTES), ("pk_s", PUBLIC_KEY_BYTES), ("b_hash", HASH_BYTES)))
        public_key(pk_c, "pk_c")  # each must be a point on the curve
        public_key(pk_s, "pk_s")
        return pk_c, pk_s, b_hash

    def _read_shares(self, content: RecordDict, peers: set[int]) -> dict[int, bytes]:
        fields = content_of(content, {"session": str, "dst": list, "ciphertexts": list})
        self._same_session(fields)
        return mapping(fields, "dst", "ciphertexts", peers, most=MAX_CIPHERTEXT_BYTES)

    def _read_unmask(self, content: RecordDict, masked_with: set[int]) -> dict[int, bytes]:
        fields = content_of(content, {"session": str, "nodes": list, "shares": list})
        self._same_session(fields)
        ids = node_ids(fields["nodes"], "nodes")
        shares = byte_strings(fields["shares"], "shares", size=SHARE_BYTES)
        if len(ids) != len(shares) or not set(ids) <= masked_with:
            raise ProtocolError(f"{len(ids)} node ids for {len(shares)} shares, of nodes outside the session's or not")
        return dict(zip(ids, shares, strict=True))

    def _same_session(self, fields: dict) -> None:
        if fields["session"] != self.out.announced.session:
            raise ProtocolError(f"session {fields['session'][:64]!r}, expected this attempt's")

    def _train(self, messages: list[Message], peers: ConfigRecord, check, pushed: Callable[[], None] | None) -> dict[int, np.ndarray]:
        """Push the train messages, with the `peers` to mask with, to those of them; the masked
        inputs that pass the checks, by node."""
        count = self.out.announced.parameters + ring.WEIGHT_DIGITS
        holders = set(node_ids(peers["nodes"], "nodes"))
        # The round's messages share one RecordDict: each node's gets its own, with the peers.
        chosen = [Message(content=RecordDict({**dict(m.content.items()), RECORD: peers}), message_type=m.metadata.message_type,
                          dst_node_id=m.metadata.dst_node_id) for m in messages if m.metadata.dst_node_id in holders]
        started = time.perf_counter()
        replies, self.out.sent, self.out.arrived, problem = self.exchange(self.grid, chosen, self.round_timeout, pushed=pushed)
        self.out.seconds["train"] = time.perf_counter() - started
        self._count_down(chosen)
        masked = {}
        for msg, reply, reason in self._pair(chosen, replies, problem, self.round_timeout):
            node = msg.metadata.dst_node_id
            down = comm.record_bytes(msg.content["arrays"])
            if reply is None:
                self.out.bytes_down_unconfirmed += down
                self._fail(node, "train", reason)
                continue
            self.out.bytes_down += down
            try:
                if not {"arrays", "metrics"} <= set(reply.content.keys()) <= MASKED_REPLY_RECORDS:
                    raise ProtocolError(f"a masked reply holds 'arrays' and 'metrics' (and at most {comm.TRAINER_RECORD!r}), "
                                        f"this one {quote(sorted(reply.content.keys()))}")
                metrics = check(reply.content)
                masked[node] = read_masked(reply.content["arrays"], count)
                size = len(reply.content["arrays"]["masked"].data)
                self.out.bytes_up += size
                self.out.bytes_masked += size
                self.out.valid.append((msg, reply, None, metrics))
            except (ProtocolError, ReplyRejected) as exc:
                self._fail(node, "train", f"refused: {quote(exc)}")
            except Exception as exc:  # noqa: BLE001 - one hostile reply must never end the round
                self._fail(node, "train", f"refused: unreadable reply ({type(exc).__name__}: {quote(exc)})")
        return masked

    def _unmask(self, masked: Mapping[int, np.ndarray], dropped: list[int], shares: Mapping[int, Mapping[int, bytes]], keys) -> None:
        a = self.out.announced
        total = np.zeros(a.parameters + ring.WEIGHT_DIGITS, dtype=ring.RING_DTYPE)
        for vector in masked.values():
            total += vector
        holders = [shares[h] for h in sorted(shares)]  # in node order: the same subsets tried first every time
        for node in masked:
            seed = reconstruct([s[node] for s in holders if node in s], a.threshold,
                               lambda b, node=node: hashlib.sha256(b).digest() == keys[node][2], f"node {node}'s mask seed")
            total -= ring.mask(seed, total.size)
        for gone in dropped:
            raw = reconstruct([s[gone] for s in holders if gone in s], a.threshold,
                              lambda k, gone=gone: _public_of(k) == keys[gone][1], f"dropped node {gone}'s mask key")
            key = private_key(raw)
            for node in masked:
                pair = ring.mask(pairwise_seed(key, public_key(keys[node][1], "pk_s")), total.size)
                total = total - pair if node < gone else total + pair
        digit_sums = total[a.parameters:].view(np.int16)
        if digit_sums.min() < 0 or digit_sums.max() > (ring.DIGIT_BASE - 1) * len(masked):
            raise ProtocolError("the unmasked weight digits are out of range: a node sent an out-of-range input")
        self.out.total_weight = ring.digits_total(digit_sums)
        self.out.total = ring.dequantize_sum(total[: a.parameters], a.value_range, a.grid_levels) * a.max_weight


class Prepared:
    """A round's key stages, run in a thread while the previous round trains."""

    def __init__(self, attempt: SecureAttempt, busy: float) -> None:
        self.attempt, self.usable = attempt, False
        self.round = attempt.out.announced.server_round
        self._other_sample, self._round_started = False, math.inf  # set by `take`, read by the thread
        self._thread = threading.Thread(target=self._run, args=(busy,), name=f"secagg-prepare-{self.round}", daemon=True)
        self._thread.start()

    def _run(self, busy: float) -> None:
        try:
            self.usable = self.attempt.keys(busy, self._give_up)
        except Exception as exc:  # noqa: BLE001 - the round then runs its key stages inline
            self.attempt.out.problem = f"{type(exc).__name__}: {exc}"
            log.exception("secure aggregation: preparing round %d failed", self.round)

    def _give_up(self, since: float) -> str | None:
        """Once its round has started, a stage waits as an inline one would: no node has the
        previous round's work left."""
        if self._other_sample:
            return "the round drew another sample"
        if time.monotonic() > max(since, self._round_started) + self.attempt.stage_seconds:
            return f"no reply within {self.attempt.stage_seconds:g} s of round {self.round}'s start"
        return None

    def take(self, nodes: list[int]) -> SecureAttempt | None:
        """The prepared attempt for the round's sample `nodes`, once its key stages are done; None
        (the reason logged) when it is another sample's (stopped at once) or unusable."""
        self._other_sample = sorted(nodes) != list(self.attempt.out.announced.nodes)
        self._round_started = started = time.monotonic()
        self._thread.join()
        if self._other_sample or not self.usable:
            why = "the online nodes changed, so did the sample" if self._other_sample else self.attempt.out.problem
            log.warning("round %d: the prepared key stages are not used (%s): they run again", self.round, why)
            return None
        out = self.attempt.out
        out.hidden = max(0.0, out.seconds["setup"] + out.seconds["share-keys"] - (time.monotonic() - started))
        return self.attempt


def _public_of(raw: bytes) -> bytes | None:
    try:
        return encode_public_key(private_key(raw).public_key())
    except ValueError:
        return None


def reconstruct(shares: list[bytes], threshold: int, valid: Callable[[bytes], bool], what: str) -> bytes:
    """The secret behind `shares` that `valid` accepts, from `threshold` of them; wrong shares are
    outvoted by trying other subsets (at most MAX_SHARE_SUBSETS)."""
    if len(shares) < threshold:
        raise ProtocolError(f"{what}: {len(shares)} share(s), the threshold is {threshold}")
    for subset in itertools.islice(itertools.combinations(shares, threshold), MAX_SHARE_SUBSETS):
        try:
            secret = combine_shares(list(subset))
        except ValueError:
            continue
        if len(secret) == ring.SEED_BYTES and valid(secret):
            return secret
    raise ProtocolError(f"{what}: no {threshold} of its {len(shares)} shares reconstruct it")


def sum_allowance(out: Attempt, noise_multiplier: float) -> float:
    """The largest norm the survivors' weighted sum can honestly have: their total weight x the
    norm bound, plus a grid step per value per node and the DP noise's tail."""
    a = out.announced
    n = len(out.valid)
    step = a.value_range / a.grid_levels * a.max_weight
    rounding = n * step * math.sqrt(a.parameters)
    noise = 0.0
    if noise_multiplier > 0:
        noise = node_noise_std(noise_multiplier, a.norm_bound, a.max_weight, a.min_nodes) * math.sqrt(n) * (math.sqrt(a.parameters) + NOISE_TAILS)
    return out.total_weight * a.norm_bound * (1 + AGGREGATE_SLACK) + rounding + noise


def mean_update(out: Attempt, shapes: Mapping[str, tuple[int, ...]], claimed_weight: float, noise_multiplier: float) -> dict[str, np.ndarray]:
    """The survivors' weighted mean update, or AggregateRefused when the sum or its weight is
    beyond what honest nodes can send."""
    if out.total_weight != int(claimed_weight):
        raise AggregateRefused(f"aggregate refused: the masked total weight {out.total_weight} differs from the replies' num-examples ({claimed_weight:g})")
    norm = float(np.linalg.norm(out.total))
    if not math.isfinite(norm) or norm > (allowed := sum_allowance(out, noise_multiplier)):
        raise AggregateRefused(f"aggregate refused: the unmasked sum has norm {norm:.6g}, beyond the {allowed:.6g} its {len(out.valid)} nodes can reach")
    mean, offset = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape, dtype=np.int64))
        mean[name] = (out.total[offset: offset + size] / out.total_weight).astype(np.float32).reshape(shape)
        offset += size
    return mean
