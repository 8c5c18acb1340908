"""ClientApp: trains the DoRA adapter on this node's partition for one round.

The round runs in the node's resident trainer when one is reachable (see
app/training/trainer_service.py), otherwise in this process; both run the same `RoundWorker`.
In this process it is `IN_PROCESS`, one per process: a deployed SuperNode starts a fresh process
per message, but a `flwr run .` simulation runs every message of its Ray worker in one process,
which then loads the base model once and keeps it across rounds and simulated nodes.
"""

from __future__ import annotations

import logging
import os
import time

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from app import comm
from app.config import load_settings
from app.node.clientapp_shim import PROCESS_START_TICKS_ENV, PULLED_AT_ENV
from app.privacy import secagg_node
from app.training.node_tokens import read_token
from app.training.trainer_service import SOCKET_ENV, TrainerUnavailable, call_trainer, request_timeout, trainer_id
from app.training.worker import NodeData, RoundWorker, TrainRequest  # torch is imported lazily, in-process only

log = logging.getLogger(__name__)
app = ClientApp()
IN_PROCESS = RoundWorker()


def _trainer_socket(resident: bool) -> str | None:
    path = os.environ.get(SOCKET_ENV)
    return path if resident and path else None


def _with_token(header: dict) -> dict:
    """A device trainer knows this node by the token its launcher gave it (app/training/device_trainer.py)."""
    token = read_token()
    return dict(header, token=token) if token else header


def _process_start_time() -> float:
    """This process's start (epoch s), within half a clock tick (5 ms): now, minus how long ago
    the kernel started it. The kernel counts the start in clock ticks since boot on the clock
    behind /proc/uptime (CLOCK_BOOTTIME, read here at full resolution); /proc/stat's btime, the
    other way to get there, is whole seconds and put nodes up to 1 s off (issue 24). psutil
    (where /proc is missing) would add ~0.1-0.2 s to every ClientApp start-up (issue 16).
    A ClientApp forked by the node's fork server counts from its `flwr-clientapp` shim's start,
    the process flwr started (app/node/clientapp_forkserver.py passes its start ticks)."""
    try:
        shim = os.environ.get(PROCESS_START_TICKS_ENV, "")
        ticks = int(shim) if shim else int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        now, since_boot = time.time(), time.clock_gettime(time.CLOCK_BOOTTIME)
        # The count is truncated to whole ticks: the middle of the tick is the closest estimate.
        return now - (since_boot - (ticks + 0.5) / os.sysconf("SC_CLK_TCK"))
    except (OSError, IndexError, ValueError, AttributeError):  # AttributeError: no CLOCK_BOOTTIME (not Linux)
        import psutil

        return psutil.Process().create_time()


@app.query("init")
def initial_adapter(msg: Message, context: Context) -> Message:
    """The freshly initialised adapter, so the ServerApp never needs the base model."""
    run_config = dict(context.run_config)
    settings = load_settings(run_config)
    adapter = None
    if socket_path := _trainer_socket(settings.trainer.resident):
        try:
            _, adapter = call_trainer(socket_path, _with_token({"op": "init", "run_config": run_config}), None, settings.trainer.connect_timeout,
                                      request_timeout(settings, "init"), wait_for_restart=True)
        except TrainerUnavailable as exc:
            log.warning("%s; initialising in-process", exc)
    if adapter is None:
        adapter = IN_PROCESS.initial_adapter(run_config)
    arrays, wire = comm.encode(adapter, "float32", comm.WEIGHTS)
    return Message(content=RecordDict({"arrays": arrays, "wire": wire}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    started, handler_start = time.perf_counter(), time.time()
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
    fmt = settings.comm.format
    global_adapter = comm.decode(
        msg.content["arrays"], msg.content["wire"], expect_format=comm.download_format(fmt), expect_content=comm.WEIGHTS
    )

    adapter, metrics, resident, ran_on = None, None, 0.0, trainer_id(settings.trainer.placement, None)
    if socket_path := _trainer_socket(settings.trainer.resident):
        header = _with_token({
            "op": "train",
            "run_config": run_config,
            "node": vars(request.node),
            "server_round": request.server_round,
            "lr": request.lr,
            "proximal_mu": request.proximal_mu,
        })
        try:
            reply, adapter = call_trainer(socket_path, header, global_adapter, settings.trainer.connect_timeout,
                                          request_timeout(settings, "train"), wait_for_restart=True)
            metrics, resident, ran_on = reply["metrics"], 1.0, str(reply.get("trainer_id", ran_on))
        except TrainerUnavailable as exc:
            log.warning("%s; training in-process", exc)
    if adapter is None:
        adapter, metrics = IN_PROCESS.train(request, global_adapter)

    metrics.update(
        {
            "partition-id": float(request.node.partition_id),
            "resident": resident,
            # This node's clock (epoch s): the report aligns it with the ServerApp's.
            "t-process-start": _process_start_time(),
            "t-handler-start": handler_start,
            # When this process had its message and bundle (the bundle check's time; absent without the gate)
            **({"t-pulled": float(os.environ[PULLED_AT_ENV])} if PULLED_AT_ENV in os.environ else {}),
            # 1: forked warm by the node's fork server (app/node/clientapp_forkserver.py), 0: a cold start
            "clientapp-forked": 1.0 if os.environ.get(PROCESS_START_TICKS_ENV) else 0.0,
        }
    )
    # The round's update relative to the adapter as received: see app/comm.py for why.
    update = comm.subtract(adapter, global_adapter)
    if settings.privacy.secure_aggregation:
        masking = time.perf_counter()
        content = RecordDict({"arrays": secagg_node.masked_update(update, metrics["num-examples"], msg.content, context, settings.privacy.noise_multiplier)})
        metrics["secagg-mask-seconds"] = time.perf_counter() - masking
    else:
        arrays, wire = comm.encode(update, fmt, comm.UPDATE, settings.comm.layout)
        content = RecordDict({"arrays": arrays, "wire": wire})
    # From handler entry to reply (process start-up before it is t-handler-start - t-process-start).
    metrics["clientapp-seconds"] = time.perf_counter() - started
    metrics["t-reply"] = time.time()
    content["metrics"] = MetricRecord(metrics)
    # Which trainer ran the round (a string: MetricRecord holds numbers only); the ServerApp checks it.
    content[comm.TRAINER_RECORD] = ConfigRecord({comm.TRAINER_ID_KEY: ran_on})
    return Message(content=content, reply_to=msg)


# Secure aggregation's key stages (app/privacy/secagg_node.py); the masked update is `train`'s.
@app.query("secagg_setup")
def secagg_setup(msg: Message, context: Context) -> Message:
    return Message(content=secagg_node.setup(msg.content, context), reply_to=msg)


@app.query("secagg_share_keys")
def secagg_share_keys(msg: Message, context: Context) -> Message:
    return Message(content=secagg_node.share_keys(msg.content, context), reply_to=msg)


@app.query("secagg_unmask")
def secagg_unmask(msg: Message, context: Context) -> Message:
    return Message(content=secagg_node.unmask(msg.content, context), reply_to=msg)
