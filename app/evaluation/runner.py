"""Answer generation and scoring for one benchmark.

Two generation paths produce the same kind of `Answer`:

* `generate_one_at_a_time` is the reference evaluation's loop: each chat-wrapped prompt is
  tokenized and passed alone to greedy `model.generate`, with the model as loaded (the tool
  loads 4-bit models as the reference does: float32 compute). `--exact` uses it.
* `generate_fast` reads only what the extractor reads (the first one or two answer tokens):
  the tokens every prompt of the benchmark starts with (instruction and template) are run
  once and their KV cache is shared; the rest of each prompt is prefilled in length-sorted,
  right-padded batches under a token budget (causal attention needs no mask: padding sits
  after the real tokens), and only the last real position of each row goes through the LM
  head. 4-bit layers compute in float16 (bfloat16 optional; with `half_blocks`, attention and
  the MLP's act(gate) * up too) while the residual stream, norms, rotary embedding and LM head
  stay in float32; non-finite answers, and with `recheck_margin` those whose top-two logit
  margin is small, are recomputed on the one-at-a-time path, so they are the reference's
  (or, with `recheck_batched`, batched with float32 compute, which is cheaper but not the
  reference's loop). On CUDA, attention is pinned to the flash / memory-efficient SDPA
  backends: PyTorch's default for fp16 on an H100 is cuDNN, which builds a plan per shape.

`max_new_tokens` follows the reference too: questions are cut into consecutive chunks of
`batch_size`, and every question of a chunk gets as many new tokens as the chunk's first
gold answer has tokens. When a prompt occurs twice, the reference keeps the answer of its
last occurrence; so do we.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from app.evaluation.benchmarks import Question
from app.evaluation.extract import extract_answer

log = logging.getLogger(__name__)

CHAT_TEMPLATE = "<|im_start|>question\n{prompt}<|im_end|>\n<|im_start|>answer\n"

Progress = Callable[[int], object]


def chat_prompt(prompt: str) -> str:
    return CHAT_TEMPLATE.format(prompt=prompt)


@dataclass(frozen=True)
class Answer:
    output: str  # decoded new tokens, special tokens skipped
    token_ids: tuple[int, ...]
    margin: float | None = None  # fast path: smallest top-1 minus top-2 logit over the answer's tokens
    rechecked: bool = False  # fast path: recomputed on the one-at-a-time path


@dataclass
class FastOptions:
    batch_tokens: int = 16384  # padded prompt tokens per forward pass
    max_batch: int = 256
    compute_dtype: torch.dtype | None = torch.float16  # for 4-bit layers on CUDA; None keeps the loaded one
    # Defaults from BENCHMARKS.md (issue 5): fp16 4-bit matmuls alone, no margin recheck, were as close
    # to the reference as fp16 attention/MLP with a 0.005 recheck (99.00 % of answers) and faster.
    half_blocks: bool = False  # attention and the MLP's act(gate) * up in compute_dtype too (faster, less agreement)
    recheck_margin: float = 0.0  # recompute answers whose top-two logit margin is below this (non-finite ones always)
    recheck_batched: bool = False  # recompute them batched in float32 compute (not one at a time): not the reference's loop
    # CUDA: SDPA backends for the fast path's attention (None: PyTorch's choice, which on an H100 with
    # fp16 is cuDNN, building an execution plan for every new batch shape).
    sdpa_backends: tuple[str, ...] | None = ("flash", "efficient", "math")
    min_prefix: int = 8  # shorter shared prefixes are not worth a cache
    stats: dict = field(default_factory=dict)  # filled in: prefix length, batches, rechecked


def reference_new_tokens(golds: Sequence[str], tokenizer, batch_size: int) -> list[int]:
    """max_new_tokens per question: the token count of the first gold of its chunk of `batch_size`."""
    counts: list[int] = []
    for start in range(0, len(golds), batch_size):
        chunk = golds[start : start + batch_size]
        counts += [len(tokenizer(chunk[0], add_special_tokens=False)["input_ids"])] * len(chunk)
    return counts


def generate_answers(model, tokenizer, prompts: Sequence[str], new_tokens: Sequence[int], *,
                     exact: bool, options: FastOptions | None = None,
                     progress: Progress | None = None) -> list[Answer]:
    """One answer per prompt; a repeated prompt is generated once, with its last occurrence's length."""
    last = {prompt: i for i, prompt in enumerate(prompts)}
    unique = list(last)
    unique_new = [new_tokens[last[prompt]] for prompt in unique]
    if exact:
        answers = generate_one_at_a_time(model, tokenizer, unique, unique_new, progress)
    else:
        answers = generate_fast(model, tokenizer, unique, unique_new, options or FastOptions(), progress)
    by_prompt = dict(zip(unique, answers))
    if progress and len(unique) < len(prompts):
        progress(len(prompts) - len(unique))
    return [by_prompt[prompt] for prompt in prompts]


