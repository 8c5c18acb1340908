"""How adapters cross the wire, and how the bytes are counted. NumPy only: a ClientApp handing
its round to the resident trainer never needs to import torch.

float32 travels as Flower's own numpy serialisation (exact FlowerTune-style accounting);
bfloat16 (numpy has no such dtype) travels as raw little-endian uint16 bytes with the dtype
named, halving every transfer. Receivers always get float32 back: aggregation and training
keep their precision, only the wire is narrower.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

RAW_STYPE = "raw.le"  # array bytes in little-endian order, dtype named in Array.dtype


def to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even like torch."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    rounded = np.where(np.isnan(values), bits | np.uint32(0x00400000), rounded)  # keep NaN a NaN
    return (rounded >> np.uint32(16)).astype("<u2")


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def encode(state: Mapping[str, np.ndarray], dtype: str) -> ArrayRecord:
    arrays = OrderedDict()
    for key, value in state.items():
        value = np.asarray(value, dtype=np.float32)
        if dtype == "float32":
            arrays[key] = Array(value)
        elif dtype == "bfloat16":
            raw = to_bfloat16_bits(value).tobytes()
            arrays[key] = Array(dtype="bfloat16", shape=tuple(value.shape), stype=RAW_STYPE, data=raw)
        else:
            raise ValueError(f"comm.dtype {dtype!r}: expected 'float32' or 'bfloat16'")
    return ArrayRecord(arrays)


def decode(record: ArrayRecord) -> OrderedDict[str, np.ndarray]:
    state = OrderedDict()
    for key, array in record.items():
        if array.stype == RAW_STYPE:
            if array.dtype != "bfloat16":
                raise ValueError(f"array {key!r}: unsupported raw dtype {array.dtype!r}")
            value = from_bfloat16_bits(np.frombuffer(array.data, dtype="<u2")).reshape(array.shape)
        else:
            value = array.numpy()
        state[key] = np.asarray(value, dtype=np.float32)
    return state


def record_bytes(record: ArrayRecord) -> int:
    """Payload bytes of all arrays in a record: what FlowerTune's budget counts."""
    return sum(len(array.data) for array in record.values())


def transfer_bytes(shapes: Mapping[str, tuple[int, ...]], dtype: str) -> int:
    """Bytes one adapter transfer costs, from its shapes alone (no model needed)."""
    return record_bytes(encode({k: np.zeros(s, dtype=np.float32) for k, s in shapes.items()}, dtype))
