"""PEFT adapter directories written from a state dict, atomically (no model needed)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from app.config import ModelSettings

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_adapter(directory: Path, state: dict[str, np.ndarray], model: ModelSettings) -> Path:
    """Write `directory` as a PEFT adapter that `PeftModel.from_pretrained` loads.

    Files go to a sibling temporary directory, are fsynced, then swapped in by rename: a crash
    at any point leaves either the previous checkpoint or the new one, never half of one.
    """
    from safetensors.numpy import save_file

    from app.model import lora_config

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-"))
    try:
        tensors = {k: np.ascontiguousarray(v) for k, v in state.items()}
        save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        lora_config(model).save_pretrained(str(staging))
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            with open(staging / name, "rb") as handle:
                os.fsync(handle.fileno())
        if directory.exists():
            retired = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-old-"))
            os.replace(directory, retired / directory.name)
            os.replace(staging, directory)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, directory)
        _fsync_dir(directory.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def load_adapter_tensors(directory: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no adapter weights (expected a PEFT directory)")
    return load_file(str(path))
