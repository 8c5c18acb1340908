"""Pre-start GPU memory plan for `fedtune local up --gpus ...` (and what each node really runs on).

Node i runs on GPU gpus[i % G]. With the resident trainer every node keeps its 4-bit base model
loaded for the whole run, so one GPU must hold

    need = (nodes on it) x (resident footprint) + (nodes that may train on it at once) x (training extra)

where the resident footprint comes from the model's config (parameter counts x bytes of their
storage: 4-bit blocks + absmax for the decoder's linear layers, bf16 for embeddings, LM head and
norms, float32 adapter) plus a process's CUDA context, and the training extra (activations with
gradient checkpointing, response-only logits, gradients, the caching allocator's slack) is the
measured peak of the seed recipe (BENCHMARKS.md) scaled by tokens per step and model width x depth.
Up to `clients per round` nodes can be sampled onto the same GPU, so that many trainers are
counted per GPU (at most its node count). Without the resident trainer (`trainer.resident=false`)
only the nodes training hold a model: need = concurrent x (footprint + extra). With device
placement (`trainer.placement=device`, app/training/device_trainer.py) one trainer per GPU holds
the one base model and trains its nodes' rounds one at a time: need = footprint + extra, whatever
the number of nodes. When the per-node residents do not fit and the submitter did not choose a
placement, `choose_placement` picks device placement if that fits, and says so.

The plan reads each GPU's free memory from `nvidia-smi` (no CUDA initialisation in the launcher)
and refuses to start, naming the GPU, the need and the free memory, when it does not fit; it
suggests the non-resident mode or fewer nodes per GPU. `FEDTUNE_GPU_PLAN=off` skips it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIB = 2**30

# Llama-3-8B's shape (equal to app.training.model.LLAMA3_8B_SHAPE; tested), used when the seed model's
# config is not on this host (the launcher needs no hub access to plan).
LLAMA3_8B_CONFIG = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
)
SEED_MODEL = "ContactDoctor/Bio-Medical-Llama-3-8B"

# Bytes per parameter as bitsandbytes stores them: 4-bit = half a byte + one float32 absmax per
# 64-value block (no double quantisation); 8-bit (LLM.int8) = one byte + a float32 scale per row
# (counted as 1.0 + margin); unquantised = bf16.
BYTES_PER_PARAM = {4: 0.5 + 4 / 64, 8: 1.0, 0: 2.0}

# One CUDA process's context and library workspaces beyond its tensors, as nvidia-smi counts it.
CUDA_CONTEXT_BYTES = int(0.25 * GIB)
# Training peak over the idle resident model for the seed recipe (16 x 512 tokens, checkpoint
# every layer, Llama-3-8B shape), per process as nvidia-smi sees it (the caching allocator's
# reserve included, expandable segments on): 22.2-23.3 GiB peak vs 5.72 GiB idle on an H100,
# three trainers sharing the GPU, 2026-11-25 (BENCHMARKS.md, issue 7). max_memory_allocated
# alone (18.3 GiB) is too low: without expandable segments three such trainers ran one GPU out
# of memory mid-round.
SEED_TRAIN_EXTRA_BYTES = int(17.5 * GIB)
SEED_TOKENS = 16 * 512
SEED_WIDTH_DEPTH = 4096 * 32
# Without gradient checkpointing the same step peaks at 65.8 GiB vs 18.2 GiB (BENCHMARKS.md).
NO_CHECKPOINTING_FACTOR = (65.8 - 5.7) / (18.2 - 5.7)
MARGIN = 0.05  # on top of every estimate


@dataclass(frozen=True)
class GpuInfo:
    index: str
    uuid: str
    name: str
    total_bytes: int
    free_bytes: int


@dataclass
class GpuNeed:
    gpu: str
    nodes: list[int]
    concurrent: int
    need_bytes: int
    free_bytes: int | None
    name: str = ""

    @property
    def fits(self) -> bool:
        return self.free_bytes is None or self.need_bytes <= self.free_bytes


@dataclass
class Plan:
    resident: bool
    footprint_bytes: int
    train_extra_bytes: int
    clients_per_round: int
    gpus: list[GpuNeed] = field(default_factory=list)
    alternative: Plan | None = None  # the non-resident plan, when the resident one does not fit
    placement: str = "node"
    device_alternative: Plan | None = None  # the device-placement plan, when per-node residents do not fit

    @property
    def fits(self) -> bool:
        return all(g.fits for g in self.gpus)


# --- model footprint -------------------------------------------------------------------------


def model_config(name_or_path: str) -> dict[str, Any] | None:
    """The model's config.json: a local directory, the local HF cache, or the seed's known shape."""
    if name_or_path == "tiny":
        from app.training.tiny import tiny_model_dir

        name_or_path = str(tiny_model_dir())
    path = Path(name_or_path) / "config.json"
    if path.is_file():
        return json.loads(path.read_text())
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, "config.json")
        if isinstance(cached, str):
            return json.loads(Path(cached).read_text())
    except Exception:  # noqa: BLE001 - no hub library or odd cache: fall through
        pass
    return dict(LLAMA3_8B_CONFIG) if name_or_path == SEED_MODEL else None


def parameter_counts(config: dict[str, Any]) -> dict[str, int]:
    """Parameters of a Llama-style decoder by storage class: linear (quantised), embed (bf16), norm."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or h // heads
    attention = h * heads * head_dim * 2 + h * kv * head_dim * 2  # q, o + k, v
    mlp = 3 * h * inter
    embed = config["vocab_size"] * h * (1 if config.get("tie_word_embeddings") else 2)
    return {"linear": layers * (attention + mlp), "embed": embed, "norm": (2 * layers + 1) * h}


