"""ServerApp: FedProx over the DoRA adapter, with a cosine LR across rounds, checkpoints and
per-round metrics. It needs no GPU and never loads the base model: the initial adapter comes
from one SuperNode (`query.init`), and checkpoints are written from the state dict.

Rounds survive lost nodes: a round aggregates the replies that arrive within
`strategy.round-timeout`, weighted over those only; with fewer than `strategy.min-replies` it
is retried, skipped or fails the run (`strategy.on-too-few-replies`), never aggregated from
nothing. `resume-from=<results>/run-<id>/peft_N` continues a stopped run at round N+1 with the
same LR schedule, node samples and communication budget.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedProx

from app import comm
from app.checkpoint import check_same_layout, load_resume_point, save_adapter
from app.config import Settings, load_settings
from app.report import MIB, PLOT_NAME, append_jsonl, plot_run, read_jsonl, write_json_atomic

log = logging.getLogger(__name__)
app = ServerApp()

CLIENT_METRICS = ("partition-id", "train-loss", "proximal-term", "num-examples", "train-seconds", "clientapp-seconds", "model-load-seconds", "resident")


class TooFewReplies(RuntimeError):
    """A round got fewer usable replies than strategy.min-replies and the policy is 'fail'."""


def cosine_lr(server_round: int, total_rounds: int, lr_max: float, lr_min: float) -> float:
    """FlowerTune's per-round learning rate: cosine annealing from lr_max to lr_min."""
    return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * server_round / total_rounds))


def weighted_average(states: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """Example-weighted mean of adapters, in float32."""
    total = float(sum(weights))
    if not states or total <= 0:
        raise ValueError("cannot aggregate: no reply with a positive number of examples")
    return {
        key: sum(state[key].astype(np.float32) * np.float32(w / total) for state, w in zip(states, weights, strict=True))
        for key in states[0]
    }


def sample_nodes(nodes: list[Any], sample_size: int, seed: int, server_round: int, attempt: int) -> list[Any]:
    """A sample that depends only on (seed, round, attempt) and the online nodes' names, not on
    what ran before: a resumed run draws the same nodes as an uninterrupted one. Nodes sort by
    their registered name (stable across launches), then id."""
    ordered = sorted(nodes, key=lambda n: (n.name or "", n.node_id))
    digest = hashlib.sha256(f"{seed}:{server_round}:{attempt}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big")).sample(ordered, sample_size)


