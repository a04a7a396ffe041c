"""One definition per figure: the console's progress line and summary, the run record and the QA
page give the same identity percentiles and the same rows/s, on hand-built finish-stage blocks
(no Ray). The figures are defined in output/stats.py (rows/s) and metrics/feature_stats.py (identity)."""

from __future__ import annotations

import html.parser
import json
import re
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import record, storage
from pipeline.config import RENDER_DEFAULTS, RenderConfig
from pipeline.metrics.feature_stats import ScoreHistogram
from pipeline.metrics.report import write_report
from pipeline.output.layout import Layout
from pipeline.output.sink import ManifestWriter
from pipeline.output.stats import RunStats
from pipeline.run import check
from pipeline.schema import EXIT_OK, output_schema

# 8 ok rows (two modes: the p50 of an even count is the mean of the middle two, -29.9 and 90.5),
# one failed, one reused ok row from an earlier run.
MAX_PIXELS = RENDER_DEFAULTS.max_pixels
SCORES = [-31.0, -30.5, -30.2, -29.9, 90.5, 91.0, 92.2, 95.0]


def _block(pairs: list[str], status: list[str], attempt: list[int], scores: list[float | None]) -> pa.Table:
    n = len(pairs)
    return pa.table(
        {
            "pair_id": pairs,
            "status": status,
            "attempt": attempt,
            "shard": ["s"] * n,
            "error_code": [None if s == "ok" else "bad_bbox" for s in status],
            "identity_score": pa.array(scores, pa.float64()),
            "needs_review": [False] * n,
            **{column: [f"/nowhere/{pair}.png" for pair in pairs] for column in ("context_uri", "product_uri")},
            "output_uri": [f"/nowhere/out-{pair}.png" for pair in pairs],
        }
    )


def _spec(tmp_path, tiny_model_dir):
    manifest = tmp_path / "in.parquet"
    rows = {"pair_id": ["a"], "context_uri": ["x.png"], "product_uri": ["y.png"], "bbox": [[0.0, 0.0, 9.0, 9.0]]}
    pq.write_table(pa.table(rows), manifest)
    cfg = RenderConfig(manifest=str(manifest), output=str(tmp_path / "out"), model=tiny_model_dir, run_id="r1")
    return check(cfg)


class _Paragraphs(html.parser.HTMLParser):
    def __init__(self, page: str):
        super().__init__()
        self.text: dict[str, str] = {}
        self._open: str | None = None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self._open = dict(attrs).get("id") if tag == "p" else self._open

    def handle_endtag(self, tag):
        self._open = None if tag == "p" else self._open

    def handle_data(self, data):
        if self._open:
            self.text[self._open] = self.text.get(self._open, "") + data


def test_console_record_and_qa_page_give_the_same_identity_figures_and_rows_per_s(tmp_path, tiny_model_dir, capsys):
    spec = _spec(tmp_path, tiny_model_dir)
    layout = Layout(spec.output)
    stats = RunStats()
    writer = ManifestWriter(layout, spec.run_id, output_schema(spec.plan.schema), part_rows=100)
    blocks = [
        _block([f"p{i}" for i in range(4)], ["ok"] * 4, [1] * 4, SCORES[:4]),
        _block(
            ["p4", "p5", "bad", "old"], ["ok", "ok", "failed", "ok"], [1, 1, 1, 0], [*SCORES[4:6], None, SCORES[6]]
        ),
        _block(["p7"], ["ok"], [1], SCORES[7:]),
    ]
    progress = record.Progress(total=9)
    for block in blocks:
        writer.add(block)
        stats.add(block)
    writer.flush()
    # the run's last rows arrived 4 s after its start: 8 rows tried here (7 rendered, 1 failed), 1 reused
    stats.started = stats.last_at - 4.0
    progress.update(stats)
    progress_line = capsys.readouterr().out

    expected = np.percentile(SCORES, [10, 50, 90])  # the true percentiles, numpy's definition
    assert ScoreHistogram.of(SCORES).summary()["p50"] == round(float(expected[1]), 2) == 30.3

    elapsed = 9.0  # the end's bookkeeping took 5 s more: not in rows/s
    summary = record.summary_text(spec, stats, elapsed, EXIT_OK, None, report_written=True)
    run = record.run_record(
        spec,
        stats,
        exit_code=EXIT_OK,
        message="",
        started_at=datetime.now(UTC),
        elapsed=elapsed,
        manifest_parts=writer.parts,
        rss_samples=[],
    )
    page = storage.read_bytes(write_report(layout, spec.run_id, None, max_pixels=MAX_PIXELS)).decode()
    distribution = _Paragraphs(page).text["identity-distribution"]

    figures = run["counts"]["identity_score"]["all"]
    assert figures["n"] == 8
    for q, value in zip((10, 50, 90), expected):
        assert abs(figures[f"p{q}"] - value) < 0.06  # the scores are binned to 0.1
        assert f"p{q} {figures[f'p{q}']:g}" in summary
        assert f"p{q} {figures[f'p{q}']:g}" in distribution
    assert f"mean {figures['mean']:g}" in summary and f"mean {figures['mean']:g}" in distribution
    assert f"over {figures['n']} " in summary and f"over {figures['n']} " in distribution

    # rows/s: the rows this run tried (not the reused one) over the seconds to its last rows, everywhere
    assert run["rows_per_s"] == stats.rows_per_s() == 2.0
    assert "8 rows rendered or failed (7 rendered), 2 rows/s" in summary
    assert re.search(r"9/9 rows .* 2 rows/s", progress_line), progress_line


def test_a_run_that_tried_nothing_shows_zero_rows_per_s_everywhere(tmp_path, tiny_model_dir, capsys):
    spec = _spec(tmp_path, tiny_model_dir)
    stats = RunStats()
    stats.add(_block(["a", "b"], ["ok", "failed"], [0, 0], [50.0, None]))  # both from earlier runs
    record.Progress(total=2).update(stats)
    assert " 0 rows/s" in capsys.readouterr().out
    summary = record.summary_text(spec, stats, 3.0, EXIT_OK, None, report_written=False)
    assert "0 rows rendered or failed (0 rendered), 0 rows/s" in summary
    run = record.run_record(
        spec, stats, exit_code=EXIT_OK, message="", started_at=datetime.now(UTC), elapsed=3.0,
        manifest_parts=0, rss_samples=[],
    )  # fmt: skip
    assert run["rows_per_s"] == 0.0
    assert json.loads(json.dumps(run, default=str))["counts"]["reused"] == 2
