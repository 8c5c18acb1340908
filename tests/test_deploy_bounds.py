"""Memory bounds of the deployment (issue 24, item 7): the edge's body limit fits what Flower
sends and no more; every generated compose service has a memory limit."""

from __future__ import annotations

import re
from collections import OrderedDict

import numpy as np
import pytest

from app.deploy.compose import COMMITTED, REPO, StackSpec, compose_spec, smoke_spec

EDGE_CONF = REPO / "docker" / "edge-nginx.conf"
UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}


def _nginx_size(text: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kmg]?)", text.lower()).groups()
    return int(number) * UNITS[unit]


def _edge_body_limit() -> int:
    values = re.findall(r"^\s*client_max_body_size\s+(\S+);", EDGE_CONF.read_text(), re.MULTILINE)
    assert len(values) == 1, "edge-nginx.conf sets client_max_body_size once, for every location"
    return _nginx_size(values[0])


def _seed_adapter() -> OrderedDict[str, np.ndarray]:
    """The seed recipe's adapter on Llama-3-8B (DoRA on q_proj and v_proj, rank r), shaped by
    hand: peft's meta-device build (app.training.model.adapter_shapes) takes ~15 s."""
    from app.config import load_settings
    from app.training.model import LLAMA3_8B_SHAPE

    lora = load_settings({}).model.lora
    assert lora.peft_lora_target_modules == "q_proj,v_proj" and lora.use_dora
    r, hidden = lora.peft_lora_r, LLAMA3_8B_SHAPE["hidden_size"]
    kv = hidden // LLAMA3_8B_SHAPE["num_attention_heads"] * LLAMA3_8B_SHAPE["num_key_value_heads"]
    state = OrderedDict()
    for layer in range(LLAMA3_8B_SHAPE["num_hidden_layers"]):
        for module, out in (("q_proj", hidden), ("v_proj", kv)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            state[f"{prefix}.lora_A.weight"] = np.ones((r, hidden), np.float32)
            state[f"{prefix}.lora_B.weight"] = np.ones((out, r), np.float32)
            state[f"{prefix}.lora_magnitude_vector"] = np.ones((out,), np.float32)
    return state


def _largest_requests(layout: str) -> tuple[int, int]:
    """(largest PushObject body, largest PushMessages body) a SuperNode sends for one reply
    carrying the seed adapter as float32 weights (the largest format: the initial adapter)."""
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
    from flwr.app.message.message import remove_content_from_message
    from flwr.common.serde import message_to_proto
    from flwr.proto.fleet_pb2 import PushMessagesRequest
    from flwr.proto.message_pb2 import PushObjectRequest
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
    from flwr.supercore.task_identity import TaskIdentity

    from app import comm

    assert FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE == 5 * 2**20  # flwr 1.42's chunk size, which the limit follows
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 2**63 - 1, 2**63 - 1, 0
    arrays, wire = comm.encode(_seed_adapter(), "float32", comm.WEIGHTS, layout)
    metrics = MetricRecord({f"metric-{i}": float(i) for i in range(64)})
    message = Message(RecordDict({"arrays": arrays, "wire": wire, "metrics": metrics}), dst_node_id=1, message_type="train")
    node = Node(node_id=2**63 - 1)
    push_object = max(
        PushObjectRequest(node=node, run_id=2**63 - 1, object_id=object_id, object_content=obj.deflate(),
                          session_id="s" * 64).ByteSize()
        for object_id, obj in get_all_nested_objects(message).items())
    push_messages = PushMessagesRequest(
        node=node, messages_list=[message_to_proto(remove_content_from_message(message))],
        message_object_trees=[get_object_tree(message)], clientapp_runtime_list=[1.0]).ByteSize()
    return push_object, push_messages


def test_edge_body_limit_fits_flowers_largest_request_and_little_more():
    from app import comm

    limit = _edge_body_limit()
    largest = {layout: _largest_requests(layout) for layout in comm.LAYOUTS}
    for layout, (push_object, push_messages) in largest.items():
        assert max(push_object, push_messages) <= limit, f"a {layout} reply's request ({push_object} B) exceeds the edge's limit"
    # close to it: one chunk plus overhead, not the 1 GiB that let any client make nginx and
    # Flower hold a gigabyte before the node's signature is checked
    worst = max(max(sizes) for sizes in largest.values())
    assert limit <= worst + 2**20, f"edge body limit {limit} B is far above Flower's largest request {worst} B"


def _mebibytes(value: str, env: dict[str, str] | None = None) -> float:
    """A compose mem_limit (`${FEDTUNE_MEM_X:-12g}` or `12g`) in MiB, after .env interpolation."""
    match = re.fullmatch(r"\$\{(\w+):-([^}]+)\}", value)
    if match:
        value = (env or {}).get(match.group(1), match.group(2))
    return _nginx_size(value) / 2**20


@pytest.mark.parametrize("name", sorted(COMMITTED))
def test_every_generated_service_has_a_memory_limit(name):
    services = compose_spec(COMMITTED[name])["services"]
    for service_name, service in services.items():
        assert "mem_limit" in service, f"{name}: service {service_name} has no memory limit"
        assert service["memswap_limit"] == service["mem_limit"], f"{name}: {service_name} may swap past its limit"
        assert _mebibytes(service["mem_limit"]) >= 128, f"{name}: {service_name}'s limit is too small to start Python"


def test_memory_limits_follow_the_role_and_profile():
    seed = compose_spec(StackSpec(nodes=3, gpus=2))["services"]
    tiny = compose_spec(smoke_spec(nodes=3))["services"]
    # a SuperNode loads a 4-bit 8B base: ~5.5 GiB of host RAM at load, plus its ClientApp
    assert _mebibytes(seed["supernode-0"]["mem_limit"]) >= 8 * 1024
    assert all(seed[f"supernode-{i}"]["mem_limit"] == seed["supernode-0"]["mem_limit"] for i in range(3))
    # the smoke stack's tiny nodes get smaller limits, above the 1.66 GiB peak measured in a tiny run
    assert 1.66 * 1024 * 1.5 <= _mebibytes(tiny["supernode-0"]["mem_limit"]) <= 4096
    assert _mebibytes(tiny["serverapp"]["mem_limit"]) < _mebibytes(seed["serverapp"]["mem_limit"])
    # the evaluation loads the base once per GPU
    assert _mebibytes(seed["evaluate"]["mem_limit"]) == 2 * _mebibytes(compose_spec(StackSpec(nodes=3, gpus=1))["services"]["evaluate"]["mem_limit"])
    # an operator raises one role in .env without regenerating
    assert _mebibytes(seed["supernode-1"]["mem_limit"], {"FEDTUNE_MEM_SUPERNODE": "16g"}) == 16 * 1024
    edge = compose_spec(StackSpec(role="superlink"))["services"]["edge"]
    assert _mebibytes(edge["mem_limit"]) <= 512


class _Container:
    def __init__(self, service: str, state: dict, restarts: int = 0, memory: int = 0, role: str | None = None) -> None:
        self.name = service
        self.labels = {"com.docker.compose.service": service, **({"fedtune.role": role} if role else {})}
        self.attrs = {"State": {"Status": "exited", "ExitCode": 0, **state}, "RestartCount": restarts,
                      "HostConfig": {"Memory": memory}}


def test_the_smoke_run_fails_a_container_killed_at_its_memory_limit():
    from app.deploy.smoke import Stack

    stack = Stack.__new__(Stack)  # no Docker client: containers() is the stand-in below
    stack.containers = lambda service=None: [
        _Container("supernode-3", {"Status": "running", "OOMKilled": True}, restarts=1, memory=3 * 2**30, role="supernode"),
        _Container("certs", {}),
    ]
    assert stack.failed_services() == [("supernode-3", "killed at its memory limit (3072 MiB; FEDTUNE_MEM_<SERVICE> raises it)")]
