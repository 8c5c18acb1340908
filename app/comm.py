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

Nothing received is believed before it is checked, and nothing is decoded before that: the
index is bounded in length and nesting before it is parsed, then must have exactly the structure
above and describe exactly the expected tensors (names, shapes, format); a message that describes
itself (the initial adapter, decoded without expected shapes) must stay under the `MAX_*` caps
below instead. Every byte count must equal what its shape and format need, int8 block scales must
be finite, non-negative and bounded, and decoded values finite and bounded (`MAX_ABS_VALUE`).
`decode` raises `WireError`, naming what is wrong, and nothing else, whatever the message holds.
"""

from __future__ import annotations

import json
import math
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

FORMATS = ("float32", "bfloat16", "int8-block64", "int8-block256")
LAYOUTS = ("packed", "per-array")
RAW_STYPE = "raw.le"  # little-endian bytes; what they encode is in the message's index
PACKED_KEY = "packed"
WEIGHTS, UPDATE = "weights", "update"
# A reply's ConfigRecord naming the trainer that ran the round (`placement:device:process`,
# app/training/trainer_service.py trainer_id): a string, which a MetricRecord cannot hold.
TRAINER_RECORD, TRAINER_ID_KEY = "trainer", "trainer-id"

State = Mapping[str, np.ndarray]


class WireError(ValueError):
    """A message's arrays do not match what the receiver expects; the message says what differs."""


# What a receiver accepts at most. MAX_TENSORS, MAX_TENSOR_VALUES and MAX_ADAPTER_VALUES bound a
# message that describes itself (decoded without expected shapes: the initial adapter, a download);
# the others hold for every message. Honest messages never come near them: the seed's 8B-shaped
# DoRA adapter (q_proj and v_proj at rank 32) is 192 tensors and 13.8 M values, its largest tensor
# 131,072 values, its longest name 71 characters. They exist so that a hostile index cannot make
# the receiver parse megabytes or allocate gigabytes.
MAX_TENSORS = 4096  # all 7 linear modules of an 8B model (32 layers x 3 tensors) are 672; of a 70B, 1680
MAX_NAME_CHARS = 256  # printable ASCII: PEFT names are module paths (this one holds for every message)
MAX_DIMS = 4  # LoRA factors are 2-D, DoRA magnitudes 1-D, a conv LoRA's factors 4-D
MAX_TENSOR_VALUES = 2**27  # 134 M: even a rank-1024 factor of a 128k-vocabulary embedding fits (131 M)
MAX_ADAPTER_VALUES = 2**28  # 1 GiB in float32, 19x the seed's adapter; an 8B all-linear one at rank 64 fits
# The largest magnitude a decoded value may have. A round's update at the seed's learning rates
# (5e-5 down to 1e-6) moves a value by ~1e-4, LoRA factors are O(0.1) and DoRA magnitude vectors,
# row norms of the base weights, O(1). Measured on tiny runs: weights at most 0.61 and a round's
# update at most 0.16 at the tiny profile's learning rate of 0.1 (7.7e-5 at the seed's). 1e4 is
# four orders of magnitude above any of these, and low enough that a sum of squares over
# MAX_ADAPTER_VALUES such values (2.7e16) or a weighted mean of them stays far from float32's
# overflow (3.4e38).
MAX_ABS_VALUE = 1e4
MAX_BLOCK_SCALE = float(np.float32(MAX_ABS_VALUE / 127))  # an int8 block's scale: its absmax / 127, in float32
# The index's own structure: a list of [name, [dims], offset, bytes]; its integers stay below
# 2**53 (exact in every JSON reader); a row takes at most a fully escaped name plus six such numbers.
INDEX_DEPTH = 3
INDEX_INT_LIMIT = 2**53
INDEX_CHARS_PER_TENSOR = 2 * MAX_NAME_CHARS + 128
WIRE_FIELDS = ("format", "content", "layout", "index")


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
    """The float32 tensors of one message, or WireError naming why not (never another exception).
    Before anything is decoded, the index is checked against `expect_shapes` (names and shapes, in
    order) or, without them, against the MAX_* caps, and every byte count against the index;
    values must be finite and within MAX_ABS_VALUE."""
    if not isinstance(arrays, ArrayRecord) or not isinstance(wire, ConfigRecord):
        raise WireError(f"records are {type(arrays).__name__} and {type(wire).__name__}, expected ArrayRecord and ConfigRecord")
    fmt, content, layout, index = _read_index(wire, None if expect_shapes is None else len(expect_shapes))
    if expect_format is not None and fmt != expect_format:
        raise WireError(f"format {fmt!r}, expected {expect_format!r}")
    if expect_content is not None and content != expect_content:
        raise WireError(f"content {content!r}, expected {expect_content!r}")
    if expect_shapes is None:
        _check_caps(index)
        expect_shapes = OrderedDict((e.name, e.shape) for e in index)
    want = index_for(expect_shapes, fmt)
    if index != want:
        raise WireError(_index_difference(index, want))
    chunks = _chunks(arrays, layout, index)
    return OrderedDict((entry.name, _checked_tensor(entry, chunk, fmt)) for entry, chunk in zip(index, chunks, strict=True))


