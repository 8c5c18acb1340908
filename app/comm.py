"""How adapters cross the wire, and how the bytes are counted. NumPy only: a ClientApp handing
its round to the resident trainer never needs to import torch.

The scheme (`comm.format`):
- Down (ServerApp -> node): the global adapter's weights, in float32 for `float32` and in
  bfloat16 for every narrower format.
- Up (node -> ServerApp): the node's round *update*, its trained adapter minus the adapter it
  received, as it received it (after rounding), in `comm.format`: float32, bfloat16, or 8-bit
  blockwise (`int8-block64` / `int8-block256`: per block of 64 / 256 values of a tensor, one
  float32 scale = absmax / 127 and one int8 code per value).
- The ServerApp keeps the global adapter in float32 and adds the example-weighted mean update.

Why nothing that accumulates is lost: the master is never rounded, so each round's movement is
added to it in float32. Rounding the download only moves the point where a node takes its
gradients, by at most half a bfloat16 step, and that error is thrown away next round (the next
download is rounded afresh from the exact master); it never builds up. The upload is rounded
relative to the size of the update itself (bfloat16 keeps 8 significant bits of every value;
8-bit blocks keep each value to 1/254 of its block's largest change), not to the size of the
weights. Rounding full weights instead erases any change smaller than half a step of the weight:
at the seed's learning rates a round moves a DoRA magnitude near 1 by ~3e-4 while half a
bfloat16 step there is ~4e-3, so a narrow wire of weights returns exactly what it was sent
(BENCHMARKS.md, communication section, has the measurements).

A message carries the whole adapter as ONE packed array (Flower 1.42 moves every Array as at
least two objects, one HTTP request each: 192 tensors cost ~390 requests per hop) plus an index
in a ConfigRecord: format, content (weights or update) and, per tensor, name, shape, byte offset
and byte count. `layout="per-array"` sends one Array per tensor instead, for the transport
benchmark. The communication budget counts tensor payload bytes (codes and scales), the same
number for both layouts; the index and Flower's framing are not counted.

Everything received is checked before it is decoded: the index must describe exactly the
expected tensors (names, shapes, format), every byte count must equal what its shape and format
need, and the decoded values must be finite. `WireError` names what is wrong.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

FORMATS = ("float32", "bfloat16", "int8-block64", "int8-block256")
LAYOUTS = ("packed", "per-array")
RAW_STYPE = "raw.le"  # little-endian bytes; what they encode is in the message's index
PACKED_KEY = "packed"
WEIGHTS, UPDATE = "weights", "update"

State = Mapping[str, np.ndarray]


class WireError(ValueError):
    """A message's arrays do not match what the receiver expects; the message says what differs."""


def download_format(fmt: str) -> str:
    """Weights travel down in float32 for the exact format, else in bfloat16."""
    _check_format(fmt)
    return "float32" if fmt == "float32" else "bfloat16"


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise WireError(f"comm.format {fmt!r}: expected one of {', '.join(FORMATS)}")


def _block(fmt: str) -> int:
    return int(fmt.removeprefix("int8-block"))