# --- the reference path ---------------------------------------------------------------


def generate_one_at_a_time(model, tokenizer, prompts: Sequence[str], new_tokens: Sequence[int],
                           progress: Progress | None = None) -> list[Answer]:
    device = _input_device(model)
    answers = []
    with _ieee_float32():
        for prompt, count in zip(prompts, new_tokens):
            input_ids = tokenizer.encode(chat_prompt(prompt), return_tensors="pt").to(device)
            output_ids = model.generate(
                inputs=input_ids, max_new_tokens=count, do_sample=False, top_p=1.0, temperature=1.0,
                pad_token_id=tokenizer.eos_token_id,
            )
            new = output_ids[0][input_ids.shape[1] :].tolist()
            answers.append(Answer(tokenizer.decode(new, skip_special_tokens=True), tuple(new)))
            if progress:
                progress(1)
    return answers


@contextlib.contextmanager
def _ieee_float32() -> Iterator[None]:
    """float32 matmuls in full precision (no TF32), whatever the process set before."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


# --- the fast path --------------------------------------------------------------------


def shared_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix all sequences share, leaving each at least one token of its own."""
    first = sequences[0]
    length = min(len(s) for s in sequences) - 1
    for sequence in sequences[1:]:
        i = 0
        while i < length and sequence[i] == first[i]:
            i += 1
        length = i
    return max(length, 0)


