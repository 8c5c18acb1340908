"""Evaluation as part of a run: `fedtune eval` on the run's final adapter, then the report.

`fedtune local up` calls `evaluate_run` after the last round; the stack's one-shot `evaluate`
service runs `fedtune eval-run --latest /results`. The base model, its quantization and the
profile come from the run's config.json. With several GPUs the four benchmarks are spread over
them, one `fedtune eval` process per GPU (benchmark i on GPU i mod G); their accuracies are
merged into `<run>/eval/summary.json`, which the report reads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from app.evaluation.cli import DEFAULT_DATASETS
from app.results.metrics import write_json_atomic

EVAL_DIR = "eval"


class RunEvalError(RuntimeError):
    """The run cannot be evaluated (no adapter, no config) or an evaluation process failed."""


def final_adapter(run_dir: Path) -> Path:
    """The last round's checkpoint: summary.json's final_adapter, else the highest peft_N."""
    summary = run_dir / "summary.json"
    if summary.is_file() and (named := json.loads(summary.read_text()).get("final_adapter")):
        if Path(named).is_dir():
            return Path(named)
        named_here = run_dir / Path(named).name  # the stack wrote /results/...; we may see it elsewhere
        if named_here.is_dir():
            return named_here
    checkpoints = [(int(p.name.split("_", 1)[1]), p) for p in run_dir.glob("peft_*") if p.name.split("_", 1)[1].isdigit()]
    if not checkpoints:
        raise RunEvalError(f"{run_dir}: no adapter checkpoint (peft_N) to evaluate")
    return max(checkpoints)[1]


def spread(names: list[str], gpus: list[str]) -> list[tuple[str | None, list[str]]]:
    """(GPU or None, benchmarks): benchmark i on GPU i mod G; one group without GPUs."""
    if not gpus:
        return [(None, names)]
    groups: dict[str, list[str]] = {}
    for i, name in enumerate(names):
        groups.setdefault(gpus[i % len(gpus)], []).append(name)
    return list(groups.items())


def eval_commands(run_dir: Path, *, exact: bool, limit: int | None, data_dir: Path | None,
                  gpus: list[str]) -> list[tuple[dict[str, str], list[str], Path]]:
    """(environment overrides, argv, output dir) for each `fedtune eval` process."""
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise RunEvalError(f"{config_path}: no such file (is {run_dir} a run directory?)")
    config = json.loads(config_path.read_text())
    base_model = config["model.name"]
    if data_dir is None and base_model == "tiny":
        from app.training.tiny import tiny_eval_dir

        data_dir = tiny_eval_dir()  # the tiny profile's own small benchmark files
    adapter = final_adapter(run_dir)
    jobs = []
    groups = spread(DEFAULT_DATASETS.split(","), gpus)
    for gpu, names in groups:
        output = run_dir / EVAL_DIR / (f"gpu-{gpu}" if len(groups) > 1 else "")
        argv = [sys.executable, "-m", "app.cli", "eval", "--base-model", base_model, "--peft-path", str(adapter),
                "--quantization", str(config.get("model.quantization", 4)), "--datasets", ",".join(names),
                "--output-dir", str(output), "--run-name", run_dir.name]
        argv += ["--exact"] if exact else []
        argv += ["--limit", str(limit)] if limit else []
        argv += ["--data-dir", str(data_dir)] if data_dir else []
        jobs.append(({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}, argv, output))
    return jobs


def merge_summaries(run_dir: Path, outputs: list[Path], limit: int | None) -> dict:
    """One summary for the run: every benchmark's accuracy and what the report labels them with."""
    config = json.loads((run_dir / "config.json").read_text())
    parts = [json.loads((output / "summary.json").read_text()) for output in outputs]
    accuracies = {name: acc for part in parts for name, acc in part["accuracies"].items()}
    merged = {
        "accuracies": accuracies,
        "average": statistics.fmean(accuracies.values()),
        "datasets": {name: entry for part in parts for name, entry in part["datasets"].items()},
        "mode": parts[0]["mode"], "limit": limit, "batch_size": parts[0]["batch_size"],
        "base_model": parts[0]["base_model"], "peft_path": parts[0]["peft_path"], "quantization": parts[0]["quantization"],
        "profile": config.get("profile"), "random_weights": has_random_weights(config["model.name"]),
        "date": parts[0]["date"],
    }
    write_json_atomic(run_dir / EVAL_DIR / "summary.json", merged)
    return merged


