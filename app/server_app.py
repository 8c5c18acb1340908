"""ServerApp: FedProx over the DoRA adapter, with a cosine LR across rounds, checkpoints and
per-round metrics. It needs no GPU and never loads the base model: the initial adapter comes
from the SuperNodes (`query.init`), taken when two of them agree (app/aggregation/initial.py),
and checkpoints are written from the state dict.

Rounds survive lost nodes: a round aggregates the replies that arrive within
`strategy.round-timeout`, weighted over those only; with fewer than `strategy.min-replies` it
is retried, skipped or fails the run (`strategy.on-too-few-replies`), never aggregated from
nothing. A run that went through its rounds but aggregated none, or skipped more than
`strategy.max-skipped-fraction` of them, ends failed (app/aggregation/outcome.py).
`resume-from=<results>/run-<id>/peft_N` continues a stopped run at round N+1 with the same LR
schedule, node samples and communication budget.

Nodes send their round's update, not their weights; the ServerApp keeps the global adapter in
float32 and adds the example-weighted mean update (app/comm.py says why). Nothing a node sends is
trusted (app/aggregation/): every reply is checked before it counts (`check_reply`), every
update is clipped to the round's norm bound, and the aggregate is checked before it is saved or
sent; a reply that fails is a failed node for that round, an aggregate that fails a skipped
round, each with the reason in metrics.jsonl. Every wait has a deadline: for nodes
(NODE_WAIT_SECONDS), for replies and for the initial adapter (`strategy.round-timeout`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedProx
from flwr.superlink.grid import http_grid
from flwr.supercore.inflatable.inflatable_utils import ObjectPushError

from app import comm
from app.aggregation.aggregate import apply_mean_update, weighted_mean
from app.aggregation.bounds import AggregateRefused, check_aggregate, clip, recipe_norm_bound, round_norm_bound, update_norm
from app.aggregation.initial import INITIAL_ASK, InitialAdapterVote
from app.aggregation.outcome import failure_reasons, run_failure
from app.aggregation.replies import ReplyRejected, check_metrics, check_reply, error_reason, quote, reply_trainer_id
from app.config import ConfigError, Settings, load_settings
from app.node.flwr_patches import PATCHED_VERSION, bound_reply_pulls, shorten_pull_retry
from app.privacy import secagg_server
from app.privacy.central import RoundPrivacy
from app.privacy.dp import guaranteed_noise_multiplier
from app.privacy.secagg_records import Announcement
from app.results.checkpoint import check_same_layout, load_resume_point, save_adapter
from app.results.metrics import MIB, PLOT_NAME, append_jsonl, plot_run, read_jsonl, write_json_atomic

log = logging.getLogger(__name__)
app = ServerApp()
State = Mapping[str, np.ndarray]

# The ServerApp's own short poll instead of Grid.send_and_receive's fixed 3 s sleep.
POLL_SECONDS = 0.25
# What a reply holds beside its arrays (wire index, metrics, records): far less than this.
REPLY_SLACK_BYTES = 1 << 20
# How long a round, or the initial adapter, waits for enough SuperNodes to be online.
NODE_WAIT_SECONDS = 600.0
# Once one node is online, how long the initial adapter waits for INITIAL_ASK to compare.
INITIAL_PEERS_WAIT_SECONDS = 60.0
# What the Grid raises while the SuperLink is briefly away: an expired push session, an HTTP
# error, a refused connection.
TRANSPORT_ERRORS = (ObjectPushError, httpx.HTTPError, OSError)


class TooFewReplies(RuntimeError):
    """A round got fewer usable replies than strategy.min-replies and the policy is 'fail'."""


class NodesUnavailable(RuntimeError):
    """Not enough SuperNodes came online, or no two agreed on the initial adapter, in time."""


class RunFailed(RuntimeError):
    """The run went through its rounds but trained too little (app/aggregation/outcome.py)."""


def cosine_lr(server_round: int, total_rounds: int, lr_max: float, lr_min: float) -> float:
    """FlowerTune's per-round learning rate: cosine annealing from lr_max to lr_min."""
    return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * server_round / total_rounds))


def sample_nodes(nodes: list[Any], sample_size: int, seed: int, server_round: int, attempt: int) -> list[Any]:
    """A sample that depends only on (seed, round, attempt) and the online nodes' names, not on
    what ran before: a resumed run draws the same nodes as an uninterrupted one. Nodes sort by
    their registered name (stable across launches), then id."""
    ordered = sorted(nodes, key=lambda n: (n.name or "", n.node_id))
    digest = hashlib.sha256(f"{seed}:{server_round}:{attempt}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big")).sample(ordered, sample_size)