def length_batches(lengths: Sequence[int], batch_tokens: int, max_batch: int) -> list[list[int]]:
    """Indices sorted by length (longest first), cut so that rows x longest <= batch_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in order:
        if batches and len(batches[-1]) < max_batch and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def generate_fast(model, tokenizer, prompts: Sequence[str], new_tokens: Sequence[int],
                  options: FastOptions, progress: Progress | None = None) -> list[Answer]:
    from transformers import DynamicCache

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, lm_head = base.get_decoder(), base.get_output_embeddings()
    device = _input_device(model)
    eos = _eos_ids(base)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    encoded = [tokenizer(chat_prompt(p))["input_ids"] for p in prompts]
    prefix = shared_prefix_length(encoded) if len(encoded) > 1 else 0
    prefix = prefix if prefix >= options.min_prefix else 0
    suffixes = [ids[prefix:] for ids in encoded]
    batches = length_batches([len(s) for s in suffixes], options.batch_tokens, options.max_batch)
    options.stats.update(prefix_tokens=prefix, batches=len(batches), questions=len(prompts))

    results: list[tuple[list[int], float]] = [([], float("nan"))] * len(prompts)
    with torch.inference_mode(), _low_precision(model, options.compute_dtype, options.half_blocks), _dora_caching(), \
            _sdpa_backends(options.sdpa_backends if device.type == "cuda" else None):
        prefix_cache = None
        if prefix:
            prefix_cache = DynamicCache()
            prefix_ids = torch.tensor([encoded[0][:prefix]], device=device)
            decoder(input_ids=prefix_ids, use_cache=True, **{_cache_kwarg(decoder): prefix_cache})
        for batch in batches:
            rows = [suffixes[i] for i in batch]
            counts = [new_tokens[i] for i in batch]
            cache = None
            if prefix_cache is not None:
                cache = DynamicCache()
                for layer_index, layer in enumerate(prefix_cache.layers):
                    expand = (len(rows), -1, -1, -1)
                    cache.update(layer.keys.expand(*expand), layer.values.expand(*expand), layer_index)
            elif max(counts) > 1:
                cache = DynamicCache()
            generated = _greedy_batch(decoder, lm_head, rows, counts, cache, prefix, pad_id, eos, device)
            for i, result in zip(batch, generated):
                results[i] = result
            if progress:
                progress(len(batch))

    answers = [Answer(tokenizer.decode(ids, skip_special_tokens=True), tuple(ids), margin)
               for ids, margin in results]
    unsure = [i for i, a in enumerate(answers) if not math.isfinite(a.margin) or a.margin < options.recheck_margin]
    options.stats["rechecked"] = len(unsure)
    if unsure:
        log.info("recomputing %d of %d answers %s (logit margin < %g or not finite)", len(unsure), len(answers),
                 "batched in float32" if options.recheck_batched else "one at a time", options.recheck_margin)
        started = time.perf_counter()
        unsure_prompts, unsure_new = [prompts[i] for i in unsure], [new_tokens[i] for i in unsure]
        if options.recheck_batched:
            # The loaded model's numerics (no fp16, full-precision float32 matmuls, PyTorch's SDPA
            # choice), batched as above; a non-finite result there still goes one at a time.
            again = FastOptions(batch_tokens=options.batch_tokens, max_batch=options.max_batch, compute_dtype=None,
                                half_blocks=False, recheck_margin=0.0, min_prefix=options.min_prefix, sdpa_backends=None)
            with _ieee_float32():
                exact = generate_fast(model, tokenizer, unsure_prompts, unsure_new, again)
        else:
            exact = generate_one_at_a_time(model, tokenizer, unsure_prompts, unsure_new)
        options.stats["recheck_seconds"] = round(time.perf_counter() - started, 3)
        for i, answer in zip(unsure, exact):
            answers[i] = Answer(answer.output, answer.token_ids, answers[i].margin, rechecked=True)
    return answers


def _greedy_batch(decoder, lm_head, rows: list[list[int]], counts: list[int], cache, prefix: int,
                  pad_id: int, eos: set[int], device) -> list[tuple[list[int], float]]:
    """Greedy answers for right-padded rows that follow `prefix` cached tokens: (token ids, margin)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=device)
    cache_kwarg = _cache_kwarg(decoder)
    out = decoder(input_ids=ids, use_cache=cache is not None, **{cache_kwarg: cache})
    last = torch.tensor([len(r) - 1 for r in rows], device=device)
    hidden = out.last_hidden_state[torch.arange(len(rows), device=device), last]
    tokens, margins = _pick(lm_head, hidden)
    generated = [[t] for t in tokens]
    done = [count <= 1 or t in eos for count, t in zip(counts, tokens)]
    steps = max(counts)
    if all(done):
        return list(zip(generated, margins))

    # Further tokens: the padding stays in the cache, masked out; positions continue per row.
    mask = torch.zeros(len(rows), prefix + width + steps - 1, dtype=torch.long, device=device)
    mask[:, :prefix] = 1
    for i, r in enumerate(rows):
        mask[i, prefix : prefix + len(r)] = 1
    for step in range(1, steps):
        mask[:, prefix + width + step - 1] = 1
        current = torch.tensor([[g[-1]] for g in generated], device=device)
        positions = torch.tensor([[prefix + len(r) + step - 1] for r in rows], device=device)
        out = decoder(input_ids=current, attention_mask=mask[:, : prefix + width + step], position_ids=positions,
                      use_cache=True, **{cache_kwarg: cache})
        tokens, step_margins = _pick(lm_head, out.last_hidden_state[:, -1])
        for i, token in enumerate(tokens):
            if not done[i]:
                generated[i].append(token)
                margins[i] = min(margins[i], step_margins[i])
                done[i] = len(generated[i]) >= counts[i] or token in eos
        if all(done):
            break
    return list(zip(generated, margins))


