"""Hostile messages at the wire (app/comm.py; issue 24): whatever a message holds, `decode` returns
checked tensors or raises WireError, never another exception, and never decodes what it did not
check. Each hostile input found in the issue has its own test; hypothesis mutates valid messages
and makes up garbage for the rest."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import comm

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAGNITUDE = comm.MAX_ABS_VALUE * (1 + 1e-6)  # an int8 value is 127 x a float32 scale: one rounding
ONE_TENSOR = {"m": np.linspace(0.5, 5.0, 70, dtype=np.float32)}  # a DoRA magnitude vector


def decoded_or_refused(arrays, wire, **expect) -> dict | None:
    """decode's result, its values checked, or None when refused; any other exception fails the test."""
    try:
        state = comm.decode(arrays, wire, **expect)
    except comm.WireError as exc:
        assert str(exc)
        return None
    for value in state.values():
        assert value.dtype == np.float32 and np.isfinite(value).all()
        assert np.abs(value).max() <= MAGNITUDE
    if expect.get("expect_shapes") is not None:
        assert comm.shapes_of(state) == dict(expect["expect_shapes"])
    return state


def refusal(arrays, wire, **expect) -> str:
    with pytest.raises(comm.WireError) as info:
        comm.decode(arrays, wire, **expect)
    return str(info.value)


def packed(data: bytes) -> ArrayRecord:
    return ArrayRecord({comm.PACKED_KEY: Array(dtype="uint8", shape=(len(data),), stype=comm.RAW_STYPE, data=data)})


def with_index(wire: ConfigRecord, rows) -> ConfigRecord:
    return ConfigRecord(dict(wire) | {"index": rows if isinstance(rows, str) else json.dumps(rows)})


# ------------------------------------------------------------------- the hostile inputs


def test_a_deeply_nested_index_is_refused_not_a_recursion_error():
    arrays, wire = comm.encode(ONE_TENSOR, "float32", comm.WEIGHTS)
    for expect in ({}, {"expect_shapes": comm.shapes_of(ONE_TENSOR)}):  # the initial adapter; a round's reply
        assert "unreadable index" in refusal(arrays, with_index(wire, "[" * 5000), **expect)
    # Short enough to pass the length bound: the nesting bound refuses it before JSON parses it.
    assert "nested 600 deep" in refusal(arrays, with_index(wire, "[" * 600), expect_shapes=comm.shapes_of(ONE_TENSOR))


@pytest.mark.parametrize("shape", [[-2, -35], [-70], [0, 70], [70.0], ["70"], [True, 70], [None], [1, 1, 1, 1, 70]])
def test_a_bad_dimension_in_the_initial_adapter_is_refused(shape):
    arrays, wire = comm.encode(ONE_TENSOR, "float32", comm.WEIGHTS)
    message = refusal(arrays, with_index(wire, [["m", shape, 0, 280]]), expect_format="float32", expect_content=comm.WEIGHTS)
    assert "tensor 'm': shape" in message and "positive integers" in message


def test_huge_dimensions_are_refused_from_the_index_alone():
    empty = packed(b"")
    _, wire = comm.encode(ONE_TENSOR, "float32", comm.WEIGHTS)
    # 2**64 values wrap to 0 bytes in int64: the index then "matches" an empty payload.
    for shape, nbytes in (([2**32, 2**32], 0), ([2**15, 2**15], 2**32)):
        assert "comm.MAX_TENSOR_VALUES" in refusal(empty, with_index(wire, [["m", shape, 0, nbytes]]))
    side = 2**13  # five tensors, each under the per-tensor cap, together over the total
    rows = [[f"t{i}", [side, side], i * 4 * side * side, 4 * side * side] for i in range(5)]
    assert "comm.MAX_ADAPTER_VALUES" in refusal(empty, with_index(wire, rows))
    assert "2**53" in refusal(empty, with_index(wire, [["m", [70], 0, 2**60]]))


