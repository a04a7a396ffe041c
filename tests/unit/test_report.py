"""The QA page and the end-of-run metrics on hand-built tables and local files (no Ray, S3 or
browser): a run whose every row failed, the contact-sheet labels, the failed pairs (listed,
capped, escaped), the settings table, the random-weights banner, and jobs.metrics on such runs."""

from __future__ import annotations

import html.parser
import io
import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from jobs.metrics import main as metrics_main
from pipeline import storage
from pipeline.config import RENDER_DEFAULTS, RenderConfig
from pipeline.metrics.report import REQUIRED_COLUMNS, render_report, write_report
from pipeline.metrics.shards import FEATURE_SCHEMA, MetricsAccumulator, compute_summary
from pipeline.output.layout import Layout

MAX_PIXELS = RENDER_DEFAULTS.max_pixels  # the run's --max-pixels: the page decodes no image over it
PROTOCOL = {"extractor": "test", "random_weights": False}


class _Page(html.parser.HTMLParser):
    """The page's element ids, and per id the text inside that element and its tags."""

    VOID = {"img", "br", "meta", "line", "rect", "input"}

    def __init__(self, page: str):
        super().__init__()
        self.text: dict[str, list[str]] = {}
        self.tags: dict[str, list[tuple[str, dict]]] = {}
        self.open: list[tuple[str, str | None]] = []
        self.scripts = 0
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.scripts += tag == "script"
        for _, element_id in self.open:
            if element_id:
                self.tags[element_id].append((tag, attrs))
        if tag in self.VOID:
            return
        if "id" in attrs:
            self.text[attrs["id"]], self.tags[attrs["id"]] = [], []
        self.open.append((tag, attrs.get("id")))

    def handle_endtag(self, tag):
        while self.open:
            if self.open.pop()[0] == tag:
                break

    def handle_data(self, data):
        for _, element_id in self.open:
            if element_id:
                self.text[element_id].append(data)

    def cells(self, element_id: str) -> str:
        return " | ".join(t.strip() for t in self.text[element_id] if t.strip())


def _rows(rows: list[dict]) -> pa.Table:
    """Output-manifest rows: the columns the page needs, typed as a manifest types them."""
    types = {c: pa.string() for c in (*REQUIRED_COLUMNS, "context_uri", "product_uri", "output_uri")}
    types |= {"clip_score": pa.float64(), "bbox": pa.list_(pa.float64())}
    return pa.table({c: pa.array([r.get(c) for r in rows], t) for c, t in types.items()})


def _failed(n: int, shard: str = "north") -> list[dict]:
    codes = ("missing_input", "bad_bbox", "decode_error")
    return [
        {"pair_id": f"pair-{i:04d}", "status": "failed", "error_code": codes[i % 3], "error_message": f"problem {i}",
         "shard": shard, "context_uri": f"/nowhere/{i}.jpg", "product_uri": f"/nowhere/{i}.png"}
        for i in range(n)
    ]  # fmt: skip


def test_a_run_whose_every_row_failed_gets_a_page_listing_the_failures():
    rows = _rows(_failed(3))
    summary = compute_summary("r1", {}, FEATURE_SCHEMA.empty_table(), {"north": {"failed": 3}}, PROTOCOL)
    assert summary["global"]["n"] == 0 and summary["global"]["fid"] is None and summary["global"]["kid_mean"] is None
    assert [(s["shard"], s["ok"], s["failed"], s["fid"]) for s in summary["shards"]] == [("north", 0, 3, None)]
    for page in (
        render_report("r1", rows, summary, max_pixels=MAX_PIXELS),
        render_report("r1", rows, None, max_pixels=MAX_PIXELS),
    ):
        parsed = _Page(page)
        assert "failed | 3 | total | 3" in parsed.cells("counts")
        listed = parsed.cells("failed-pairs")
        for i, code in enumerate(("missing_input", "bad_bbox", "decode_error")):
            assert f"pair-{i:04d} | north | {code} | problem {i}" in listed
        assert "lowest" not in parsed.text and "sample" not in parsed.text  # no ok row: no contact sheet
    assert "No CLIP scores in this run." in render_report("r1", rows, summary, max_pixels=MAX_PIXELS)
    # no rows at all (nothing in the manifest): still a page
    empty = render_report("r1", rows.slice(0, 0), summary, max_pixels=MAX_PIXELS)
    assert "total | 0" in _Page(empty).cells("counts") and "failed-pairs" not in _Page(empty).text