def exchange(
    grid: Grid, messages: list[Message], timeout: float, enough: Callable[[list[Message]], bool] | None = None,
    pushed: Callable[[], None] | None = None,
) -> tuple[list[Message], float, dict[str, float], str | None]:
    """Push `messages` (then call `pushed`), then pull replies every POLL_SECONDS until all are in, `enough(replies)`
    says the replies so far suffice, or `timeout` s have passed. Returns the replies, when the push finished, when each reply arrived (epoch s,
    keyed by the message it answers) and, for replies that never came, a transport problem
    seen on the way (a SuperLink restart can expire a push session or refuse a pull): that
    attempt then fails like a lost node instead of ending the run."""
    try:
        pending = {i for i in grid.push_messages(messages) if i}
    except TRANSPORT_ERRORS as exc:
        log.warning("pushing %d message(s) failed: %s: %s", len(messages), type(exc).__name__, exc)
        return [], time.time(), {}, f"not delivered ({type(exc).__name__}: {exc})"
    sent = time.time()
    if pushed is not None:
        pushed()
    problem = None if len(pending) == len(messages) else "not delivered (the SuperLink refused the message)"
    deadline = time.monotonic() + timeout
    replies, arrived = [], {}
    while pending:
        try:
            for reply in grid.pull_messages(list(pending)):
                replies.append(reply)
                arrived[reply.metadata.reply_to_message_id] = time.time()
                pending.discard(reply.metadata.reply_to_message_id)
        except TRANSPORT_ERRORS as exc:  # transient while the SuperLink restarts: keep polling
            problem = f"reply not pulled ({type(exc).__name__}: {exc})"
            log.warning("pulling replies failed: %s", problem)
        if not pending or time.monotonic() >= deadline or (enough is not None and enough(replies)):
            break
        time.sleep(POLL_SECONDS)
    return replies, sent, arrived, problem


def node_names(nodes: Iterable[Any]) -> dict[int, str]:
    return {n.node_id: n.name or str(n.node_id) for n in nodes}


def wait_for_nodes(grid: Grid, needed: int, what: str) -> list[Any]:
    patience = NODE_WAIT_SECONDS
    deadline = time.monotonic() + patience
    while True:
        nodes = list(grid.get_nodes())
        if len(nodes) >= needed:
            return nodes
        if time.monotonic() >= deadline:
            raise NodesUnavailable(f"{what}: {len(nodes)} SuperNode(s) online after {patience:g} s, {needed} needed")
        log.info("%s: waiting for SuperNodes (%d online, %d needed)", what, len(nodes), needed)
        time.sleep(1)


