"""A checkpoint save on a really full disk (a small tmpfs as the results directory): the save
fails naming the checkpoint and "no space left", and the previous checkpoint stays whole.
Needs root and `mount -t tmpfs` (CI runs as root): without them this test fails, never skips."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from app.results.checkpoint import load_adapter_tensors, save_adapter
from app.config import load_settings


@pytest.fixture
def small_disk(tmp_path):
    mount_point = tmp_path / "results"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount_point)], capture_output=True, text=True)
    assert done.returncode == 0, f"this test needs root and `mount -t tmpfs` (CI has both): {done.stderr.strip()}"
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_disk_full_during_a_checkpoint_save_keeps_the_previous_one(small_disk):
    model = load_settings({"profile": "tiny"}).model
    previous = {"base_model.model.layer.lora_A.weight": np.arange(64, dtype=np.float32).reshape(8, 8)}
    target = small_disk / "run-1" / "peft_1"
    save_adapter(target, previous, model, {"round": 1})
    too_big = {"base_model.model.layer.lora_A.weight": np.ones((1024, 1024), np.float32)}  # 4 MiB on a 512 KiB disk
    with pytest.raises(OSError, match="no space left on device") as info:
        save_adapter(target, too_big, model, {"round": 1})
    assert str(target) in str(info.value)
    kept = load_adapter_tensors(target)
    assert np.array_equal(kept["base_model.model.layer.lora_A.weight"], previous["base_model.model.layer.lora_A.weight"])
    assert sorted(p.name for p in target.parent.iterdir()) == ["peft_1"]  # the half-written staging copy is gone
    save_adapter(small_disk / "run-1" / "peft_2", previous, model)  # the space it took is free again