def _shown(value: object, limit: int = 80) -> str:
    """The repr of something a sender chose, cut short: an error message stays one short line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_index(wire: ConfigRecord, expected_count: int | None) -> tuple[str, str, str, list[Entry]]:
    if sorted(wire.keys()) != sorted(WIRE_FIELDS):
        missing = [k for k in WIRE_FIELDS if k not in wire]
        unexpected = [k for k in wire.keys() if k not in WIRE_FIELDS]
        raise WireError(f"unreadable index: wire fields missing {missing}, unexpected {_shown(unexpected)}")
    for field in WIRE_FIELDS:
        if not isinstance(wire[field], str):
            raise WireError(f"unreadable index: wire field {field!r} is {type(wire[field]).__name__}, expected str")
    fmt, content, layout, text = (wire[field] for field in WIRE_FIELDS)
    if fmt not in FORMATS:
        raise WireError(f"format {_shown(fmt)}: expected one of {', '.join(FORMATS)}")
    if content not in (WEIGHTS, UPDATE):
        raise WireError(f"content {_shown(content)}: expected {WEIGHTS!r} or {UPDATE!r}")
    if layout not in LAYOUTS:
        raise WireError(f"layout {_shown(layout)}: expected one of {', '.join(LAYOUTS)}")
    return fmt, content, layout, _parse_index(text, expected_count)


def _parse_index(text: str, expected_count: int | None) -> list[Entry]:
    """The index's entries, its length and nesting bounded before JSON parses it (no recursion
    can run deep) and every field's type and range checked after."""
    most = MAX_TENSORS if expected_count is None else expected_count
    limit = INDEX_CHARS_PER_TENSOR * max(most, 1)
    if len(text) > limit:
        raise WireError(f"unreadable index: {len(text)} characters, more than {limit} for {most} tensors")
    if not text.isascii():
        raise WireError("unreadable index: non-ASCII characters (the encoder escapes them)")
    depth = _nesting_depth(text)
    if depth > INDEX_DEPTH:
        raise WireError(f"unreadable index: nested {depth} deep, expected a list of [name, shape, offset, bytes] ({INDEX_DEPTH} deep)")
    try:
        rows = json.loads(text)
    except ValueError as exc:
        raise WireError(f"unreadable index ({type(exc).__name__}: {exc})") from None
    if not isinstance(rows, list):
        raise WireError(f"unreadable index: a JSON {type(rows).__name__}, expected a list of [name, shape, offset, bytes]")
    if len(rows) > most:
        raise WireError(f"index lists {len(rows)} tensors, more than {most}{' (comm.MAX_TENSORS)' if expected_count is None else ''}")
    entries = [_entry(i, row) for i, row in enumerate(rows)]
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        twice = next(name for name, times in Counter(names).items() if times > 1)
        raise WireError(f"tensor {twice!r} listed twice")
    return entries


def _nesting_depth(text: str) -> int:
    """How deep brackets nest outside JSON strings, counted with array operations instead of a
    parser: exact for valid JSON, and for invalid JSON up to where a parser stops."""
    raw = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    if raw.size == 0:
        return 0
    position = np.arange(raw.size, dtype=np.int32)
    backslash = raw == ord("\\")
    run = position - np.maximum.accumulate(np.where(backslash, np.int32(-1), position))  # backslashes ending here
    escaped = np.zeros(raw.size, dtype=bool)
    escaped[1:] = run[:-1] % 2 == 1
    quote = (raw == ord('"')) & ~escaped
    in_string = np.cumsum(quote, dtype=np.int32) % 2 == 1
    step = np.isin(raw, np.frombuffer(b"[{", np.uint8)).astype(np.int32) - np.isin(raw, np.frombuffer(b"]}", np.uint8))
    step[in_string] = 0
    return int(np.cumsum(step).max())


