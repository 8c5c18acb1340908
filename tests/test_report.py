"""`fedtune report`: the table, the per-node timeline with clock alignment, GPU per site, bounded
updates, what the evaluation could not parse, a failed run said first, the files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from report_fixture import ACCURACIES, DELIVERY, NODE_CLOCK_OFFSETS, UPLOAD, make_run

from app.cli import main
from app.results.metrics import plot_run, read_jsonl
from app.results.report import (
    NODE_START_RESOLUTION, clock_offsets, gpu_by_site, load_run, render_html, render_markdown, results_table,
    round_timeline, unparsed_answers,
)


def rewrite_metrics(run_dir: Path, change) -> None:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in lines:
        change(record)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def chart_names(page: str) -> list[str]:
    return re.findall(r'<svg class="chart" data-chart="([\w-]+)"', page)


def test_table_has_this_run_next_to_the_seed_and_the_leaderboard(tmp_path):
    rows = results_table(load_run(make_run(tmp_path)))
    this, seed, best_bio, best = rows
    assert this["accuracies"] == ACCURACIES
    assert this["average"] == pytest.approx(0.3125)
    assert this["communication_mib"] == pytest.approx(48.0)
    assert this["label"] == "this run (tiny model, random weights)"
    assert seed["accuracies"] == {"pubmedqa": 0.6960, "medmcqa": 0.5912, "medqa": 0.6394, "careqa": 0.5318}
    assert seed["average"] == pytest.approx(0.6146, abs=5e-5) and seed["communication_mib"] == 3000.96
    assert best_bio["accuracies"] == {"pubmedqa": 0.7040, "medmcqa": 0.6093, "medqa": 0.6582, "careqa": 0.5536}
    # The medical leaderboard's best entry overall (issue 24): 63.57 average at 2.0 GB.
    assert best["label"] == "leaderboard best overall, Llama3.1-Aloe-Beta-8B"
    assert round(best["average"] * 100, 2) == 63.57 and best["communication_mib"] == 2000


def test_the_8b_shaped_random_model_is_not_called_tiny(tmp_path):
    run_dir = make_run(tmp_path)
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    (run_dir / "eval" / "summary.json").write_text(json.dumps(dict(summary, profile="bio-medical-llama3-8b")))
    (run_dir / "config.json").write_text(json.dumps({"profile": "bio-medical-llama3-8b"}))
    assert results_table(load_run(run_dir))[0]["label"] == "this run (random weights)"


@pytest.mark.parametrize(("dataset", "path", "label"), [
    ("medalpaca/medical_meadow_medical_flashcards", "", "this run (random weights)"),
    ("medalpaca/medical_meadow_wikidoc", "", "this run (random weights, not the leaderboard's dataset)"),
    ("medalpaca/medical_meadow_medical_flashcards", "/data/own.jsonl", "this run (random weights, not the leaderboard's dataset)"),
])
def test_a_run_off_the_leaderboards_static_dataset_says_so(tmp_path, dataset, path, label):
    run_dir = make_run(tmp_path)
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    (run_dir / "eval" / "summary.json").write_text(json.dumps(dict(summary, profile="bio-medical-llama3-8b")))
    config = {"profile": "bio-medical-llama3-8b", "dataset.name": dataset, "dataset.path": path,
              "static.dataset.name": "medalpaca/medical_meadow_medical_flashcards"}
    (run_dir / "config.json").write_text(json.dumps(config))
    assert results_table(load_run(run_dir))[0]["label"] == label


def test_markdown_holds_all_four_accuracies_profile_and_model(tmp_path):
    text = render_markdown(load_run(make_run(tmp_path)))
    row = next(line for line in text.splitlines() if line.startswith("| this run"))
    assert [float(x) for x in re.findall(r"\d\.\d{4}", row)[:5]] == [0.25, 0.5, 0.125, 0.375, 0.3125]
    assert "| 48.00 |" in row
    assert "- profile: tiny" in text and "- model: tiny" in text and "- random weights: yes" in text
    assert "Llama3.1-Aloe-Beta-8B | 0.7480 | 0.5539 | 0.5931 | 0.6479 | 0.6357 | 2000.00 |" in text


def test_one_unit_name_for_communication(tmp_path):
    """The console says MiB; so does the report, for the same figure (issue 25)."""
    run_dir = make_run(tmp_path)
    for page in (render_html(load_run(run_dir)), render_markdown(load_run(run_dir))):
        assert "communication (MiB)" in page and "MiB this round" in page or "MiB (down + up)" in page
        # "MB" only where the report says what FlowerTune calls the unit
        assert len(re.findall(r"\bMB\b", page)) == 1 and "FlowerTune calls this unit MB" in page


def test_clock_offsets_are_recovered_within_the_stated_bound(tmp_path):
    offsets = clock_offsets(load_run(make_run(tmp_path)).rounds)
    assert set(offsets) == set(NODE_CLOCK_OFFSETS)
    for node, true_offset in NODE_CLOCK_OFFSETS.items():
        estimate = offsets[node]
        # epoch seconds: 2e-7 s resolution
        assert estimate.bound == pytest.approx((DELIVERY + UPLOAD) / 2 + NODE_START_RESOLUTION, abs=1e-5)
        assert estimate.offset == pytest.approx(true_offset + (DELIVERY - UPLOAD) / 2, abs=1e-5)
        assert abs(estimate.offset - true_offset) <= estimate.bound


def test_sites_are_named_as_sites_everywhere_never_by_node_id(tmp_path):
    """The clock table named nodes by their 19-digit ids where everything else said "site 9" (issue 25)."""
    data = load_run(make_run(tmp_path))
    page, text = render_html(data), render_markdown(data)
    for node in NODE_CLOCK_OFFSETS:
        assert str(node) not in page and str(node) not in text
    clock_rows = [line for line in text.split("| site | offset")[1].splitlines()[2:5]]
    assert [row.split(" | ")[0] for row in clock_rows] == ["| site 0", "| site 1", "| site 2"]
    assert "<td>site 2</td><td>-2.950</td>" in page
    assert "site 0: 2.0000, site 1: 2.1000, site 2: 2.2000" in text  # the rounds table


def test_the_loss_chart_has_a_legend_entry_per_site(tmp_path):
    page = render_html(load_run(make_run(tmp_path)))
    loss = page.split('data-chart="loss"')[1].split("</svg>")[0]
    legend_texts = re.findall(r"<text[^>]*>([^<]+)</text>", loss)
    for label in ("site 0", "site 1", "site 2", "aggregate (weighted by examples)"):
        assert label in legend_texts
    assert len(re.findall(r'class="mark"><title>site \d: ', loss)) == 3  # one series (with its tooltip) per site


def test_timeline_puts_every_node_event_between_send_and_receive_on_the_server_clock(tmp_path):
    data = load_run(make_run(tmp_path))
    length, rows, aggregation = round_timeline(data.rounds[0], clock_offsets(data.rounds))
    assert [label for label, _ in rows] == ["site 0", "site 1", "site 2"]
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


def assert_self_contained(page: str) -> None:
    """Nothing in the page can load anything: no script, no source, no stylesheet link or import;
    the SVG's own references (matplotlib's markers, clip paths) all point inside the page, and
    every id they point at is there once."""
    assert "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'" in page
    assert not re.search(r"<script|<link|<iframe|<object|<embed|<image|<img|@import|\bsrc\s*=", page, re.IGNORECASE)
    references = re.findall(r"\bhref\s*=\s*[\"']([^\"']*)", page, re.IGNORECASE)
    urls = re.findall(r"url\(\s*['\"]?([^)'\"]*)", page, re.IGNORECASE)
    assert all(target.startswith("#") for target in references + urls), sorted({*references, *urls} - {""})
    assert set(re.findall(r"https?://[^\"'\s<>]+", page)) <= {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids)), "an id used twice: one chart would draw another's markers"
    assert {target[1:] for target in references + urls} <= set(ids)


def test_html_is_self_contained_and_forbids_requests(tmp_path):
    page = render_html(load_run(make_run(tmp_path)))
    assert_self_contained(page)
    assert chart_names(page) == ["loss", "communication", "timeline-1", "timeline-2", "gpu"]


def test_a_run_without_evaluation_timestamps_gpu_or_norms_still_gets_a_report(tmp_path):
    run_dir = make_run(tmp_path, with_eval=False)

    def old_format(record):  # a run from before the timing, GPU and norm metrics existed
        for key in ("t_start", "t_end", "aggregate_seconds", "comm_format", "status", "failed"):
            record.pop(key)
        record["clients"] = [{k: v for k, v in c.items() if not k.startswith(("t_", "gpu_"))} for c in record["clients"]]

    rewrite_metrics(run_dir, old_format)
    data = load_run(run_dir)
    page, text = render_html(data), render_markdown(data)
    assert chart_names(page) == ["loss", "communication"]
    assert "no per-message timestamps" in page and "No GPU samples" in page and "No update norms recorded" in page
    assert "| this run (tiny model) | n/a | n/a | n/a | n/a | n/a | 48.00 |" in text
    assert "evaluation: not run" in text and "Warning" not in text


# ------------------------------------------------------------------ what a node sent (issue 24 item 6)


def test_an_extreme_but_finite_loss_breaks_neither_the_plot_nor_the_report(tmp_path):
    """train-loss=1.7e308 passes the ServerApp's checks; plot_run raised (OverflowError in
    matplotlib's axis arithmetic) and so did `fedtune report` (its own tick code)."""
    run_dir = make_run(tmp_path)

    def extreme(record):
        record["clients"][2]["train_loss"] = 1.7e308
        record["train_loss"] = 1.7e308 / 3

    rewrite_metrics(run_dir, extreme)
    plot_run(read_jsonl(run_dir / "metrics.jsonl"), run_dir / "training.png")
    assert (run_dir / "training.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report.html").read_text()
    assert_self_contained(page)
    assert "Off scale, drawn on the chart's edge: site 2, round 1: 1.7e+308" in page
    assert "site 2: 1.7e+308" in (run_dir / "report.md").read_text()  # the table keeps the value