class SerialGrid:
    """The run's Grid, its calls taking turns: with secure aggregation a thread runs the next
    round's key stages while the main one waits for the round's updates, and flwr 1.42 does not
    make its Grid safe to share (HttpGrid connects on first use, unlocked)."""

    def __init__(self, grid: Grid) -> None:
        self._grid, self._lock = grid, threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._grid, name)
        if not callable(attr):
            return attr

        def serial(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return attr(*args, **kwargs)

        return serial


class FedTuneProx(FedProx):
    """FedProx over updates: sends a per-round LR and the global adapter, keeps the float32
    master, checks every reply, samples reproducibly, survives lost or refused replies and logs
    every round, including its failures, to metrics.jsonl."""

    def __init__(self, settings: Settings, run_dir: Path) -> None:
        strategy = settings.strategy
        super().__init__(
            fraction_train=strategy.fraction_train,
            fraction_evaluate=strategy.fraction_evaluate,
            min_train_nodes=strategy.min_train_nodes,
            min_available_nodes=strategy.min_train_nodes,
            proximal_mu=strategy.proximal_mu,
        )
        self.settings = settings
        self.metrics_path = run_dir / "metrics.jsonl"
        self.cumulative_bytes = 0  # continued from the checkpoint's run state on resume
        self.max_examples = max_num_examples(settings)
        self.privacy = RoundPrivacy(settings, self.max_examples)  # refuses DP without a weight cap
        self.secure = settings.privacy.secure_aggregation
        self.prepared: secagg_server.Prepared | None = None  # the next round's key stages, under way
        if self.secure and self.max_examples is None:
            raise ConfigError("privacy.secure-aggregation needs a bound on a node's weight: set strategy.max-num-examples "
                              "(the dataset is not one the server knows the partition size of)")

    def lr(self, server_round: int) -> float:
        train = self.settings.train
        return cosine_lr(server_round, self.settings.num_server_rounds, train.learning_rate_max, train.learning_rate_min)

    def sample_size(self, online: int) -> int:
        strategy = self.settings.strategy
        needed = max(strategy.min_train_nodes, strategy.min_replies)
        return max(int(online * strategy.fraction_train), needed, secagg_server.MIN_NODES if self.secure else 1)

    def configure_round(self, server_round: int, master: State, grid: Grid, attempt: int) -> tuple[list[Message], dict[int, str]]:
        strategy, comm_settings = self.settings.strategy, self.settings.comm
        nodes = wait_for_nodes(grid, max(strategy.min_train_nodes, strategy.min_replies), f"round {server_round}")
        size = self.sample_size(len(nodes))
        if self.secure and len(nodes) < size:
            nodes = wait_for_nodes(grid, size, f"round {server_round} (secure aggregation takes {size} nodes)")
        nodes = sample_nodes(nodes, size, self.settings.seed, server_round, attempt)
        config = ConfigRecord({"server-round": server_round, "proximal-mu": self.proximal_mu, "lr": self.lr(server_round)})
        arrays, wire = comm.encode(master, comm.download_format(comm_settings.format), comm.WEIGHTS, comm_settings.layout)
        record = RecordDict({self.arrayrecord_key: arrays, "wire": wire, self.configrecord_key: config})
        messages = [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=n.node_id) for n in nodes]
        return messages, node_names(nodes)

    def collect(self, messages: list[Message], replies: Iterable[Message], names: dict[int, str], shapes: Mapping[str, tuple[int, ...]], problem: str | None = None) -> dict[str, Any]:
        """Sort replies into usable ones (in sample order, so aggregation is reproducible) and
        failures. Bytes count only what moved: a download is confirmed by the node's own reply
        (result or error); one with no reply from the node is reported apart as unconfirmed."""
        by_request = {r.metadata.reply_to_message_id: r for r in replies}
        out: dict[str, Any] = {"valid": [], "failed": [], "bytes_down": 0, "bytes_up": 0, "bytes_down_unconfirmed": 0}
        for msg in messages:
            node = msg.metadata.dst_node_id
            size = comm.record_bytes(msg.content[self.arrayrecord_key])
            reply = by_request.get(msg.metadata.message_id)
            if reply is None:
                out["bytes_down_unconfirmed"] += size
                reason = problem or f"no reply within strategy.round-timeout={self.settings.strategy.round_timeout:g} s"
            elif reply.metadata.src_node_id != node:  # the SuperLink answered for it: node lost
                out["bytes_down_unconfirmed"] += size
                reason = f"error {reply.error.code}: {reply.error.reason}"
            else:
                out["bytes_down"] += size
                try:
                    if not reply.has_error() and isinstance(reply.content.get(self.arrayrecord_key), ArrayRecord):
                        out["bytes_up"] += comm.record_bytes(reply.content[self.arrayrecord_key])
                    if reply.has_error():
                        reason = f"error {reply.error.code}: {error_reason(reply.error.reason)}"
                    else:
                        update, metrics = check_reply(reply, shapes, self.settings.comm.format, self.max_examples, self.settings.dataset.num_partitions)
                        out["valid"].append((msg, reply, update, metrics))
                        continue
                except ReplyRejected as exc:
                    reason = f"refused: {exc}"
                except Exception as exc:  # noqa: BLE001 - one hostile reply must never end the round
                    reason = f"refused: unreadable reply ({type(exc).__name__}: {quote(exc)})"
            out["failed"].append({"node_id": node, "node": names[node], "reason": reason})
            log.warning("node %s (%d) failed: %s", names[node], node, reason)
        return out

    def run_round(self, grid: Grid, server_round: int, master: State) -> State:
        """One round, retried per policy; appends its metrics line and returns the new global adapter."""
        strategy = self.settings.strategy
        started, t_start = time.perf_counter(), time.time()
        record: dict[str, Any] = {
            "round": server_round, "lr": self.lr(server_round), "status": "skipped", "attempts": 0,
            "comm_format": self.settings.comm.format, "train_loss": None, "clients": [], "failures": 0, "failed": [],
            "bytes_down": 0, "bytes_up": 0, "bytes_down_unconfirmed": 0, "t_start": t_start, "aggregate_seconds": 0.0,
            "norm_bound": None, "clipped": 0, "skip_reason": None, **self.privacy.fields(),
        }
        new_master = master
        shapes = comm.shapes_of(master)
        attempts = 1 + (strategy.max_retries if strategy.on_too_few_replies == "retry" else 0)
        if self.secure:
            # secagg_hidden_seconds: of setup and share-keys, prepared during the previous round, the time that ran before this one
            record.update(secagg_bytes_keys=0, secagg_bytes_shares=0, secagg_bytes_masked=0, secagg_seconds={}, secagg_prepared=False,
                          secagg_hidden_seconds=0.0)
        for attempt in range(attempts):
            messages, names = self.configure_round(server_round, master, grid, attempt)
            if self.secure:
                secure = self._secure_attempt(grid, server_round, master, messages, names)
                got, sent, arrived = vars(secure), secure.sent, secure.arrived
                for key in ("bytes_keys", "bytes_shares", "bytes_masked"):
                    record[f"secagg_{key}"] += got[key]
                for stage, seconds in secure.seconds.items():
                    record["secagg_seconds"][stage] = record["secagg_seconds"].get(stage, 0.0) + seconds
                if secure.hidden is not None:
                    record.update(secagg_prepared=True, secagg_hidden_seconds=secure.hidden)
                if secure.problem:
                    record["skip_reason"] = secure.problem
            else:
                replies, sent, arrived, problem = exchange(grid, messages, strategy.round_timeout)
                got = self.collect(messages, replies, names, shapes, problem)
            record["attempts"] += 1
            record["failures"] += len(got["failed"])
            record["failed"] += [dict(f, attempt=attempt) for f in got["failed"]]
            for key in ("bytes_down", "bytes_up", "bytes_down_unconfirmed"):
                record[key] += got[key]
            if len(got["valid"]) >= strategy.min_replies:
                aggregate_start = time.perf_counter()
                if self.secure:
                    new_master = self._aggregate_secure(master, secure, record, sent, arrived)
                else:
                    new_master = self._aggregate(master, got["valid"], record, sent, arrived)
                record["aggregate_seconds"] = time.perf_counter() - aggregate_start
                break
            log.warning(
                "round %d attempt %d: %d usable replies of %d sampled, below strategy.min-replies=%d",
                server_round, attempt + 1, len(got["valid"]), len(messages), strategy.min_replies,
            )
        if record["status"] == "aggregated":
            record["skip_reason"] = None  # an earlier attempt's reason, since retried
        elif record["skip_reason"] is None:
            record["skip_reason"] = f"fewer than strategy.min-replies={strategy.min_replies} usable replies"
        round_bytes = record["bytes_down"] + record["bytes_up"]
        self.cumulative_bytes += round_bytes
        record.update(bytes_round=round_bytes, cumulative_mib=self.cumulative_bytes / MIB, round_seconds=time.perf_counter() - started)
        if record["status"] != "aggregated" and strategy.on_too_few_replies == "fail":
            record["status"] = "failed"
        record["t_end"] = time.time()
        append_jsonl(self.metrics_path, record)
        if record["status"] == "failed":
            raise TooFewReplies(
                f"round {server_round}: {record['skip_reason']} (strategy.on-too-few-replies=fail); "
                f"resume from the last checkpoint with resume-from=..."
            )
        if record["status"] == "skipped":
            log.warning("round %d skipped after %d attempt(s) (%s): the global adapter is unchanged", server_round, record["attempts"], record["skip_reason"])
        else:
            log.info(
                "round %d: train loss %.4g over %d clients (%d failures, %d clipped to %.4g), %.2f MiB this round, %.2f MiB total",
                server_round, record["train_loss"], len(record["clients"]), record["failures"], record["clipped"], record["norm_bound"],
                round_bytes / MIB, self.cumulative_bytes / MIB,
            )
        return new_master

    def norm_bound(self, server_round: int, parameters: int, norms: list[float]) -> float:
        """The round's L2 bound on one update (app/aggregation/bounds.py)."""
        strategy = self.settings.strategy
        recipe = recipe_norm_bound(self.settings.train.training_arguments.max_steps, self.lr(server_round), parameters)
        return round_norm_bound(strategy.update_norm_bound, recipe, strategy.update_norm_median_multiple, norms)

    def _aggregate(self, master: State, valid: list, record: dict[str, Any], sent: float, arrived: dict[str, float]) -> State:
        """The new global adapter from the usable replies, each clipped to the round's norm bound;
        the old one (round skipped, reason recorded) if the aggregate fails its check."""
        norms = [update_norm(update) for _, _, update, _ in valid]
        bound = self.norm_bound(record["round"], sum(v.size for v in master.values()), norms)
        record["norm_bound"] = bound
        updates, weights = [], []
        for (msg, reply, update, metrics), norm in zip(valid, norms, strict=True):
            clipped, scale = clip(update, norm, bound)
            updates.append(clipped)
            weights.append(metrics["num-examples"])
            record["clipped"] += int(scale < 1.0)
            client = client_entry(msg, reply, metrics, sent, arrived, norm, scale)
            record["clients"].append(client)
            if scale < 1.0:
                log.warning("round %d: node %d's update (norm %.4g) clipped to the norm bound %.4g", record["round"], client["node_id"], norm, bound)
        new_master = apply_mean_update(master, updates, weights)
        try:
            check_aggregate(master, new_master, bound)  # before the noise: app/privacy/central.py says why
        except AggregateRefused as exc:
            record["skip_reason"] = str(exc)
            return master
        finally:
            record.update(self.privacy.spend())  # computed from the updates: spends, released or refused
        new_master, noise = self.privacy.noised(new_master, bound, sum(weights))
        record.update(noise)
        record["status"] = "aggregated"
        record["train_loss"] = weighted_mean([c["train_loss"] for c in record["clients"]], weights)
        return new_master

    def _secure_attempt(self, grid: Grid, server_round: int, master: State, messages: list[Message], names: dict[int, str]) -> secagg_server.Attempt:
        """One attempt under secure aggregation (app/privacy/secagg_server.py), its key stages
        prepared during the previous round if they can be used."""
        settings, parameters = self.settings, sum(v.size for v in master.values())
        nodes = [m.metadata.dst_node_id for m in messages]
        prepared = None
        if self.prepared is not None and self.prepared.round == server_round:  # the round's first attempt takes it
            prepared, self.prepared = self.prepared, None
        secure = prepared.take(nodes) if prepared is not None else None
        if secure is None:
            secure = self._inline(grid, server_round, parameters, nodes, names)
            if prepared is not None:
                secure.out.add_traffic(prepared.attempt.out)
        if secure.out.problem:
            return secure.out
        kinds = {self.arrayrecord_key: ArrayRecord, "metrics": MetricRecord}

        def check(content: RecordDict) -> dict[str, float]:
            return check_metrics(content, kinds, self.max_examples, settings.dataset.num_partitions)

        def prepare_next() -> None:  # once this round's updates are out, never after the last round or twice
            if server_round < settings.num_server_rounds and self.prepared is None:
                self._prepare(grid, server_round + 1, parameters)

        return secure.finish(messages, check, prepare_next)

    def _inline(self, grid: Grid, server_round: int, parameters: int, nodes: list[int], names: dict[int, str]) -> secagg_server.SecureAttempt:
        secure = secagg_server.SecureAttempt(grid, exchange, names, self.settings.strategy.round_timeout,
                                             self._announcement(server_round, parameters, nodes))
        secure.keys()
        return secure

    def _prepare(self, grid: Grid, server_round: int, parameters: int) -> None:
        """Start round `server_round`'s key stages in a thread, for the sample configure_round will
        draw if the online nodes stay the same; nothing when too few are online."""
        try:
            nodes = list(grid.get_nodes())
        except TRANSPORT_ERRORS as exc:
            log.warning("round %d: key stages not prepared (%s: %s)", server_round, type(exc).__name__, exc)
            return
        if len(nodes) < (size := self.sample_size(len(nodes))):
            return
        names = node_names(sample_nodes(nodes, size, self.settings.seed, server_round, 0))
        timeout = self.settings.strategy.round_timeout
        attempt = secagg_server.SecureAttempt(grid, exchange, names, timeout, self._announcement(server_round, parameters, list(names)))
        self.prepared = secagg_server.Prepared(attempt, busy=timeout)  # a node sampled in this round first trains it

    def _announcement(self, server_round: int, parameters: int, nodes: list[int]) -> Announcement:
        """The session's parameters; the round's bound cannot use the median update norm, which the
        ServerApp never sees: it depends on the round and the adapter's size alone."""
        settings = self.settings
        bound = self.norm_bound(server_round, parameters, [])
        recipe = recipe_norm_bound(settings.train.training_arguments.max_steps, self.lr(server_round), parameters)
        return secagg_server.announcement(nodes, server_round, parameters, bound, recipe, self.max_examples, settings.strategy.min_replies,
                                          settings.privacy.noise_multiplier)

    def _aggregate_secure(self, master: State, secure: secagg_server.Attempt, record: dict[str, Any], sent: float, arrived: dict[str, float]) -> State:
        """The new global adapter from the unmasked sum; the old one (round skipped, reason
        recorded) if the sum is beyond what the round's nodes can honestly reach."""
        record["norm_bound"], record["clipped"] = secure.announced.norm_bound, None  # each node clips its own
        weights = [metrics["num-examples"] for *_, metrics in secure.valid]
        record["clients"] += [client_entry(msg, reply, metrics, sent, arrived, None, None) for msg, reply, _, metrics in secure.valid]
        try:
            mean = secagg_server.mean_update(secure, comm.shapes_of(master), sum(weights), self.settings.privacy.noise_multiplier)
        except AggregateRefused as exc:
            record["skip_reason"] = str(exc)
            return master
        finally:  # the sum was computed from the updates: it spends, released or refused
            record.update(self._spend_secure(secure))
        record["status"] = "aggregated"
        record["train_loss"] = weighted_mean([c["train_loss"] for c in record["clients"]], weights)
        return apply_mean_update(master, [mean], [1.0])


    def _spend_secure(self, secure: secagg_server.Attempt) -> dict[str, Any]:
        """Privacy of a secure round: every node added its noise share for `min_nodes` shares;
        shares beyond those are not counted, so the guarantee against the coordinator holds with
        any min_nodes of the round's nodes (a node colluding with it knows its own share: README)."""
        if not self.privacy.on:
            return self.privacy.spend()
        min_nodes = secure.announced.min_nodes
        guaranteed = min(len(secure.valid), min_nodes)
        multiplier = guaranteed_noise_multiplier(self.privacy.noise_multiplier, min_nodes, guaranteed)
        return self.privacy.spend(noise_multiplier=multiplier, guaranteed_shares=guaranteed)