def _entry(i: int, row: object) -> Entry:
    if not (isinstance(row, list) and len(row) == 4):
        raise WireError(f"index entry {i}: {_shown(row)}, expected [name, shape, offset, bytes]")
    name, shape, offset, nbytes = row
    if not (isinstance(name, str) and 0 < len(name) <= MAX_NAME_CHARS and name.isascii() and name.isprintable()):
        raise WireError(f"index entry {i}: name {_shown(name)}, expected 1 to {MAX_NAME_CHARS} printable ASCII characters")
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(_is_count(d, 1) for d in shape)):
        raise WireError(f"tensor {name!r}: shape {_shown(shape)}, expected a list of at most {MAX_DIMS} positive integers")
    if not (_is_count(offset, 0) and _is_count(nbytes, 0)):
        raise WireError(f"tensor {name!r}: offset {_shown(offset)} and size {_shown(nbytes)}, expected integers from 0 to 2**53")
    return Entry(name, tuple(shape), offset, nbytes)


def _is_count(value: object, least: int) -> bool:
    return type(value) is int and least <= value <= INDEX_INT_LIMIT  # not a bool, not a float


def _check_caps(index: list[Entry]) -> None:
    """Without expected shapes, a message may describe no more than the MAX_* caps allow."""
    total = 0
    for entry in index:
        count = math.prod(entry.shape)
        if count > MAX_TENSOR_VALUES:
            raise WireError(f"tensor {entry.name!r}: shape {_shown(list(entry.shape))} holds more than comm.MAX_TENSOR_VALUES ({MAX_TENSOR_VALUES}) values")
        total += count
    if total > MAX_ADAPTER_VALUES:
        raise WireError(f"index declares {total} values in all, more than comm.MAX_ADAPTER_VALUES ({MAX_ADAPTER_VALUES})")


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
        got = list(arrays.keys())
        raise WireError(f"arrays {_shown(got[:3])}{'...' if len(got) > 3 else ''}, expected {names[:3]}{'...' if len(names) > 3 else ''}")
    sizes = [sum(e.nbytes for e in index)] if layout == "packed" else [e.nbytes for e in index]
    for name, size in zip(names, sizes, strict=True):
        array = arrays[name]
        if array.stype != RAW_STYPE or array.dtype != "uint8" or list(array.shape) != [size] or len(array.data) != size:
            raise WireError(
                f"array {name!r}: {_shown(array.dtype, 20)}/{_shown(array.stype, 20)} shape {_shown(list(array.shape), 40)} "
                f"with {len(array.data)} B, expected uint8/{RAW_STYPE} of {size} B"
            )
    if layout == "packed":
        view = memoryview(arrays[PACKED_KEY].data)
        return [view[e.offset : e.offset + e.nbytes] for e in index]
    return [memoryview(arrays[e.name].data) for e in index]


def _checked_tensor(entry: Entry, chunk: memoryview, fmt: str) -> np.ndarray:
    """One tensor's values; int8 blocks' scales are checked before they multiply anything."""
    if fmt in ("float32", "bfloat16"):
        value = _decode_tensor(chunk, entry.shape, fmt)
        if not np.isfinite(value).all():
            raise WireError(f"tensor {entry.name!r}: {int((~np.isfinite(value)).sum())} non-finite values")
        if (largest := float(np.abs(value).max())) > MAX_ABS_VALUE:
            raise WireError(f"tensor {entry.name!r}: a value of magnitude {largest:.3g}, above comm.MAX_ABS_VALUE ({MAX_ABS_VALUE:g})")
        return value
    count = math.prod(entry.shape)
    scales = np.frombuffer(chunk, dtype="<f4", offset=count)
    if not np.isfinite(scales).all():
        raise WireError(f"tensor {entry.name!r}: {int((~np.isfinite(scales)).sum())} non-finite values in its block scales")
    if (scales < 0).any():
        raise WireError(f"tensor {entry.name!r}: {int((scales < 0).sum())} negative block scales")
    if (largest := float(scales.max())) > MAX_BLOCK_SCALE:
        raise WireError(f"tensor {entry.name!r}: a block scale of {largest:.3g} decodes to values up to {127 * largest:.3g}, above comm.MAX_ABS_VALUE ({MAX_ABS_VALUE:g})")
    if (np.frombuffer(chunk, dtype=np.int8, count=count) == -128).any():
        raise WireError(f"tensor {entry.name!r}: int8 code -128, outside the encoder's range [-127, 127]")
    return _decode_tensor(chunk, entry.shape, fmt)


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