# A local model directory with this file holds random weights (the benchmarks' 8B-shaped model).
RANDOM_WEIGHTS_MARKER = "fedtune-random-weights"


def has_random_weights(model_name: str) -> bool:
    return model_name == "tiny" or (Path(model_name) / RANDOM_WEIGHTS_MARKER).is_file()


def evaluate_run(run_dir: Path, *, exact: bool = False, limit: int | None = None, data_dir: Path | None = None,
                 gpus: list[str] | None = None, out=None) -> dict:
    """Evaluate the run's final adapter on the four benchmarks; returns the merged summary."""
    out = out or sys.stdout
    jobs = eval_commands(run_dir, exact=exact, limit=limit, data_dir=data_dir, gpus=gpus or [])
    how = ["exact path" if exact else "fast path"]
    how += [f"first {limit} questions of each benchmark"] if limit else []
    how += [f"benchmarks spread over GPUs {','.join(gpus)}"] if gpus else []
    print(f"evaluating {final_adapter(run_dir)} ({', '.join(how)})", file=out, flush=True)
    processes = [subprocess.Popen(argv, env={**os.environ, **env}) for env, argv, _ in jobs]
    try:
        codes = [p.wait() for p in processes]
    except BaseException:  # Ctrl-C or SIGTERM of the launcher: leave no evaluation behind
        for p in processes:
            p.terminate()
        for p in processes:
            p.wait()
        raise
    if any(codes):
        raise RunEvalError(f"fedtune eval failed (exit codes {codes}); its output is above")
    return merge_summaries(run_dir, [output for _, _, output in jobs], limit)


def evaluate_and_report(run_dir: Path, *, exact: bool, limit: int | None, data_dir: Path | None,
                        gpus: list[str], out=None) -> int:
    """What a run ends with: the evaluation, then report.html and report.md. 0 when both exist."""
    from app.results.report import write_report

    out = out or sys.stdout
    try:
        summary = evaluate_run(run_dir, exact=exact, limit=limit, data_dir=data_dir, gpus=gpus, out=out)
    except RunEvalError as exc:
        print(f"fedtune: {exc}", file=sys.stderr)
        write_report(run_dir)  # the training part of the report still
        return 1
    html_path, md_path = write_report(run_dir)
    accuracies = "  ".join(f"{name} {acc:.4f}" for name, acc in summary["accuracies"].items())
    print(f"accuracy: {accuracies}  average {summary['average']:.4f}\nreport: {html_path}\nreport: {md_path}",
          file=out, flush=True)
    return 0


def run_failure(run_dir: Path, status: str) -> str | None:
    """Why the run trained nothing worth evaluating, or None: the SuperLink's status, the
    ServerApp's summary.json (`stopped`, no aggregated round), or no summary at all."""
    summary_path = run_dir / "summary.json"
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError) as exc:
        return f"the run ended {status} without a readable {summary_path} ({exc})"
    if not isinstance(summary, dict):
        return f"{summary_path}: expected a JSON object"
    if summary.get("stopped"):
        return f"the run stopped: {summary['stopped']}"
    if status != "finished:completed":
        return f"the run ended {status}"
    if not summary.get("rounds_aggregated"):
        return "no round aggregated: the adapter is the untrained initial one"
    return None


# flwr's form of an exception raised in a ClientApp: `error 2: <class 'pkg.Name'>:<'message'>`
_FLWR_ERROR = re.compile(r"error \d+: <class '(?:[\w.]*\.)?(\w+)'>:<'(.*)'>", re.DOTALL)


def readable_reason(reason: str) -> str:
    """A node failure reason as a person reads it: `Name: message` for flwr's exception form."""
    match = _FLWR_ERROR.fullmatch(reason.strip())
    return f"{match[1]}: {match[2]}" if match else reason


