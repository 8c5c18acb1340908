import json

import numpy as np

import pytest
import torch

from app import comm
from app.results import checkpoint
from app.config import load_settings
from app.training.model import LLAMA3_8B_SHAPE, adapter_shapes, adapter_state, build_peft_model, load_base_model
from app.results.metrics import MIB
from app.aggregation.aggregate import apply_mean_update


def test_mean_update_uses_example_counts_and_keeps_the_master_float32():
    master = {"w": np.array([10.0, 10.0], dtype=np.float32)}
    a = {"w": np.array([1.0, 3.0], dtype=np.float32)}
    b = {"w": np.array([5.0, 7.0], dtype=np.float32)}
    out = apply_mean_update(master, [a, b], [300.0, 100.0])
    assert np.allclose(out["w"], [12.0, 14.0]) and out["w"].dtype == np.float32
    tiny = apply_mean_update({"w": np.ones(1, np.float32)}, [{"w": np.full(1, 3e-5, np.float32)}], [1.0])
    assert tiny["w"][0] == np.float32(1) + np.float32(3e-5) != 1.0  # far below a bfloat16 step at 1, kept
    with pytest.raises(ValueError, match="no reply"):
        apply_mean_update(master, [], [])


def test_seed_adapter_size_and_transfer_bytes():
    shapes = adapter_shapes(load_settings({}).model, **LLAMA3_8B_SHAPE)
    params = sum(torch.Size(s).numel() for s in shapes.values())
    assert params == 13_795_328
    fp32 = comm.transfer_bytes(shapes, "float32")
    bf16 = comm.transfer_bytes(shapes, "bfloat16")
    int8 = comm.transfer_bytes(shapes, "int8-block64")
    assert fp32 == params * 4 and bf16 == params * 2  # tensor payload only: no per-array framing
    assert int8 == params + 4 * sum(-(-torch.Size(s).numel() // 64) for s in shapes.values())
    assert fp32 / MIB == pytest.approx(52.62, abs=0.01) and bf16 / MIB <= 26.4 and int8 / MIB <= 14.0


def test_bfloat16_rounding_matches_torch_on_edge_values():
    values = np.array([0.0, -0.0, 1.0, 1.00390625, 1.01171875, 3.4e38, -3.4e38, 1e-40, np.inf, -np.inf], dtype=np.float32)
    ours = comm.from_bfloat16_bits(comm.to_bfloat16_bits(values))
    reference = torch.from_numpy(values).to(torch.bfloat16).float().numpy()
    assert np.array_equal(ours, reference)
    assert np.isnan(comm.from_bfloat16_bits(comm.to_bfloat16_bits(np.array([np.nan], dtype=np.float32)))).all()


def test_checkpoint_loads_with_peft_and_reproduces_outputs(tmp_path):
    from peft import PeftModel

    settings = load_settings({"profile": "tiny"})
    model = build_peft_model(settings.model, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # a non-trivial adapter (lora_B starts at zero)
    state = {k: v.numpy() for k, v in adapter_state(model).items()}
    path = checkpoint.save_adapter(tmp_path / "peft_1", state, settings.model)
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["base_model_name_or_path"] == "tiny"
    assert config["r"] == settings.model.lora.peft_lora_r
    loaded = PeftModel.from_pretrained(load_base_model("tiny", 0), str(path))
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-5)


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    settings = load_settings({"profile": "tiny"})
    good = {"base_model.model.x.lora_A.weight": np.ones((2, 2), dtype=np.float32)}
    checkpoint.save_adapter(tmp_path / "peft_5", good, settings.model)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    import safetensors.numpy

    monkeypatch.setattr(safetensors.numpy, "save_file", disk_full)
    with pytest.raises(OSError, match="no space left on device; the previous checkpoint there, if any, is unchanged"):
        checkpoint.save_adapter(tmp_path / "peft_5", {"base_model.model.x.lora_A.weight": np.zeros((2, 2), dtype=np.float32)}, settings.model)
    assert np.array_equal(checkpoint.load_adapter_tensors(tmp_path / "peft_5")["base_model.model.x.lora_A.weight"], np.ones((2, 2)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft_5"]  # no staging left behind


WRITER = """
import itertools, sys
from pathlib import Path
import numpy as np
from app.results.checkpoint import save_adapter
from app.config import load_settings
model = load_settings({"profile": "tiny"}).model
for version in itertools.count():
    save_adapter(Path(sys.argv[1]), {"w": np.full((256, 256), version, np.float32)}, model, {"version": version})
    print(version, flush=True)
"""


def _consistent_version(path) -> int:
    """The checkpoint at `path` loads, and its weights and run state are of the same save."""
    import os
    from pathlib import Path

    for _ in range(50):
        fd = os.open(path, os.O_RDONLY)  # one directory for both reads, even if a save swaps it meanwhile
        try:
            opened = Path(f"/proc/self/fd/{fd}")
            weights = checkpoint.load_adapter_tensors(opened)["w"]
            state = json.loads((opened / checkpoint.RUN_STATE).read_text())
            json.loads((opened / checkpoint.ADAPTER_CONFIG).read_text())
            break
        except (checkpoint.CheckpointError, FileNotFoundError):
            # The directory we opened was replaced and then removed by a newer save before we
            # read it: not a torn checkpoint. Open the path again.
            if Path(f"/proc/self/fd/{fd}").resolve().exists() and Path(f"/proc/self/fd/{fd}").resolve() == Path(path).resolve():
                raise
        finally:
            os.close(fd)
    else:
        raise AssertionError(f"{path}: no whole checkpoint could be read in 50 tries")
    assert (weights == state["version"]).all()
    return state["version"]


def test_kill_during_save_leaves_a_whole_checkpoint(tmp_path):
    import random
    import subprocess
    import sys
    import time

    target = tmp_path / "peft_3"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "0"  # a first version exists; now it is replaced over and over
        seen, deadline = set(), time.monotonic() + 60
        while len(seen) < 3 and time.monotonic() < deadline:  # readers meanwhile always see a whole version
            seen.add(_consistent_version(target))
            time.sleep(random.uniform(0, 0.02))
        time.sleep(random.uniform(0, 0.2))
        writer.kill()  # almost surely inside save_adapter: it does nothing else
        writer.wait()
        final = _consistent_version(target)
    finally:
        writer.kill()
    assert len(seen) > 1 and final >= max(seen)
    # The next save removes what the killed one left behind.
    checkpoint.save_adapter(target, {"w": np.full((256, 256), 7, np.float32)}, load_settings({"profile": "tiny"}).model, {"version": 7})
    assert _consistent_version(target) == 7 and sorted(p.name for p in tmp_path.iterdir()) == ["peft_3"]