def client_entry(msg: Message, reply: Message, metrics: dict[str, float], sent: float, arrived: dict[str, float],
                 norm: float | None, scale: float | None) -> dict[str, Any]:
    """A counted node's line in the round's `clients`."""
    client: dict[str, Any] = {key.replace("-", "_"): value for key, value in metrics.items()}
    client.update(
        update_norm=norm,
        update_scale=scale,
        dropped_metrics=len(reply.content["metrics"]) - len(metrics),
        node_id=reply.metadata.src_node_id,
        partition_id=int(metrics["partition-id"]),
        num_examples=int(metrics["num-examples"]),
        skipped_rows=int(metrics.get("skipped-rows", 0)),
        resident=bool(metrics["resident"]),
        trainer_id=reply_trainer_id(reply),
        bytes_up=comm.record_bytes(reply.content["arrays"]),
        t_sent=sent,
        t_received=arrived.get(msg.metadata.message_id),
    )
    return client


def known_weight_cap(settings: Settings) -> int | None:
    """strategy.max-num-examples, or the partition size of a dataset the server knows."""
    from app.training.data import known_partition_size

    if settings.strategy.max_num_examples:
        return settings.strategy.max_num_examples
    dataset = settings.dataset
    return known_partition_size(dataset.name, dataset.path, dataset.num_partitions)


