"""What the secure-aggregation messages carry, built and parsed in one place for both sides.

Every parser checks types, counts and sizes before it decodes anything and raises ProtocolError,
naming the field and what was expected, whatever it is given: the ServerApp parses node replies
with it, a node parses what the ServerApp forwards. Node ids travel as decimal strings (Flower's
are uint64, a ConfigRecord int is int64).
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from app.privacy import ring

SETUP, SHARE_KEYS, UNMASK = "query.secagg_setup", "query.secagg_share_keys", "query.secagg_unmask"
RECORD = "secagg"  # the ConfigRecord every protocol message and reply carries
MASKED_KEY = "masked"  # the one Array of a masked train reply
CURVE = ec.SECP256R1()
PUBLIC_KEY_BYTES = 33  # a compressed P-256 point
HASH_BYTES = 32
# A share of a 32-byte secret: 4 bytes of index + 16 per chunk of the secret padded to 48 bytes.
SHARE_BYTES = 4 + 48
# A Fernet token of one encrypted share pair (124 bytes of plaintext) is 248 characters.
MAX_CIPHERTEXT_BYTES = 512
MAX_SESSION_CHARS = 64
UINT64_LIMIT = 2**64


class ProtocolError(ValueError):
    """A secure-aggregation message or reply does not hold what its stage expects."""


@dataclass(frozen=True)
class Announcement:
    """What the ServerApp announces at setup and a node holds to for the whole session."""

    session: str
    server_round: int
    nodes: tuple[int, ...]  # the round's sampled nodes, ascending
    threshold: int  # shares needed to reconstruct a secret
    min_nodes: int  # the fewest masked inputs the ServerApp unmasks (DP: each node's noise share)
    parameters: int  # adapter values; the masked vector has WEIGHT_DIGITS more
    norm_bound: float
    max_weight: int
    grid_levels: int
    value_range: float  # the grid's per-coordinate range R (noise tails included)

    def record(self) -> ConfigRecord:
        fields = asdict(self)
        fields["nodes"] = [str(n) for n in self.nodes]
        return ConfigRecord(fields)

    @classmethod
    def parse(cls, record: object) -> Announcement:
        fields = _fields(record, {"session": str, "server_round": int, "nodes": list, "threshold": int, "min_nodes": int, "parameters": int,
                                  "norm_bound": float, "max_weight": int, "grid_levels": int, "value_range": float})
        nodes = tuple(sorted(node_ids(fields["nodes"], "nodes")))
        announced = cls(**{**fields, "nodes": nodes})
        announced.check()
        return announced

    def check(self) -> None:
        n = len(self.nodes)
        # Hex: a node names its state's keys after it (app/privacy/secagg_node.py).
        if not 0 < len(self.session) <= MAX_SESSION_CHARS or self.session.strip(string.hexdigits):
            raise ProtocolError(f"session id of {len(self.session)} characters, expected 1..{MAX_SESSION_CHARS} hex digits")
        if not 2 <= n <= ring.MAX_ROUND_NODES or len(set(self.nodes)) != n:
            raise ProtocolError(f"nodes: {n} (distinct: {len(set(self.nodes))}), expected 2..{ring.MAX_ROUND_NODES} distinct")
        # More than half: no two disjoint groups of nodes can each hand the ServerApp enough
        # shares, so it never learns both a node's mask seed and its key.
        if not n // 2 < self.threshold <= n:
            raise ProtocolError(f"threshold {self.threshold} for {n} nodes, expected {n // 2 + 1}..{n}")
        if not self.threshold <= self.min_nodes <= n:
            raise ProtocolError(f"min_nodes {self.min_nodes}, expected {self.threshold}..{n}")
        if self.grid_levels != ring.levels(n):
            raise ProtocolError(f"grid_levels {self.grid_levels}, expected {ring.levels(n)} for {n} nodes")
        if not (0 < self.norm_bound < float("inf") and 0 < self.value_range < float("inf")):
            raise ProtocolError(f"norm_bound {self.norm_bound} and value_range {self.value_range} must be positive and finite")
        if not (0 < self.parameters and 0 < self.max_weight < ring.DIGIT_BASE**ring.WEIGHT_DIGITS and self.server_round >= 1):
            raise ProtocolError(f"parameters {self.parameters}, max_weight {self.max_weight}, round {self.server_round}: out of range")


def _fields(record: object, kinds: Mapping[str, type]) -> dict:
    if not isinstance(record, ConfigRecord):
        raise ProtocolError(f"'{RECORD}' is {type(record).__name__}, expected a ConfigRecord")
    if set(record.keys()) != set(kinds):
        raise ProtocolError(f"'{RECORD}' has fields {sorted(record.keys())[:16]}, expected {sorted(kinds)}")
    for key, kind in kinds.items():
        value = record[key]
        ok = isinstance(value, kind) and not isinstance(value, bool)
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise ProtocolError(f"field {key!r} is {type(value).__name__}, expected {kind.__name__}")
    return {k: float(record[k]) if kinds[k] is float else record[k] for k in kinds}


def content_of(content: RecordDict, kinds: Mapping[str, type]) -> dict:
    """The fields of a message's or reply's `secagg` record, checked against `kinds`."""
    if RECORD not in content:
        raise ProtocolError(f"no '{RECORD}' record; has {sorted(content.keys())[:16]}")
    return _fields(content[RECORD], kinds)


def node_ids(values: Sequence, field: str) -> list[int]:
    ids = []
    for value in values:
        if not (isinstance(value, str) and value.isdigit() and len(value) <= 20 and int(value) < UINT64_LIMIT):
            raise ProtocolError(f"field {field!r}: {str(value)[:40]!r} is not a node id (decimal uint64)")
        ids.append(int(value))
    if len(set(ids)) != len(ids):
        raise ProtocolError(f"field {field!r} names a node twice")
    return ids


def byte_strings(values: Sequence, field: str, size: int | None = None, most: int | None = None) -> list[bytes]:
    for value in values:
        if not isinstance(value, bytes):
            raise ProtocolError(f"field {field!r} holds {type(value).__name__}, expected bytes")
        if (size is not None and len(value) != size) or (most is not None and len(value) > most):
            raise ProtocolError(f"field {field!r}: {len(value)} bytes, expected {size if size is not None else f'at most {most}'}")
    return list(values)


def public_key(data: bytes, field: str) -> ec.EllipticCurvePublicKey:
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(CURVE, data)
    except ValueError:
        raise ProtocolError(f"field {field!r}: not a point on P-256") from None


def encode_public_key(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)


def mapping(fields: dict, keys: str, values: str, expect: set[int], **size) -> dict[int, bytes]:
    """`fields[keys]` (node ids) zipped with `fields[values]` (bytes), covering exactly `expect`."""
    ids = node_ids(fields[keys], keys)
    data = byte_strings(fields[values], values, **size)
    if len(ids) != len(data):
        raise ProtocolError(f"{len(ids)} {keys!r} for {len(data)} {values!r}")
    if set(ids) != expect:
        raise ProtocolError(f"field {keys!r} names {len(ids)} node(s), expected exactly the {len(expect)} of the session")
    return dict(zip(ids, data, strict=True))


def masked_array(vector: np.ndarray) -> ArrayRecord:
    data = np.ascontiguousarray(vector, dtype=ring.RING_DTYPE).tobytes()
    return ArrayRecord({MASKED_KEY: Array(dtype="uint16", shape=(len(vector),), stype="raw.le", data=data)})


def read_masked(arrays: object, count: int) -> np.ndarray:
    """A masked reply's ring elements, its dtype, shape and byte count checked before decoding."""
    if not isinstance(arrays, ArrayRecord) or list(arrays.keys()) != [MASKED_KEY]:
        raise ProtocolError(f"masked input: expected an ArrayRecord holding only {MASKED_KEY!r}")
    array = arrays[MASKED_KEY]
    want = count * ring.RING_DTYPE.itemsize
    if array.dtype != "uint16" or array.stype != "raw.le" or tuple(array.shape) != (count,) or len(array.data) != want:
        raise ProtocolError(f"masked input: dtype {str(array.dtype)[:16]!r}, shape {list(array.shape)[:4]}, {len(array.data)} bytes; "
                            f"expected uint16 ring elements, shape [{count}], {want} bytes")
    return np.frombuffer(array.data, dtype=ring.RING_DTYPE)
