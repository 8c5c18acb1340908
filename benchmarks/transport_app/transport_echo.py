"""Echo app of the transport benchmark: the ServerApp sends an adapter-shaped bfloat16 state through
app.comm (the layout under test) to `clients` SuperNodes each round; each ClientApp decodes it and
sends it back encoded the same way. Round times are written to the run config's `out` (JSON)."""

from __future__ import annotations

import json
import time
from collections import OrderedDict

import numpy as np
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from app import comm

FORMAT = "bfloat16"  # what the app sends down (comm.download_format of every narrow format)
SEED_MIB = 13_795_328 * 2 / 2**20  # the seed adapter (Llama-3-8B, DoRA r=32 on q,v) in bfloat16
ROUND_TIMEOUT = 900.0

server = ServerApp()
client = ClientApp()


def adapter_shapes(size_mib: float, layers: int = 32, rank: int = 32) -> OrderedDict[str, tuple[int, ...]]:
    """The seed adapter's 192 tensors (per layer: q and v lora_A, lora_B, DoRA magnitude) with the
    hidden sizes 4096 (q) and 1024 (v) scaled so that the state is about `size_mib` in bfloat16."""
    scale = size_mib / SEED_MIB
    q, v = max(1, round(4096 * scale)), max(1, round(1024 * scale))
    shapes = OrderedDict()
    for i in range(layers):
        for proj, out in (("q_proj", q), ("v_proj", v)):
            base = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            shapes[f"{base}.lora_A.default.weight"] = (rank, q)
            shapes[f"{base}.lora_B.default.weight"] = (out, rank)
            shapes[f"{base}.lora_magnitude_vector.default.weight"] = (out,)
    return shapes


def make_state(shapes) -> OrderedDict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return OrderedDict((k, rng.standard_normal(s, dtype=np.float32)) for k, s in shapes.items())


@client.train()
def echo(msg: Message, context: Context) -> Message:
    state = comm.decode(msg.content["arrays"], msg.content["wire"], expect_format=FORMAT)
    arrays, wire = comm.encode(state, FORMAT, comm.WEIGHTS, str(msg.content["wire"]["layout"]))
    return Message(content=RecordDict({"arrays": arrays, "wire": wire}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    from flwr.superlink.grid import http_grid

    from app.node.flwr_patches import shorten_pull_retry
    from app.server_app import exchange, wait_for_nodes  # the app's own push/poll loop

    cfg = context.run_config
    if cfg["short-pull-retry"]:
        shorten_pull_retry(http_grid)
    clients, layout = int(cfg["clients"]), str(cfg["layout"])
    shapes = adapter_shapes(float(cfg["size-mib"]))
    state = make_state(shapes)
    nodes = sorted(wait_for_nodes(grid, clients, "transport benchmark"), key=lambda n: n.node_id)[:clients]
    rows = []
    for rnd in range(1, int(cfg["rounds"]) + 1):
        started = time.monotonic()
        arrays, wire = comm.encode(state, FORMAT, comm.WEIGHTS, layout)
        messages = [Message(content=RecordDict({"arrays": arrays, "wire": wire}), message_type=MessageType.TRAIN, dst_node_id=n.node_id) for n in nodes]
        replies, _, _, _ = exchange(grid, messages, ROUND_TIMEOUT)
        ok = [r for r in replies if not r.has_error()]
        for reply in ok:  # the echo must be the state as sent, after bfloat16 rounding
            back = comm.decode(reply.content["arrays"], reply.content["wire"], expect_shapes=shapes, expect_format=FORMAT)
            assert all(np.array_equal(back[k], comm.round_trip(state[k], FORMAT)) for k in list(shapes)[:3])
        rows.append({"round": rnd, "round_s": time.monotonic() - started, "replies": len(ok), "bytes_down": comm.record_bytes(arrays),
                     "arrays": len(arrays)})
    with open(str(cfg["out"]), "w") as f:
        json.dump(rows, f)