def test_gpu_samples_without_the_memory_figures_is_shown_as_missing(tmp_path):
    """A node sending gpu-samples without gpu-mem-peak-bytes made the report raise KeyError."""
    run_dir = make_run(tmp_path)

    def partial(record):
        for key in ("gpu_mem_peak_bytes", "gpu_mem_mean_bytes"):
            del record["clients"][1][key]
        record["clients"][0]["gpu_util_mean"] = "busy"

    rewrite_metrics(run_dir, partial)
    assert main(["report", str(run_dir)]) == 0
    text = (run_dir / "report.md").read_text()
    assert "| site 1 | n/a | n/a | 60.0 | 2 | 40 |" in text and "| site 0 | 10.00 | 8.00 | n/a | 2 | 40 |" in text


# ------------------------------------------------------------------ bounded updates (issue 24 item 3)


def bounded(record):
    """What the ServerApp records with strategy.update-norm-bound: round 2 clips site 2 and refuses a fourth node."""
    record["norm_bound"] = 5.0
    for i, client in enumerate(record["clients"]):
        client["update_norm"], client["update_scale"] = 1.0 + i, 1.0
    if record["round"] == 2:
        record["clients"][2].update(update_norm=5000.0, update_scale=5.0 / 5000.0)
        record["clipped"] = 1
        record["failed"] = [{"node_id": 99, "node": "supernode-9", "attempt": 0,
                             "reason": "refused: update refused: block scale 2.6e+36 out of range"}]
    else:
        record["clipped"] = 0


