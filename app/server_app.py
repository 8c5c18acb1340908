"""ServerApp: FedProx over the DoRA adapter, with a cosine LR across rounds, checkpoints and
per-round metrics. It needs no GPU and never loads the base model: the initial adapter comes
from one SuperNode (`query.init`), and checkpoints are written from the state dict.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedProx

from app import comm
from app.checkpoint import save_adapter
from app.config import Settings, load_settings
from app.report import MIB, PLOT_NAME, append_jsonl, plot_run, read_jsonl, write_json_atomic

log = logging.getLogger(__name__)
app = ServerApp()


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


class FedTuneProx(FedProx):
    """FedProx that sends a per-round LR, travels in `comm.dtype`, and logs every round."""

    def __init__(self, settings: Settings, run_dir: Path) -> None:
        super().__init__(
            fraction_train=settings.strategy.fraction_train,
            fraction_evaluate=settings.strategy.fraction_evaluate,
            min_train_nodes=settings.strategy.min_train_nodes,
            min_available_nodes=settings.strategy.min_train_nodes,
            proximal_mu=settings.strategy.proximal_mu,
        )
        self.settings = settings
        self.metrics_path = run_dir / "metrics.jsonl"
        self.cumulative_bytes = 0
        self._round_started = 0.0
        self._bytes_down = 0
        self._lr = 0.0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._round_started = time.perf_counter()
        train = self.settings.train
        self._lr = cosine_lr(server_round, self.settings.num_server_rounds, train.learning_rate_max, train.learning_rate_min)
        config["lr"] = self._lr
        wire = comm.encode(comm.decode(arrays), self.settings.comm.dtype)
        messages = list(super().configure_train(server_round, wire, config, grid))
        self._bytes_down = sum(comm.record_bytes(m.content[self.arrayrecord_key]) for m in messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, failed = self._check_and_log_replies(list(replies), is_train=True, validate=False)
        states, weights, clients, bytes_up = [], [], [], 0
        for msg in valid:
            arrays = msg.content[self.arrayrecord_key]
            metrics = msg.content["metrics"]
            size = comm.record_bytes(arrays)
            bytes_up += size
            states.append(comm.decode(arrays))
            weights.append(float(metrics[self.weighted_by_key]))
            clients.append(
                {
                    "node_id": msg.metadata.src_node_id,
                    "partition_id": int(metrics["partition-id"]),
                    "train_loss": float(metrics["train-loss"]),
                    "proximal_term": float(metrics["proximal-term"]),
                    "num_examples": int(metrics["num-examples"]),
                    "train_seconds": float(metrics["train-seconds"]),
                    "clientapp_seconds": float(metrics["clientapp-seconds"]),
                    "model_load_seconds": float(metrics["model-load-seconds"]),
                    "resident": bool(metrics["resident"]),
                    "bytes_up": size,
                }
            )
        if not states:
            log.warning("round %d: no usable reply (%d failures); keeping the global adapter", server_round, len(failed))
            return None, None
        aggregated = weighted_average(states, weights)
        train_loss = sum(c["train_loss"] * w for c, w in zip(clients, weights, strict=True)) / sum(weights)
        round_bytes = self._bytes_down + bytes_up
        self.cumulative_bytes += round_bytes
        record = {
            "round": server_round,
            "lr": self._lr,
            "train_loss": train_loss,
            "clients": clients,
            "failures": len(failed),
            "bytes_down": self._bytes_down,
            "bytes_up": bytes_up,
            "bytes_round": round_bytes,
            "cumulative_mib": self.cumulative_bytes / MIB,
            "round_seconds": time.perf_counter() - self._round_started,
        }
        append_jsonl(self.metrics_path, record)
        log.info(
            "round %d: train loss %.4f over %d clients, %.2f MiB this round, %.2f MiB total",
            server_round, train_loss, len(clients), round_bytes / MIB, self.cumulative_bytes / MIB,
        )
        return comm.encode(aggregated, "float32"), MetricRecord({"train-loss": train_loss})


def request_initial_adapter(grid: Grid, timeout: float) -> tuple[ArrayRecord, int]:
    """Ask one connected SuperNode for the freshly initialised adapter."""
    while not (node_ids := list(grid.get_node_ids())):
        log.info("waiting for a SuperNode to initialise the adapter")
        time.sleep(1)
    for node_id in random.sample(node_ids, len(node_ids)):
        message = Message(content=RecordDict({"config": ConfigRecord({})}), message_type="query.init", dst_node_id=node_id)
        replies = list(grid.send_and_receive([message], timeout=timeout))
        if replies and not replies[0].has_error():
            arrays = replies[0].content["arrays"]
            return arrays, comm.record_bytes(arrays)
        log.warning("node %d could not initialise the adapter: %s", node_id, replies[0].error.reason if replies else "timeout")
    raise RuntimeError("no SuperNode could initialise the adapter")


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = load_settings(dict(context.run_config))
    random.seed(settings.seed)  # Flower samples nodes with `random`: reproducible selection
    run_dir = Path(settings.results.dir).resolve() / f"run-{context.run_id}"
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "config.json", settings.flat())
    log.info("results in %s", run_dir)

    started = time.perf_counter()
    initial, init_bytes = request_initial_adapter(grid, settings.strategy.round_timeout)
    strategy = FedTuneProx(settings, run_dir)
    save_every = settings.train.save_every_round
    last = settings.num_server_rounds

    def save_checkpoint(server_round: int, arrays: ArrayRecord) -> None:
        if server_round > 0 and (server_round % save_every == 0 or server_round == last):
            path = save_adapter(run_dir / f"peft_{server_round}", comm.decode(arrays), settings.model)
            log.info("saved global adapter to %s", path)

    strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=last,
        timeout=settings.strategy.round_timeout,
        evaluate_fn=save_checkpoint,
    )
    rounds = read_jsonl(strategy.metrics_path) if strategy.metrics_path.exists() else []
    summary = {
        "run_id": context.run_id,
        "profile": settings.profile,
        "rounds_completed": len(rounds),
        "rounds_configured": last,
        "final_train_loss": rounds[-1]["train_loss"] if rounds else None,
        "adapter_parameters": sum(a.numpy().size for a in initial.values()),
        "comm_dtype": settings.comm.dtype,
        "init_bytes": init_bytes,
        "communication_mib": strategy.cumulative_bytes / MIB,
        "failures": sum(r["failures"] for r in rounds),
        "wall_seconds": time.perf_counter() - started,
        "final_adapter": str(run_dir / f"peft_{last}") if (run_dir / f"peft_{last}").is_dir() else None,
    }
    write_json_atomic(run_dir / "summary.json", summary)
    if rounds:
        plot_run(rounds, run_dir / PLOT_NAME)
    log.info("run finished: %s", summary)