def test_end_of_run_with_no_ok_row_and_with_no_features(tmp_path):
    # What the driver calls at the end of a run: finalize, then write_report, then (later) jobs.metrics.
    layout = Layout(str(tmp_path / "out"))
    failed = _rows(_failed(4))
    accumulator = MetricsAccumulator(layout, "r1")
    accumulator.add(failed.append_column("attempt", pa.array([1] * 4, pa.int64())))
    summary = accumulator.finalize({"north": {"failed": 4}}, PROTOCOL)
    assert summary["shards"][0]["ok"] == 0 and summary["global"]["clip"]["n"] == 0
    assert json.loads(storage.read_bytes(storage.join(layout.metrics_dir("r1"), "summary.json")))["global"]["n"] == 0
    storage.write_parquet(layout.manifest_part("r1", 0), failed)
    uri = write_report(layout, "r1", summary, settings=RenderConfig().settings(256), max_pixels=MAX_PIXELS)
    assert "pair-0003" in _Page(storage.read_bytes(uri).decode()).cells("failed-pairs")
    assert metrics_main(["--output", layout.output, "--run-id", "r1"]) == 0  # no shard files: counts only
    assert "pair-0003" in storage.read_bytes(uri).decode()

    # ok rows with a CLIP score but no Inception features (CLIP-only metrics), and an empty shard file
    ok = [{"pair_id": f"ok-{i}", "status": "ok", "shard": "south", "clip_score": 80.0 + i} for i in range(3)]
    accumulator = MetricsAccumulator(layout, "r2")
    accumulator.add(_rows(ok).append_column("attempt", pa.array([1] * 3, pa.int64())))
    summary = accumulator.finalize({"south": {"ok": 3}}, PROTOCOL)
    assert summary["global"]["n"] == 0 and summary["global"]["fid"] is None
    assert summary["global"]["clip"]["n"] == 3 and summary["global"]["kid_mean"] is None
    storage.write_parquet(
        storage.join(layout.metrics_dir("r2"), "shard=west.features.parquet"), FEATURE_SCHEMA.empty_table()
    )
    assert metrics_main(["--output", layout.output, "--run-id", "r2"]) == 0
    shards = json.loads(storage.read_bytes(storage.join(layout.metrics_dir("r2"), "summary.json")))["shards"]
    assert [(s["shard"], s["n"], s["clip"]["n"]) for s in shards] == [("south", 0, 3), ("west", 0, 0)]
    # no manifest part at all: the page still renders
    assert "total | 0" in _Page(
        storage.read_bytes(write_report(layout, "r2", summary, max_pixels=MAX_PIXELS)).decode()
    ).cells("counts")


def test_failed_pairs_are_escaped_capped_and_counted():
    rows = _failed(205)
    rows[0]["error_message"] = "<script>alert('x')</script> & more"
    rows[1]["error_message"] = "y" * 5000
    page = render_report("r1", _rows(rows), None, max_pixels=MAX_PIXELS)
    parsed = _Page(page)
    assert parsed.scripts == 1  # only the page's own images-loaded script
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in page
    assert "<script>alert(" not in page
    listed = [t for t, _ in parsed.tags["failed-pairs"] if t == "tr"]
    assert len(listed) == 1 + 200  # header + the first 200
    assert "pair-0199" in parsed.cells("failed-pairs") and "pair-0200" not in parsed.cells("failed-pairs")
    assert parsed.cells("failed-pairs-more") == "and 5 more"
    assert "y" * 400 + "…" in page and "y" * 401 not in page
    assert "missing_input | 69" in parsed.cells("error-codes")  # every failure counted, not only those listed


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_contact_sheets_label_their_columns(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(3):
        uris = {k: str(tmp_path / f"{i}-{k}.png") for k in ("context", "product", "output")}
        storage.write_bytes(uris["context"], _png(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)))
        storage.write_bytes(uris["output"], _png(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)))
        storage.write_bytes(uris["product"], _png(rng.integers(0, 255, (32, 32, 4), dtype=np.uint8)))
        rows.append({"pair_id": f"ok-{i}", "status": "ok", "shard": "north", "clip_score": 70.0 + i,
                     "bbox": [8.0, 8.0, 40.0, 40.0], **{f"{k}_uri": v for k, v in uris.items()}})  # fmt: skip
    gone = {"context_uri": str(tmp_path / "gone.png"), "product_uri": "x", "output_uri": "y"}
    rows.append(
        {
            "pair_id": "gone",
            "status": "ok",
            "shard": "north",
            "clip_score": 10.0,
            "bbox": [8.0, 8.0, 40.0, 40.0],
            **gone,
        }
    )
    summary = compute_summary("r1", {}, FEATURE_SCHEMA.empty_table(), {"north": {"ok": 4}}, PROTOCOL)
    parsed = _Page(render_report("r1", _rows(rows), summary, sample_size=4, max_pixels=MAX_PIXELS))
    for sheet in ("lowest", "sample"):
        headers = [t for t in parsed.text[sheet] if t.strip()][:4]
        assert headers == ["pair", "context", "product", "output"]
        images = [a["alt"] for t, a in parsed.tags[sheet] if t == "img"]
        assert images == ["context", "product", "output"] * 3  # the unreadable pair: a note, no image
        assert all(a["src"].startswith("data:image/jpeg;base64,") for t, a in parsed.tags[sheet] if t == "img")
        assert "inputs no longer readable" in parsed.cells(sheet)
    assert parsed.cells("lowest").startswith("pair | context | product | output | gone | north | CLIP 10.00")
    # the run's --max-pixels holds on the page too: a 64 x 48 photo over it is not decoded
    capped = _Page(render_report("r1", _rows(rows), summary, sample_size=4, max_pixels=64 * 48 - 1))
    for sheet in ("lowest", "sample"):
        assert [t for t, _ in capped.tags[sheet] if t == "img"] == []
        assert capped.cells(sheet).count("inputs no longer readable") == 4