def test_clipped_and_refused_updates_are_shown_per_round(tmp_path):
    run_dir = make_run(tmp_path)
    rewrite_metrics(run_dir, bounded)
    data = load_run(run_dir)
    text, page = render_markdown(data), render_html(data)
    assert "| 1 | 5.000 | 3 | 0 | 0 | - |" in text
    assert "| 2 | 5.000 | 3 | 1 (site 2) | 1 | node supernode-9: refused: update refused: block scale 2.6e+36 out of range |" in text
    assert chart_names(page)[:3] == ["loss", "communication", "norms"]
    norms = page.split('data-chart="norms"')[1].split("</svg>")[0]
    assert "clipped to the bound" in norms and "norm bound" in norms
    assert "clipped to the bound, site 2, round 2: 5000 (off scale)" in norms  # its norm before clipping
    assert_self_contained(page)


def test_a_refused_reply_from_a_node_that_counted_before_is_named_by_its_site(tmp_path):
    run_dir = make_run(tmp_path)
    node_of_site_1 = list(NODE_CLOCK_OFFSETS)[1]

    def refuse(record):
        if record["round"] == 2:
            record["failed"] = [{"node_id": node_of_site_1, "node": str(node_of_site_1), "reason": "no reply within 3600 s"}] * 2

    rewrite_metrics(run_dir, refuse)
    text = render_markdown(load_run(run_dir))
    assert "| 2 | n/a | 3 | n/a | 2 | site 1: no reply within 3600 s (x2) |" in text


