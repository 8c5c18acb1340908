"""The four medical benchmarks: where each comes from and how a row becomes a prompt.

Sources, splits, instructions (Meditron's, as FlowerTune uses them), prompt layout and gold
answers follow Flower's `benchmarks/flowertune-llm/evaluation/medical`. Rows come either from
the Hugging Face hub (`datasets.load_dataset`) or, for offline hosts, from a local jsonl or
parquet file per benchmark in the dataset's own (source) schema; every row is checked and a
bad one is reported with its file, row and field.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_MCQ_DOCTOR = (
    "You are a medical doctor answering realworld medical entrance exam questions. Based on your "
    "understanding of basic and clinical science, medical knowledge, and mechanisms underlying health, "
    "disease, patient care, and modes of therapy, answer the following multiple-choice question. Select "
    "one correct answer from A to D. Base your answer on the current and standard practices referenced "
    "in medical guidelines."
)
INSTRUCTIONS = {
    "pubmedqa": (
        "As an expert doctor in clinical science and medical knowledge, can you tell me if the following "
        "statement is correct? Answer yes, no, or maybe."
    ),
    "medqa": (
        "You are a medical doctor taking the US Medical Licensing Examination. You need to demonstrate your "
        "understanding of basic and clinical science, medical knowledge, and mechanisms underlying health, "
        "disease, patient care, and modes of therapy. Show your ability to apply the knowledge essential for "
        "medical practice. For the following multiple-choice question, select one correct answer from A to E. "
        "Base your answer on the current and standard practices referenced in medical guidelines."
    ),
    "medmcqa": _MCQ_DOCTOR,
    "careqa": _MCQ_DOCTOR,
}


class EvalDataError(ValueError):
    """A benchmark file or row that cannot be used; the message names the file, row and field."""


@dataclass(frozen=True)
class Question:
    prompt: str  # instruction, question and options, "The answer is:" (the reference's `prompt` column)
    gold: str  # "A".."D" for multiple choice, "yes"/"no"/"maybe" for PubMedQA


class Row:
    """One source row with typed, checked field access; errors name the source, row and field."""

    def __init__(self, data: Any, source: str, number: int):
        self.source, self.number = source, number
        if not isinstance(data, dict):
            raise self.error(None, f"expected an object with the dataset's fields, got {type(data).__name__}")
        self.data = data

    def error(self, field: str | None, problem: str) -> EvalDataError:
        where = f"{self.source}: row {self.number}"
        return EvalDataError(f"{where}: field {field!r}: {problem}" if field else f"{where}: {problem}")

    def _get(self, field: str) -> Any:
        if field not in self.data:
            raise self.error(field, "missing")
        return self.data[field]

    def text(self, field: str) -> str:
        value = self._get(field)
        if not isinstance(value, str):
            raise self.error(field, f"expected a string, got {_describe(value)}")
        return value

    def texts(self, field: str) -> list[str]:
        value = self._get(field)
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise self.error(field, f"expected a list of strings, got {_describe(value)}")
        return value

    def integer(self, field: str, allowed: range) -> int:
        value = self._get(field)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(field, f"expected an integer, got {_describe(value)}")
        if value not in allowed:
            raise self.error(field, f"expected {allowed.start}..{allowed.stop - 1}, got {value}")
        return value

    def options(self, field: str) -> list[tuple[str, str]]:
        value = self._get(field)
        good = isinstance(value, list) and value and all(
            isinstance(o, dict) and isinstance(o.get("key"), str) and isinstance(o.get("value"), str) for o in value
        )
        if not good:
            raise self.error(field, f"expected a list of {{'key': str, 'value': str}}, got {_describe(value)}")
        return [(o["key"], o["value"]) for o in value]


def _describe(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def format_multiple_choice(question: str, choices: list[str]) -> str:
    """'Question: ...?' then the options lettered A, B, ... (a '?' is added unless it ends in '?' or '.')."""
    if not question.endswith(("?", ".")):
        question += "?"
    lines = "\n".join(f"{chr(ord('A') + i)}. {choice}" for i, choice in enumerate(choices))
    return f"Question: {question}\n\nOptions:\n{lines}"


def with_instruction(name: str, body: str) -> str:
    return f"{INSTRUCTIONS[name]}\n{body}\nThe answer is:\n"


def _pubmedqa(row: Row) -> Question:
    contexts, question = row.texts("CONTEXTS"), row.text("QUESTION")
    gold = row.text("final_decision")
    if gold.lower() not in ("yes", "no", "maybe"):
        raise row.error("final_decision", f"expected yes, no or maybe, got {gold!r}")
    return Question(with_instruction("pubmedqa", "\n".join(contexts) + "\n" + question), gold)


def _medmcqa(row: Row) -> Question:
    question = row.text("question")
    choices = [row.text(field) for field in ("opa", "opb", "opc", "opd")]
    answer = row.integer("cop", range(0, 4))  # 0-based
    return Question(with_instruction("medmcqa", format_multiple_choice(question, choices)), "ABCD"[answer])


def _medqa(row: Row) -> Question:
    question, options, answer = row.text("question"), row.options("options"), row.text("answer")
    gold = next((key for key, value in options if value == answer), None)
    if gold is None:
        raise row.error("answer", f"{_describe(answer)} is none of the options' values")
    body = format_multiple_choice(question, [value for _, value in options])
    return Question(with_instruction("medqa", body), gold)


def _careqa(row: Row) -> Question:
    question = row.text("question")
    choices = [row.text(field) for field in ("op1", "op2", "op3", "op4")]
    answer = row.integer("cop", range(1, 5))  # 1-based
    return Question(with_instruction("careqa", format_multiple_choice(question, choices)), "ABCD"[answer - 1])


@dataclass(frozen=True)
class Benchmark:
    name: str
    hub_path: str
    hub_config: str | None
    split: str
    answer_type: str  # "boolean" (yes/no/maybe) or "mcq" (a letter)
    to_question: Callable[[Row], Question]


BENCHMARKS = {
    b.name: b
    for b in (
        Benchmark("pubmedqa", "bigbio/pubmed_qa", "pubmed_qa_labeled_fold0_source", "test", "boolean", _pubmedqa),
        # "medmcqa" on the hub is a redirect to this repository.
        Benchmark("medmcqa", "openlifescienceai/medmcqa", None, "validation", "mcq", _medmcqa),
        Benchmark("medqa", "bigbio/med_qa", "med_qa_en_4options_source", "test", "mcq", _medqa),
        Benchmark("careqa", "HPAI-BSC/CareQA", "CareQA_en", "test", "mcq", _careqa),
    )
}


def parse_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown or not names:
        raise EvalDataError(f"unknown dataset(s) {unknown or text!r}: choose from {', '.join(BENCHMARKS)}")
    return names


def load_questions(name: str, data_dir: Path | None = None, limit: int | None = None) -> list[Question]:
    """The benchmark's questions in source order: from `data_dir` if given, else from the hub."""
    benchmark = BENCHMARKS[name]
    if data_dir is not None:
        path = find_data_file(Path(data_dir), name)
        rows: Iterable[tuple[int, Any]] = read_rows(path)
        source = str(path)
    else:
        rows = enumerate(_hub_rows(benchmark), start=1)
        source = f"{benchmark.hub_path}/{benchmark.hub_config or 'default'}[{benchmark.split}]"
    questions = []
    for number, data in rows:
        if limit is not None and len(questions) >= limit:
            break
        questions.append(benchmark.to_question(Row(data, source, number)))
    if not questions:
        raise EvalDataError(f"{source}: no rows")
    return questions


