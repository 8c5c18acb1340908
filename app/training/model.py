"""The base model (4-bit on GPU), the DoRA adapter, and the adapter's state as plain tensors."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Any

import torch

from app.config import ASSIGNED_GPU_ENV, ModelSettings

log = logging.getLogger(__name__)


def resolve_model_path(name_or_path: str) -> str:
    if name_or_path == "tiny":
        from app.training.tiny import tiny_model_dir

        return str(tiny_model_dir())
    return name_or_path


class ModelLoadError(RuntimeError):
    """The base model cannot be loaded where this node runs: no GPU where one was given, or an
    unreadable model cache. The message names the cause and the fix."""


def check_assigned_gpu() -> None:
    """A node given a GPU must not quietly train an 8B model on its CPU instead."""
    gpu = os.environ.get(ASSIGNED_GPU_ENV, "").strip()
    if gpu and not torch.cuda.is_available():
        raise ModelLoadError(
            f"this node was given GPU {gpu} ({ASSIGNED_GPU_ENV}) but CUDA sees no device "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): check the host's NVIDIA driver, "
            "the container runtime's GPU access (NVIDIA Container Toolkit) and the GPU id"
        )


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # Llama 3 has none; FlowerTune does the same
    return tokenizer


def load_base_model(name_or_path: str, quantization: int, compute_dtype: torch.dtype | None = None):
    """A frozen causal LM: 4/8-bit through bitsandbytes on CUDA, bf16 weights otherwise on GPU."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    check_assigned_gpu()
    cuda = torch.cuda.is_available()
    dtype = compute_dtype or (torch.bfloat16 if cuda else torch.float32)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quantization and cuda:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=quantization == 4,
            load_in_8bit=quantization == 8,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    elif quantization:
        log.warning("model.quantization=%d needs CUDA (bitsandbytes); loading unquantized on CPU", quantization)
    path = resolve_model_path(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, SafetensorError) as exc:  # missing, truncated or garbled files
        raise ModelLoadError(
            f"base model {name_or_path} could not be loaded from {path}: {type(exc).__name__}: {exc}. "
            "The model cache may be incomplete or corrupt: fill it again (docker compose run --rm model-cache)"
        ) from exc
    if cuda and not quantization:
        model.to(device())
    model.requires_grad_(False)
    return model


def lora_config(settings: ModelSettings):
    from peft import LoraConfig

    lora = settings.lora
    return LoraConfig(
        r=lora.peft_lora_r,
        lora_alpha=lora.peft_lora_alpha,
        lora_dropout=lora.peft_lora_dropout,
        target_modules=lora.target_modules,
        use_dora=lora.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=settings.name,
    )


def apply_fused_kernels(base) -> None:
    """Liger's Triton RMSNorm, SwiGLU and RoPE on a Llama instance (the LM head stays ours)."""
    if base.config.model_type != "llama":
        log.warning("fused kernels are wired for Llama only; %s runs unfused", base.config.model_type)
        return
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(
        rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=base
    )


def build_peft_model(settings: ModelSettings, seed: int, use_fused_kernels: bool = False):
    """Base model + freshly initialised DoRA adapter (same seed, same initial adapter)."""
    from peft import get_peft_model

    base = load_base_model(settings.name, settings.quantization)
    if use_fused_kernels and torch.cuda.is_available():
        apply_fused_kernels(base)
    if settings.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input-grad hook and works with frozen embeddings.
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False
    torch.manual_seed(seed)
    model = get_peft_model(base, lora_config(settings))
    _cast_adapter(model, torch.float32)
    return model


def _cast_adapter(model, dtype: torch.dtype) -> None:
    # Adapter weights train in float32 (optimizer precision); the frozen base stays bf16/4-bit.
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(dtype)


def adapter_state(model) -> OrderedDict[str, torch.Tensor]:
    """The trainable adapter as PEFT names it on disk (adapter name stripped), on CPU."""
    return OrderedDict((k, p.detach().to("cpu", copy=True)) for k, p in adapter_parameters(model).items())


def load_adapter_state(model, state: dict[str, torch.Tensor]) -> None:
    params = adapter_parameters(model)
    if set(state) != set(params):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ValueError(f"adapter does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for key, param in params.items():  # every shape checked before any is loaded: never half a load
        if tuple(state[key].shape) != tuple(param.shape):
            raise ValueError(f"adapter tensor {key}: shape {tuple(state[key].shape)}, the model's is {tuple(param.shape)}")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(state[key])


def adapter_parameters(model) -> OrderedDict[str, torch.nn.Parameter]:
    """PEFT's on-disk adapter names mapped to the live parameters, found once per model: PEFT's
    own state-dict functions walk every module of the 4-bit base (and pack its quantization
    state) each call, a cost a resident trainer paid three times per client round."""
    cached = getattr(model, "_fedtune_adapter_parameters", None)
    if cached is None:
        from peft import get_peft_model_state_dict

        trainable = {p.data_ptr(): p for p in model.parameters() if p.requires_grad}
        # The state dict's tensors are views of the parameters: the same storage identifies them.
        cached = OrderedDict((k, trainable[v.data_ptr()]) for k, v in get_peft_model_state_dict(model).items())
        if len(cached) != len(trainable):
            raise ValueError(f"the adapter's {len(cached)} tensors are not the model's {len(trainable)} trainable parameters")
        model._fedtune_adapter_parameters = cached
    return cached


def count_parameters(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in state.values())


LLAMA3_8B_SHAPE = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
)


def adapter_shapes(settings: ModelSettings, **llama_config: Any) -> dict[str, tuple[int, ...]]:
    """Adapter tensor shapes for a Llama config, computed on the meta device (no weights)."""
    from peft import get_peft_model, get_peft_model_state_dict
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = get_peft_model(LlamaForCausalLM(LlamaConfig(**llama_config)), lora_config(settings))
    return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
