import json

import pytest

from app.training.data import (
    IGNORE_INDEX,
    DataError,
    build_examples,
    collate,
    load_partition,
    load_partition_rows,
    round_batches,
    tokenize_example,
)
from app.training.model import load_tokenizer
from app.training.prompt import ALPACA_HEADER, format_prompt


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def test_prompt_is_flowertune_alpaca():
    assert format_prompt("What causes gout?") == (
        f"{ALPACA_HEADER}\n### Instruction:\nWhat causes gout?\n### Response:"
    )


def test_loss_only_on_response_tokens(tokenizer):
    example = tokenize_example(tokenizer, "What is the usual cause of otitis?", "The usual cause of otitis is virus.", 512)
    prompt_len = len(tokenizer(format_prompt("What is the usual cause of otitis?"))["input_ids"])
    assert example.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert example.labels[prompt_len:] == example.input_ids[prompt_len:]
    response = tokenizer.decode(example.input_ids[prompt_len:])
    assert response.strip() == "The usual cause of otitis is virus."


def test_truncation_keeps_length_and_drops_examples_without_response(tokenizer):
    long = tokenize_example(tokenizer, "q", "word " * 200, 64)
    assert len(long.input_ids) == len(long.labels) == 64
    assert tokenize_example(tokenizer, "question " * 100, "answer", 32) is None


def test_collate_pads_right_and_masks_padding(tokenizer):
    a = tokenize_example(tokenizer, "a", "short.", 64)
    b = tokenize_example(tokenizer, "b", "a much longer response than the other one.", 64)
    batch = collate([a, b], tokenizer.pad_token_id)
    assert batch["input_ids"].shape[1] == len(b.input_ids)
    pad = len(b.input_ids) - len(a.input_ids)
    assert batch["attention_mask"][0].tolist() == [1] * len(a.input_ids) + [0] * pad
    assert batch["labels"][0, len(a.input_ids):].eq(IGNORE_INDEX).all()


def test_round_batches_are_seeded_and_wrap(tokenizer):
    examples = build_examples([{"instruction": f"q{i}", "response": f"r{i}"} for i in range(5)], tokenizer, 64)
    first = [b["input_ids"].tolist() for b in round_batches(examples, batch_size=4, steps=3, seed=1, pad_token_id=0)]
    again = [b["input_ids"].tolist() for b in round_batches(examples, batch_size=4, steps=3, seed=1, pad_token_id=0)]
    other = [b["input_ids"].tolist() for b in round_batches(examples, batch_size=4, steps=3, seed=2, pad_token_id=0)]
    assert first == again and first != other and len(first) == 3


def test_partitions_are_disjoint_and_cover_the_file(tmp_path):
    rows = [{"instruction": "x", "input": f"question {i}", "output": f"answer {i}"} for i in range(40)]
    path = tmp_path / "cards.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parts = [load_partition_rows("ignored", str(path), i, 4) for i in range(4)]
    seen = [r["instruction"] for part in parts for r in part]
    assert sorted(seen) == sorted(r["input"] for r in rows) and len(set(seen)) == 40
    assert parts[0][0].keys() == {"instruction", "response"}


def test_node_file_and_bad_inputs(tmp_path):
    path = tmp_path / "site.jsonl"
    path.write_text(json.dumps({"input": "q", "output": "a"}) + "\n" + json.dumps({"input": "", "output": "a"}) + "\n")
    assert load_partition_rows("x", "", 0, 20, node_data_path=str(path)) == [{"instruction": "q", "response": "a"}]
    with pytest.raises(DataError, match="partition-id 20 is outside 0..19"):
        load_partition_rows("tiny", "", 20, 20)
    with pytest.raises(DataError, match="missing.jsonl: not found"):
        load_partition_rows("x", str(tmp_path / "missing.jsonl"), 0, 2)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(DataError, match=r"wrong.jsonl: missing column\(s\) \['input', 'output'\]"):
        load_partition_rows("x", str(wrong), 0, 1)
    with pytest.raises(DataError, match="unsupported type '.csv'"):
        (tmp_path / "a.csv").write_text("x")
        load_partition_rows("x", str(tmp_path / "a.csv"), 0, 1)


def test_bad_rows_are_counted_or_named(tmp_path):
    path = tmp_path / "site.jsonl"
    rows = [{"input": "q0", "output": "a0"}, {"input": "q1"}, {"input": " ", "output": "a2"}, {"input": "q3", "output": None},
            {"input": "q4", "output": "a4"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept, skipped = load_partition("x", "", 0, 1, node_data_path=str(path))
    assert [r["instruction"] for r in kept] == ["q0", "q4"] and skipped == 3
    with pytest.raises(DataError, match=r"site.jsonl: row 1: 'output' is missing \(expected a non-empty string"):
        load_partition("x", "", 0, 1, node_data_path=str(path), on_bad_rows="fail")
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text(json.dumps({"input": 3, "output": "a"}) + "\n")
    with pytest.raises(DataError, match=r"row 0: 'input' is of type int \(expected"):
        load_partition("x", "", 0, 1, node_data_path=str(numbers), on_bad_rows="fail")


def test_node_config_must_agree_with_the_run():
    from app.config import load_settings
    from app.training.worker import NodeData

    settings = load_settings({"profile": "tiny", "dataset.num-partitions": 20})
    assert NodeData.from_node_config({"partition-id": 3, "num-partitions": 20}, settings) == NodeData(3, 20)
    with pytest.raises(ValueError, match="num-partitions=5 disagrees with the run's dataset.num-partitions=20"):
        NodeData.from_node_config({"partition-id": 3, "num-partitions": 5}, settings)
    with pytest.raises(ValueError, match="node config has no 'partition-id'"):
        NodeData.from_node_config({"num-partitions": 20}, settings)