def find_data_file(data_dir: Path, name: str) -> Path:
    candidates = [data_dir / f"{name}.{ext}" for ext in ("jsonl", "parquet")]
    found = [path for path in candidates if path.is_file()]
    if not found:
        raise EvalDataError(f"{candidates[0]}: no such file (nor {candidates[1].name}) for dataset {name!r}")
    if len(found) > 1:
        raise EvalDataError(f"{found[0]} and {found[1]}: both exist for dataset {name!r}; keep one")
    return found[0]


def read_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(row number, row) from a jsonl file (number = line) or a parquet file (number = 1-based row)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for unreadable files
            raise EvalDataError(f"{path}: not a readable parquet file ({exc})") from exc
        yield from enumerate(table.to_pylist(), start=1)
        return
    try:
        with open(path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield line_number, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise EvalDataError(f"{path}: row {line_number}: not valid JSON ({exc.msg})") from exc
    except UnicodeDecodeError as exc:
        raise EvalDataError(f"{path}: not UTF-8 text ({exc})") from exc


def _hub_rows(benchmark: Benchmark) -> Iterable[dict]:
    import datasets

    def load(**extra):
        return datasets.load_dataset(benchmark.hub_path, benchmark.hub_config, split=benchmark.split, **extra)

    try:
        return load()
    except RuntimeError as exc:
        # The bigbio repositories were script datasets, which datasets>=4 no longer runs; the hub
        # keeps a parquet export of every config on this revision.
        if "scripts are no longer supported" not in str(exc):
            raise
        log.info("%s is a script dataset; loading its parquet export", benchmark.hub_path)
        return load(revision="refs/convert/parquet")


def export_benchmarks(target: Path) -> dict[str, Path]:
    """Each benchmark's split from the hub, in its source schema, as `<target>/<name>.jsonl`:
    what `--data-dir` reads on a host without internet (the stack's model-cache service fills it).
    A file already there is kept; each is written to a temporary name, then renamed, then checked
    as any `--data-dir` file is."""
    import os

    target.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, benchmark in BENCHMARKS.items():
        path = target / f"{name}.jsonl"
        if not path.exists():
            partial = path.with_name(path.name + ".partial")
            with open(partial, "w", encoding="utf-8") as handle:
                for row in _hub_rows(benchmark):
                    handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            os.replace(partial, path)
        load_questions(name, target)
        paths[name] = path
    return paths
