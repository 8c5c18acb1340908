"""Property-based fuzzing of what the report and training.png read: metrics.jsonl lines whose
fields (set by the ServerApp from what nodes reported) are missing, of the wrong type, extreme or
not finite, plus the run and evaluation summaries. Whatever they hold, the report and the plot
are written, and the page stays self-contained (issue 24 item 6)."""

from __future__ import annotations

import json
import math

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from report_fixture import make_run
from test_report import assert_self_contained

from app.results.charts import display_window
from app.results.metrics import plot_run, read_jsonl
from app.results.report import load_run, render_html, render_markdown

ROUND_KEYS = ("round", "status", "train_loss", "clients", "failed", "cumulative_mib", "bytes_round", "round_seconds",
              "aggregate_seconds", "t_start", "t_end", "comm_format", "norm_bound", "clipped")
CLIENT_KEYS = ("node_id", "partition_id", "train_loss", "num_examples", "t_sent", "t_received", "t_process_start",
               "t_handler_start", "t_train_start", "t_train_end", "t_reply", "gpu_mem_peak_bytes", "gpu_mem_mean_bytes",
               "gpu_util_mean", "gpu_samples", "update_norm", "update_scale")
FAILURE_KEYS = ("node_id", "node", "reason", "attempt")
SUMMARY_KEYS = ("rounds_aggregated", "stopped", "failure_reasons", "status")
EVAL_KEYS = ("accuracies", "average", "random_weights", "limit", "profile", "peft_path", "datasets")
DELETE = object()

EXTREME = st.sampled_from([1.7e308, -1.7e308, 1e100, 1.0000001e100, -1e100, 5e-324, -0.0, 0.0, 1e15, 2**63, 2**64,
                           2**64 + 1, -1, 10**400, 1_800_000_000.0])
VALUES = st.one_of(
    EXTREME,
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.text(max_size=12),
    st.sampled_from(["\ud800", "a|b\nc", "<script>", "x" * 5000]),
    st.none(), st.booleans(),
    st.lists(st.one_of(st.integers(), st.text(max_size=4)), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
MUTATION = st.one_of(
    st.tuples(st.just("round"), st.integers(0, 1), st.sampled_from(ROUND_KEYS), st.one_of(VALUES, st.just(DELETE))),
    st.tuples(st.just("client"), st.integers(0, 5), st.sampled_from(CLIENT_KEYS), st.one_of(VALUES, st.just(DELETE))),
    st.tuples(st.just("failure"), st.integers(0, 3), st.sampled_from(FAILURE_KEYS), st.one_of(VALUES, st.just(DELETE))),
    st.tuples(st.just("summary"), st.just(0), st.sampled_from(SUMMARY_KEYS), VALUES),
    st.tuples(st.just("eval"), st.just(0), st.sampled_from(EVAL_KEYS), VALUES),
)


def _set(target: dict, key: str, value) -> None:
    if value is DELETE:
        target.pop(key, None)
    else:
        target[key] = value


def mutate(run_dir, mutations) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in lines:  # what a bounded-update run records, for the fuzzer to break
        record.update(norm_bound=5.0, clipped=0, failed=[{"node_id": 7, "node": "supernode-7", "reason": "no reply", "attempt": 0}])
        for client in record["clients"]:
            client.update(update_norm=1.0, update_scale=1.0)
    summary = {"rounds_aggregated": 2, "stopped": None, "failure_reasons": []}
    evaluation = json.loads((run_dir / "eval" / "summary.json").read_text())
    for where, index, key, value in mutations:
        if where == "round":
            _set(lines[index % len(lines)], key, value)
            continue
        if where in ("summary", "eval"):
            _set(summary if where == "summary" else evaluation, key, value)
            continue
        record = lines[index % len(lines)]
        items = record.get("clients" if where == "client" else "failed")
        if isinstance(items, list) and items and isinstance(items[index % len(items)], dict):
            _set(items[index % len(items)], key, value)
    # json writes NaN and Infinity literals, and reads them back: a line may hold them
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "eval" / "summary.json").write_text(json.dumps(evaluation))
    return lines


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(MUTATION, min_size=1, max_size=6))
@example(mutations=[("client", 2, "train_loss", 1.7e308)])  # issue 24: plot_run and the report raised
@example(mutations=[("client", 1, "gpu_mem_peak_bytes", DELETE)])  # issue 24: KeyError in the report
@example(mutations=[("round", 0, "round", 2)])  # two lines of one round: one timeline each, ids unique
def test_no_metrics_line_breaks_the_report_or_the_plot(tmp_path_factory, mutations):
    run_dir = make_run(tmp_path_factory.mktemp("fuzz"))
    mutate(run_dir, mutations)
    data = load_run(run_dir)
    page = render_html(data)
    assert_self_contained(page)
    page.encode("utf-8")  # written as UTF-8: no lone surrogate survives
    render_markdown(data).encode("utf-8")
    # training.png from the aggregated rounds, as the ServerApp draws it
    records = read_jsonl(run_dir / "metrics.jsonl")
    plot_run([r for r in records if r.get("status", "aggregated") == "aggregated"], run_dir / "training.png")


@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=12),
       from_zero=st.booleans())
def test_the_axis_window_is_finite_ordered_and_holds_the_bulk(values, from_zero):
    low, high = display_window(values, from_zero)
    assert math.isfinite(low) and math.isfinite(high) and low < high
    assert abs(low) <= 2e101 and abs(high) <= 2e101  # matplotlib's arithmetic on it cannot overflow
    inside = [v for v in values if low <= v <= high]
    plottable = [v for v in values if abs(v) <= 1e100]
    assert len(inside) * 2 >= len(plottable)  # at least half of what can be drawn is drawn