def max_num_examples(settings: Settings) -> int | None:
    """known_weight_cap, with a warning when there is none."""
    bound = known_weight_cap(settings)
    if bound is None:
        dataset = settings.dataset
        log.warning("no bound on a reply's num-examples: set strategy.max-num-examples (dataset %s is not one the server knows)", dataset.path or dataset.name)
    return bound


def request_initial_adapter(grid: Grid, settings: Settings) -> tuple[State, int]:
    """The initial adapter and the bytes its replies carried: up to INITIAL_ASK SuperNodes are
    asked at once, with one deadline (`strategy.round-timeout`), and it is taken as soon as two
    agree (app/aggregation/initial.py); a silent node costs nothing while two others agree. With
    one node online it is taken from that node alone, and the log says so."""
    timeout = settings.strategy.round_timeout
    nodes = wait_for_nodes(grid, 1, "initial adapter")
    wanted = min(INITIAL_ASK, settings.dataset.num_partitions)
    peers_deadline = time.monotonic() + INITIAL_PEERS_WAIT_SECONDS
    while len(nodes) < wanted and time.monotonic() < peers_deadline:
        log.info("initial adapter: waiting for SuperNodes to compare (%d online, %d wanted)", len(nodes), wanted)
        time.sleep(1)
        nodes = list(grid.get_nodes()) or nodes
    nodes = sorted(nodes, key=lambda n: (n.name or "", n.node_id))[:INITIAL_ASK]
    names = {n.node_id: n.name or str(n.node_id) for n in nodes}
    messages = [Message(content=RecordDict({"config": ConfigRecord({})}), message_type="query.init", dst_node_id=n.node_id) for n in nodes]
    vote = InitialAdapterVote(settings.model.lora, messages, names)
    replies, _, _, problem = exchange(grid, messages, timeout, enough=vote.add)
    vote.add(replies)
    for reason in vote.reasons:
        log.warning("initial adapter: %s", reason)
    if vote.decided is not None:
        adapter, agreeing, how = vote.decided
        others = [n for n, _ in vote.candidates if n not in agreeing]
        log.info("initial adapter: nodes %s agree (%s)%s", " and ".join(agreeing), how, f"; outvoted: {', '.join(others)}" if others else "")
        return adapter, vote.bytes
    if len(nodes) == 1 and vote.candidates:
        log.warning("initial adapter: taken from node %s alone, the only SuperNode online (no second one to compare it with)", vote.candidates[0][0])
        return vote.candidates[0][1], vote.bytes
    answered = {r.metadata.reply_to_message_id for r in replies}
    reasons = vote.reasons + [f"node {names[m.metadata.dst_node_id]}: {problem or 'no reply'}" for m in messages if m.metadata.message_id not in answered]
    if valid := sorted(n for n, _ in vote.candidates):
        reasons.insert(0, f"nodes {', '.join(valid)} sent adapters that differ" if len(valid) > 1 else f"only node {valid[0]} sent a usable adapter")
        raise NodesUnavailable(f"no two of the {len(nodes)} SuperNodes asked returned the same initial adapter within {timeout:g} s (strategy.round-timeout): {'; '.join(reasons)}")
    raise NodesUnavailable(f"no SuperNode returned the initial adapter within {timeout:g} s (strategy.round-timeout): {'; '.join(reasons) or 'none asked'}")


