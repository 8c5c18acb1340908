"""Whatever a node's secure-aggregation reply holds, the ServerApp's parsers return what the stage
expects or raise ProtocolError naming the field, never anything else; the same for what a node
parses of the ServerApp's announcement."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.privacy import ring
from app.privacy.secagg_records import CURVE, RECORD, Announcement, ProtocolError, encode_public_key, read_masked
from app.privacy.secagg_server import SecureAttempt, announcement

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NODES = [11, 22, 33]
SCALARS = st.one_of(st.text(max_size=24), st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=True), st.binary(max_size=80), st.booleans())
# ConfigRecord lists hold one type each.
LISTS = st.one_of(st.lists(st.text(max_size=24), max_size=5), st.lists(st.binary(max_size=300), max_size=5),
                  st.lists(st.integers(0, 2**63 - 1), max_size=5), st.lists(st.sampled_from(["11", "22", "33", "44", "0x1", "-1", "1" * 25]), max_size=5))
VALUES = st.one_of(SCALARS, LISTS)


def attempt() -> SecureAttempt:
    return SecureAttempt(grid=None, exchange=None, names={n: str(n) for n in NODES}, round_timeout=5.0,
                         announced=announcement(NODES, 1, 100, 1.0, 1.0, 10, 1, 0.0))


def valid_replies(session: str) -> dict[str, dict]:
    key = encode_public_key(ec.generate_private_key(CURVE).public_key())
    return {
        "keys": {"session": session, "pk_c": key, "pk_s": key, "b_hash": hashlib.sha256(b"b").digest()},
        "shares": {"session": session, "dst": ["11", "22", "33"], "ciphertexts": [b"x" * 248, b"y" * 248, b"z" * 248]},
        "unmask": {"session": session, "nodes": ["11", "22"], "shares": [b"s" * 52, b"t" * 52]},
    }


def parse(made: SecureAttempt, stage: str, content: RecordDict):
    if stage == "keys":
        return made._read_keys(11, content)
    if stage == "shares":
        return made._read_shares(content, set(NODES))
    return made._read_unmask(content, set(NODES))


@pytest.mark.parametrize("stage", ["keys", "shares", "unmask"])
def test_the_valid_replies_parse(stage):
    made = attempt()
    assert parse(made, stage, RecordDict({RECORD: ConfigRecord(valid_replies(made.out.announced.session)[stage])}))


@FUZZ
@given(stage=st.sampled_from(["keys", "shares", "unmask"]), field=st.text(min_size=1, max_size=12), value=VALUES, drop=st.booleans(), data=st.data())
def test_a_mutated_reply_is_parsed_or_refused_naming_why(stage, field, value, drop, data):
    made = attempt()
    fields = valid_replies(made.out.announced.session)[stage]
    target = data.draw(st.sampled_from(sorted(fields) + [field]))
    if drop and target in fields:
        del fields[target]
    else:
        fields[target] = value
    try:
        parse(made, stage, RecordDict({RECORD: ConfigRecord(fields)}))
    except ProtocolError as exc:
        assert str(exc)


@FUZZ
@given(fields=st.dictionaries(st.text(max_size=12), VALUES, max_size=6), other=st.booleans(), stage=st.sampled_from(["keys", "shares", "unmask"]))
def test_any_record_is_parsed_or_refused(fields, other, stage):
    content = RecordDict({RECORD: MetricRecord({"x": 1.0})} if other else {RECORD: ConfigRecord(fields)})
    with pytest.raises(ProtocolError):
        parse(attempt(), stage, content)


@FUZZ
@given(dtype=st.sampled_from(["uint16", "int16", "uint32", "float32", "uint8"]), shape=st.lists(st.integers(0, 300), min_size=0, max_size=3),
       size=st.integers(0, 700), key=st.sampled_from(["masked", "other"]), stype=st.sampled_from(["raw.le", "numpy.ndarray"]))
def test_a_masked_input_is_checked_before_it_is_decoded(dtype, shape, size, key, stype):
    arrays = ArrayRecord({key: Array(dtype=dtype, shape=tuple(shape), stype=stype, data=bytes(size))})
    count = 104
    good = dtype == "uint16" and tuple(shape) == (count,) and size == 2 * count and key == "masked" and stype == "raw.le"
    if good:
        assert read_masked(arrays, count).shape == (count,)
    else:
        with pytest.raises(ProtocolError, match="masked input"):
            read_masked(arrays, count)


@FUZZ
@given(field=st.sampled_from(["session", "server_round", "nodes", "threshold", "min_nodes", "parameters", "norm_bound", "max_weight",
                              "grid_levels", "value_range", "extra"]), value=VALUES)
def test_a_node_parses_the_announcement_or_refuses_it(field, value):
    record = announcement(NODES, 1, 100, 1.0, 1.0, 10, 1, 0.0).record()
    record[field] = value
    try:
        parsed = Announcement.parse(record)
    except ProtocolError as exc:
        assert str(exc)
        return
    assert parsed.grid_levels == ring.levels(len(parsed.nodes)) and len(parsed.nodes) // 2 < parsed.threshold
    assert np.isfinite(parsed.value_range) and parsed.value_range > 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), max_size=40), min_size=1, max_size=4),
       st.floats(1e-3, 1e3), st.integers(1, ring.MAX_ROUND_NODES), st.floats(1e-6, 1e6))
def test_quantize_keeps_any_finite_values_on_the_grid_within_one_step(arrays, scale, nodes, value_range):
    """Whatever finite values, scale, node count and range: every value becomes one ring element
    in [-L, L] (the sum of n of them cannot overflow), at most one grid step from its clipped value."""
    values = [np.array(a, np.float32) for a in arrays]
    levels = ring.levels(nodes)
    got = ring.quantize(values, value_range, levels, np.random.default_rng(0), scale=scale).view(np.int16).astype(np.float64)
    flat = np.concatenate(values).astype(np.float64)
    assert got.size == flat.size
    assert np.all(np.abs(got) <= levels)
    target = np.clip(flat * scale, -value_range, value_range) * (levels / value_range)
    assert np.all(np.abs(got - target) <= 1 + 1e-3 * np.maximum(1, np.abs(target)))
