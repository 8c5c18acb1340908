"""Synthetic evaluation sets at the four benchmarks' real test-set sizes (issue 26).

`fedtune eval --data-dir DIR` reads `<benchmark>.jsonl` in each benchmark's source schema
(app/evaluation/benchmarks.py). This writes such files with as many questions as the real splits
FlowerTune evaluates on, each question's chat-wrapped prompt aimed at a length drawn uniformly
from 250-550 tokens of the given tokenizer (the real prompts run 240-568 Llama 3 tokens,
BENCHMARKS.md; a prompt is never shorter than its benchmark's instruction, which in the tiny
tokenizer alone is longer than 250), so an evaluation of them takes about as long as the real one
would on the same model. The lengths reached are printed.

    python benchmarks/eval_sets.py OUT_DIR --tokenizer MODEL_DIR [--scale 0.01]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eval import WORDS  # noqa: E402

from app.evaluation.benchmarks import BENCHMARKS, Row  # noqa: E402
from app.evaluation.runner import chat_prompt  # noqa: E402

# Questions in the splits FlowerTune's medical evaluation uses (app/evaluation/benchmarks.py):
# PubMedQA pqa_labeled fold0 test, MedMCQA validation, MedQA (USMLE, 4 options) test, CareQA_en test.
REAL_SIZES = {"pubmedqa": 500, "medmcqa": 4183, "medqa": 1273, "careqa": 5621}
PROMPT_TOKENS = (250, 550)


def source_row(name: str, text: str, options: list[str], rng: random.Random) -> dict:
    """One row in the benchmark's source schema with `text` as its question and a random gold."""
    gold = rng.randrange(4)
    if name == "pubmedqa":
        return {"QUESTION": text + "?", "CONTEXTS": [text + "."], "final_decision": rng.choice(["yes", "no", "maybe"])}
    if name == "medmcqa":
        return {"question": text + "?", **dict(zip(("opa", "opb", "opc", "opd"), options)), "cop": gold}
    if name == "medqa":
        return {"question": text + "?", "answer": options[gold], "options": [{"key": "ABCD"[k], "value": v} for k, v in enumerate(options)]}
    return {"question": text + "?", **dict(zip(("op1", "op2", "op3", "op4"), options)), "cop": gold + 1}


def write_sets(out_dir: Path, tokenizer, scale: float = 1.0, seed: int = 0) -> dict[str, dict]:
    rng = random.Random(seed)
    words = list(WORDS)

    def row_with(name: str, n_words: int, options: list[str], row_rng: random.Random) -> dict:
        text = " ".join(row_rng.choice(words) for _ in range(max(n_words, 1)))
        return source_row(name, text, options, row_rng)

    def tokens(name: str, row: dict) -> int:
        question = BENCHMARKS[name].to_question(Row(row, "synthetic", 1))
        return len(tokenizer(chat_prompt(question.prompt))["input_ids"])

    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {}
    for name, size in REAL_SIZES.items():
        count, lengths = max(1, round(size * scale)), []
        path = out_dir / f"{name}.jsonl"
        staging = path.with_suffix(".jsonl.tmp")
        with open(staging, "w") as handle:
            for _ in range(count):
                options = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 6))) for _ in range(4)]
                target, state = rng.randint(*PROMPT_TOKENS), rng.random()
                # PubMedQA repeats the text (question and context): about half the words per token.
                base = tokens(name, row_with(name, 1, options, random.Random(state)))
                n_words = max(int((target - base) / (2.3 if name == "pubmedqa" else 1.15)), 1)
                got = tokens(name, row_with(name, n_words, options, random.Random(state)))
                n_words = max(int(n_words * (target - base) / max(got - base, 1)), 1)  # one correction
                row = row_with(name, n_words, options, random.Random(state))
                lengths.append(tokens(name, row))
                handle.write(json.dumps(row) + "\n")
        staging.rename(path)
        stats[name] = {"questions": count, "mean_tokens": sum(lengths) / len(lengths), "min_tokens": min(lengths), "max_tokens": max(lengths)}
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--tokenizer", required=True, help="model directory whose tokenizer measures the prompts")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the real sizes (a quick check)")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    stats = write_sets(args.out_dir, AutoTokenizer.from_pretrained(args.tokenizer), args.scale)
    for name, s in stats.items():
        print(f"{name:9s} {s['questions']:5d} questions, prompt tokens mean {s['mean_tokens']:.0f} (min {s['min_tokens']}, max {s['max_tokens']})")


if __name__ == "__main__":
    main()
