"""Data: the flashcard partitions (FlowerTune's Alpaca prompt, app/training/prompt.py) and response-only labels."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.training.prompt import format_prompt

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
REQUIRED_COLUMNS = ("input", "output")  # medalpaca's schema: input -> instruction, output -> response


class DataError(ValueError):
    """The dataset or a row of it is not usable."""


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]


def tokenize_example(tokenizer: Any, instruction: str, response: str, seq_length: int) -> Example | None:
    """Prompt and response tokenized apart so the loss mask is exact; None if no response token fits."""
    prompt_ids = tokenizer(format_prompt(instruction), add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(" " + response, add_special_tokens=False)["input_ids"]
    input_ids = (prompt_ids + response_ids)[:seq_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:seq_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return Example(input_ids=input_ids, labels=labels)


def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, Any]:
    """Right-pad to the longest example of the batch (no work on padding beyond that)."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def round_batches(
    examples: Sequence[Example], *, batch_size: int, steps: int, seed: int, pad_token_id: int
) -> Iterator[dict[str, Any]]:
    """`steps` batches of a fresh seeded shuffle (wrapping around a small partition)."""
    if not examples:
        raise DataError("the partition has no usable example")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    for step in range(steps):
        picks = [order[(step * batch_size + i) % len(order)] for i in range(batch_size)]
        yield collate([examples[i] for i in picks], pad_token_id)


def _load_file(path: Path):
    import datasets

    if not path.is_file():
        raise DataError(f"dataset file {path}: not found (expected a .json, .jsonl or .parquet file)")
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        return datasets.Dataset.from_json(str(path))
    if suffix == ".parquet":
        return datasets.Dataset.from_parquet(str(path))
    raise DataError(f"dataset file {path}: unsupported type {suffix!r} (expected .json, .jsonl or .parquet)")


def _missing_columns(dataset: Any) -> list[str]:
    return [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]


def _read_file(path: Path):
    dataset = _load_file(path)
    if missing := _missing_columns(dataset):
        # the message reaches the server: the site's own column names stay in the node's log
        log.error("dataset file %s has columns %s", path, dataset.column_names)
        raise DataError(f"dataset file {path}: missing column(s) {missing}; expected medalpaca's columns {list(REQUIRED_COLUMNS)}")
    return dataset