def test_settings_table_shows_the_run_settings():
    settings = RenderConfig(image_format="png", steps=20, guidance_scale=7.5, scheduler="dpmpp").settings(512)
    settings["note"] = "<b>bold</b>"
    page = render_report("r1", _rows(_failed(1)), None, settings=settings, max_pixels=MAX_PIXELS)
    cells = _Page(page).cells("settings")
    for key in ("steps | 20", "guidance_scale | 7.5", "scheduler | dpmpp", "resolution | 512", "image_format | png",
                "jpeg_quality | –", "crop_margin | 0.25", "feather_px | 4", "note | <b>bold</b>"):  # fmt: skip
        assert key in cells
    assert "&lt;b&gt;bold&lt;/b&gt;" in page
    assert "Not recorded" in _Page(render_report("r1", _rows(_failed(1)), None, max_pixels=MAX_PIXELS)).cells(
        "settings"
    )


def test_random_weights_banner_and_merged_runs():
    summary = compute_summary(
        "m", {}, FEATURE_SCHEMA.empty_table(), {}, {"random_weights": True, "merged_runs": ["a", "b"]}
    )
    parsed = _Page(render_report("m", _rows(_failed(1)), summary, max_pixels=MAX_PIXELS))
    assert "RANDOM-WEIGHT EXTRACTORS" in parsed.cells("random-weights")
    assert parsed.cells("merged-runs") == "Merged from runs: a, b"
    assert (
        "random-weights"
        not in _Page(
            render_report("m", _rows(_failed(1)), {**summary, "protocol": PROTOCOL}, max_pixels=MAX_PIXELS)
        ).text
    )
    assert "metrics-skipped" in _Page(render_report("m", _rows(_failed(1)), None, max_pixels=MAX_PIXELS)).text


def test_rows_without_a_required_column_are_refused():
    with pytest.raises(ValueError, match=r"lack column\(s\) \['error_message'\]"):
        render_report("r1", _rows(_failed(1)).drop_columns(["error_message"]), None, max_pixels=MAX_PIXELS)


def test_merge_of_runs_whose_rows_all_failed(tmp_path, capsys):
    layout = Layout(str(tmp_path / "out"))
    for run_id in ("a", "b"):
        accumulator = MetricsAccumulator(layout, run_id)
        summary = accumulator.finalize({"north": {"failed": 2}}, {**PROTOCOL, "random_weights": run_id == "b"})
        storage.write_parquet(layout.manifest_part(run_id, 0), _rows(_failed(2)))
        storage.write_bytes(
            layout.run_record(run_id), json.dumps({"settings": {"steps": 2 if run_id == "a" else 4}}).encode()
        )
    assert metrics_main(["--output", layout.output, "--run-id", "a", "--run-id", "b", "--out-id", "ab"]) == 0
    assert "[RANDOM-WEIGHT EXTRACTORS: meaningless]" in capsys.readouterr().out
    summary = json.loads(storage.read_bytes(storage.join(layout.metrics_dir("ab"), "summary.json")))
    assert summary["protocol"]["random_weights"] is True and summary["protocol"]["merged_runs"] == ["a", "b"]
    assert [(s["shard"], s["failed"]) for s in summary["shards"]] == [("north", 4)]
    parsed = _Page(storage.read_bytes(layout.report("ab")).decode())
    assert "random-weights" in parsed.text and "steps | a: 2; b: 4" in parsed.cells("settings")
    assert len([t for t, _ in parsed.tags["failed-pairs"] if t == "tr"]) == 1 + 4