def failures_by_reason(records: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Each distinct node failure reason of these metrics.jsonl records -> the nodes it hit, in order."""
    reasons: dict[str, list[str]] = {}
    for record in records:
        failed = record.get("failed")
        for entry in failed if isinstance(failed, list) else []:
            if isinstance(entry, dict) and entry.get("reason"):
                nodes = reasons.setdefault(readable_reason(str(entry["reason"])), [])
                if (node := str(entry.get("node", entry.get("node_id", "?")))) not in nodes:
                    nodes.append(node)
    return reasons


def failure_reasons(run_dir: Path) -> list[str]:
    """Each distinct node failure reason of the run (summary.json's failure_reasons when it has
    them, else metrics.jsonl's failed entries), with the nodes it hit."""
    from app.results.metrics import read_jsonl

    summary_path, metrics = run_dir / "summary.json", run_dir / "metrics.jsonl"
    with contextlib.suppress(OSError, ValueError, AttributeError):
        listed = json.loads(summary_path.read_text()).get("failure_reasons")
        if isinstance(listed, list) and listed and all(isinstance(r, str) for r in listed):
            return listed
    by_reason = failures_by_reason(read_jsonl(metrics)) if metrics.is_file() else {}
    return [f"{', '.join(nodes[:3])}{f' and {len(nodes) - 3} more' if len(nodes) > 3 else ''}: {reason}"
            for reason, nodes in by_reason.items()]


def finish_run(run_dir: Path, args, gpus: list[str], status: str = "finished:completed", out=None) -> int:
    """`fedtune local up` after its last round: evaluate and report, or (--no-eval) report only.
    A run that failed or trained nothing exits 1 with the reasons; its adapter is not evaluated."""
    from app.results.report import write_report

    out = out or sys.stdout
    if (failed := run_failure(run_dir, status)) is not None:
        print(f"fedtune: {failed}", file=sys.stderr, flush=True)
        for reason in failure_reasons(run_dir):
            print(f"  {reason}", file=sys.stderr, flush=True)
        print("evaluation skipped: nothing trained to evaluate", file=out, flush=True)
        if (run_dir / "summary.json").is_file():  # the training part of the report, for the record
            try:
                for path in write_report(run_dir):
                    print(f"report: {path}", file=out, flush=True)
            except Exception as exc:  # noqa: BLE001 - the run's failure above is what matters
                print(f"report not written: {type(exc).__name__}: {exc}", file=out, flush=True)
        return 1
    if args.no_eval:
        for path in write_report(run_dir):
            print(f"report: {path}", file=out, flush=True)
        return 0
    return evaluate_and_report(run_dir, exact=args.exact, limit=args.limit, data_dir=args.data_dir, gpus=gpus, out=out)


def cmd_eval_run(args) -> int:
    from app.results.report import latest_run

    try:
        run_dir = latest_run(Path(args.path)) if args.latest else Path(args.path)
    except FileNotFoundError as exc:
        print(f"fedtune: {exc}", file=sys.stderr)
        return 2
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else []
    return evaluate_and_report(run_dir, exact=args.exact, limit=args.limit, data_dir=args.data_dir, gpus=gpus)


def add_eval_options(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """--exact, --limit and --data-dir, as `fedtune eval` takes them (`prefix`: for `local up`)."""
    from app.evaluation.cli import _positive_int

    parser.add_argument(f"--{prefix}exact", action="store_true", dest="exact",
                        help="evaluate with the reference loop (slow, the leaderboard's numerics) instead of the fast path")
    parser.add_argument(f"--{prefix}limit", type=_positive_int, dest="limit", help="only the first N questions of each benchmark")
    parser.add_argument("--benchmarks-dir", f"--{prefix}data-dir", type=Path, dest="data_dir", metavar="DIR",
                        help="benchmark files (<dataset>.jsonl/.parquet, source schema) instead of the hub's")


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval-run", help="evaluate a run's final adapter on the four benchmarks, then write its report",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a run directory, or with --latest a results directory")
    parser.add_argument("--latest", action="store_true", help="the run in PATH whose summary.json is newest")
    parser.add_argument("--gpus", default=os.environ.get("FEDTUNE_EVAL_GPUS", ""),
                        help="comma-separated GPU ids to spread the benchmarks over (default FEDTUNE_EVAL_GPUS)")
    add_eval_options(parser)
    parser.set_defaults(func=cmd_eval_run)
