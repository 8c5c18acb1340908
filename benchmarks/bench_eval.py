"""Evaluation speed: the reference's one-prompt-at-a-time path against `fedtune eval`'s fast path.

Builds a Llama-3-8B-shaped model with random seeded weights and the real Llama 3 tokenizer
(converted from the tiktoken file that the `llama-models` wheel ships), a random DoRA
adapter (r=32 on q/v, as the recipe trains), and synthetic questions in the four benchmarks'
real prompt layouts with prompt lengths drawn from 250-550 tokens. The model is loaded as
`fedtune eval` loads it (4-bit bitsandbytes, float32 compute, like the reference), then:

* reference: `generate_one_at_a_time` (the reference's loop and numerics) on a subset;
* fast variants: `generate_answers(exact=False)` on all questions, compared answer by answer
  with the reference subset (token ids, decoded output, extracted prediction).

    python benchmarks/bench_eval.py --tokenizer .whl_eval/llama3-tokenizer.model \
        --workdir /tmp/fedtune-eval-bench --profile --out benchmarks/results/eval_h100.json

(`.whl_eval/llama3-tokenizer.model` is `llama_models/llama3/tokenizer.model` from
`pip download --no-deps llama-models==0.3.0`.) Each variant runs twice over all questions:
the first pass warms its shapes and SDPA backend (cuDNN builds a plan per new shape), the
second is timed and compared.

`--shape tiny` runs the same steps on CPU with a small model, as a smoke test.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NAMES = ("pubmedqa", "medmcqa", "medqa", "careqa")
WORDS = (
    "patient presents with acute chronic pain fever cough dyspnoea hypertension diabetes renal hepatic cardiac "
    "failure infection history examination reveals elevated reduced serum levels normal abnormal findings "
    "treatment therapy dose mg daily weeks months years study trial randomised controlled cohort outcome "
    "significant increase decrease risk ratio confidence interval mortality morbidity clinical diagnosis "
    "the of and in to a with for was were on at by from after before during between compared than "
    "which most likely following would be is are this that these those following best next step management"
).split()


def llama3_tokenizer(tiktoken_file: Path):
    """Llama 3's tokenizer from its tiktoken BPE file: 128,000 ranks + 256 special tokens, BOS first."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    def ranks(path):  # the tiktoken file: "<base64 token> <rank>" per line (no tiktoken needed)
        return {base64.b64decode(t): int(r) for t, r in (line.split() for line in Path(path).read_text().splitlines() if line)}

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
                "<|eot_id|>", "<|python_tag|>", "<|image|>"]
    specials += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(specials))]
    converter = TikTokenConverter(vocab_file=str(tiktoken_file), extra_special_tokens=specials)
    converter.load_tiktoken_bpe = ranks
    backend = converter.converted()
    bos = backend.token_to_id("<|begin_of_text|>")
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                      special_tokens=[("<|begin_of_text|>", bos)]),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>", pad_token="<|finetune_right_pad_id|>")