def test_too_many_tensors_are_refused_and_the_cap_itself_passes():
    many = {f"t{i}": np.ones(1, np.float32) for i in range(comm.MAX_TENSORS + 1)}
    arrays, wire = comm.encode(many, "float32", comm.WEIGHTS)
    assert "comm.MAX_TENSORS" in refusal(arrays, wire)
    del many["t0"]
    assert len(comm.decode(*comm.encode(many, "float32", comm.WEIGHTS))) == comm.MAX_TENSORS


def _int8_message(codes: np.ndarray, scale: float):
    """A one-block int8-block64 update whose codes and scale are chosen by the sender."""
    state = {"m": np.zeros(64, np.float32)}
    _, wire = comm.encode(state, "int8-block64", comm.UPDATE)
    data = codes.astype(np.int8).tobytes() + np.array([scale], "<f4").tobytes()
    return packed(data), wire, {"expect_shapes": comm.shapes_of(state), "expect_format": "int8-block64"}


@pytest.mark.parametrize(
    "scale, reason",
    [(2.6e36, "above comm.MAX_ABS_VALUE"), (comm.MAX_ABS_VALUE, "above comm.MAX_ABS_VALUE"), (-1e-3, "negative block scales"),
     (float("nan"), "non-finite values in its block scales"), (float("inf"), "non-finite values in its block scales")],
)
def test_absurd_int8_block_scales_are_refused(scale, reason):
    # The case: 127 x 2.6e36 = 3.3e38 is finite, and moved the global adapter to 6.6e37.
    arrays, wire, expect = _int8_message(np.full(64, 127), scale)
    message = refusal(arrays, wire, **expect)
    assert "tensor 'm'" in message and reason in message


def test_an_int8_code_the_encoder_never_makes_is_refused():
    arrays, wire, expect = _int8_message(np.full(64, -128), 1e-3)
    assert "code -128" in refusal(arrays, wire, **expect)
    arrays, wire, expect = _int8_message(np.full(64, -127), comm.MAX_BLOCK_SCALE)  # the bound itself passes
    assert np.abs(comm.decode(arrays, wire, **expect)["m"]).max() <= MAGNITUDE


@pytest.mark.parametrize("fmt", ["float32", "bfloat16"])
@pytest.mark.parametrize("value", [3e38, -1e30, 2 * comm.MAX_ABS_VALUE])
def test_huge_finite_float_values_are_refused(fmt, value):
    arrays, wire = comm.encode({"m": np.full(70, value, np.float32)}, fmt, comm.UPDATE)
    assert "above comm.MAX_ABS_VALUE" in refusal(arrays, wire, expect_shapes={"m": (70,)}, expect_format=fmt)


def test_wrong_record_kinds_and_wire_field_types_are_refused():
    arrays, wire = comm.encode(ONE_TENSOR, "float32", comm.WEIGHTS)
    data = arrays[comm.PACKED_KEY].data
    for records in ((ConfigRecord({comm.PACKED_KEY: data}), wire), (MetricRecord({comm.PACKED_KEY: 1.0}), wire),
                    (arrays, MetricRecord({"index": 1})), (arrays, arrays)):
        assert "expected ArrayRecord and ConfigRecord" in refusal(*records)
    for field, value in (("index", [1, 2]), ("format", 7), ("layout", b"packed"), ("content", ["weights"])):
        assert f"wire field {field!r} is" in refusal(arrays, ConfigRecord(dict(wire) | {field: value}))
    assert "unexpected ['extra']" in refusal(arrays, ConfigRecord(dict(wire) | {"extra": "x"}))
    assert "missing ['index']" in refusal(arrays, ConfigRecord({k: v for k, v in wire.items() if k != "index"}))


def test_wrong_array_kinds_and_twice_listed_tensors_are_refused():
    arrays, wire = comm.encode(ONE_TENSOR, "float32", comm.WEIGHTS)
    data = arrays[comm.PACKED_KEY].data
    for dtype, stype in (("float32", comm.RAW_STYPE), ("uint8", "numpy.ndarray")):
        bad = ArrayRecord({comm.PACKED_KEY: Array(dtype=dtype, shape=(len(data),), stype=stype, data=data)})
        assert "expected uint8/raw.le of 280 B" in refusal(bad, wire)
    rows = json.loads(wire["index"])
    assert "tensor 'm' listed twice" in refusal(packed(data + data), with_index(wire, rows + [["m", [70], 280, 280]]))


