"""`fedtune eval`: FlowerTune's medical evaluation of a base model plus (optionally) a PEFT adapter."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from app.evaluation.benchmarks import BENCHMARKS, EvalDataError, Question, load_questions, parse_names

# app.evaluation.runner imports torch: only inside the commands, so that building the `fedtune`
# parser (every sub-command, e.g. the SuperNode wrapper) stays light.
if TYPE_CHECKING:
    from app.evaluation.runner import FastOptions

DEFAULT_DATASETS = "pubmedqa,medmcqa,medqa,careqa"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="medical QA accuracy (PubMedQA, MedMCQA, MedQA, CareQA) as FlowerTune measures it",
        description=__doc__,
    )
    parser.add_argument("--base-model", required=True, help="Hugging Face name or local directory; 'tiny' for the tiny profile's model")
    parser.add_argument("--peft-path", default=None, help="PEFT adapter directory (e.g. a round's checkpoint)")
    parser.add_argument("--datasets", default=DEFAULT_DATASETS, help=f"comma-separated, from {', '.join(BENCHMARKS)}")
    parser.add_argument("--quantization", type=int, choices=(0, 4, 8), default=4,
                        help="4 (the leaderboard's setting; float32 compute as the reference), 8 (float16), 0 (none)")
    parser.add_argument("--batch-size", type=_positive_int, default=16,
                        help="the reference's chunk size: each chunk's answers get as many tokens as its first gold")
    parser.add_argument("--benchmarks-dir", "--data-dir", type=Path, default=None, dest="data_dir", metavar="DIR",
                        help="read <dataset>.jsonl or <dataset>.parquet (Hugging Face source schema) from here instead of the hub")
    parser.add_argument("--limit", type=_positive_int, default=None, help="only the first N questions of each dataset")
    parser.add_argument("--exact", action="store_true",
                        help="one prompt at a time through model.generate, as the reference (slow, same numerics)")
    parser.add_argument("--run-name", default="fl", help="suffix of the output files' names (generation_<dataset>_<run-name>.jsonl)")
    parser.add_argument("--output-dir", type=Path, default=Path("results/eval"), help="where generations, accuracies and summary.json go")
    fast = parser.add_argument_group("fast path (without --exact)")
    fast.add_argument("--batch-tokens", type=_positive_int, default=None,
                      help="padded prompt tokens per forward pass (default 16384)")
    fast.add_argument("--compute-dtype", choices=("float16", "bfloat16"), default="float16",
                      help="compute type of the 4-bit layers (residual stream, attention and LM head stay float32)")
    fast.add_argument("--half-blocks", action="store_true",
                      help="attention and the MLP's activation product in the compute type too (faster, agrees less)")
    fast.add_argument("--recheck-margin", type=float, default=None,
                      help="recompute one at a time the answers whose top-two logit margin is below this "
                           "(default 0: only non-finite ones)")
    fast.add_argument("--recheck-batched", action="store_true",
                      help="recompute those answers batched with float32 compute instead of one at a time (cheaper; "
                           "not the reference's loop)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        names = parse_names(args.datasets)
        # Every file is read and checked before the (slow) model load.
        question_sets = {name: load_questions(name, args.data_dir, args.limit) for name in names}
    except EvalDataError as exc:
        print(f"fedtune eval: error: {exc}", file=sys.stderr)
        return 2
    import torch

    from app.evaluation.runner import FastOptions

    model, tokenizer = load_model(args.base_model, args.peft_path, args.quantization)
    options = None
    if not args.exact:
        given = {"batch_tokens": args.batch_tokens, "recheck_margin": args.recheck_margin}
        options = FastOptions(compute_dtype=getattr(torch, args.compute_dtype), recheck_batched=args.recheck_batched,
                              half_blocks=args.half_blocks,
                              **{k: v for k, v in given.items() if v is not None})
    summary = evaluate(model, tokenizer, question_sets, exact=args.exact, batch_size=args.batch_size,
                       options=options, output_dir=args.output_dir, run_name=args.run_name)
    summary.update(base_model=args.base_model, peft_path=args.peft_path, quantization=args.quantization)
    (args.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"average accuracy {summary['average']:.4f}; results in {args.output_dir}")
    return 0


def load_model(base_model: str, peft_path: str | None, quantization: int):
    """The model as the reference loads it: 4-bit with float32 compute, or 8-bit with float16."""
    import torch

    from app.training.model import load_base_model, load_tokenizer

    dtype = torch.float16 if quantization == 8 else torch.float32
    model = load_base_model(base_model, quantization, compute_dtype=dtype)
    if peft_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, peft_path)
    model.eval()
    return model, load_tokenizer(base_model)


def evaluate(model, tokenizer, question_sets: dict[str, list[Question]], *, exact: bool, batch_size: int,
             options: FastOptions | None, output_dir: Path, run_name: str) -> dict:
    """Answer, score and write each benchmark; returns the summary (accuracies and their average)."""
    from app.evaluation.runner import generate_answers, reference_new_tokens, score

    from tqdm import tqdm

    output_dir.mkdir(parents=True, exist_ok=True)
    per_dataset = {}
    for name, questions in question_sets.items():
        benchmark = BENCHMARKS[name]
        prompts = [q.prompt for q in questions]
        new_tokens = reference_new_tokens([q.gold for q in questions], tokenizer, batch_size)
        started = time.perf_counter()
        with tqdm(total=len(questions), desc=name, unit="q", file=sys.stderr, mininterval=1.0) as bar:
            answers = generate_answers(model, tokenizer, prompts, new_tokens, exact=exact,
                                       options=options, progress=bar.update)
        seconds = time.perf_counter() - started
        accuracy, rows = score(benchmark.answer_type, questions, answers)
        with open(output_dir / f"generation_{name}_{run_name}.jsonl", "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        (output_dir / f"acc_{name}_{run_name}.txt").write_text(f"Accuracy: {accuracy}. ")
        per_dataset[name] = {
            "accuracy": accuracy, "questions": len(questions), "seconds": round(seconds, 3),
            "questions_per_second": round(len(questions) / seconds, 3) if seconds > 0 else None,
            **({} if exact or options is None else {"fast_path": dict(options.stats)}),
        }
        print(f"{name}: accuracy {accuracy:.4f} over {len(questions)} questions "
              f"({len(questions) / max(seconds, 1e-9):.2f} questions/s)", flush=True)
    accuracies = {name: entry["accuracy"] for name, entry in per_dataset.items()}
    return {
        "run_name": run_name, "mode": "exact" if exact else "fast", "batch_size": batch_size,
        "accuracies": accuracies, "average": statistics.fmean(accuracies.values()),
        "datasets": per_dataset, "date": time.strftime("%Y-%m-%d"),
    }
