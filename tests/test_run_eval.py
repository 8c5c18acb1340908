"""Evaluation as part of a run: the final adapter, benchmarks spread over GPUs, merged summary,
the tiny profile's own benchmark files, and the export the model-cache service does."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from app.evaluation import benchmarks
from app.evaluation.benchmarks import BENCHMARKS, load_questions
from app.evaluation.run_eval import RunEvalError, eval_commands, final_adapter, merge_summaries, spread

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


def _run_dir(tmp_path: Path, model: str = "tiny") -> Path:
    run_dir = tmp_path / "run-7"
    for n in (5, 10):
        (run_dir / f"peft_{n}").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"profile": "p", "model.name": model, "model.quantization": 4}))
    return run_dir


def test_final_adapter_is_the_summarys_or_the_last_round(tmp_path):
    run_dir = _run_dir(tmp_path)
    assert final_adapter(run_dir) == run_dir / "peft_10"
    (run_dir / "summary.json").write_text(json.dumps({"final_adapter": "/results/run-7/peft_5"}))
    assert final_adapter(run_dir) == run_dir / "peft_5"  # written inside a container, read here
    with pytest.raises(RunEvalError, match="no adapter"):
        final_adapter(tmp_path)


def test_benchmarks_spread_over_gpus():
    names = list(BENCHMARKS)
    assert spread(names, []) == [(None, names)]
    assert spread(names, ["0", "1"]) == [("0", ["pubmedqa", "medqa"]), ("1", ["medmcqa", "careqa"])]
    assert spread(names, [str(g) for g in range(8)]) == [(str(i), [n]) for i, n in enumerate(names)]


def test_one_eval_process_per_gpu_with_the_runs_model_and_passthrough_flags(tmp_path):
    run_dir = _run_dir(tmp_path, model="ContactDoctor/Bio-Medical-Llama-3-8B")
    jobs = eval_commands(run_dir, exact=True, limit=50, data_dir=Path("/data"), gpus=["2", "3"])
    assert [env for env, _, _ in jobs] == [{"CUDA_VISIBLE_DEVICES": "2"}, {"CUDA_VISIBLE_DEVICES": "3"}]
    argv = jobs[0][1]
    assert argv[:4] == [sys.executable, "-m", "app.cli", "eval"]
    for flag, value in {"--base-model": "ContactDoctor/Bio-Medical-Llama-3-8B", "--peft-path": str(run_dir / "peft_10"),
                        "--quantization": "4", "--datasets": "pubmedqa,medqa", "--limit": "50", "--data-dir": "/data",
                        "--output-dir": str(run_dir / "eval" / "gpu-2")}.items():
        assert argv[argv.index(flag) + 1] == value
    assert "--exact" in argv
    fast = eval_commands(run_dir, exact=False, limit=None, data_dir=None, gpus=[])
    assert len(fast) == 1 and fast[0][2] == run_dir / "eval"
    assert not {"--exact", "--limit", "--data-dir"} & set(fast[0][1])  # the hub, the fast path


def test_the_tiny_profile_is_evaluated_on_its_own_benchmark_files(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "cache"))
    argv = eval_commands(_run_dir(tmp_path), exact=False, limit=None, data_dir=None, gpus=[])[0][1]
    data_dir = Path(argv[argv.index("--data-dir") + 1])
    for name in BENCHMARKS:
        questions = load_questions(name, data_dir)
        assert len(questions) == 12 and all(q.gold for q in questions)
    assert {q.gold for q in load_questions("pubmedqa", data_dir)} == {"yes", "no"}


def test_partial_summaries_merge_into_the_runs(tmp_path):
    run_dir = _run_dir(tmp_path)
    parts = []
    for gpu, names in (("0", ["pubmedqa", "medqa"]), ("1", ["medmcqa", "careqa"])):
        out = run_dir / "eval" / f"gpu-{gpu}"
        out.mkdir(parents=True)
        acc = {n: 0.1 * (i + 1) + (0.5 if gpu == "1" else 0) for i, n in enumerate(names)}
        (out / "summary.json").write_text(json.dumps({
            "accuracies": acc, "datasets": {n: {"accuracy": a} for n, a in acc.items()}, "mode": "fast", "batch_size": 16,
            "base_model": "tiny", "peft_path": "x", "quantization": 0, "date": "2026-11-29"}))
        parts.append(out)
    merged = merge_summaries(run_dir, parts, limit=None)
    assert merged["accuracies"] == pytest.approx({"pubmedqa": 0.1, "medqa": 0.2, "medmcqa": 0.6, "careqa": 0.7})
    assert merged["average"] == pytest.approx(0.4)
    assert merged["random_weights"] is True and merged["profile"] == "p"
    assert json.loads((run_dir / "eval" / "summary.json").read_text()) == merged


def test_export_writes_the_hub_rows_in_their_source_schema(tmp_path, monkeypatch):
    """The hub side (datasets.load_dataset) needs the internet; here its rows come from the fixtures."""
    rows = {b.hub_path: [json.loads(line) for line in (FIXTURES / f"{b.name}.jsonl").read_text().splitlines()]
            for b in BENCHMARKS.values()}
    monkeypatch.setattr(benchmarks, "_hub_rows", lambda benchmark: rows[benchmark.hub_path])
    paths = benchmarks.export_benchmarks(tmp_path / "eval")
    for name, path in paths.items():
        assert load_questions(name, path.parent) == load_questions(name, FIXTURES)
    assert not list((tmp_path / "eval").glob("*.partial"))
    monkeypatch.setattr(benchmarks, "_hub_rows", lambda benchmark: [{"question": "no options"}])
    benchmarks.export_benchmarks(tmp_path / "eval")  # files already there are kept, not fetched again


def test_a_local_model_marked_random_is_reported_as_such(tmp_path):
    from app.evaluation.run_eval import RANDOM_WEIGHTS_MARKER, has_random_weights

    assert has_random_weights("tiny") and not has_random_weights(str(tmp_path))
    (tmp_path / RANDOM_WEIGHTS_MARKER).write_text("")
    assert has_random_weights(str(tmp_path))
