"""How adapters cross the wire, and how the bytes are counted.

float32 travels as Flower's own numpy serialisation (exact FlowerTune-style accounting);
bfloat16 (numpy has no such dtype) travels as raw little-endian bytes with the dtype named,
halving every transfer. Receivers always get float32 back: aggregation and training keep
their precision, only the wire is narrower.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from flwr.app import Array, ArrayRecord

RAW_STYPE = "torch.raw"  # tensor bytes in native (little-endian) order, dtype in Array.dtype


def encode(state: dict[str, torch.Tensor], dtype: str) -> ArrayRecord:
    if dtype == "float32":
        return ArrayRecord(OrderedDict((k, Array(v.detach().to(torch.float32).cpu().numpy())) for k, v in state.items()))
    if dtype == "bfloat16":
        arrays = OrderedDict()
        for key, value in state.items():
            raw = value.detach().to(torch.bfloat16).cpu().contiguous().view(torch.int16).numpy().tobytes()
            arrays[key] = Array(dtype="bfloat16", shape=tuple(value.shape), stype=RAW_STYPE, data=raw)
        return ArrayRecord(arrays)
    raise ValueError(f"comm.dtype {dtype!r}: expected 'float32' or 'bfloat16'")


def decode(record: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
    state = OrderedDict()
    for key, array in record.items():
        if array.stype == RAW_STYPE:
            if array.dtype != "bfloat16":
                raise ValueError(f"array {key!r}: unsupported raw dtype {array.dtype!r}")
            tensor = torch.frombuffer(bytearray(array.data), dtype=torch.bfloat16).reshape(array.shape)
        else:
            tensor = torch.from_numpy(array.numpy().copy())
        state[key] = tensor.to(torch.float32)
    return state


def record_bytes(record: ArrayRecord) -> int:
    """Payload bytes of all arrays in a record: what FlowerTune's budget counts."""
    return sum(len(array.data) for array in record.values())


def transfer_bytes(shapes: dict[str, tuple[int, ...]], dtype: str) -> int:
    """Bytes one adapter transfer costs, from its shapes alone (no model needed)."""
    record = encode({k: torch.zeros(s) for k, s in shapes.items()}, dtype)
    return record_bytes(record)