def _pick(lm_head, hidden: torch.Tensor) -> tuple[list[int], list[float]]:
    """Greedy token and top-1 minus top-2 logit (nan when not finite), logits in float32."""
    logits = lm_head(hidden.to(lm_head.weight.dtype)).float()
    top = logits.topk(2, dim=-1).values
    margin = top[:, 0] - top[:, 1]
    margin = torch.where(torch.isfinite(logits).all(dim=-1), margin, torch.full_like(margin, float("nan")))
    return logits.argmax(dim=-1).tolist(), margin.tolist()


def _cache_kwarg(decoder) -> str:
    """The decoder's name for the KV cache argument (`past_key_values`, `cache` from transformers 5.2x)."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _eos_ids(base) -> set[int]:
    config = getattr(base, "generation_config", None)
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


def _input_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


@contextlib.contextmanager
def _low_precision(model, dtype: torch.dtype | None, half_blocks: bool) -> Iterator[None]:
    """Run bitsandbytes 4-bit layers in `dtype` (inputs cast in, outputs cast back to float32).

    No-op unless the model has 4-bit layers (CUDA). With `half_blocks`, attention and the MLP's
    activation product run in `dtype` too: their inputs are outputs of `dtype` matmuls already.
    """
    layers = []
    if dtype is not None:
        try:
            import bitsandbytes as bnb
        except ImportError:
            bnb = None
        if bnb is not None:
            layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if not layers:
        yield
        return
    saved = [(m.compute_dtype, m.compute_type_is_set) for m in layers]
    reduced = torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
    for m in layers:
        m.compute_dtype, m.compute_type_is_set = dtype, True
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False  # keep float32 accumulation
    try:
        with _half_blocks(model, dtype) if half_blocks else contextlib.nullcontext():
            yield
    finally:
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = reduced
        for m, (previous, was_set) in zip(layers, saved):
            m.compute_dtype, m.compute_type_is_set = previous, was_set


@contextlib.contextmanager
def _half_blocks(model, dtype: torch.dtype) -> Iterator[None]:
    """SDPA attention and each MLP's act(gate) * up in `dtype`; residual stream, norms and RoPE unchanged."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        if attention_mask is not None and attention_mask.dtype.is_floating_point:
            attention_mask = attention_mask.to(dtype)
        out, weights = sdpa(module, query.to(dtype), key.to(dtype), value.to(dtype), attention_mask, *args, **kwargs)
        return out.to(query.dtype), weights

    def mlp_forward(mlp):
        def forward(x):
            h = x.to(dtype)
            return mlp.down_proj(mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h)).to(x.dtype)

        return forward

    mlps = [m for m in model.modules() if all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn"))]
    ALL_ATTENTION_FUNCTIONS["sdpa"] = attention
    for mlp in mlps:
        mlp.forward = mlp_forward(mlp)
    try:
        yield
    finally:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa
        for mlp in mlps:
            del mlp.forward


@contextlib.contextmanager
def _sdpa_backends(names: Sequence[str] | None) -> Iterator[None]:
    """Restrict `scaled_dot_product_attention` to these backends ("flash", "efficient", "math", "cudnn")."""
    if not names:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}
    with sdpa_kernel([backends[name] for name in names]):
        yield


@contextlib.contextmanager
def _dora_caching() -> Iterator[None]:
    """PEFT's DoRA weight-norm cache (the norms are constant at inference)."""
    try:
        from peft.helpers import DoraCaching
    except ImportError:
        yield
        return
    with DoraCaching():
        yield


# --- scoring --------------------------------------------------------------------------


def score(answer_type: str, questions: Sequence[Question], answers: Sequence[Answer]) -> tuple[float, list[dict]]:
    """Accuracy and one record per question: prompt, gold, output, pred, correct (, rechecked)."""
    rows = []
    for question, answer in zip(questions, answers, strict=True):
        pred = extract_answer(answer.output, answer_type)
        rows.append({"prompt": question.prompt, "gold": question.gold, "output": answer.output,
                     "pred": pred, "correct": pred == question.gold.lower()})
        if answer.rechecked:
            rows[-1]["rechecked"] = True
    return sum(r["correct"] for r in rows) / len(rows), rows
