"""`fedtune report`: the table, the per-node timeline with clock alignment, GPU per site, the files."""

from __future__ import annotations

import json
import re

import pytest
from report_fixture import ACCURACIES, DELIVERY, NODE_CLOCK_OFFSETS, UPLOAD, make_run

from app.cli import main
from app.results.report import clock_offsets, gpu_by_site, load_run, render_html, render_markdown, results_table, round_timeline


def test_table_has_this_run_next_to_the_seed_and_the_leaderboard(tmp_path):
    rows = results_table(load_run(make_run(tmp_path)))
    this, seed, best = rows
    assert this["accuracies"] == ACCURACIES
    assert this["average"] == pytest.approx(0.3125)
    assert this["communication_mb"] == pytest.approx(48.0)
    assert this["label"] == "this run (tiny model, random weights)"
    assert seed["accuracies"] == {"pubmedqa": 0.6960, "medmcqa": 0.5912, "medqa": 0.6394, "careqa": 0.5318}
    assert seed["average"] == pytest.approx(0.6146, abs=5e-5) and seed["communication_mb"] == 3000.96
    assert best["accuracies"] == {"pubmedqa": 0.7040, "medmcqa": 0.6093, "medqa": 0.6582, "careqa": 0.5536}


def test_the_8b_shaped_random_model_is_not_called_tiny(tmp_path):
    run_dir = make_run(tmp_path)
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    (run_dir / "eval" / "summary.json").write_text(json.dumps(dict(summary, profile="bio-medical-llama3-8b")))
    (run_dir / "config.json").write_text(json.dumps({"profile": "bio-medical-llama3-8b"}))
    assert results_table(load_run(run_dir))[0]["label"] == "this run (random weights)"


def test_markdown_holds_all_four_accuracies_profile_and_model(tmp_path):
    text = render_markdown(load_run(make_run(tmp_path)))
    row = next(line for line in text.splitlines() if line.startswith("| this run"))
    assert [float(x) for x in re.findall(r"\d\.\d{4}", row)[:5]] == [0.25, 0.5, 0.125, 0.375, 0.3125]
    assert "| 48.00 |" in row
    assert "- profile: tiny" in text and "- model: tiny" in text and "- random weights: yes" in text


def test_clock_offsets_are_recovered_within_the_stated_bound(tmp_path):
    offsets = clock_offsets(load_run(make_run(tmp_path)).rounds)
    assert set(offsets) == set(NODE_CLOCK_OFFSETS)
    for node, true_offset in NODE_CLOCK_OFFSETS.items():
        estimate = offsets[node]
        assert estimate.bound == pytest.approx((DELIVERY + UPLOAD) / 2, abs=1e-5)  # epoch seconds: 2e-7 s resolution
        assert estimate.offset == pytest.approx(true_offset + (DELIVERY - UPLOAD) / 2, abs=1e-5)
        assert abs(estimate.offset - true_offset) <= estimate.bound


def test_timeline_puts_every_node_event_between_send_and_receive_on_the_server_clock(tmp_path):
    data = load_run(make_run(tmp_path))
    length, rows, aggregation = round_timeline(data.rounds[0], clock_offsets(data.rounds))
    assert len(rows) == 3
    for _, events in rows:
        order = ["t_start", "t_sent", "t_process_start", "t_handler_start", "t_train_start", "t_train_end", "t_reply", "t_received"]
        assert [events[k] for k in order] == sorted(events[k] for k in order)
        assert events["t_received"] <= aggregation[0] < aggregation[1] <= length
    # The node 5 s ahead of the server still trains inside its round on the server's axis.
    assert rows[0][1]["t_train_start"] < 1.5


def test_gpu_use_per_site(tmp_path):
    gpus = gpu_by_site(load_run(make_run(tmp_path)).rounds)
    assert list(gpus) == ["site 0", "site 1", "site 2"]
    assert gpus["site 2"]["peak_bytes"] == 12 * 2**30 and gpus["site 2"]["util_mean"] == 90.0
    assert gpus["site 0"]["samples"] == 40


def test_html_is_self_contained_and_forbids_requests(tmp_path):
    page = render_html(load_run(make_run(tmp_path)))
    assert "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'" in page
    # nothing that could load: no src/href, no CSS url() or @import, no script
    assert not re.search(r"\b(src|href)\s*=|url\(|@import|<script|<link", page, re.IGNORECASE)
    assert set(re.findall(r"https?://[^\"'\s<>]+", page)) <= {"http://www.w3.org/2000/svg"}
    charts = re.findall(r'data-chart="([\w-]+)"', page)
    assert charts == ["loss", "communication", "timeline-1", "timeline-2", "gpu"]


def test_a_run_without_evaluation_timestamps_or_gpu_still_gets_a_report(tmp_path):
    run_dir = make_run(tmp_path, with_eval=False)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in lines:  # a run from before the timing and GPU metrics existed
        for key in ("t_start", "t_end", "aggregate_seconds", "comm_format"):
            record.pop(key)
        record["clients"] = [{k: v for k, v in c.items() if not k.startswith(("t_", "gpu_"))} for c in record["clients"]]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    data = load_run(run_dir)
    page, text = render_html(data), render_markdown(data)
    assert re.findall(r'data-chart="([\w-]+)"', page) == ["loss", "communication"]
    assert "no per-message timestamps" in page and "No GPU samples" in page
    assert "| this run (tiny model) | n/a | n/a | n/a | n/a | n/a | 48.00 |" in text
    assert "evaluation: not run" in text


def test_cli_writes_both_files_atomically_and_finds_the_latest_run(tmp_path, capsys):
    run_dir = make_run(tmp_path)
    (run_dir / "summary.json").write_text("{}")
    assert main(["report", "--latest", str(tmp_path)]) == 0
    assert "0.3125" in capsys.readouterr().out
    assert (run_dir / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert "| this run" in (run_dir / "report.md").read_text()
    assert not list(run_dir.glob("*.tmp"))
    assert main(["report", str(tmp_path / "missing")]) == 2