def prepare_run_dir(results_dir: str, run_id: int) -> Path:
    """`<results.dir>/run-<id>`, created and proven writable before any node does work."""
    run_dir = Path(results_dir).resolve() / f"run-{run_id}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise PermissionError(f"results.dir {results_dir!r}: cannot write {run_dir} ({exc.strerror or exc})") from None
    return run_dir


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = load_settings(dict(context.run_config))
    if not shorten_pull_retry(http_grid):  # the grid's reply pulls: app/node/flwr_patches.py
        log.info("replies are pulled with flwr's own retry waits (the patch is for flwr %s)", PATCHED_VERSION)
    flat = settings.flat()
    run_dir = prepare_run_dir(settings.results.dir, context.run_id)
    # Checked before any node works: a bad checkpoint fails the run at once, naming what differs.
    resume = load_resume_point(Path(settings.resume_from), flat) if settings.resume_from else None
    write_json_atomic(run_dir / "config.json", flat)
    log.info("results in %s", run_dir)

    started = time.perf_counter()
    grid = SerialGrid(grid)
    strategy = FedTuneProx(settings, run_dir)
    # Replies are bounded before they are pulled (app/node/flwr_patches.py): the initial adapter by
    # what comm accepts at most, each round's update by its known size.
    bound_reply_pulls(http_grid, max_bytes=4 * comm.MAX_ADAPTER_VALUES + REPLY_SLACK_BYTES, max_arrays=1)
    initial, init_bytes = request_initial_adapter(grid, settings)
    if bound_reply_pulls(http_grid, max_bytes=2 * comm.transfer_bytes(comm.shapes_of(initial), settings.comm.format) + REPLY_SLACK_BYTES,
                         max_arrays=1 if settings.comm.layout == "packed" else len(initial)):
        log.info("replies larger than twice an update are refused before they are pulled")
    master, first_round = initial, 1
    if resume is not None:
        check_same_layout(resume.tensors, initial, resume.directory)
        master, first_round = {k: np.asarray(resume.tensors[k], dtype=np.float32) for k in initial}, resume.round + 1
        strategy.cumulative_bytes = int(resume.state["cumulative_bytes"])
        strategy.privacy.ledger.releases = resumed_releases(resume.state, resume.round)
        _carry_history(resume.directory.parent / "metrics.jsonl", strategy.metrics_path, resume.round)
        log.info("resuming %s at round %d", resume.directory, first_round)
    last = settings.num_server_rounds
    stopped = None
    try:
        for server_round in range(first_round, last + 1):
            master = strategy.run_round(grid, server_round, master)
            if server_round % settings.train.save_every_round == 0 or server_round == last:
                run_state = {"round": server_round, "cumulative_bytes": strategy.cumulative_bytes, "run_id": context.run_id, "config": flat,
                             "privacy_releases": strategy.privacy.ledger.releases}
                path = save_adapter(run_dir / f"peft_{server_round}", dict(master), settings.model, run_state)
                log.info("saved global adapter to %s", path)
        rounds = read_jsonl(strategy.metrics_path) if strategy.metrics_path.exists() else []
        if failure := run_failure(rounds, settings.strategy.max_skipped_fraction):
            raise RunFailed(failure)
    except (TooFewReplies, NodesUnavailable, RunFailed) as exc:
        stopped = str(exc)
        raise
    finally:
        _write_summary(context.run_id, settings, run_dir, strategy, initial, init_bytes, started, resume, stopped)


