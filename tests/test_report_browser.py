"""The HTML report in a real headless browser (Chromium from Debian packages): it loads from a
file:// URL with the network off, every chart renders, and no request leaves the page. The
screenshot is kept in $FEDTUNE_TEST_ARTIFACTS (default test-artifacts/)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from headless_browser import chromium_path, load_page
from report_fixture import make_run
from test_report import bounded, rewrite_metrics

from app.results.report import write_report

ARTIFACTS = Path(os.environ.get("FEDTUNE_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))

pytestmark = pytest.mark.skipif(
    chromium_path() is None and os.environ.get("FEDTUNE_REQUIRE_BROWSER", "1") == "0",
    reason="chromium missing and FEDTUNE_REQUIRE_BROWSER=0")


def _external(urls: list[str]) -> list[str]:
    return [u for u in urls if not u.startswith(("file:", "data:", "about:"))]


def test_report_renders_every_chart_offline_and_requests_nothing(tmp_path):
    html_path, _ = write_report(make_run(tmp_path))
    page = load_page(html_path, screenshot=ARTIFACTS / "report.png")
    names = [c["name"] for c in page["charts"]]
    assert names == ["loss", "communication", "timeline-1", "timeline-2", "gpu"]
    for chart in page["charts"]:
        assert chart["width"] > 100 and chart["height"] > 50, chart
        assert chart["marks"] == chart["total"] > 0, chart  # every mark drawn with a size
    assert page["requests"] == [html_path.resolve().as_uri()]  # the file itself, nothing else
    assert not page["messages"], page["messages"]  # no CSP violation, no error
    assert (ARTIFACTS / "report.png").stat().st_size > 20_000


def test_a_hostile_runs_report_renders_every_chart_too(tmp_path):
    """A node's train-loss of 1.7e308, a clipped 1000x update and a refused reply: the same checks,
    the norms chart included, and the off-scale values drawn (on the edge) like any other mark."""
    run_dir = make_run(tmp_path)

    def hostile(record):
        bounded(record)
        record["clients"][0]["train_loss"] = 1.7e308

    rewrite_metrics(run_dir, hostile)
    html_path, _ = write_report(run_dir)
    page = load_page(html_path, screenshot=ARTIFACTS / "report-hostile.png")
    assert [c["name"] for c in page["charts"]] == ["loss", "communication", "norms", "timeline-1", "timeline-2", "gpu"]
    for chart in page["charts"]:
        assert chart["marks"] == chart["total"] > 0, chart
    assert page["requests"] == [html_path.resolve().as_uri()]
    assert not page["messages"], page["messages"]
    loss = html_path.read_text().split('data-chart="loss"')[1].split("</svg>")[0]
    assert ">site 0</text>" in loss  # every point of site 0 off scale, the site still in the legend


def test_the_check_sees_a_page_that_reaches_out(tmp_path):
    """The same check on a page with an external image and no CSP: it must catch the request."""
    html_path, _ = write_report(make_run(tmp_path))
    leaky = tmp_path / "leaky.html"
    text = html_path.read_text()
    text = text.replace('<meta http-equiv="Content-Security-Policy"', '<meta name="x"')
    leaky.write_text(text.replace("</body>", '<img src="http://192.0.2.1/pixel.png"></body>'))
    page = load_page(leaky)
    assert _external(page["requests"]) == ["http://192.0.2.1/pixel.png"]
    assert page["charts"]  # still rendered: only the request is wrong
