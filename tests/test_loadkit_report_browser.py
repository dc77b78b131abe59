"""The load kit's HTML report in a real headless Chromium at 1,200 px: a page people can share.

The report is built from a synthetic recording (every kind, ~0 ms gaps between events as when
several events arrive in one network read, a threshold, a long configuration value), rendered
by `app.loadkit.htmlreport`, opened as a file, checked for horizontal overflow and screenshotted;
the screenshot's path is printed (`pytest -s` or `-rP` shows it).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from playwright.async_api import Browser

from app.loadkit.htmlreport import (
    GAP_FLOOR_MS,
    config_rows,
    latency_distribution_figure,
    latency_over_time_figure,
    render_html,
)
from app.loadkit.recording import KINDS, LoadConfig, Recorder
from app.loadkit.report import Thresholds, build_report

pytestmark = pytest.mark.browser

WIDTH = 1200


def synthetic_report(thresholds: Thresholds) -> dict[str, Any]:
    """A recording shaped like a real 20 s run, with a configuration value 300 chars long."""
    rng = random.Random(7)
    config = LoadConfig(
        url="http://127.0.0.1:8080",
        duration=20.0,
        concurrency=50,
        stream_body=('{"message": "' + "long " * 60 + '"}').encode(),
        headers={"Origin": "https://shop.example.com", "X-Request-Tag": "nightly"},
    )
    rec = Recorder(config.duration)
    for i in range(4000):
        at = 20.0 * i / 4000
        kind = KINDS[i % len(KINDS)]
        rec.success(kind, at, rng.lognormvariate(-5.5, 0.6))
        if kind == "stream":
            rec.streams_completed += 1
            rec.streams_started += 1
            rec.ttfe.record(rng.lognormvariate(-5.0, 0.5))
            rec.timeline.record("ttfe", at, 0.004)
            for _ in range(20):
                rec.gaps.record(0.0 if rng.random() < 0.9 else rng.uniform(0.0001, 0.002))
    rec.failure("read", 3.0, "status_503")
    rec.finished = 20.5
    return build_report(rec, config, thresholds)


def test_the_configuration_is_a_table_of_readable_values() -> None:
    report = synthetic_report(Thresholds(max_p99_ms=50))
    rows = dict((str(k), str(v)) for k, v in config_rows(report))
    assert rows["mix"] == "read=60, write=20, stream=20"
    assert rows["headers"] == "Origin, X-Request-Tag"  # names only: values may be credentials
    assert rows["threshold: max_p99_ms"] == "50"
    assert rows["max_requests"] == "-"
    page = render_html(report)
    assert '<table class="config">' in page
    assert "{'url'" not in page  # no Python dict dump


def _first_y(line: Any) -> float:
    """The y of a line's first point (a threshold line is flat)."""
    return float(line.get_ydata()[0])


def test_the_plots_draw_thresholds_keep_legends_aside_and_floor_the_gaps() -> None:
    report = synthetic_report(Thresholds(max_p99_ms=50, max_ttfe_p99_ms=80))
    over_time = latency_over_time_figure(report)
    distribution = latency_distribution_figure(report)
    for fig in (over_time, distribution):
        canvas: Any = FigureCanvasAgg(fig)  # untyped in matplotlib's stubs
        canvas.draw()
        renderer = canvas.get_renderer()
        ax = fig.axes[0]
        levels = {line.get_label(): _first_y(line) for line in ax.get_lines()}
        assert levels["--max-p99-ms 50 ms"] == 50
        assert levels["--max-ttfe-p99-ms 80 ms"] == 80
        # The legend sits right of the plotting area: it hides no line.
        legend = ax.get_legend()
        assert legend is not None
        assert legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1
    # Gaps of ~0 (1 µs) no longer pull the log axis down to 0.001 ms.
    low, _ = distribution.axes[0].get_ylim()
    assert low >= GAP_FLOOR_MS / 2, low


async def test_the_report_fits_1200px_and_is_screenshotted(
    browser: Browser, tmp_path: Path
) -> None:
    report = synthetic_report(Thresholds(max_p99_ms=50, max_ttfe_p99_ms=80))
    assert report["stream"]["gap_ms"]["p50"] < GAP_FLOOR_MS  # the case that stretched the axis
    html_path = tmp_path / "report.html"
    html_path.write_text(render_html(report), encoding="utf-8")
    page = await browser.new_page(viewport={"width": WIDTH, "height": 900})
    await page.goto(html_path.as_uri())
    widths = await page.evaluate(
        "() => ({scroll: document.documentElement.scrollWidth,"
        " client: document.documentElement.clientWidth})"
    )
    shot = tmp_path / "loadgen-report-1200px.png"
    await page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    assert widths["scroll"] <= widths["client"], widths
    # Both plots are shown whole (scaled to the page, never cropped or overflowing).
    images = await page.evaluate(
        "() => [...document.images].map(i => ({w: i.getBoundingClientRect().width,"
        " natural: i.naturalWidth, right: i.getBoundingClientRect().right}))"
    )
    assert len(images) == 2
    for image in images:
        assert image["natural"] > 0 and image["right"] <= widths["client"], images
    # 1 error in 4,001 requests and every p99 under its limit.
    assert "passed all thresholds" in await page.inner_text("body")