def tensor_bytes(shape: tuple[int, ...], fmt: str) -> int:
    """Bytes one tensor of `shape` takes in `fmt`: what a receiver expects before decoding."""
    _check_format(fmt)
    count = int(np.prod(shape, dtype=np.int64))
    if fmt == "float32":
        return 4 * count
    if fmt == "bfloat16":
        return 2 * count
    return count + 4 * -(-count // _block(fmt))  # int8 codes + one float32 scale per block


# ------------------------------------------------------------------------- value encodings


def to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even like torch."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    rounded = np.where(np.isnan(values), bits | np.uint32(0x00400000), rounded)  # keep NaN a NaN
    return (rounded >> np.uint32(16)).astype("<u2")


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def round_trip(values: np.ndarray, fmt: str) -> np.ndarray:
    """What `values` become after crossing the wire in `fmt`."""
    return _decode_tensor(_encode_tensor(np.asarray(values, dtype=np.float32), fmt), values.shape, fmt)


def _encode_tensor(value: np.ndarray, fmt: str) -> bytes:
    flat = np.ascontiguousarray(value, dtype=np.float32).reshape(-1)
    if fmt == "float32":
        return flat.astype("<f4").tobytes()
    if fmt == "bfloat16":
        return to_bfloat16_bits(flat).tobytes()
    block = _block(fmt)
    padded = np.zeros(-(-flat.size // block) * block, dtype=np.float32)
    padded[: flat.size] = flat
    blocks = padded.reshape(-1, block)
    scales = (np.abs(blocks).max(axis=1) / np.float32(127)).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1))[:, None]
    codes = np.clip(np.rint(blocks / safe), -127, 127).astype(np.int8).reshape(-1)[: flat.size]
    return codes.tobytes() + scales.astype("<f4").tobytes()


def _decode_tensor(data: bytes | memoryview, shape: tuple[int, ...], fmt: str) -> np.ndarray:
    count = int(np.prod(shape, dtype=np.int64))
    if fmt == "float32":
        flat = np.frombuffer(data, dtype="<f4").astype(np.float32)
    elif fmt == "bfloat16":
        flat = from_bfloat16_bits(np.frombuffer(data, dtype="<u2"))
    else:
        block = _block(fmt)
        codes = np.zeros(-(-count // block) * block, dtype=np.float32)
        codes[:count] = np.frombuffer(data, dtype=np.int8, count=count)
        scales = np.frombuffer(data, dtype="<f4", offset=count).astype(np.float32)
        flat = (codes.reshape(-1, block) * scales[:, None]).reshape(-1)[:count]
    return flat.reshape(shape)


# ----------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def index_for(shapes: Mapping[str, tuple[int, ...]], fmt: str) -> list[Entry]:
    entries, offset = [], 0
    for name, shape in shapes.items():
        size = tensor_bytes(tuple(shape), fmt)
        entries.append(Entry(name, tuple(int(d) for d in shape), offset, size))
        offset += size
    return entries


def shapes_of(state: State) -> OrderedDict[str, tuple[int, ...]]:
    return OrderedDict((k, tuple(np.shape(v))) for k, v in state.items())


def encode(state: State, fmt: str, content: str = WEIGHTS, layout: str = "packed") -> tuple[ArrayRecord, ConfigRecord]:
    """The arrays and the index of one message carrying `state` (weights or an update)."""
    _check_format(fmt)
    if layout not in LAYOUTS:
        raise WireError(f"comm.layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    index = index_for(shapes_of(state), fmt)
    chunks = [_encode_tensor(state[e.name], fmt) for e in index]
    if layout == "packed":
        payload = b"".join(chunks)
        arrays = ArrayRecord(OrderedDict({PACKED_KEY: _raw_array(payload)}))
    else:
        arrays = ArrayRecord(OrderedDict((e.name, _raw_array(c)) for e, c in zip(index, chunks, strict=True)))
    wire = ConfigRecord(
        {
            "format": fmt,
            "content": content,
            "layout": layout,
            "index": json.dumps([[e.name, list(e.shape), e.offset, e.nbytes] for e in index]),
        }
    )
    return arrays, wire


def _raw_array(data: bytes) -> Array:
    return Array(dtype="uint8", shape=(len(data),), stype=RAW_STYPE, data=data)


def decode(
    arrays: ArrayRecord,
    wire: ConfigRecord,
    *,
    expect_shapes: Mapping[str, tuple[int, ...]] | None = None,
    expect_format: str | None = None,
    expect_content: str | None = None,
) -> OrderedDict[str, np.ndarray]:
    """The float32 tensors of one message, after checking its index and byte counts against
    what is expected (when given) and against itself, before decoding; values must be finite."""
    fmt, content, layout, index = _read_index(wire)
    if expect_format is not None and fmt != expect_format:
        raise WireError(f"format {fmt!r}, expected {expect_format!r}")
    if expect_content is not None and content != expect_content:
        raise WireError(f"content {content!r}, expected {expect_content!r}")
    want = index_for(expect_shapes if expect_shapes is not None else OrderedDict((e.name, e.shape) for e in index), fmt)
    if index != want:
        raise WireError(_index_difference(index, want))
    chunks = _chunks(arrays, layout, index)
    state = OrderedDict()
    for entry, chunk in zip(index, chunks, strict=True):
        value = _decode_tensor(chunk, entry.shape, fmt)
        if not np.isfinite(value).all():
            raise WireError(f"tensor {entry.name!r}: {int((~np.isfinite(value)).sum())} non-finite values")
        state[entry.name] = value
    return state


def _read_index(wire: ConfigRecord) -> tuple[str, str, str, list[Entry]]:
    try:
        fmt, content, layout = str(wire["format"]), str(wire["content"]), str(wire["layout"])
        rows = json.loads(str(wire["index"]))
        index = [Entry(str(n), tuple(int(d) for d in s), int(o), int(b)) for n, s, o, b in rows]
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError(f"unreadable index ({type(exc).__name__}: {exc})") from None
    if fmt not in FORMATS:
        raise WireError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if layout not in LAYOUTS:
        raise WireError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    return fmt, content, layout, index


def _index_difference(got: list[Entry], want: list[Entry]) -> str:
    got_names, want_names = [e.name for e in got], [e.name for e in want]
    if got_names != want_names:
        missing = [n for n in want_names if n not in got_names]
        extra = [n for n in got_names if n not in want_names]
        return f"tensors differ: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}" if missing or extra else "tensors in a different order"
    for g, w in zip(got, want, strict=True):
        if g != w:
            return f"tensor {g.name!r}: shape {list(g.shape)} at byte {g.offset} ({g.nbytes} B), expected shape {list(w.shape)} at byte {w.offset} ({w.nbytes} B)"
    return "index differs"


def _chunks(arrays: ArrayRecord, layout: str, index: list[Entry]) -> list[memoryview]:
    """Each tensor's bytes, after checking every Array's kind and size (nothing decoded yet)."""
    names = [PACKED_KEY] if layout == "packed" else [e.name for e in index]
    if list(arrays.keys()) != names:
        raise WireError(f"arrays {list(arrays.keys())[:3]}..., expected {names[:3]}{'...' if len(names) > 3 else ''}")
    sizes = [sum(e.nbytes for e in index)] if layout == "packed" else [e.nbytes for e in index]
    for name, size in zip(names, sizes, strict=True):
        array = arrays[name]
        if array.stype != RAW_STYPE or array.dtype != "uint8" or list(array.shape) != [size] or len(array.data) != size:
            raise WireError(
                f"array {name!r}: {array.dtype}/{array.stype} shape {list(array.shape)} with {len(array.data)} B, "
                f"expected uint8/{RAW_STYPE} of {size} B"
            )
    if layout == "packed":
        view = memoryview(arrays[PACKED_KEY].data)
        return [view[e.offset : e.offset + e.nbytes] for e in index]
    return [memoryview(arrays[e.name].data) for e in index]


def record_bytes(arrays: ArrayRecord) -> int:
    """Payload bytes of all arrays in a record: what the communication budget counts."""
    return sum(len(array.data) for array in arrays.values())


def transfer_bytes(shapes: Mapping[str, tuple[int, ...]], fmt: str) -> int:
    """Bytes one adapter transfer costs, from its shapes alone (no model needed)."""
    return sum(tensor_bytes(tuple(s), fmt) for s in shapes.values())


def subtract(a: State, b: State) -> OrderedDict[str, np.ndarray]:
    """a - b, in b's order: an update travels in the order of the adapter it was made from
    (the resident trainer's safetensors reply comes back sorted by name)."""
    return OrderedDict((k, np.asarray(a[k], dtype=np.float32) - np.asarray(b[k], dtype=np.float32)) for k in b)