# ------------------------------------------------------------------ a truthful report (issue 25)


def write_generations(run_dir: Path, name: str, preds: list[str], golds: list[str]) -> None:
    (run_dir / "eval").mkdir(exist_ok=True)
    rows = [{"prompt": "q", "gold": g, "output": p, "pred": p, "correct": p == g.lower()} for p, g in zip(preds, golds)]
    (run_dir / "eval" / f"generation_{name}_{run_dir.name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_unparsed_answers_are_counted_and_most_unparsed_is_a_warning(tmp_path):
    """Every accuracy was 0.0000 because no answer could be parsed ("pred": "ocar"); nothing said so."""
    run_dir = make_run(tmp_path)
    write_generations(run_dir, "pubmedqa", ["ocar"] * 7 + ["yes", "maybe", "no"], ["yes"] * 8 + ["maybe", "no"])
    write_generations(run_dir, "medqa", ["a", "b", "zzz", "c"], ["a"] * 4)
    data = load_run(run_dir)
    # "maybe" is no extractable answer, but it matched the gold as generated: it was read.
    assert unparsed_answers(data) == {"pubmedqa": (7, 10), "medqa": (1, 4)}
    text, page = render_markdown(data), render_html(data)
    assert "| answers not parsed (this run) | 7 of 10 | n/a | 1 of 4 | n/a | | |" in text
    assert "> **Warning:** Most answers could not be parsed (pubmedqa: 7 of 10)" in text
    assert '7 of 10</td><td>n/a</td><td>1 of 4</td><td>n/a</td><td></td><td></td></tr><tr class="warning"><td colspan="7">Most answers to pubmedqa could not be parsed' in page


def test_a_run_where_no_round_aggregated_says_the_adapter_is_untrained_and_why(tmp_path):
    run_dir = make_run(tmp_path)

    def nothing_trained(record):
        record.update(status="skipped", train_loss=None, clients=[],
                      failed=[{"node_id": 5, "node": "supernode-0", "reason": "data: nope.jsonl: no such file"}])

    rewrite_metrics(run_dir, nothing_trained)
    (run_dir / "summary.json").write_text(json.dumps({
        "rounds_aggregated": 0, "stopped": "round 2: fewer than strategy.min-replies=1 usable replies",
        "failure_reasons": ["supernode-0: data: nope.jsonl: no such file"]}))
    data = load_run(run_dir)
    text, page = render_markdown(data), render_html(data)
    head = text.split("## Accuracy")[0]
    assert "> **Warning:** The run stopped before its last round: round 2: fewer than strategy.min-replies=1" in head
    assert "> **Warning:** Failure: supernode-0: data: nope.jsonl: no such file" in head
    assert "No round aggregated: the adapter is untrained" in head and "the accuracies below are the base model's" in head
    assert results_table(data)[0]["label"].startswith("this run (untrained adapter")
    assert page.index('<div class="alert">') < page.index("<h2>Accuracy")
    assert "node supernode-0: data: nope.jsonl: no such file" in page


def test_a_summary_without_the_newer_fields_warns_of_nothing(tmp_path):
    run_dir = make_run(tmp_path)
    (run_dir / "summary.json").write_text(json.dumps({"rounds_aggregated": 2, "stopped": None}))
    assert "Warning" not in render_markdown(load_run(run_dir))


def test_cli_writes_both_files_atomically_and_finds_the_latest_run(tmp_path, capsys):
    run_dir = make_run(tmp_path)
    (run_dir / "summary.json").write_text("{}")
    assert main(["report", "--latest", str(tmp_path)]) == 0
    assert "0.3125" in capsys.readouterr().out
    assert (run_dir / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert "| this run" in (run_dir / "report.md").read_text()
    assert not list(run_dir.glob("*.tmp"))
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_a_long_run_gets_the_timelines_of_its_first_and_last_rounds(tmp_path):
    from app.results.report import TIMELINE_ROUNDS, _timeline_rounds

    shown, omitted = _timeline_rounds(load_run(make_run(tmp_path, rounds=TIMELINE_ROUNDS + 6)).rounds)
    half = TIMELINE_ROUNDS // 2
    assert [r.number for r in shown] == [*range(1, half + 1), *range(half + 7, TIMELINE_ROUNDS + 7)] and omitted == 6


def test_a_nodes_failure_reason_cannot_put_an_image_or_html_into_report_md(tmp_path):
    """A node chooses its error's reason; report.md, opened in a Markdown viewer, must not load
    anything from it nor have its table split."""
    run_dir = make_run(tmp_path)

    def hostile_reason(record):
        record["failed"] = [{"node_id": 1, "node": "supernode-1",
                             "reason": "error 0: ![x](http://192.0.2.1/p.png) <img src=http://192.0.2.1/q.png> a|b [y](http://192.0.2.1/)"}]

    rewrite_metrics(run_dir, hostile_reason)
    text = render_markdown(load_run(run_dir))
    row = next(line for line in text.splitlines() if "supernode-1" in line)
    assert "!\\[x\\](http" in row
    assert not re.search(r"(?<!\\)[\[<]", row) and row.count("|") - row.count("\\|") == 7  # 6 cells


def test_the_trainer_of_each_client_round_is_shown(tmp_path):
    run = make_run(tmp_path)
    ids = iter(["device:gpu0:4242", "device:gpu0:in-process", "device:gpu0:4242", "<b>" + "x" * 500, None, "device:gpu0:4242"])

    def name_trainers(record):
        for client in record["clients"]:
            value = next(ids, None)
            if value is not None:
                client["trainer_id"] = value

    rewrite_metrics(run, name_trainers)
    data = load_run(run)
    markdown, page = render_markdown(data), render_html(data)
    counted = [c for r in data.rounds for c in r.clients]
    rounds_of = {t: sum(c.trainer_id == t for c in counted) for t in ("device:gpu0:4242", "device:gpu0:in-process")}
    assert rounds_of["device:gpu0:4242"] >= 2
    assert f"| device:gpu0:4242 | {rounds_of['device:gpu0:4242']} |" in markdown
    assert f"| device:gpu0:in-process | {rounds_of['device:gpu0:in-process']} |" in markdown
    assert "| unknown |" in markdown  # a client line without one (older metrics)
    assert "<b>" not in page and "&lt;b&gt;" + "x" * 96 + "…</td>" in page  # a hand-edited id: cut to 100 characters, escaped