def test_per_array_messages_with_too_few_or_too_many_arrays_are_refused():
    state = ONE_TENSOR | {"b": np.ones(3, np.float32)}
    arrays, wire = comm.encode(state, "bfloat16", comm.UPDATE, layout="per-array")
    fewer = ArrayRecord({"m": arrays["m"]})
    more = ArrayRecord(dict(arrays) | {"c": arrays["b"]})
    for sent in (fewer, more):
        assert "expected ['m', 'b']" in refusal(sent, wire, expect_shapes=comm.shapes_of(state))


def test_names_with_brackets_quotes_and_backslashes_still_round_trip():
    # The nesting bound counts brackets outside JSON strings only.
    state = {'w["[[[[\\': np.ones(3, np.float32), "]]]]\\\\": np.full(2, 0.5, np.float32), '"{{{{{"': np.zeros(1, np.float32)}
    for expect in ({}, {"expect_shapes": comm.shapes_of(state)}):
        back = comm.decode(*comm.encode(state, "float32", comm.WEIGHTS), **expect)
        assert list(back) == list(state) and all(np.array_equal(back[k], v) for k, v in state.items())


# --------------------------------------------------------------------------------- fuzzing

NAMES = st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=12)
SHAPES = st.lists(st.integers(1, 9), max_size=3).map(tuple)
SCALES = st.sampled_from([0.0, 1e-9, 1e-4, 1e-2, 1.0, 5.0, 100.0])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4),
    max_leaves=8,
)
CONFIG_VALUES = st.one_of(
    st.text(max_size=30), st.sampled_from(comm.FORMATS + comm.LAYOUTS + (comm.WEIGHTS, comm.UPDATE)),
    st.integers(-(2**63), 2**63 - 1), st.floats(), st.booleans(), st.binary(max_size=16),
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4), st.lists(st.text(max_size=5), max_size=4),
)
SPECIAL_FLOATS = st.sampled_from([np.nan, np.inf, -np.inf, 3.4e38, 2.6e36, 1e5, -1e5, -1.0, 0.0, -0.0, 1e-45, comm.MAX_BLOCK_SCALE, np.nextafter(np.float32(comm.MAX_BLOCK_SCALE), np.float32(np.inf))]) | st.floats(width=32)