class FedTuneProx(FedProx):
    """FedProx that sends a per-round LR, travels in `comm.dtype`, samples reproducibly,
    survives lost replies and logs every round, including its failures, to metrics.jsonl."""

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

    def lr(self, server_round: int) -> float:
        train = self.settings.train
        return cosine_lr(server_round, self.settings.num_server_rounds, train.learning_rate_max, train.learning_rate_min)

    def _sample(self, grid: Grid, server_round: int, attempt: int) -> list[Any]:
        strategy = self.settings.strategy
        while True:
            nodes = list(grid.get_nodes())
            size = max(int(len(nodes) * strategy.fraction_train), strategy.min_train_nodes, strategy.min_replies)
            if len(nodes) >= size:
                return sample_nodes(nodes, size, self.settings.seed, server_round, attempt)
            log.info("round %d: waiting for nodes (%d online, %d needed)", server_round, len(nodes), size)
            time.sleep(1)

    def configure_round(self, server_round: int, arrays: ArrayRecord, grid: Grid, attempt: int) -> tuple[list[Message], dict[int, str]]:
        nodes = self._sample(grid, server_round, attempt)
        config = ConfigRecord({"server-round": server_round, "proximal-mu": self.proximal_mu, "lr": self.lr(server_round)})
        record = RecordDict({self.arrayrecord_key: comm.encode(comm.decode(arrays), self.settings.comm.dtype), self.configrecord_key: config})
        messages = [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=n.node_id) for n in nodes]
        return messages, {n.node_id: n.name or str(n.node_id) for n in nodes}

    def collect(self, messages: list[Message], replies: Iterable[Message], names: dict[int, str]) -> dict[str, Any]:
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
                reason = f"no reply within strategy.round-timeout={self.settings.strategy.round_timeout:g} s"
            elif reply.metadata.src_node_id != node:  # the SuperLink answered for it: node lost
                out["bytes_down_unconfirmed"] += size
                reason = f"error {reply.error.code}: {reply.error.reason}"
            else:
                out["bytes_down"] += size
                reason = f"error {reply.error.code}: {reply.error.reason}" if reply.has_error() else _malformed(reply, self.arrayrecord_key)
                if reason is None:
                    out["bytes_up"] += comm.record_bytes(reply.content[self.arrayrecord_key])
                    out["valid"].append(reply)
                    continue
                if not reply.has_error() and self.arrayrecord_key in reply.content:
                    out["bytes_up"] += comm.record_bytes(reply.content[self.arrayrecord_key])
            out["failed"].append({"node_id": node, "node": names[node], "reason": reason})
            log.warning("node %s (%d) failed: %s", names[node], node, reason)
        return out

    def run_round(self, grid: Grid, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """One round, retried per policy; appends its metrics line and returns the new global adapter."""
        strategy = self.settings.strategy
        started = time.perf_counter()
        record: dict[str, Any] = {
            "round": server_round, "lr": self.lr(server_round), "status": "skipped", "attempts": 0,
            "train_loss": None, "clients": [], "failures": 0, "failed": [],
            "bytes_down": 0, "bytes_up": 0, "bytes_down_unconfirmed": 0,
        }
        new_arrays = arrays
        attempts = 1 + (strategy.max_retries if strategy.on_too_few_replies == "retry" else 0)
        for attempt in range(attempts):
            messages, names = self.configure_round(server_round, arrays, grid, attempt)
            replies = grid.send_and_receive(messages, timeout=strategy.round_timeout)
            got = self.collect(messages, replies, names)
            record["attempts"] += 1
            record["failures"] += len(got["failed"])
            record["failed"] += [dict(f, attempt=attempt) for f in got["failed"]]
            for key in ("bytes_down", "bytes_up", "bytes_down_unconfirmed"):
                record[key] += got[key]
            if len(got["valid"]) >= strategy.min_replies:
                new_arrays = self._aggregate(got["valid"], record)
                break
            log.warning(
                "round %d attempt %d: %d usable replies of %d sampled, below strategy.min-replies=%d",
                server_round, attempt + 1, len(got["valid"]), len(messages), strategy.min_replies,
            )
        round_bytes = record["bytes_down"] + record["bytes_up"]
        self.cumulative_bytes += round_bytes
        record.update(bytes_round=round_bytes, cumulative_mib=self.cumulative_bytes / MIB, round_seconds=time.perf_counter() - started)
        if record["status"] != "aggregated" and strategy.on_too_few_replies == "fail":
            record["status"] = "failed"
        append_jsonl(self.metrics_path, record)
        if record["status"] == "failed":
            raise TooFewReplies(
                f"round {server_round}: fewer than strategy.min-replies={strategy.min_replies} usable replies "
                f"(strategy.on-too-few-replies=fail); resume from the last checkpoint with resume-from=..."
            )
        if record["status"] == "skipped":
            log.warning("round %d skipped after %d attempt(s): the global adapter is unchanged", server_round, record["attempts"])
        else:
            log.info(
                "round %d: train loss %.4f over %d clients (%d failures), %.2f MiB this round, %.2f MiB total",
                server_round, record["train_loss"], len(record["clients"]), record["failures"], round_bytes / MIB, self.cumulative_bytes / MIB,
            )
        return new_arrays

    def _aggregate(self, valid: list[Message], record: dict[str, Any]) -> ArrayRecord:
        states, weights = [], []
        for msg in valid:
            metrics = msg.content["metrics"]
            arrays = msg.content[self.arrayrecord_key]
            states.append(comm.decode(arrays))
            weights.append(float(metrics[self.weighted_by_key]))
            record["clients"].append(
                {
                    "node_id": msg.metadata.src_node_id,
                    "partition_id": int(metrics["partition-id"]),
                    "train_loss": float(metrics["train-loss"]),
                    "proximal_term": float(metrics["proximal-term"]),
                    "num_examples": int(metrics["num-examples"]),
                    "skipped_rows": int(metrics.get("skipped-rows", 0)),
                    "train_seconds": float(metrics["train-seconds"]),
                    "clientapp_seconds": float(metrics["clientapp-seconds"]),
                    "model_load_seconds": float(metrics["model-load-seconds"]),
                    "resident": bool(metrics["resident"]),
                    "bytes_up": comm.record_bytes(arrays),
                }
            )
        record["status"] = "aggregated"
        record["train_loss"] = sum(c["train_loss"] * w for c, w in zip(record["clients"], weights, strict=True)) / sum(weights)
        return comm.encode(weighted_average(states, weights), "float32")


def _malformed(reply: Message, arrays_key: str) -> str | None:
    """Why a reply without an error cannot be aggregated, or None if it can."""
    content = reply.content
    if arrays_key not in content or "metrics" not in content:
        return f"malformed reply: needs '{arrays_key}' and 'metrics', has {sorted(content.keys())}"
    missing = [k for k in CLIENT_METRICS if k not in content["metrics"]]
    if missing:
        return f"malformed reply: metrics lack {missing}"
    if float(content["metrics"]["num-examples"]) <= 0:
        return "malformed reply: num-examples <= 0"
    return None


def request_initial_adapter(grid: Grid, timeout: float) -> tuple[ArrayRecord, int]:
    """Ask one connected SuperNode for the freshly initialised adapter."""
    while not (nodes := sorted(grid.get_nodes(), key=lambda n: (n.name or "", n.node_id))):
        log.info("waiting for a SuperNode to initialise the adapter")
        time.sleep(1)
    for node in nodes:
        message = Message(content=RecordDict({"config": ConfigRecord({})}), message_type="query.init", dst_node_id=node.node_id)
        replies = list(grid.send_and_receive([message], timeout=timeout))
        if replies and not replies[0].has_error():
            arrays = replies[0].content["arrays"]
            return arrays, comm.record_bytes(arrays)
        log.warning("node %d could not initialise the adapter: %s", node.node_id, replies[0].error.reason if replies else "timeout")
    raise RuntimeError("no SuperNode could initialise the adapter")


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
    flat = settings.flat()
    run_dir = prepare_run_dir(settings.results.dir, context.run_id)
    # Checked before any node works: a bad checkpoint fails the run at once, naming what differs.
    resume = load_resume_point(Path(settings.resume_from), flat) if settings.resume_from else None
    write_json_atomic(run_dir / "config.json", flat)
    log.info("results in %s", run_dir)

    started = time.perf_counter()
    initial, init_bytes = request_initial_adapter(grid, settings.strategy.round_timeout)
    strategy = FedTuneProx(settings, run_dir)
    arrays, first_round = initial, 1
    if resume is not None:
        check_same_layout(resume.tensors, comm.decode(initial), resume.directory)
        arrays, first_round = comm.encode(resume.tensors, "float32"), resume.round + 1
        strategy.cumulative_bytes = int(resume.state["cumulative_bytes"])
        _carry_history(resume.directory.parent / "metrics.jsonl", strategy.metrics_path, resume.round)
        log.info("resuming %s at round %d", resume.directory, first_round)
    last = settings.num_server_rounds
    stopped = None
    try:
        for server_round in range(first_round, last + 1):
            arrays = strategy.run_round(grid, server_round, arrays)
            if server_round % settings.train.save_every_round == 0 or server_round == last:
                run_state = {"round": server_round, "cumulative_bytes": strategy.cumulative_bytes, "run_id": context.run_id, "config": flat}
                path = save_adapter(run_dir / f"peft_{server_round}", comm.decode(arrays), settings.model, run_state)
                log.info("saved global adapter to %s", path)
    except TooFewReplies as exc:
        stopped = str(exc)
        raise
    finally:
        _write_summary(context.run_id, settings, run_dir, strategy, initial, init_bytes, started, resume, stopped)


def _carry_history(source: Path, target: Path, upto: int) -> None:
    """A resumed run's metrics.jsonl starts with the rounds it continues (when they are on disk)."""
    if source.is_file() and source != target and not target.exists():
        for record in read_jsonl(source):
            if record["round"] <= upto:
                append_jsonl(target, record)


def _write_summary(run_id, settings: Settings, run_dir: Path, strategy: FedTuneProx, initial, init_bytes, started, resume, stopped) -> None:
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
        "final_train_loss": aggregated[-1]["train_loss"] if aggregated else None,
        "adapter_parameters": sum(a.numpy().size for a in initial.values()),
        "comm_dtype": settings.comm.dtype,
        "init_bytes": init_bytes,
        "communication_mib": strategy.cumulative_bytes / MIB,
        "failures": sum(r["failures"] for r in rounds),
        "attempts": sum(r.get("attempts", 1) for r in rounds),
        "wall_seconds": time.perf_counter() - started,
        "final_adapter": str(run_dir / f"peft_{last}") if (run_dir / f"peft_{last}").is_dir() else None,
    }
    write_json_atomic(run_dir / "summary.json", summary)
    if aggregated:
        plot_run(aggregated, run_dir / PLOT_NAME)
    log.info("run finished: %s", summary)
