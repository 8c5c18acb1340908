"""`fedtune eval` without a model: prompts, answer extraction, accuracy, data files and their errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from app.evaluation import runner
from app.evaluation.benchmarks import (
    INSTRUCTIONS,
    EvalDataError,
    format_multiple_choice,
    load_questions,
    parse_names,
)
from app.evaluation.extract import accuracy, extract_answer, is_correct
from app.evaluation.runner import Answer, chat_prompt, length_batches, reference_new_tokens, score, shared_prefix_length

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
MCQ_INSTRUCTION = (
    "You are a medical doctor answering realworld medical entrance exam questions. Based on your understanding "
    "of basic and clinical science, medical knowledge, and mechanisms underlying health, disease, patient care, "
    "and modes of therapy, answer the following multiple-choice question. Select one correct answer from A to D. "
    "Base your answer on the current and standard practices referenced in medical guidelines."
)


# --- prompts ---------------------------------------------------------------------------


def test_pubmedqa_prompt_joins_contexts_then_question():
    first = load_questions("pubmedqa", FIXTURES)[0]
    assert first.gold == "yes"
    assert first.prompt == (
        "As an expert doctor in clinical science and medical knowledge, can you tell me if the following "
        "statement is correct? Answer yes, no, or maybe.\n"
        "Adults with stage 1 hypertension were randomised to daily brisk walking or usual activity for twelve weeks.\n"
        "Resting systolic pressure fell by 6 mmHg in the walking group and did not change in controls.\n"
        "Does daily walking lower resting blood pressure in adults with stage 1 hypertension?\n"
        "The answer is:\n"
    )


def test_pubmedqa_question_is_not_given_a_question_mark():
    third = load_questions("pubmedqa", FIXTURES)[2]
    assert third.gold == "maybe"
    assert third.prompt.endswith("in older inpatients\nThe answer is:\n")


def test_medmcqa_prompt_and_zero_based_gold():
    questions = load_questions("medmcqa", FIXTURES)
    assert [q.gold for q in questions] == ["A", "C", "A", "B"]
    assert questions[1].prompt == (
        MCQ_INSTRUCTION + "\nQuestion: The recurrent laryngeal nerve is a branch of the?\n\nOptions:\n"
        "A. Glossopharyngeal nerve\nB. Hypoglossal nerve\nC. Vagus nerve\nD. Accessory nerve\nThe answer is:\n"
    )


def test_medqa_prompt_uses_its_own_instruction_and_gold_from_the_matching_option():
    questions = load_questions("medqa", FIXTURES)
    assert [q.gold for q in questions] == ["A", "B", "C", "D"]
    assert questions[3].prompt == (
        INSTRUCTIONS["medqa"] + "\nQuestion: A child has a barking cough and inspiratory stridor. Which virus is the "
        "usual cause.\n\nOptions:\nA. Adenovirus\nB. Rhinovirus\nC. Respiratory syncytial virus\n"
        "D. Parainfluenza virus\nThe answer is:\n"
    )
    assert "select one correct answer from A to E" in INSTRUCTIONS["medqa"]


def test_careqa_prompt_and_one_based_gold():
    questions = load_questions("careqa", FIXTURES)
    assert [q.gold for q in questions] == ["A", "A", "A", "C"]
    assert questions[1].prompt == (
        MCQ_INSTRUCTION + "\nQuestion: Which drug reverses heparin?\n\nOptions:\nA. Protamine sulfate\n"
        "B. Vitamin K\nC. Idarucizumab\nD. Andexanet alfa\nThe answer is:\n"
    )


@pytest.mark.parametrize(
    "question, shown",
    [("Is it?", "Is it?"), ("It is.", "It is."), ("It is", "It is?"), ("It is!", "It is!?"), ("", "?")],
)
def test_multiple_choice_question_mark(question, shown):
    assert format_multiple_choice(question, ["x", "y"]) == f"Question: {shown}\n\nOptions:\nA. x\nB. y"


def test_chat_template():
    assert chat_prompt("P\n") == "<|im_start|>question\nP\n<|im_end|>\n<|im_start|>answer\n"


def test_limit_keeps_the_first_rows():
    assert load_questions("medmcqa", FIXTURES, limit=2) == load_questions("medmcqa", FIXTURES)[:2]


def test_parse_names():
    assert parse_names("medqa, pubmedqa") == ["medqa", "pubmedqa"]
    with pytest.raises(EvalDataError, match="unknown dataset.*mmlu"):
        parse_names("pubmedqa,mmlu")


# --- answer extraction and accuracy ----------------------------------------------------


@pytest.mark.parametrize(
    "output, answer_type, pred",
    [
        ("A", "mcq", "a"),
        ("B.", "mcq", "b"),
        (" c) because", "mcq", "c"),
        ("(D)", "mcq", "d"),
        ("E", "mcq", "e"),
        ("Answer: C", "mcq", "a"),  # the first character of the cleaned text, as the reference reads it
        ("The answer", "mcq", "the answer"),  # 't' is not a choice: the whole generation is kept
        ("", "mcq", ""),
        ("\n## B\nmore", "mcq", "b"),  # only the line after "\n##" is read
        ("é", "mcq", "é"),
        ("yes", "boolean", "yes"),
        ("Yes, it does", "boolean", "yes, it does"),  # not in the set: the whole lower-cased generation
        ("No.", "boolean", "no"),
        ("yesyes", "boolean", "yes"),
        ("nono", "boolean", "no"),
        ("yes no", "boolean", "yes no"),
        ("yesno", "boolean", "yes"),
        ("noyes", "boolean", "no"),
        ("Maybe", "boolean", "maybe"),
        (" maybe", "boolean", " maybe"),  # "maybe" is no valid answer: the raw text is compared
        ("MAYBE.", "boolean", "maybe."),
        ("A", "boolean", "a"),
    ],
)
def test_extract_answer(output, answer_type, pred):
    assert extract_answer(output, answer_type) == pred


@pytest.mark.parametrize(
    "output, gold, answer_type, correct",
    [
        ("A", "A", "mcq", True),
        (" a.", "A", "mcq", True),
        ("B", "A", "mcq", False),
        ("Yes", "yes", "boolean", True),
        ("no", "yes", "boolean", False),
        ("maybe", "maybe", "boolean", True),
        ("Maybe", "maybe", "boolean", True),
        (" maybe", "maybe", "boolean", False),
        ("maybe.", "maybe", "boolean", False),
    ],
)
def test_is_correct(output, gold, answer_type, correct):
    assert is_correct(output, gold, answer_type) is correct


def test_accuracy_counts_correct_answers():
    assert accuracy(["A", "b", "C.", "x"], ["A", "B", "D", "A"], "mcq") == 0.5
    assert accuracy(["yes", "maybe", " maybe"], ["yes", "maybe", "maybe"], "boolean") == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        accuracy(["A"], ["A", "B"], "mcq")


def test_score_on_fixtures_with_known_answers():
    questions = load_questions("careqa", FIXTURES)  # golds A, A, A, C
    answers = [Answer(text, ()) for text in ("A", "B.", "a) ampulla", "C")]
    value, rows = score("mcq", questions, answers)
    assert value == 0.75
    assert [r["pred"] for r in rows] == ["a", "b", "a", "c"]
    assert [r["correct"] for r in rows] == [True, False, True, True]
    assert rows[0]["prompt"] == questions[0].prompt and rows[0]["gold"] == "A"


# --- generation plumbing that needs no model --------------------------------------------


class CharTokenizer:
    """One token per character."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}


