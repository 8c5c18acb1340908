"""The wire (app/comm.py): formats, the packed message and its index, and refusals before decoding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from app import comm

RNG = np.random.default_rng(0)
STATE = {
    "base_model.model.layers.0.q_proj.lora_A.weight": RNG.standard_normal((4, 70)).astype(np.float32) * 1e-2,
    "base_model.model.layers.0.q_proj.lora_B.weight": RNG.standard_normal((70, 4)).astype(np.float32) * 1e-3,
    "base_model.model.layers.0.q_proj.lora_magnitude_vector": 1 + RNG.standard_normal(70).astype(np.float32) * 1e-2,
}


@pytest.mark.parametrize("fmt", comm.FORMATS)
@pytest.mark.parametrize("layout", comm.LAYOUTS)
def test_round_trip_and_byte_count(fmt, layout):
    arrays, wire = comm.encode(STATE, fmt, comm.UPDATE, layout)
    assert len(arrays) == (1 if layout == "packed" else len(STATE))
    # The budget counts tensor payload only, the same for both layouts, from the shapes alone.
    assert comm.record_bytes(arrays) == comm.transfer_bytes(comm.shapes_of(STATE), fmt)
    back = comm.decode(arrays, wire, expect_shapes=comm.shapes_of(STATE), expect_format=fmt, expect_content=comm.UPDATE)
    for key, value in STATE.items():
        assert back[key].dtype == np.float32 and back[key].shape == value.shape
        if fmt == "float32":
            assert np.array_equal(back[key], value)
        elif fmt == "bfloat16":  # rounded exactly as torch rounds
            assert np.array_equal(back[key], torch.from_numpy(value).to(torch.bfloat16).float().numpy())
        else:  # within half a step of the block's scale
            block = int(fmt.removeprefix("int8-block"))
            flat = np.pad(value.reshape(-1), (0, -value.size % block)).reshape(-1, block)
            bound = np.repeat(np.abs(flat).max(axis=1) / 127 / 2, block)[: value.size].reshape(value.shape)
            assert (np.abs(back[key] - value) <= bound * (1 + 1e-6)).all()


def test_packed_message_is_a_handful_of_objects_not_one_per_tensor():
    state = {f"t{i}": np.ones((8, 8), np.float32) for i in range(192)}
    packed, _ = comm.encode(state, "bfloat16", layout="packed")
    per_array, _ = comm.encode(state, "bfloat16", layout="per-array")
    assert len(packed) == 1 and len(per_array) == 192
    assert comm.record_bytes(packed) == comm.record_bytes(per_array) == 192 * 64 * 2


def test_int8_blocks_keep_small_updates_that_a_narrow_format_of_weights_would_erase():
    weights = np.ones(256, np.float32)  # a DoRA magnitude near 1
    update = np.full(256, 3e-4, np.float32) * np.linspace(0.5, 1.0, 256, dtype=np.float32)
    assert np.array_equal(comm.round_trip(weights + update, "bfloat16"), weights)  # the old wire: erased
    for fmt in ("bfloat16", "int8-block64", "int8-block256"):
        sent = comm.round_trip(update, fmt)
        assert np.linalg.norm(sent - update) / np.linalg.norm(update) < 0.01


def test_int8_scales_are_float32_so_tiny_updates_do_not_underflow():
    update = np.full(64, 1e-9, np.float32)  # late rounds at LR 1e-6 move some entries this little
    assert np.allclose(comm.round_trip(update, "int8-block64"), update, rtol=1e-2)
    assert not comm.round_trip(np.zeros(64, np.float32), "int8-block64").any()


def _tampered(fmt="bfloat16", **change):
    arrays, wire = comm.encode(STATE, fmt, comm.UPDATE)
    fields = dict(wire)
    fields.update(change)
    return arrays, ConfigRecord(fields)


def _refused(arrays, wire, fmt="bfloat16"):
    with pytest.raises(comm.WireError) as info:
        comm.decode(arrays, wire, expect_shapes=comm.shapes_of(STATE), expect_format=fmt, expect_content=comm.UPDATE)
    return str(info.value)


def test_a_shape_that_would_broadcast_is_refused_naming_the_tensor():
    shapes = comm.shapes_of(STATE)
    key = next(iter(shapes))
    bad = dict(STATE, **{key: np.ones((1,), np.float32)})
    arrays, wire = comm.encode(bad, "bfloat16", comm.UPDATE)
    message = _refused(arrays, wire)
    assert key in message and "shape [1]" in message and "expected shape [4, 70]" in message


def test_missing_and_unexpected_tensors_are_named():
    key = next(iter(STATE))
    arrays, wire = comm.encode({k: v for k, v in STATE.items() if k != key} | {"extra": np.ones(3, np.float32)}, "bfloat16", comm.UPDATE)
    message = _refused(arrays, wire)
    assert f"missing ['{key}']" in message and "unexpected ['extra']" in message


def test_sizes_are_checked_before_decoding():
    arrays, wire = comm.encode(STATE, "bfloat16", comm.UPDATE)
    data = arrays[comm.PACKED_KEY].data
    for wrong in (data[:-2], data + b"\x00" * 1024):
        # The index still describes the expected tensors; only the payload's length is wrong.
        message = _refused(ArrayRecord({comm.PACKED_KEY: Array(dtype="uint8", shape=(len(wrong),), stype=comm.RAW_STYPE, data=wrong)}), wire)
        assert f"with {len(wrong)} B, expected uint8/raw.le of {len(data)} B" in message
    # An index claiming a huge tensor is refused from the index alone.
    rows = json.loads(wire["index"])
    rows[0][1] = [10**6, 10**6]
    assert "expected shape [4, 70]" in _refused(*_tampered(index=json.dumps(rows)))


def test_format_content_and_garbage_index_are_refused():
    assert "format 'float32', expected 'bfloat16'" in _refused(*_tampered(format="float32"))
    assert "content 'weights', expected 'update'" in _refused(*_tampered(content="weights"))
    assert "unreadable index" in _refused(*_tampered(index="not json"))
    assert "format 'int4'" in _refused(*_tampered(format="int4"))


@pytest.mark.parametrize("fmt", comm.FORMATS)
def test_non_finite_values_are_refused(fmt):
    key = next(iter(STATE))
    bad = dict(STATE, **{key: np.where(np.arange(280).reshape(4, 70) == 5, np.nan, STATE[key]).astype(np.float32)})
    arrays, wire = comm.encode(bad, fmt, comm.UPDATE)
    assert f"tensor {key!r}: " in _refused(arrays, wire, fmt) and "non-finite" in _refused(arrays, wire, fmt)


def seed_adapter_shapes() -> dict[str, tuple[int, ...]]:
    """The seed recipe's adapter on Llama-3-8B (DoRA, q_proj and v_proj, rank 32), as
    app.training.model.adapter_shapes gives it; written out because building the meta model
    takes ~20 s here."""
    shapes = {}
    for layer in range(32):
        for module, out in (("q_proj", 4096), ("v_proj", 1024)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            shapes |= {f"{prefix}.lora_A.weight": (32, 4096), f"{prefix}.lora_B.weight": (out, 32), f"{prefix}.lora_magnitude_vector": (out,)}
    return shapes


def test_the_seed_adapter_passes_every_bound_as_initial_adapter_and_as_update():
    shapes = seed_adapter_shapes()
    assert len(shapes) == 192 and sum(int(np.prod(s)) for s in shapes.values()) == 13_795_328
    rng = np.random.default_rng(1)

    def initial(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name.endswith("magnitude_vector"):
            return rng.uniform(0.5, 5.0, shape)  # row norms of the base weights
        if name.endswith("lora_A.weight"):
            return rng.uniform(-1, 1, shape) / 64  # PEFT's kaiming-uniform bound, 1/sqrt(fan-in 4096)
        return np.zeros(shape)  # lora_B starts at zero

    # The initial adapter is decoded without expected shapes: the MAX_* caps apply.
    weights = {k: initial(k, s).astype(np.float32) for k, s in shapes.items()}
    back = comm.decode(*comm.encode(weights, "float32", comm.WEIGHTS), expect_format="float32", expect_content=comm.WEIGHTS)
    assert all(np.array_equal(back[k], v) for k, v in weights.items())
    update = {k: (rng.standard_normal(s) * 1e-4).astype(np.float32) for k, s in shapes.items()}
    for fmt in comm.FORMATS:
        back = comm.decode(*comm.encode(update, fmt, comm.UPDATE), expect_shapes=shapes, expect_format=fmt, expect_content=comm.UPDATE)
        assert list(back) == list(shapes)


@pytest.mark.parametrize("fmt", comm.FORMATS)
@pytest.mark.parametrize("magnitude", [1e-9, 1e-4, 1.0, 5.0, 100.0])
def test_honest_values_pass_in_every_format(fmt, magnitude):
    # Updates at the seed's learning rates (~1e-4, late rounds ~1e-9), weights O(1), DoRA
    # magnitudes 0.5-5, and 100x that still decode exactly as they always did.
    state = {k: v / np.abs(v).max() * magnitude for k, v in STATE.items()}
    back = comm.decode(*comm.encode(state, fmt, comm.UPDATE), expect_shapes=comm.shapes_of(state), expect_format=fmt)
    assert all(np.array_equal(back[k], comm.round_trip(v, fmt)) for k, v in state.items())