def adapter_parameters(config: dict[str, Any], r: int, target_modules: Sequence[str], dora: bool) -> int:
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or h // heads
    shapes = {  # (in, out)
        "q_proj": (h, heads * head_dim), "k_proj": (h, kv * head_dim), "v_proj": (h, kv * head_dim),
        "o_proj": (heads * head_dim, h), "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h),
    }
    total = 0
    for module in target_modules:
        fan_in, fan_out = shapes.get(module, (h, h))
        total += r * (fan_in + fan_out) + (fan_out if dora else 0)
    return layers * total


def resident_footprint_bytes(config: dict[str, Any], quantization: int, adapter_params: int = 0) -> int:
    """GPU bytes one resident trainer holds between rounds: weights, adapter, CUDA context, margin."""
    counts = parameter_counts(config)
    weights = counts["linear"] * BYTES_PER_PARAM[quantization] + (counts["embed"] + counts["norm"]) * 2
    # adapter in float32, plus its gradients (kept between rounds) and the global copy (anchors)
    adapter = adapter_params * 4 * 3
    return int((weights + adapter + CUDA_CONTEXT_BYTES) * (1 + MARGIN))


def train_extra_bytes(config: dict[str, Any], batch_size: int, seq_length: int, gradient_checkpointing: bool) -> int:
    """GPU bytes one node adds while it trains (scaled from the seed recipe's measured peak)."""
    scale = (batch_size * seq_length / SEED_TOKENS) * (config["hidden_size"] * config["num_hidden_layers"] / SEED_WIDTH_DEPTH)
    if not gradient_checkpointing:
        scale *= NO_CHECKPOINTING_FACTOR
    return int(SEED_TRAIN_EXTRA_BYTES * scale * (1 + MARGIN))


# --- the GPUs ---------------------------------------------------------------------------------