def test_new_tokens_follow_the_first_gold_of_each_chunk():
    golds = ["yes", "no", "maybe", "no", "yes"]
    assert reference_new_tokens(golds, CharTokenizer(), 2) == [3, 3, 5, 5, 3]
    assert reference_new_tokens(golds, CharTokenizer(), 16) == [3] * 5
    assert reference_new_tokens(golds, CharTokenizer(), 1) == [3, 2, 5, 2, 3]


def test_repeated_prompt_takes_its_last_occurrence(monkeypatch):
    calls = []

    def fake(model, tokenizer, prompts, new_tokens, progress=None):
        calls.append(list(zip(prompts, new_tokens)))
        return [Answer(f"{p}/{n}", ()) for p, n in zip(prompts, new_tokens)]

    monkeypatch.setattr(runner, "generate_one_at_a_time", fake)
    answers = runner.generate_answers(None, None, ["p", "q", "p"], [1, 2, 3], exact=True)
    assert calls == [[("p", 3), ("q", 2)]]
    assert [a.output for a in answers] == ["p/3", "q/2", "p/3"]


def test_shared_prefix_length_leaves_every_sequence_a_token():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2
    assert shared_prefix_length([[7, 1], [8, 1]]) == 0


def test_length_batches_respect_the_token_budget():
    lengths = [5, 50, 20, 21, 3, 50, 7]
    batches = length_batches(lengths, batch_tokens=100, max_batch=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 3 and len(batch) * max(lengths[i] for i in batch) <= 100
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths, reverse=True)
    assert batches[0] == [1, 5]  # two 50-token rows fill the budget


