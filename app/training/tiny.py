"""The `tiny` profile's base model and data, built locally (no hub): a CPU-sized Llama.

The model is a real Hugging Face directory (config, safetensors, fast tokenizer), so the
tiny profile loads it through exactly the same `from_pretrained` path as the 8B model.
The data are synthetic flashcards in medalpaca's schema with a learnable pattern.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

TINY_VERSION = "v1"
TINY_SEED = 0
NUM_FLASHCARDS = 2400

# A small fictional ontology: the answer is a deterministic function of the question, so a
# tiny model's loss keeps falling as it learns both the template and the facts.
_CONDITIONS = [
    "arthralgia", "brucellosis", "cardiomyopathy", "dermatitis", "encephalitis", "fasciitis",
    "gastritis", "hepatitis", "ileitis", "jaundice", "keratitis", "laryngitis", "myocarditis",
    "nephritis", "osteomyelitis", "pancreatitis", "rhinitis", "sinusitis", "tendinitis",
    "uveitis", "vasculitis", "colitis", "cystitis", "otitis",
]
_ATTRIBUTES = {
    "first-line treatment": ["amoxicillin", "doxycycline", "prednisone", "ibuprofen", "rest"],
    "main organ affected": ["liver", "kidney", "heart", "skin", "brain", "joints"],
    "hallmark sign": ["fever", "rash", "pain", "swelling", "fatigue", "cough"],
    "usual cause": ["bacteria", "virus", "autoimmunity", "trauma", "toxins"],
}
_QUESTION_FORMS = [
    "What is the {attribute} of {condition}?",
    "In {condition}, what is the {attribute}?",
]
INSTRUCTION = "Answer this question truthfully"


def cache_root() -> Path:
    return Path(os.environ.get("FEDTUNE_CACHE", Path.home() / ".cache" / "fedtune"))


def synthetic_facts(seed: int = TINY_SEED) -> dict[tuple[str, str], str]:
    """The ontology's answers, as synthetic_flashcards draws them (same generator, first draws)."""
    rng = random.Random(seed)
    return {(c, a): rng.choice(values) for c in _CONDITIONS for a, values in _ATTRIBUTES.items()}


def synthetic_flashcards(n: int = NUM_FLASHCARDS, seed: int = TINY_SEED) -> list[dict[str, str]]:
    """Rows with medalpaca/medical_meadow_medical_flashcards' columns: instruction, input, output."""
    rng = random.Random(seed)
    facts = {
        (condition, attribute): rng.choice(values)
        for condition in _CONDITIONS
        for attribute, values in _ATTRIBUTES.items()
    }
    rows = []
    keys = sorted(facts)
    for _ in range(n):
        condition, attribute = rng.choice(keys)
        question = rng.choice(_QUESTION_FORMS).format(attribute=attribute, condition=condition)
        answer = f"The {attribute} of {condition} is {facts[condition, attribute]}."
        rows.append({"instruction": INSTRUCTION, "input": question, "output": answer})
    return rows


def tiny_dataset_path() -> Path:
    """The synthetic flashcards as a jsonl file (created once, atomically)."""
    path = cache_root() / f"tiny-flashcards-{TINY_VERSION}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(row) + "\n" for row in synthetic_flashcards())
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
            tmp.write(text)
        os.replace(tmp.name, path)
    return path


def tiny_model_dir() -> Path:
    """A local Llama-architecture model directory with random seeded weights (created once)."""
    path = cache_root() / f"tiny-llama-{TINY_VERSION}"
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tiny-llama-"))
    try:
        _build_tiny_model(staging)
        staging.rename(path)
    except OSError:
        if not (path / "config.json").exists():  # lost a race with another process: fine
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _build_tiny_model(directory: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from app.training.prompt import ALPACA_TEMPLATE

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = [ALPACA_TEMPLATE.format(instruction=r["input"], response=r["output"]) for r in synthetic_flashcards()]
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=specials[0], eos_token=specials[1], pad_token=specials[2]
    )
    fast.save_pretrained(directory)

    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, like Llama 3
        max_position_embeddings=512,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(TINY_SEED)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory, safe_serialization=True)


NUM_EVAL_QUESTIONS = 12


def synthetic_eval_rows(n: int = NUM_EVAL_QUESTIONS, seed: int = TINY_SEED) -> dict[str, list[dict]]:
    """Questions about the tiny ontology in each benchmark's source schema (docs/evaluation.md):
    what the tiny profile is evaluated on, so a CPU run ends with all four accuracies."""
    rng = random.Random(seed + 1)
    facts = synthetic_facts(seed)
    keys = sorted(facts)
    rows: dict[str, list[dict]] = {"pubmedqa": [], "medmcqa": [], "medqa": [], "careqa": []}
    for i in range(n):
        condition, attribute = rng.choice(keys)
        true = facts[condition, attribute]
        wrong = [v for v in _ATTRIBUTES[attribute] if v != true]
        claimed = true if i % 2 == 0 else rng.choice(wrong)
        rows["pubmedqa"].append({
            "QUESTION": f"Is the {attribute} of {condition} {claimed}?",
            "CONTEXTS": [f"The {attribute} of {condition} is {true}."],
            "final_decision": "yes" if claimed == true else "no",
        })
        choices = [true, *rng.sample(wrong, 3)]  # every attribute has at least four wrong values
        rng.shuffle(choices)
        question = f"What is the {attribute} of {condition}?"
        gold = choices.index(true)
        rows["medmcqa"].append({"question": question, **dict(zip(("opa", "opb", "opc", "opd"), choices)), "cop": gold})
        rows["medqa"].append({"question": question, "answer": true,
                              "options": [{"key": "ABCD"[k], "value": v} for k, v in enumerate(choices)]})
        rows["careqa"].append({"question": question, **dict(zip(("op1", "op2", "op3", "op4"), choices)), "cop": gold + 1})
    return rows


def tiny_eval_dir() -> Path:
    """`<dataset>.jsonl` for the four benchmarks, for `fedtune eval --data-dir` (created once)."""
    path = cache_root() / f"tiny-eval-{TINY_VERSION}"
    if path.is_dir():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tiny-eval-"))
    try:
        for name, rows in synthetic_eval_rows().items():
            (staging / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        staging.rename(path)
    except OSError:
        if not path.is_dir():  # lost a race with another process: fine
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