def query_gpus(runner=subprocess.run) -> list[GpuInfo] | None:
    """Every GPU's index, UUID, name, total and free memory from nvidia-smi; None if unavailable."""
    if runner is subprocess.run and shutil.which("nvidia-smi") is None:
        return None
    try:
        done = runner(
            ["nvidia-smi", "--query-gpu=index,uuid,name,memory.total,memory.free", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return parse_query_gpus(done.stdout)


def parse_query_gpus(text: str) -> list[GpuInfo]:
    gpus = []
    for line in text.strip().splitlines():
        index, uuid, name, total, free = (part.strip() for part in line.split(","))
        gpus.append(GpuInfo(index, uuid, name, int(float(total)) * 2**20, int(float(free)) * 2**20))
    return gpus


def _find(gpu: str, found: list[GpuInfo]) -> GpuInfo | None:
    """A CUDA_VISIBLE_DEVICES entry: an index, a UUID or a unique UUID prefix."""
    for info in found:
        if gpu in (info.index, info.uuid) or (gpu.startswith("GPU-") and info.uuid.startswith(gpu)):
            return info
    return None


# --- the plan ---------------------------------------------------------------------------------


def clients_per_round(num_nodes: int, fraction_train: float, min_train_nodes: int) -> int:
    """As Flower 1.42's strategies sample: max(int(n x fraction), min nodes), at most n."""
    return min(num_nodes, max(int(num_nodes * fraction_train), min_train_nodes))


def make_plan(settings, num_nodes: int, gpus: Sequence[str], found: list[GpuInfo] | None, resident: bool | None = None,
              placement: str | None = None) -> Plan | None:
    """The memory each listed GPU needs for this run; None when the model's shape is unknown."""
    config = model_config(settings.model.name)
    if config is None:
        return None
    resident = settings.trainer.resident if resident is None else resident
    placement = settings.trainer.placement if placement is None else placement
    device = resident and placement == "device"  # one base model, one training client at a time
    lora = settings.model.lora
    adapter = adapter_parameters(config, lora.peft_lora_r, lora.target_modules, lora.use_dora)
    footprint = resident_footprint_bytes(config, settings.model.quantization, adapter)
    args = settings.train.training_arguments
    extra = train_extra_bytes(config, args.per_device_train_batch_size, settings.train.seq_length, settings.model.gradient_checkpointing)
    per_round = clients_per_round(num_nodes, settings.strategy.fraction_train, settings.strategy.min_train_nodes)
    plan = Plan(resident, footprint, extra, per_round, placement="device" if device else "node")
    distinct: dict[str, list[int]] = {}
    for i in range(num_nodes):
        distinct.setdefault(gpus[i % len(gpus)], []).append(i)
    for gpu, nodes in distinct.items():
        concurrent = 1 if device else min(len(nodes), per_round)
        holding = 1 if device else len(nodes) if resident else concurrent
        need = holding * footprint + concurrent * extra
        info = _find(gpu, found) if found is not None else None
        plan.gpus.append(GpuNeed(gpu, nodes, concurrent, need, info.free_bytes if info else None, info.name if info else ""))
    if resident and not plan.fits:
        plan.alternative = make_plan(settings, num_nodes, gpus, found, resident=False)
    if resident and not device and not plan.fits:
        plan.device_alternative = make_plan(settings, num_nodes, gpus, found, placement="device")
    return plan


def max_resident_nodes(free_bytes: int, footprint: int, extra: int, concurrent: int) -> int:
    """How many resident nodes one GPU can hold while `concurrent` of them train."""
    room = free_bytes - concurrent * extra
    return max(0, math.floor(room / footprint)) if room > 0 else 0


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def describe(plan: Plan) -> str:
    mode = ("device trainers (one resident base model per GPU, its nodes' rounds one at a time)" if plan.placement == "device"
            else "resident base models" if plan.resident else "non-resident (a model per training client only)")
    lines = [
        f"GPU memory plan ({mode}): {_gib(plan.footprint_bytes)} per loaded model, "
        f"+{_gib(plan.train_extra_bytes)} per training node, {plan.clients_per_round} client(s) per round"
    ]
    for g in plan.gpus:
        free = "free unknown" if g.free_bytes is None else f"{_gib(g.free_bytes)} free"
        state = "ok" if g.fits else "DOES NOT FIT"
        lines.append(
            f"  GPU {g.gpu}{' (' + g.name + ')' if g.name else ''}: {len(g.nodes)} node(s), up to {g.concurrent} "
            f"training at once: needs {_gib(g.need_bytes)}, {free}: {state}"
        )
    return "\n".join(lines)


def refusal(plan: Plan, num_nodes: int) -> str:
    bad = [g for g in plan.gpus if not g.fits]
    first = bad[0]
    parts = [
        f"the run does not fit in GPU memory: GPU {first.gpu} would hold {len(first.nodes)} "
        f"{'resident ' if plan.resident else ''}model(s) with up to {first.concurrent} training at once and "
        f"needs {_gib(first.need_bytes)}, but has {_gib(first.free_bytes or 0)} free"
        + (f" ({len(bad) - 1} more GPU(s) short too)" if len(bad) > 1 else ""),
        describe(plan),
    ]
    options = []
    if (device := plan.device_alternative) is not None:
        options.append(
            '--run-config "trainer.placement=device" (a device trainer per GPU holds one base model for all its nodes; needs '
            f"{_gib(max(g.need_bytes for g in device.gpus))} per GPU, {'fits' if device.fits else 'does not fit either'})"
        )
    if plan.resident and plan.alternative is not None:
        if plan.alternative.fits:
            options.append(
                '--run-config "trainer.resident=false" (non-resident mode: each round loads the model in the '
                f"ClientApp process; needs at most {_gib(max(g.need_bytes for g in plan.alternative.gpus))} per GPU, fits)"
            )
        else:
            options.append('--run-config "trainer.resident=false" does not fit either')
    if plan.resident and plan.placement == "node" and first.free_bytes:
        room = max_resident_nodes(first.free_bytes, plan.footprint_bytes, plan.train_extra_bytes, first.concurrent)
        if room:
            gpus_needed = math.ceil(num_nodes / room)
            options.append(f"at most {room} resident node(s) per GPU like GPU {first.gpu}: fewer --supernodes or more --gpus (>= {gpus_needed})")
        else:
            options.append("more --gpus (fewer nodes and fewer training clients per GPU)")
    else:
        options.append("more --gpus or a smaller strategy.fraction-train (fewer clients training per GPU at once)")
    parts.append("options: " + "; ".join(options))
    parts.append("(FEDTUNE_GPU_PLAN=off skips this check)")
    return "\n".join(parts)


def preflight(settings, num_nodes: int, gpus: Sequence[str], out=None, runner=subprocess.run) -> str | None:
    """Print the plan for the settings' own placement; return a refusal message when it does not fit, else None."""
    return choose_placement(settings, num_nodes, gpus, False, out, runner)[0]


def choose_placement(settings, num_nodes: int, gpus: Sequence[str], may_choose: bool, out=None,
                     runner=subprocess.run) -> tuple[str | None, str]:
    """(refusal or None, the trainer placement to launch with). With `may_choose` (the submitter
    did not set trainer.placement), per-node residents that do not fit give way to device
    placement when that fits, and the printed plan says why."""
    import sys

    out = out or sys.stdout
    placement = settings.trainer.placement
    if os.environ.get("FEDTUNE_GPU_PLAN", "").lower() in ("off", "0", "false", "no"):
        return None, placement
    found = query_gpus(runner)
    plan = make_plan(settings, num_nodes, gpus, found)
    if plan is None:
        print(f"GPU memory plan: skipped (no config.json for model {settings.model.name!r} on this host)", file=out, flush=True)
        return None, placement
    if found is None:
        print("GPU memory plan: nvidia-smi unavailable, free memory unknown; not checked", file=out, flush=True)
    missing = [g.gpu for g in plan.gpus if found is not None and g.free_bytes is None]
    if missing:
        return f"GPU(s) {', '.join(missing)} not found by nvidia-smi (have: {', '.join(i.index for i in found or [])})", placement
    if not plan.fits and may_choose and plan.device_alternative is not None and plan.device_alternative.fits:
        short = next(g for g in plan.gpus if not g.fits)
        print(f"GPU memory plan: {len(short.nodes)} resident per-node models on GPU {short.gpu} need {_gib(short.need_bytes)}, "
              f"{_gib(short.free_bytes or 0)} free: using trainer.placement=device instead (one base model per GPU; "
              'choose with --run-config "trainer.placement=node|device")', file=out, flush=True)
        plan, placement = plan.device_alternative, "device"
    if not plan.fits:
        return refusal(plan, num_nodes), placement
    print(describe(plan), file=out, flush=True)
    return None, placement


# --- what a process really runs on -------------------------------------------------------------


def describe_cuda_device() -> dict[str, Any]:
    """The physical GPU this process computes on (call after CUDA is initialised)."""
    import torch

    info: dict[str, Any] = {"pid": os.getpid(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info.update(
            current_device=index,
            name=props.name,
            uuid=f"GPU-{props.uuid}",
            pci_bus_id=f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0",
        )
    return info


DEVICE_LOG_PREFIX = "fedtune-trainer-device "


def parse_device_lines(text: str) -> list[dict[str, Any]]:
    """The `describe_cuda_device` records a resident trainer printed to its log."""
    return [json.loads(line.split(DEVICE_LOG_PREFIX, 1)[1]) for line in text.splitlines() if DEVICE_LOG_PREFIX in line]