def build_model(directory: Path, adapter_dir: Path, tokenizer, shape: str) -> None:
    """Random seeded bf16 Llama (8B shapes on CUDA, or tiny on CPU) and a random DoRA adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from app.training.model import LLAMA3_8B_SHAPE

    if (directory / "config.json").exists() and (adapter_dir / "adapter_config.json").exists():
        return
    if shape == "8b":
        dims = dict(LLAMA3_8B_SHAPE)
        device, dtype = "cuda", torch.bfloat16
    else:
        dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=2048)
        device, dtype = "cpu", torch.float32
    config = LlamaConfig(**dims, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(directory, max_shard_size="5GB")
    tokenizer.save_pretrained(directory)
    peft_model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, lora_dropout=0.075, use_dora=True,
                                                  target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 1e-3)
    peft_model.save_pretrained(adapter_dir)
    del model, peft_model
    if device == "cuda":
        torch.cuda.empty_cache()


def synthetic_questions(tokenizer, per_dataset: int, seed: int = 0):
    """Questions in each benchmark's prompt layout, chat-wrapped lengths uniform in 250-550 tokens."""
    from app.evaluation.benchmarks import Question, format_multiple_choice, with_instruction
    from app.evaluation.runner import chat_prompt

    rng = random.Random(seed)

    def words(n):
        return " ".join(rng.choice(WORDS) for _ in range(max(n, 1)))

    def make(name, n_words):
        if name == "pubmedqa":
            gold = rng.choice(["yes", "no", "maybe"])
            parts = [words(n_words // 3) + ".", words(n_words // 3) + ".", words(n_words // 3) + "?"]
            return Question(with_instruction(name, "\n".join(parts)), gold)
        options = [words(rng.randint(1, 6)) for _ in range(4)]
        return Question(with_instruction(name, format_multiple_choice(words(n_words) + "?", options)), rng.choice("ABCD"))

    def length(q):
        return len(tokenizer(chat_prompt(q.prompt))["input_ids"])

    sets = {}
    for name in NAMES:
        questions = []
        for _ in range(per_dataset):
            target = rng.randint(250, 550)
            base = length(make(name, 1))
            n_words = max(int((target - base) / 1.15), 1)  # ~1.15 tokens per word, then one correction
            got = length(make(name, n_words))
            n_words = max(int(n_words * (target - base) / max(got - base, 1)), 1)
            questions.append(make(name, n_words))
        sets[name] = questions
    lengths = [length(q) for qs in sets.values() for q in qs]
    return sets, lengths


def compare(reference, fast, answer_type):
    from app.evaluation.extract import extract_answer

    rows = []
    for r, f in zip(reference, fast):
        rows.append({
            "same_ids": r.token_ids == f.token_ids, "same_output": r.output == f.output,
            "same_pred": extract_answer(r.output, answer_type) == extract_answer(f.output, answer_type),
            "margin": f.margin, "rechecked": f.rechecked,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, required=True, help="Llama 3 tiktoken file (tokenizer.model)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fedtune-eval-bench"))
    parser.add_argument("--shape", choices=("8b", "tiny"), default="8b")
    parser.add_argument("--per-dataset", type=int, default=300, help="questions per benchmark for the fast path")
    parser.add_argument("--reference-per-dataset", type=int, default=100, help="of those, answered one at a time")
    parser.add_argument("--variants", default="default,half-blocks,cudnn,no-recheck,batched,fp16-matmuls-batched",
                        help="comma-separated: default, half-blocks, cudnn, no-recheck, batched, fp16-matmuls-batched, "
                             "fp16-matmuls-recheck, bf16, no-prefix")
    parser.add_argument("--profile", action="store_true", help="profile the fast path on one benchmark (CUDA)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import torch

    from app.evaluation.benchmarks import BENCHMARKS
    from app.evaluation.cli import load_model
    from app.evaluation.runner import FastOptions, generate_answers, generate_one_at_a_time, reference_new_tokens

    started = time.perf_counter()
    result: dict = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__}
    for package in ("transformers", "peft", "bitsandbytes"):
        try:
            result[package] = __import__(package).__version__
        except Exception:
            result[package] = None
    result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    tokenizer = llama3_tokenizer(args.tokenizer)
    probe = {g: tokenizer(g, add_special_tokens=False)["input_ids"] for g in ("A", "yes", "no", "maybe")}
    print(f"tokenizer: {len(tokenizer)} tokens; gold token ids {probe}", flush=True)
    model_dir, adapter_dir = args.workdir / f"llama3-{args.shape}-random", args.workdir / f"dora-{args.shape}-random"
    build_model(model_dir, adapter_dir, tokenizer, args.shape)
    result["build_seconds"] = round(time.perf_counter() - started, 1)
    t = time.perf_counter()
    model, tokenizer = load_model(str(model_dir), str(adapter_dir), 4)
    result["load_seconds"] = round(time.perf_counter() - t, 1)
    print(f"built in {result['build_seconds']} s, loaded (4-bit, float32 compute, DoRA) in {result['load_seconds']} s", flush=True)

    sets, lengths = synthetic_questions(tokenizer, args.per_dataset)
    result["questions"] = sum(len(q) for q in sets.values())
    result["prompt_tokens"] = {"min": min(lengths), "mean": round(sum(lengths) / len(lengths), 1), "max": max(lengths)}
    plans = {name: ([q.prompt for q in qs], reference_new_tokens([q.gold for q in qs], tokenizer, 16)) for name, qs in sets.items()}
    print(f"{result['questions']} questions, prompt tokens {result['prompt_tokens']}", flush=True)

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    # Warm-up (CUDA context, cuBLAS handles, kernels) on both paths.
    generate_answers(model, tokenizer, plans["medqa"][0][:24], plans["medqa"][1][:24], exact=False)
    generate_one_at_a_time(model, tokenizer, plans["medqa"][0][:2], plans["medqa"][1][:2])

    k = args.reference_per_dataset
    reference, ref_seconds = {}, 0.0
    for name, (prompts, counts) in plans.items():
        sync(); t = time.perf_counter()
        reference[name] = generate_one_at_a_time(model, tokenizer, prompts[:k], counts[:k])
        sync(); ref_seconds += time.perf_counter() - t
    ref_rate = 4 * k / ref_seconds
    result["reference"] = {"questions": 4 * k, "seconds": round(ref_seconds, 2), "questions_per_second": round(ref_rate, 3)}
    print(f"reference one-at-a-time (float32 compute): {ref_rate:.2f} questions/s", flush=True)
    save()

    m = 0.005  # the recheck margin tried (the default before 2026-11-25; the default now rechecks only non-finite answers)
    half = dict(half_blocks=True)
    variants = {
        "default": ("default: fp16 4-bit matmuls, attention/MLP float32, no margin recheck", {}),
        "half-blocks": (f"fp16 + fp16 attention/MLP (SDPA flash/efficient), recheck margin < {m}", dict(half, recheck_margin=m)),
        "cudnn": (f"same, SDPA left to PyTorch (cuDNN): the default before 2026-11-25",
                  dict(half, recheck_margin=m, sdpa_backends=None)),
        "no-recheck": ("fp16 + fp16 attention/MLP, no recheck", half),
        "batched": (f"fp16 + fp16 attention/MLP, recheck margin < {m} batched in float32",
                    dict(half, recheck_margin=m, recheck_batched=True)),
        "fp16-matmuls-batched": (f"fp16 matmuls only, recheck margin < {m} batched in float32",
                                 dict(recheck_margin=m, recheck_batched=True)),
        "fp16-matmuls-recheck": (f"fp16 matmuls only, recheck margin < {m} one at a time", dict(recheck_margin=m)),
        "bf16": ("bf16 + bf16 attention/MLP, no recheck", dict(half, compute_dtype=torch.bfloat16)),
        "no-prefix": ("fp16 + fp16 attention/MLP, no prefix cache, no recheck", dict(half, min_prefix=10**9)),
    }
    variants = [(key, *variants[key]) for key in args.variants.split(",")]
    result["warm_up"] = ("every variant runs twice over all questions; the first pass (first_pass_seconds) warms "
                         "its shapes and backends, the second is timed and compared")
    result["variants"] = []
    no_recheck_answers = None
    for key, label, kwargs in variants:
        for timed in (False, True):
            rows, seconds, stats, questions, margins, answers_by_name = [], 0.0, [], 0, [], {}
            for name, (prompts, counts) in plans.items():
                options = FastOptions(**kwargs)
                sync(); t = time.perf_counter()
                answers = generate_answers(model, tokenizer, prompts, counts, exact=False, options=options)
                sync(); seconds += time.perf_counter() - t
                answers_by_name[name] = answers
                questions += len(prompts)
                stats.append({"dataset": name, **options.stats})
                rows += compare(reference[name], answers[:k], BENCHMARKS[name].answer_type)
                margins += [a.margin for a in answers]
            if not timed:
                first_seconds = seconds
                print(f"  (warm-up pass of {label!r}: {seconds:.2f} s)", flush=True)
        if key == "no-recheck":
            no_recheck_answers = answers_by_name
        rate = questions / seconds
        n = len(rows)
        entry = {
            "variant": label, "key": key, "options": {key: str(value) for key, value in kwargs.items()}, "questions": questions,
            "first_pass_seconds": round(first_seconds, 2),
            "seconds": round(seconds, 2), "questions_per_second": round(rate, 2), "speedup": round(rate / ref_rate, 2),
            "agree_token_ids": sum(r["same_ids"] for r in rows) / n, "agree_output": sum(r["same_output"] for r in rows) / n,
            "agree_pred": sum(r["same_pred"] for r in rows) / n, "compared": n, "stats": stats,
            "rechecked": sum(s.get("rechecked", 0) for s in stats),
            "recheck_seconds": round(sum(s.get("recheck_seconds", 0.0) for s in stats), 2),
            "rechecked_compared": sum(r["rechecked"] for r in rows),
            "rechecked_compared_equal": sum(r["rechecked"] and r["same_ids"] for r in rows),
            "disagreeing_margins": sorted(round(r["margin"], 5) for r in rows if not r["same_ids"]),
        }
        finite = sorted(m for m in margins if math.isfinite(m))
        entry["margin_quantiles"] = {q: round(finite[int(q * (len(finite) - 1))], 5) for q in (0.01, 0.02, 0.05, 0.1, 0.5)}
        if key in ("default", "no-recheck"):
            # What a recheck margin t would cost and buy: rechecked share of all answers, agreement
            # on the compared ones (a rechecked answer is the reference's), and the implied rate.
            per_fast, per_ref = seconds / questions, 1 / ref_rate
            entry["recheck_sweep"] = []
            for t in (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.02, 0.05):
                share = sum(m < t or not math.isfinite(m) for m in margins) / len(margins)
                agree = sum(r["same_ids"] or r["margin"] < t for r in rows) / n
                entry["recheck_sweep"].append({"margin": t, "rechecked_share": round(share, 4), "agree_token_ids": round(agree, 4),
                                               "estimated_questions_per_second": round(1 / (per_fast + share * per_ref), 2)})
            for sweep in entry["recheck_sweep"]:
                print(f"    recheck < {sweep['margin']:<7} rechecks {100 * sweep['rechecked_share']:5.2f} %  agree "
                      f"{sweep['agree_token_ids']:.4f}  ~{sweep['estimated_questions_per_second']} q/s", flush=True)
        result["variants"].append(entry)
        print(f"{label:<58} {rate:7.2f} q/s  x{entry['speedup']:<6} agree ids {entry['agree_token_ids']:.4f} "
              f"output {entry['agree_output']:.4f} pred {entry['agree_pred']:.4f}  rechecked {entry['rechecked']} "
              f"({entry['recheck_seconds']} s; compared {entry['rechecked_compared']}, equal "
              f"{entry['rechecked_compared_equal']})  first pass {entry['first_pass_seconds']} s  "
              f"disagreeing margins {entry['disagreeing_margins'][:8]}", flush=True)
        save()

    if no_recheck_answers is not None:
        # Does a batched float32 recompute give the reference's answer where it matters? On the
        # compared questions whose fp16 margin is below 0.03, recompute batched in float32 compute.
        from app.evaluation.runner import _ieee_float32, generate_fast

        check = {"margin_below": 0.03, "questions": 0, "equal_to_reference": 0, "fp16_equal_to_reference": 0, "seconds": 0.0}
        for name, (prompts, counts) in plans.items():
            low = [i for i, a in enumerate(no_recheck_answers[name][:k]) if not a.margin >= 0.03]
            if not low:
                continue
            sync(); t = time.perf_counter()
            with _ieee_float32():
                again = generate_fast(model, tokenizer, [prompts[i] for i in low], [counts[i] for i in low],
                                      FastOptions(compute_dtype=None, half_blocks=False, recheck_margin=0.0, sdpa_backends=None))
            sync(); check["seconds"] += time.perf_counter() - t
            check["questions"] += len(low)
            check["equal_to_reference"] += sum(a.token_ids == reference[name][i].token_ids for i, a in zip(low, again))
            check["fp16_equal_to_reference"] += sum(no_recheck_answers[name][i].token_ids == reference[name][i].token_ids for i in low)
        check["seconds"] = round(check["seconds"], 2)
        result["float32_batched_recompute_check"] = check
        print(f"float32 batched recompute of low-margin compared answers: {check}", flush=True)
        save()

    if args.profile and torch.cuda.is_available():
        from torch.profiler import ProfilerActivity, profile

        prompts, counts = plans["medqa"]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            generate_answers(model, tokenizer, prompts, counts, exact=False, options=FastOptions())
            sync()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60)
        print(table, flush=True)
        result["profile_medqa_default"] = table
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    save()


if __name__ == "__main__":
    main()