def resumed_releases(state: Mapping[str, Any], saved_round: int) -> list[float]:
    """The privacy ledger of a checkpoint's rounds. A checkpoint without one (written before
    differential privacy was accounted) released its rounds un-noised, as far as anyone can
    tell: one release without noise, so the run's epsilon is infinite, never understated."""
    if "privacy_releases" in state:
        return [float(z) for z in state["privacy_releases"]]
    return [0.0] if saved_round > 0 else []


def _carry_history(source: Path, target: Path, upto: int) -> None:
    """A resumed run's metrics.jsonl starts with the rounds it continues (when they are on disk)."""
    if source.is_file() and source != target and not target.exists():
        for record in read_jsonl(source):
            if record["round"] <= upto:
                append_jsonl(target, record)


def _write_summary(run_id, settings: Settings, run_dir: Path, strategy: FedTuneProx, initial, init_bytes, started, resume, stopped) -> None:
    """summary.json and the plot. A failure here is logged, never raised: the run's outcome is
    what its rounds did, not whether this report of them could be written."""
    try:
        summary, aggregated = _summary(run_id, settings, run_dir, strategy, initial, init_bytes, started, resume, stopped)
        write_json_atomic(run_dir / "summary.json", summary)
        log.info("run finished: %s", summary)
    except Exception:  # noqa: BLE001 - see the docstring
        log.exception("could not write %s", run_dir / "summary.json")
        return
    if aggregated:
        try:
            plot_run(aggregated, run_dir / PLOT_NAME)
        except Exception:  # noqa: BLE001 - see the docstring
            log.exception("could not plot the run to %s", run_dir / PLOT_NAME)


