"""Answer extraction and accuracy, with the reference evaluation's exact rules.

The generated text and the gold are lower-cased. If the text holds "\\n##", only the line
after it is read. Everything but ASCII letters and digits becomes a space, runs of spaces
collapse and the ends are trimmed. Multiple choice keeps the first character; yes/no first
turns a doubled "yesyes"/"nono"/"yesno"/"noyes" into its first word. A result in
{a, b, c, d, e, yes, no} is the prediction; anything else (including "maybe", which is
not in that set) leaves the whole lower-cased generation as the prediction, so "maybe"
scores only when the model generated exactly "maybe". A prediction is correct when it equals
the lower-cased gold; accuracy is the fraction correct.
"""

from __future__ import annotations

import re

VALID = frozenset({"a", "b", "c", "d", "e", "yes", "no"})
_DOUBLED = (("yesyes", "yes"), ("nono", "no"), ("yesno", "yes"), ("noyes", "no"))


def extract_answer(output: str, answer_type: str) -> str:
    """The prediction read from a generation (`answer_type` is "mcq" or "boolean")."""
    full = output.lower()
    text = full.split("\n##")[1].split("\n")[0].strip() if "\n##" in full else full
    text = re.sub(" +", " ", re.sub(r"[^a-zA-Z0-9]", " ", text).strip())
    if answer_type == "boolean":
        for doubled, single in _DOUBLED:
            if doubled in text:  # only the first pattern that occurs is replaced
                text = text.replace(doubled, single)
                break
    elif answer_type == "mcq":
        text = text[:1]
    else:
        raise ValueError(f"unknown answer type {answer_type!r}")
    return text if text in VALID else full


def is_correct(output: str, gold: str, answer_type: str) -> bool:
    return extract_answer(output, answer_type) == gold.lower()


def accuracy(outputs: list[str], golds: list[str], answer_type: str) -> float:
    if len(outputs) != len(golds) or not golds:
        raise ValueError(f"need as many outputs as golds, at least one: {len(outputs)} vs {len(golds)}")
    return sum(is_correct(o, g, answer_type) for o, g in zip(outputs, golds)) / len(golds)
