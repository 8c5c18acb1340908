"""PEFT adapter directories written from a state dict, atomically (no model needed), and read
back for `resume-from` with every mismatch named."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.config import ModelSettings
from app.results.metrics import share_like_new_files

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# The run's position after this checkpoint's round (round, cumulative bytes, configuration),
# inside the checkpoint directory so it is swapped in atomically with the adapter.
RUN_STATE = "fedtune_state.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not match the run that wants it."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL):  # kernel or filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def save_adapter(
    directory: Path, state: dict[str, np.ndarray], model: ModelSettings, run_state: dict[str, Any] | None = None
) -> Path:
    """Write `directory` as a PEFT adapter that `PeftModel.from_pretrained` loads.

    Files go to a sibling temporary directory, are fsynced, then swapped in by rename (an atomic
    exchange when a previous version exists): a crash at any point leaves either the previous
    checkpoint or the new one at `directory`, never half of one. Temporary directories a
    killed save left behind are removed by the next save of the same checkpoint.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    from app.training.model import lora_config

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    for stale in directory.parent.glob(f".{directory.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-"))
    try:
        try:
            tensors = {k: np.ascontiguousarray(v) for k, v in state.items()}
            save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            lora_config(model).save_pretrained(str(staging))
            names = [ADAPTER_WEIGHTS, ADAPTER_CONFIG]
            if run_state is not None:
                (staging / RUN_STATE).write_text(json.dumps(run_state, indent=2), encoding="utf-8")
                names.append(RUN_STATE)
            for name in names:
                share_like_new_files(staging / name)  # safetensors writes 0600
                with open(staging / name, "rb") as handle:
                    os.fsync(handle.fileno())
            share_like_new_files(staging, directory=True)  # mkdtemp made it 0700
            _fsync_dir(staging)
        except (OSError, SafetensorError) as exc:  # a full disk, a quota, an I/O error: name what failed
            raise _write_error(directory, exc) from exc
        if not directory.exists():
            os.replace(staging, directory)
        elif not _exchange(staging, directory):
            retired = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-old-"))
            os.replace(directory, retired / directory.name)
            os.replace(staging, directory)
            shutil.rmtree(retired, ignore_errors=True)
        _fsync_dir(directory.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after an exchange: the previous version
    return directory


def _write_error(directory: Path, exc: Exception) -> OSError:
    """OSError naming the checkpoint and the cause; safetensors reports errno only in its text."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None and (match := re.search(r"os error (\d+)", str(exc))):
        code = int(match.group(1))
    why = os.strerror(code).lower() if code else str(exc)
    return OSError(code or errno.EIO, f"checkpoint {directory}: could not write it: {why}; the previous checkpoint there, if any, is unchanged")


def load_adapter_tensors(directory: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path}: no adapter weights (expected a PEFT directory)")
    try:
        return load_file(str(path))
    except (SafetensorError, ValueError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


@dataclass(frozen=True)
class ResumePoint:
    directory: Path
    round: int
    tensors: dict[str, np.ndarray]
    state: dict[str, Any]


# Keys that change what rounds N+1.. compute: resuming with other values would not continue the run.
RESUME_MUST_MATCH = (
    "seed", "num-server-rounds", "model.", "train.", "dataset.", "comm.format",
    "strategy.fraction-train", "strategy.min-train-nodes", "strategy.proximal-mu",
)


def load_resume_point(directory: Path, flat_config: dict[str, Any]) -> ResumePoint:
    """Read and check `<results>/run-<id>/peft_N` before the resumed run does any work."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"resume-from {directory}: not a directory (expected <results>/run-<id>/peft_<round>)")
    state_path = directory / RUN_STATE
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        saved_round, saved_config = int(state["round"]), dict(state["config"])
        int(state["cumulative_bytes"])
    except FileNotFoundError:
        raise CheckpointError(f"resume-from {directory}: no {RUN_STATE} (only checkpoints written by this version can be resumed)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"resume-from {state_path}: unreadable run state ({type(exc).__name__}: {exc})") from None
    if (match := re.fullmatch(r"peft_(\d+)", directory.name)) and int(match.group(1)) != saved_round:
        raise CheckpointError(f"resume-from {directory}: directory name says round {match.group(1)}, {RUN_STATE} says {saved_round}")
    differences = [
        f"{key}: checkpoint {saved_config.get(key)!r}, this run {value!r}"
        for key, value in sorted(flat_config.items())
        if key.startswith(RESUME_MUST_MATCH) and saved_config.get(key) != value
    ]
    if differences:
        raise CheckpointError(f"resume-from {directory}: the checkpoint's run differs in\n  " + "\n  ".join(differences))
    if saved_round >= flat_config["num-server-rounds"]:
        raise CheckpointError(f"resume-from {directory}: round {saved_round} is the last of {flat_config['num-server-rounds']}; nothing to resume")
    _check_adapter_config(directory, flat_config)
    return ResumePoint(directory, saved_round, load_adapter_tensors(directory), state)


def _check_adapter_config(directory: Path, flat: dict[str, Any]) -> None:
    path = directory / ADAPTER_CONFIG
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable adapter config ({exc})") from None
    expected = {
        "base_model_name_or_path": flat["model.name"],
        "r": flat["model.lora.peft-lora-r"],
        "target_modules": sorted(m.strip() for m in flat["model.lora.peft-lora-target-modules"].split(",") if m.strip()),
        "use_dora": flat["model.lora.use-dora"],
    }
    got = dict(found, target_modules=sorted(found.get("target_modules") or []))
    wrong = [f"{key}: expected {value!r}, found {got.get(key)!r}" for key, value in expected.items() if got.get(key) != value]
    if wrong:
        raise CheckpointError(f"{path}: adapter does not match this run's model\n  " + "\n  ".join(wrong))


def check_same_layout(tensors: dict[str, np.ndarray], reference: dict[str, np.ndarray], source: Path) -> None:
    """The resumed adapter must have exactly the tensors (names and shapes) the nodes train."""
    missing = sorted(set(reference) - set(tensors))
    extra = sorted(set(tensors) - set(reference))
    shapes = [
        f"{key}: expected {tuple(reference[key].shape)}, found {tuple(tensors[key].shape)}"
        for key in sorted(set(reference) & set(tensors))
        if tuple(reference[key].shape) != tuple(tensors[key].shape)
    ]
    if missing or extra or shapes:
        lines = [f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)})"] if missing else []
        lines += [f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''} ({len(extra)})"] if extra else []
        lines += shapes[:10]
        raise CheckpointError(f"{source / ADAPTER_WEIGHTS}: tensors do not match the nodes' adapter\n  " + "\n  ".join(lines))


def latest_checkpoint(results: Path) -> Path:
    """The checkpoint saved last under `results` (any run-<id>/peft_<round> holding its run state):
    what `--resume-from latest` continues after the ServerApp died."""
    saved = [state.parent for state in Path(results).glob(f"run-*/peft_*/{RUN_STATE}")]
    if not saved:
        raise CheckpointError(f"resume-from latest: no checkpoint under {results} (expected run-<id>/peft_<round>/{RUN_STATE})")
    return max(saved, key=lambda d: ((d / RUN_STATE).stat().st_mtime, d.name))
