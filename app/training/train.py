"""One client round of DoRA fine-tuning, as a plain loop (FedProx term included)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from app.config import TrainingArguments
from app.training.data import IGNORE_INDEX


def proximal_term(params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx: mu/2 * ||w - w_global||^2 over the trainable parameters."""
    total = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))
    return 0.5 * mu * total


@torch.no_grad()
def add_proximal_gradient(params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor], mu: float) -> float:
    """Add d/dw of `proximal_term` (= mu * (w - w_global)) to the gradients; return the term's value.

    Same objective as backpropagating `proximal_term`, in two fused multi-tensor kernels instead
    of an autograd graph over every adapter tensor.
    """
    diffs = torch._foreach_sub(params, anchors)
    torch._foreach_add_([p.grad for p in params], diffs, alpha=mu)
    norms = torch._foreach_norm(diffs)
    return 0.5 * mu * float(torch.stack(norms).pow(2).sum())


def response_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss over response tokens only.

    The LM head runs on the response positions alone: with a 128k vocabulary, full-sequence
    logits would be the largest tensor of the step and all but the response is discarded.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    logits = base.get_output_embeddings()(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), targets[keep])


def make_optimizer(params: list[torch.Tensor], args: TrainingArguments, lr: float) -> torch.optim.Optimizer:
    if args.optim == "paged_adamw_8bit" and torch.cuda.is_available():
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


@dataclass
class RoundResult:
    train_loss: float
    proximal: float
    steps: int
    tokens: int
    train_seconds: float
    step_seconds: list[float]


def train_round(
    model,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    args: TrainingArguments,
    lr: float,
    proximal_mu: float,
) -> RoundResult:
    """Train the adapter in place for one round; the global adapter is its current value."""
    from transformers import get_constant_schedule, get_constant_schedule_with_warmup

    dev = next(p.device for p in model.parameters() if p.requires_grad)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params]
    optimizer = make_optimizer(params, args, lr)
    if args.lr_scheduler_type == "constant_with_warmup":
        scheduler = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=args.warmup_steps)
    else:
        scheduler = get_constant_schedule(optimizer)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if args.bf16 and dev.type == "cuda"
        else contextlib.nullcontext()
    )

    model.train()
    losses, prox_values, step_seconds, tokens = [], [], [], 0
    started = time.perf_counter()
    for step, batch in enumerate(batches):
        step_start = time.perf_counter()
        batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
        with autocast:
            loss = response_loss(model, batch) / args.gradient_accumulation_steps
        loss.backward()
        if (step + 1) % args.gradient_accumulation_steps == 0:
            # FedProx: the loss is task + mu/2 ||w - w_global||^2; its gradient is added here.
            prox_values.append(add_proximal_gradient(params, anchors, proximal_mu) if proximal_mu > 0 else 0.0)
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item() * args.gradient_accumulation_steps)  # .item() syncs: honest step time
        tokens += int(batch["attention_mask"].sum())
        step_seconds.append(time.perf_counter() - step_start)
    model.eval()
    del optimizer
    return RoundResult(
        train_loss=sum(losses) / len(losses),
        proximal=sum(prox_values) / max(1, len(prox_values)),
        steps=len(losses),
        tokens=tokens,
        train_seconds=time.perf_counter() - started,
        step_seconds=step_seconds,
    )