@st.composite
def messages(draw):
    """A valid message: a small state, its format, content and layout."""
    shapes = draw(st.dictionaries(NAMES, SHAPES, min_size=1, max_size=4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(SCALES)
    state = {name: np.asarray(rng.standard_normal(shape) * scale, dtype=np.float32) for name, shape in shapes.items()}
    fmt, content, layout = draw(st.sampled_from(comm.FORMATS)), draw(st.sampled_from((comm.WEIGHTS, comm.UPDATE))), draw(st.sampled_from(comm.LAYOUTS))
    return state, fmt, content, layout


@FUZZ
@given(messages())
def test_fuzz_valid_messages_round_trip_exactly(message):
    state, fmt, content, layout = message
    arrays, wire = comm.encode(state, fmt, content, layout)
    for expect in ({}, {"expect_shapes": comm.shapes_of(state), "expect_format": fmt, "expect_content": content}):
        back = comm.decode(arrays, wire, **expect)
        assert list(back) == list(state)
        for name, value in state.items():
            assert np.array_equal(back[name], comm.round_trip(value, fmt))
            if fmt == "float32":
                assert np.array_equal(back[name], value)


def _mutate_index_text(draw, text: str) -> str:
    position = draw(st.integers(0, len(text)))
    kind = draw(st.sampled_from(["insert", "delete", "nest", "replace"]))
    if kind == "insert":
        return text[:position] + draw(st.text(st.sampled_from('[]{}",:0123456789-.eE \\atrufnlsNI'), max_size=20)) + text[position:]
    if kind == "delete":
        return text[:position] + text[position + draw(st.integers(1, 20)) :]
    if kind == "nest":  # deep enough, at the start, to run any recursive parser out of stack
        depth, position = draw(st.sampled_from([2, 4, 100, 1200, 5000])), draw(st.sampled_from([0, position]))
        return text[:position] + "[" * depth + draw(st.sampled_from(["", "]" * depth, "1"])) + text[position:]
    return draw(st.text(max_size=50) | JSON_VALUES.map(json.dumps))


def _declared_bytes(shape: list, fmt: str) -> int:
    """What comm.tensor_bytes would say, in Python ints (no int64 wrap) and for any dimensions."""
    count = math.prod(shape) if all(type(d) is int for d in shape) else 1
    if fmt in ("float32", "bfloat16"):
        return (4 if fmt == "float32" else 2) * count
    return count + 4 * -(-count // int(fmt.removeprefix("int8-block")))


def _mutate_index_rows(draw, rows: list, fmt: str) -> list:
    i = draw(st.integers(0, len(rows) - 1))
    kind = draw(st.sampled_from(["field", "dim", "same count", "same count", "reshape", "drop", "duplicate", "swap", "append"]))
    if kind == "same count":  # as many values (or a float of it): the byte counts still match
        if all(type(d) is int for d in rows[i][1]):
            count = math.prod(rows[i][1])
            rows[i][1] = draw(st.sampled_from([[-1, -count], [-count, -1], [1, 1, 1, 1, count], [0, count], [float(count)]]))
    elif kind == "field":
        rows[i][draw(st.integers(0, 3))] = draw(JSON_VALUES)
    elif kind == "dim" and rows[i][1]:
        rows[i][1][draw(st.integers(0, len(rows[i][1]) - 1))] = draw(st.integers(-(2**65), 2**65) | JSON_VALUES)
    elif kind == "reshape":  # a new shape with consistent byte counts and offsets: reaches the caps
        rows[i][1] = draw(st.lists(st.integers(-3, 2**33) | st.sampled_from([2**31, 2**32, 2**53]), max_size=5))
        offset = 0
        for row in rows:
            row[2], row[3] = offset, _declared_bytes(row[1], fmt)
            offset += row[3]
    elif kind == "drop":
        del rows[i]
    elif kind == "duplicate":
        rows.insert(i, list(rows[i]))
    elif kind == "swap":
        j = draw(st.integers(0, len(rows) - 1))
        rows[i], rows[j] = rows[j], rows[i]
    else:
        rows.append(draw(JSON_VALUES))
    return rows


def _mutate_payload(draw, arrays: dict, fmt: str) -> None:
    name = draw(st.sampled_from(sorted(arrays)))
    dtype, shape, stype, data = arrays[name]
    data = bytearray(data)
    kind = draw(st.sampled_from(["bytes", "value", "truncate", "extend"]))
    if kind == "bytes" and data:
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    elif kind == "value" and data:  # a chosen float32 (or its top half) where a value or scale is
        raw = np.array([draw(SPECIAL_FLOATS)], "<f4").tobytes()
        raw = raw[2:] if fmt == "bfloat16" else raw
        at = draw(st.integers(0, max(0, len(data) - len(raw))))
        data[at : at + len(raw)] = raw[: len(data) - at]
    elif kind == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    else:
        data += draw(st.binary(min_size=1, max_size=64))
    shape = (len(data),) if draw(st.booleans()) else shape
    arrays[name] = (dtype, shape, stype, bytes(data))


def _mutate_arrays(draw, arrays: dict) -> None:
    name = draw(st.sampled_from(sorted(arrays)))
    dtype, shape, stype, data = arrays[name]
    kind = draw(st.sampled_from(["dtype", "stype", "shape", "rename", "add", "remove"]))
    if kind == "dtype":
        arrays[name] = (draw(st.sampled_from(["float32", "int8", "bfloat16"]) | st.text(max_size=9)), shape, stype, data)
    elif kind == "stype":
        arrays[name] = (dtype, shape, draw(st.sampled_from(["numpy.ndarray", "raw.be"]) | st.text(max_size=9)), data)
    elif kind == "shape":
        arrays[name] = (dtype, tuple(draw(st.lists(st.integers(-5, 2**40), max_size=3))), stype, data)
    elif kind == "rename":
        arrays[draw(NAMES)] = arrays.pop(name)
    elif kind == "add":
        arrays[draw(NAMES)] = ("uint8", (4,), comm.RAW_STYPE, b"\x00\x00\x80\x7f")
    else:
        del arrays[name]


MUTATIONS = ("text", "rows", "field", "payload", "arrays", "kinds")


@st.composite
def mutated_messages(draw, kinds: tuple[str, ...] = MUTATIONS):
    """A valid message after one to three mutations of the given kinds (its index's text or rows,
    wire fields, payload, arrays or record kinds); returns what was sent and where it came from."""
    state, fmt, content, layout = draw(messages())
    record, wire_record = comm.encode(state, fmt, content, layout)
    arrays = {k: (a.dtype, tuple(a.shape), a.stype, a.data) for k, a in record.items()}
    wire = dict(wire_record)
    arrays_kind = wire_kind = "right"
    for kind in draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=3)):
        if kind == "text" and isinstance(wire.get("index"), str):
            wire["index"] = _mutate_index_text(draw, wire["index"])
        elif kind == "rows":
            try:
                rows = json.loads(wire["index"])
            except (KeyError, TypeError, ValueError, RecursionError):
                continue
            if isinstance(rows, list) and rows and all(isinstance(r, list) and len(r) == 4 and isinstance(r[1], list) for r in rows):
                wire["index"] = json.dumps(_mutate_index_rows(draw, rows, fmt))
        elif kind == "field":
            field = draw(st.sampled_from(comm.WIRE_FIELDS + ("extra",)))
            if draw(st.booleans()):
                wire.pop(field, None)
            else:
                wire[field] = draw(CONFIG_VALUES)
        elif kind == "payload" and arrays:
            _mutate_payload(draw, arrays, fmt)
        elif kind == "arrays" and arrays:
            _mutate_arrays(draw, arrays)
        elif kind == "kinds":
            arrays_kind, wire_kind = draw(st.sampled_from(["right", "config", "metric"])), draw(st.sampled_from(["right", "metric", "array"]))
    array_record = ArrayRecord({k: Array(dtype=d, shape=s, stype=t, data=b) for k, (d, s, t, b) in arrays.items()})
    config_record = ConfigRecord(wire)
    sent_arrays = {"right": array_record, "config": ConfigRecord({k: v[3] for k, v in arrays.items()}), "metric": MetricRecord({k: 1.0 for k in arrays})}[arrays_kind]
    sent_wire = {"right": config_record, "metric": MetricRecord({"index": 1}), "array": array_record}[wire_kind]
    return sent_arrays, sent_wire, state, fmt, content


@pytest.mark.parametrize("kinds", [("text",), ("rows",), ("field", "kinds"), ("payload", "arrays"), MUTATIONS])
@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_fuzz_mutated_messages_are_decoded_or_refused_never_crash(kinds, data):
    arrays, wire, state, fmt, content = data.draw(mutated_messages(kinds))
    decoded_or_refused(arrays, wire, expect_shapes=comm.shapes_of(state), expect_format=fmt, expect_content=content)  # a round's reply
    decoded_or_refused(arrays, wire)  # the initial adapter: the message describes itself


@FUZZ
@given(messages(), st.data())
def test_fuzz_a_chosen_value_is_accepted_exactly_when_it_is_in_range(message, data):
    """Write any float32 where a value (float formats) or a block scale (int8) lies: refused iff
    non-finite, above MAX_ABS_VALUE (a scale: above MAX_BLOCK_SCALE) or a negative scale."""
    state, fmt, content, layout = message
    arrays, wire = comm.encode(state, fmt, content, "packed")
    entry = data.draw(st.sampled_from(comm.index_for(comm.shapes_of(state), fmt)))
    count = math.prod(entry.shape)
    value = np.float32(data.draw(SPECIAL_FLOATS))
    payload = bytearray(arrays[comm.PACKED_KEY].data)
    if fmt == "float32":
        at, raw, landed = entry.offset + 4 * data.draw(st.integers(0, count - 1)), value.tobytes(), value
    elif fmt == "bfloat16":
        raw = value.tobytes()[2:]  # the top half: value truncated to bfloat16
        at, landed = entry.offset + 2 * data.draw(st.integers(0, count - 1)), comm.from_bfloat16_bits(np.frombuffer(raw, "<u2"))[0]
    else:
        blocks = -(-count // int(fmt.removeprefix("int8-block")))
        at, raw, landed = entry.offset + count + 4 * data.draw(st.integers(0, blocks - 1)), value.tobytes(), value
    payload[at : at + len(raw)] = raw
    bound = comm.MAX_BLOCK_SCALE if fmt.startswith("int8") else comm.MAX_ABS_VALUE
    in_range = bool(np.isfinite(landed)) and abs(float(landed)) <= bound and not (fmt.startswith("int8") and landed < 0)
    back = decoded_or_refused(packed(bytes(payload)), wire, expect_shapes=comm.shapes_of(state), expect_format=fmt, expect_content=content)
    assert (back is not None) == in_range, (fmt, float(landed))
    if back is not None and not fmt.startswith("int8"):
        assert landed in back[entry.name]


INDEX_TEXTS = st.one_of(
    st.text(max_size=60),
    st.sampled_from([2, 4, 100, 1200, 5000]).map(lambda depth: "[" * depth),
    JSON_VALUES.map(json.dumps),
    st.lists(st.tuples(NAMES, st.lists(st.integers(-3, 2**40), max_size=5), st.integers(-9, 2**40), st.integers(-9, 2**40)), max_size=4).map(json.dumps),
)
ARRAYS = st.builds(
    Array,
    dtype=st.sampled_from(["uint8", "float32"]) | st.text(max_size=6),
    shape=st.lists(st.integers(-3, 300), max_size=2).map(tuple),
    stype=st.sampled_from([comm.RAW_STYPE, "numpy.ndarray"]),
    data=st.binary(max_size=300),
)


@FUZZ
@given(
    fields=st.tuples(st.sampled_from(comm.FORMATS), st.sampled_from((comm.WEIGHTS, comm.UPDATE)), st.sampled_from(comm.LAYOUTS), INDEX_TEXTS),
    garbled=st.sampled_from([None, None, None, *comm.WIRE_FIELDS, "extra"]),
    garbage=CONFIG_VALUES,
    arrays=st.dictionaries(st.just(comm.PACKED_KEY), ARRAYS, min_size=1) | st.dictionaries(NAMES, ARRAYS, max_size=3),
    kinds=st.sampled_from([(ArrayRecord, ConfigRecord)] * 6 + [(ConfigRecord, ConfigRecord), (ArrayRecord, ArrayRecord)]),
    expect_shapes=st.none() | st.dictionaries(NAMES, SHAPES, min_size=1, max_size=3),
)
def test_fuzz_garbage_is_refused_never_crashes(fields, garbled, garbage, arrays, kinds, expect_shapes):
    """A made-up index and payload; at most one wire field garbled, so that most get past the first check."""
    wire = dict(zip(comm.WIRE_FIELDS, fields, strict=True)) | ({garbled: garbage} if garbled else {})
    arrays_kind, wire_kind = kinds
    sent_arrays = ArrayRecord(arrays) if arrays_kind is ArrayRecord else ConfigRecord({k: a.data for k, a in arrays.items()})
    sent_wire = ConfigRecord(wire) if wire_kind is ConfigRecord else ArrayRecord(arrays)
    decoded_or_refused(sent_arrays, sent_wire, expect_shapes=expect_shapes)