def _summary(run_id, settings: Settings, run_dir: Path, strategy: FedTuneProx, initial, init_bytes, started, resume, stopped) -> tuple[dict, list]:
    rounds = read_jsonl(strategy.metrics_path) if strategy.metrics_path.exists() else []
    aggregated = [r for r in rounds if r.get("status", "aggregated") == "aggregated"]
    last = settings.num_server_rounds
    summary = {
        "run_id": run_id,
        "profile": settings.profile,
        "rounds_completed": sum(1 for r in rounds if r.get("status") != "failed"),
        "rounds_aggregated": len(aggregated),
        "rounds_skipped": [r["round"] for r in rounds if r.get("status") == "skipped"],
        "rounds_configured": last,
        "resumed_from": str(resume.directory) if resume else None,
        "stopped": stopped,
        "failure_reasons": failure_reasons(rounds),
        "final_train_loss": aggregated[-1]["train_loss"] if aggregated else None,
        "adapter_parameters": sum(a.size for a in initial.values()),
        "comm_format": settings.comm.format,
        "init_bytes": init_bytes,
        "communication_mib": strategy.cumulative_bytes / MIB,
        "failures": sum(r["failures"] for r in rounds),
        "attempts": sum(r.get("attempts", 1) for r in rounds),
        "wall_seconds": time.perf_counter() - started,
        "final_adapter": str(run_dir / f"peft_{last}") if (run_dir / f"peft_{last}").is_dir() else None,
        "privacy": strategy.privacy.summary(),
    }
    return summary, aggregated
