"""ClientApp: trains the DoRA adapter on this node's partition for one round.

The round runs in the node's resident trainer when one is reachable (see
app/trainer_service.py), otherwise in this process; both run the same `RoundWorker`.
"""

from __future__ import annotations

import logging
import os
import time

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from app import comm
from app.config import load_settings
from app.trainer_service import SOCKET_ENV, TrainerUnavailable, call_trainer, request_timeout
from app.worker import NodeData, RoundWorker, TrainRequest  # torch is imported lazily, in-process only

log = logging.getLogger(__name__)
app = ClientApp()


def _trainer_socket(resident: bool) -> str | None:
    path = os.environ.get(SOCKET_ENV)
    return path if resident and path else None


@app.query("init")
def initial_adapter(msg: Message, context: Context) -> Message:
    """The freshly initialised adapter, so the ServerApp never needs the base model."""
    run_config = dict(context.run_config)
    settings = load_settings(run_config)
    adapter = None
    if socket_path := _trainer_socket(settings.trainer.resident):
        try:
            _, adapter = call_trainer(socket_path, {"op": "init", "run_config": run_config}, None, settings.trainer.connect_timeout,
                                      request_timeout(settings, "init"))
        except TrainerUnavailable as exc:
            log.warning("%s; initialising in-process", exc)
    if adapter is None:
        adapter = RoundWorker().initial_adapter(run_config)
    content = RecordDict({"arrays": comm.encode(adapter, "float32")})
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    run_config = dict(context.run_config)
    settings = load_settings(run_config)
    config: ConfigRecord = msg.content["config"]
    request = TrainRequest(
        run_config=run_config,
        node=NodeData.from_node_config(dict(context.node_config), settings),
        server_round=int(config["server-round"]),
        lr=float(config["lr"]),
        proximal_mu=float(config["proximal-mu"]),
    )
    global_adapter = comm.decode(msg.content["arrays"])

    adapter, metrics, resident = None, None, 0.0
    if socket_path := _trainer_socket(settings.trainer.resident):
        header = {
            "op": "train",
            "run_config": run_config,
            "node": vars(request.node),
            "server_round": request.server_round,
            "lr": request.lr,
            "proximal_mu": request.proximal_mu,
        }
        try:
            reply, adapter = call_trainer(socket_path, header, global_adapter, settings.trainer.connect_timeout,
                                          request_timeout(settings, "train"))
            metrics, resident = reply["metrics"], 1.0
        except TrainerUnavailable as exc:
            log.warning("%s; training in-process", exc)
    if adapter is None:
        adapter, metrics = RoundWorker().train(request, global_adapter)

    metrics.update(
        {
            "partition-id": float(request.node.partition_id),
            "resident": resident,
            # From message arrival to reply, including process start-up work done here.
            "clientapp-seconds": time.perf_counter() - started,
        }
    )
    content = RecordDict(
        {"arrays": comm.encode(adapter, settings.comm.dtype), "metrics": MetricRecord(metrics)}
    )
    return Message(content=content, reply_to=msg)