# --- data files and their errors ---------------------------------------------------------


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _fixture_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["pubmedqa", "medmcqa", "medqa", "careqa"])
def test_parquet_reads_like_jsonl(tmp_path, name):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(_fixture_rows(name)), tmp_path / f"{name}.parquet")
    assert load_questions(name, tmp_path) == load_questions(name, FIXTURES)


def _bad(rows_or_text, name="medmcqa"):
    def make(tmp_path: Path) -> Path:
        path = tmp_path / f"{name}.jsonl"
        if isinstance(rows_or_text, str):
            path.write_text(rows_or_text)
        else:
            _write_jsonl(path, rows_or_text)
        return path

    return make


_MCQ = _fixture_rows("medmcqa")[0]
_MEDQA = _fixture_rows("medqa")[0]


@pytest.mark.parametrize(
    "name, make, expected",
    [
        ("medmcqa", _bad([_MCQ, "{not json"]), r"medmcqa\.jsonl: row 2: not valid JSON"),
        ("medmcqa", _bad([_MCQ, {k: v for k, v in _MCQ.items() if k != "opc"}]), r"medmcqa\.jsonl: row 2: field 'opc': missing"),
        ("medmcqa", _bad([dict(_MCQ, opb=None)]), r"medmcqa\.jsonl: row 1: field 'opb': expected a string, got null"),
        ("medmcqa", _bad([_MCQ, dict(_MCQ, cop=4)]), r"row 2: field 'cop': expected 0\.\.3, got 4"),
        ("medmcqa", _bad([dict(_MCQ, cop="1")]), r"row 1: field 'cop': expected an integer, got \"1\""),
        ("medmcqa", _bad([dict(_MCQ, cop=True)]), r"row 1: field 'cop': expected an integer"),
        ("medmcqa", _bad("[1, 2]\n"), r"medmcqa\.jsonl: row 1: expected an object"),
        ("medmcqa", _bad("\n\n"), r"medmcqa\.jsonl: no rows"),
        ("careqa", _bad([dict(_fixture_rows("careqa")[0], cop=0)], "careqa"), r"careqa\.jsonl: row 1: field 'cop': expected 1\.\.4, got 0"),
        ("medqa", _bad([_MEDQA, dict(_MEDQA, answer="Aspirin")], "medqa"), r"medqa\.jsonl: row 2: field 'answer': \"Aspirin\" is none of"),
        ("medqa", _bad([dict(_MEDQA, options={"A": "x"})], "medqa"), r"row 1: field 'options': expected a list of"),
        ("pubmedqa", _bad([dict(_fixture_rows("pubmedqa")[0], CONTEXTS="one")], "pubmedqa"),
         r"pubmedqa\.jsonl: row 1: field 'CONTEXTS': expected a list of strings"),
        ("pubmedqa", _bad([dict(_fixture_rows("pubmedqa")[0], final_decision="perhaps")], "pubmedqa"),
         r"row 1: field 'final_decision': expected yes, no or maybe, got 'perhaps'"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, name, make, expected):
    make(tmp_path)
    with pytest.raises(EvalDataError, match=expected) as info:
        load_questions(name, tmp_path)
    assert str(tmp_path) in str(info.value)


def test_bad_parquet_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "careqa.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(EvalDataError, match=r"careqa\.parquet: not a readable parquet file"):
        load_questions("careqa", tmp_path)
    rows = _fixture_rows("careqa")
    rows[2]["op3"] = None
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "careqa.parquet")
    with pytest.raises(EvalDataError, match=r"careqa\.parquet: row 3: field 'op3': expected a string, got null"):
        load_questions("careqa", tmp_path)


def test_missing_and_ambiguous_files(tmp_path):
    with pytest.raises(EvalDataError, match=r"medqa\.jsonl: no such file \(nor medqa\.parquet\)"):
        load_questions("medqa", tmp_path)
    shutil.copy(FIXTURES / "medqa.jsonl", tmp_path / "medqa.jsonl")
    (tmp_path / "medqa.parquet").write_bytes(b"")
    with pytest.raises(EvalDataError, match="both exist"):
        load_questions("medqa", tmp_path)


def test_cli_reports_a_bad_file_before_loading_any_model(tmp_path, capsys, monkeypatch):
    from app.cli import main
    from app.evaluation import cli

    monkeypatch.setattr(cli, "load_model", lambda *a: pytest.fail("model loaded despite a bad file"))
    for name in ("pubmedqa", "medmcqa", "medqa"):
        shutil.copy(FIXTURES / f"{name}.jsonl", tmp_path)
    rows = _fixture_rows("careqa")
    del rows[1]["op2"]
    _write_jsonl(tmp_path / "careqa.jsonl", rows)
    code = main(["eval", "--base-model", "tiny", "--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "out")])
    assert code == 2
    assert f"{tmp_path / 'careqa.jsonl'}: row 2: field 'op2': missing" in capsys.readouterr().err


@pytest.mark.parametrize("flags, expected", [
    ([], dict(half_blocks=False, recheck_margin=0.0, recheck_batched=False)),
    (["--half-blocks", "--recheck-margin", "0.005", "--recheck-batched"],
     dict(half_blocks=True, recheck_margin=0.005, recheck_batched=True)),
])
def test_cli_fast_path_flags_reach_the_options(tmp_path, monkeypatch, flags, expected):
    import torch

    from app.cli import main
    from app.evaluation import cli

    seen = {}

    def evaluate(model, tokenizer, question_sets, *, options, **kwargs):
        seen["options"] = options
        return {"average": 0.0}

    monkeypatch.setattr(cli, "load_model", lambda *a: (None, None))
    monkeypatch.setattr(cli, "evaluate", evaluate)
    shutil.copy(FIXTURES / "medqa.jsonl", tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["eval", "--base-model", "tiny", "--datasets", "medqa", "--data-dir", str(tmp_path),
                 "--output-dir", str(out), *flags]) == 0
    options = seen["options"]
    assert {key: getattr(options, key) for key in expected} == expected
    assert options.compute_dtype == torch.float16 and options.sdpa_backends == ("flash", "efficient", "math")
    assert not runner.FastOptions().half_blocks  # the library default is the CLI's (BENCHMARKS.md, issue 5)