def check_dataset_file(path: Path) -> None:
    """Raise DataError unless `path` is a dataset file that training can read: it exists, parses
    as its type, and has medalpaca's columns. For the launcher, before anything starts: the file
    is the user's own, so the message names the columns it has."""
    import datasets  # its import sets its logger's level: before ours

    datasets_log = logging.getLogger("datasets")  # it logs the parse error too: the DataError says it once
    level, bars = datasets_log.level, datasets.is_progress_bar_enabled()
    datasets_log.setLevel(logging.CRITICAL)
    datasets.disable_progress_bars()  # a bar for a check of a second is noise, even on a terminal
    try:
        dataset = _load_file(path)
    except DataError:
        raise
    except Exception as exc:  # datasets/pyarrow raise their own types for a file that does not parse
        chain = [exc]
        while (inner := chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 10:
            chain.append(inner)
        # datasets wraps the parser's error (e.g. "JSON parse error: ... in row 0") in a generic one
        said = [" ".join(str(e).split()) for e in chain[1:] + chain[:1] if str(e).strip()]
        cause = "empty file" if path.stat().st_size == 0 else (said[0][:300] if said else type(exc).__name__)
        raise DataError(f"dataset file {path}: cannot be read as {path.suffix.lstrip('.')} ({cause})") from exc
    finally:
        datasets_log.setLevel(level)
        if bars:
            datasets.enable_progress_bars()
    if missing := _missing_columns(dataset):
        raise DataError(f"dataset file {path}: has columns {dataset.column_names}, missing {missing} "
                        f"(expected medalpaca's columns {list(REQUIRED_COLUMNS)})")


def _partition(dataset: Any, partition_id: int, num_partitions: int):
    from flwr_datasets.partitioner import IidPartitioner

    partitioner = IidPartitioner(num_partitions=num_partitions)
    partitioner.dataset = dataset
    return partitioner.load_partition(partition_id)


def load_partition_rows(
    name: str, path: str, partition_id: int, num_partitions: int, node_data_path: str = "", on_bad_rows: str = "skip"
) -> list[dict[str, str]]:
    return load_partition(name, path, partition_id, num_partitions, node_data_path, on_bad_rows)[0]


def load_partition(
    name: str, path: str, partition_id: int, num_partitions: int, node_data_path: str = "", on_bad_rows: str = "skip"
) -> tuple[list[dict[str, str]], int]:
    """Rows {instruction, response} of one node, from (in order of precedence) the node's own file,
    a local file partitioned IID, the tiny synthetic set, or the hub via flwr-datasets; and how
    many rows were dropped for a missing, empty or non-string field (`on_bad_rows="fail"`
    raises DataError naming the first such row instead)."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} is outside 0..{num_partitions - 1} (num-partitions={num_partitions})")
    if node_data_path:
        source = f"dataset file {node_data_path}"
        dataset = _read_file(Path(node_data_path))
    elif path or name == "tiny":
        from app.training.tiny import tiny_dataset_path

        file = Path(path) if path else tiny_dataset_path()
        source = f"dataset file {file}, partition {partition_id} of {num_partitions}"
        dataset = _partition(_read_file(file), partition_id, num_partitions)
    else:
        from flwr_datasets import FederatedDataset
        from flwr_datasets.partitioner import IidPartitioner

        source = f"dataset {name}, partition {partition_id} of {num_partitions}"
        federated = FederatedDataset(dataset=name, partitioners={"train": IidPartitioner(num_partitions=num_partitions)})
        dataset = federated.load_partition(partition_id, "train")
    rows, bad = [], 0
    for index, row in enumerate(dataset):
        problem = next((f"'{c}' is {_describe_value(row.get(c))}" for c in REQUIRED_COLUMNS if not _usable(row.get(c))), None)
        if problem is None:
            rows.append({"instruction": row["input"], "response": row["output"]})
            continue
        if on_bad_rows == "fail":
            raise DataError(f"{source}: row {index}: {problem} (expected a non-empty string; dataset.on-bad-rows=skip drops such rows)")
        bad += 1
    if bad:
        log.warning("%s: skipped %d of %d rows with a missing, empty or non-string input/output", source, bad, bad + len(rows))
    return rows, bad


def _usable(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _describe_value(value: Any) -> str:
    if value is None:
        return "missing"
    if isinstance(value, str):
        return "empty"
    return f"of type {type(value).__name__}"  # never the value: the message reaches the server


def build_examples(rows: Sequence[dict[str, str]], tokenizer: Any, seq_length: int) -> list[Example]:
    examples = (tokenize_example(tokenizer, r["instruction"], r["response"], seq_length) for r in rows)
    return [e for e in examples if e is not None]


# Rows of the datasets whose size the ServerApp knows without reading them (medalpaca's card:
# 33,955 Anki flashcards; the tiny set is generated with a fixed count).
KNOWN_DATASET_ROWS = {"medalpaca/medical_meadow_medical_flashcards": 33_955}


def known_partition_size(name: str, path: str, num_partitions: int) -> int | None:
    """The largest IID partition of a dataset the server knows, or None. `path` may be the
    stack's own export of the hub dataset (same rows), recognised by its file name."""
    from app.training.tiny import NUM_FLASHCARDS

    rows = {**KNOWN_DATASET_ROWS, "tiny": NUM_FLASHCARDS}.get(name)
    if rows is None or (path and Path(path).name != name.replace("/", "__") + ".jsonl"):
        return None
    return -(-rows // num_partitions)
