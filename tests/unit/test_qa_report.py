"""The QA page's scene, variant and identity sections (pipeline/metrics/qa.py) on hand-built
output manifests and small solid-colour images written here (no Ray, S3 or browser). Each
image has its own colour, so a thumbnail's corner pixel says which image a cell shows: strips
in step order, the chosen variant outlined and showing the pair's image, the lowest identity
scores first, placeholders for images that are gone, and no section for a manifest without the
columns."""

from __future__ import annotations

import base64
import html.parser
import io

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline import storage
from pipeline.config import RENDER_DEFAULTS
from pipeline.metrics import qa
from pipeline.metrics.report import read_manifest_rows, render_report, write_report
from pipeline.output.layout import Layout

MAX_PIXELS = RENDER_DEFAULTS.max_pixels  # the run's --max-pixels: the page decodes no image over it
BBOX = [24.0, 16.0, 40.0, 32.0]  # the middle of a 64 x 48 image: a thumbnail's corner is the image's colour
COLOURS = {
    "photo": (128, 128, 128),
    "red": (220, 30, 30),
    "green": (30, 200, 30),
    "blue": (30, 30, 220),
    "yellow": (230, 220, 20),
    "cyan": (20, 210, 220),
    "magenta": (210, 20, 210),
    "black": (10, 10, 10),
    "white": (245, 245, 245),
}
TYPES = {
    **{c: pa.string() for c in ("pair_id", "status", "error_code", "error_message", "shard")},
    **{c: pa.string() for c in ("context_uri", "product_uri", "output_uri", "mask_uri", "scene_id")},
    "clip_score": pa.float64(),
    "bbox": pa.list_(pa.float64()),
    "step": pa.int64(),
    "identity_score": pa.float64(),
    "needs_review": pa.bool_(),
    "variant_seeds": pa.list_(pa.int64()),
    "variant_scores": pa.list_(pa.float64()),
    "chosen_variant": pa.int64(),
}
OLD_COLUMNS = ("pair_id", "status", "error_code", "error_message", "shard", "clip_score", "bbox")
OLD_COLUMNS += ("context_uri", "product_uri", "output_uri")


class _Tables(html.parser.HTMLParser):
    """Per table id its rows (attributes and cells: attributes, text, image sources); per
    paragraph id its text; every element id, in page order."""

    def __init__(self, page: str):
        super().__init__()
        self.tables: dict[str, list[dict]] = {}
        self.paragraphs: dict[str, str] = {}
        self.ids: list[str] = []
        self._table: list[dict] | None = None
        self._cell: dict | None = None
        self._paragraph: str | None = None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id"), [])
        elif tag == "tr" and self._table is not None:
            self._table.append({"attrs": attrs, "cells": []})
        elif tag in ("td", "th") and self._table is not None:
            self._cell = {"attrs": attrs, "text": "", "images": []}
            self._table[-1]["cells"].append(self._cell)
        elif tag == "img" and self._cell is not None:
            self._cell["images"].append(attrs["src"])
        elif tag == "br" and self._cell is not None and self._cell["text"]:  # a line break after text
            self._cell["text"] += " | "
        elif tag == "p" and "id" in attrs:
            self._paragraph = attrs["id"]
            self.paragraphs[attrs["id"]] = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "p":
            self._paragraph = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data
        if self._paragraph is not None:
            self.paragraphs[self._paragraph] += data

    def rows(self, table_id: str, css_class: str) -> list[dict]:
        return [r for r in self.tables[table_id] if r["attrs"].get("class") == css_class]


def _colour_of(src: str) -> str:
    """The name of the colour nearest a thumbnail's corner pixel (JPEG moves it a little)."""
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))
    corner = pixels[4, 4].astype(int)
    return min(COLOURS, key=lambda name: int(np.abs(corner - COLOURS[name]).sum()))


def _shown(cell: dict) -> str | None:
    """The colour name a cell's one image shows, or None for a placeholder."""
    assert len(cell["images"]) <= 1
    return _colour_of(cell["images"][0]) if cell["images"] else None


def _image(uri: str, colour: str) -> str:
    array = np.empty((48, 64, 3), np.uint8)
    array[:] = COLOURS[colour]
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    storage.write_bytes(uri, buffer.getvalue())
    return uri


def _table(rows: list[dict], columns=tuple(TYPES)) -> pa.Table:
    """An output manifest holding `columns`, typed as the pipeline types them; an ok row in the
    region BBOX by default."""
    rows = [{"status": "ok", "shard": "north", "bbox": BBOX, **r} for r in rows]
    return pa.table({c: pa.array([r.get(c) for r in rows], TYPES[c]) for c in columns})


def _inputs(tmp_path) -> dict:
    """A photo and a product, shared by the rows of a test."""
    return {
        "context_uri": _image(str(tmp_path / "in" / "photo.png"), "photo"),
        "product_uri": _image(str(tmp_path / "in" / "product.png"), "white"),
    }


def _scene_rows(tmp_path, layout: Layout, later_context: bool = False) -> list[dict]:
    """room-a: three ok steps, listed 3, 1, 2; room-b: step 2 failed, step 3 upstream_failed;
    room-c: two clean steps scored high; and a pair in no scene. Steps after the first have an
    empty context_uri, or with `later_context` the photo (both are the contract's)."""
    inputs = _inputs(tmp_path)

    def step(scene, k, colour, score, **extra):
        pair_id = f"{scene}-{k}"
        row = {"pair_id": pair_id, "scene_id": scene, "step": k, "identity_score": score, **inputs}
        row |= {"output_uri": _image(layout.image(pair_id, "png"), colour)} if colour else {}
        return row | ({} if k == 1 or later_context else {"context_uri": None}) | extra

    failed = {"status": "failed", "identity_score": None}
    return [
        step("room-a", 3, "blue", 70.0),
        {"pair_id": "loose", "identity_score": 99.0, "output_uri": _image(layout.image("loose", "png"), "black"),
         **inputs},
        step("room-a", 1, "red", 80.0),
        step("room-c", 2, "cyan", 95.0),
        step("room-b", 3, None, None, **failed, error_code="upstream_failed", error_message="step 2 failed"),
        step("room-a", 2, "green", 60.0),
        step("room-b", 1, "yellow", 85.0),
        step("room-c", 1, "magenta", 90.0),
        step("room-b", 2, None, None, **failed, error_code="image_unreadable", error_message="bad product"),
    ]  # fmt: skip


def test_scenes_are_strips_in_step_order_worst_scene_first(tmp_path):
    layout = Layout(str(tmp_path / "out"))
    rows = _table(_scene_rows(tmp_path, layout))
    parsed = _Tables(qa.scene_strips(rows, max_pixels=MAX_PIXELS))
    strips = parsed.rows("scene-strips", "scene")
    # room-b has a failed step; then room-a's lowest score (60) before room-c's (90); "loose" is in no scene
    assert [s["attrs"]["data-scene"] for s in strips] == ["room-b", "room-a", "room-c"]
    room_a = strips[1]["cells"]
    assert room_a[0]["text"].startswith("room-a") and "3 step(s)" in room_a[0]["text"]
    assert [_shown(c) for c in room_a[1:]] == ["photo", "red", "green", "blue"]  # photo, step 1, 2, 3
    assert room_a[1]["text"].endswith("photo")
    assert [c["text"].split(" | ")[:4] for c in room_a[2:]] == [
        ["step 1", "room-a-1", "ok", "identity 80.00"],
        ["step 2", "room-a-2", "ok", "identity 60.00"],
        ["step 3", "room-a-3", "ok", "identity 70.00"],
    ]
    room_b = strips[0]["cells"]
    assert [_shown(c) for c in room_b[1:]] == ["photo", "yellow", None, None]  # failed steps have no image
    assert "image_unreadable" in room_b[3]["text"] and "step 2 | room-b-2 | failed" in room_b[3]["text"]
    assert "upstream_failed" in room_b[4]["text"]
    # at most `count` scenes, the worst kept; the heading counts them all
    page = qa.scene_strips(rows, count=2, max_pixels=MAX_PIXELS)
    assert [s["attrs"]["data-scene"] for s in _Tables(page).rows("scene-strips", "scene")] == ["room-b", "room-a"]
    assert "Scenes (3; 2 shown" in page


def test_a_flagged_step_and_missing_images_in_a_strip(tmp_path):
    layout = Layout(str(tmp_path / "out"))
    scene = [r for r in _scene_rows(tmp_path, layout) if r.get("scene_id") in ("room-a", "room-c")]
    for row in scene:
        row["needs_review"] = row["pair_id"] == "room-c-2"
    storage.delete(layout.image("room-a-2", "png"))  # a render deleted by hand: the strip still renders
    next(r for r in scene if r["pair_id"] == "room-a-1")["context_uri"] = str(tmp_path / "gone.png")  # photo gone
    strips = _Tables(qa.scene_strips(_table(scene), max_pixels=MAX_PIXELS)).rows("scene-strips", "scene")
    assert [s["attrs"]["data-scene"] for s in strips] == ["room-c", "room-a"]  # the flagged scene first
    assert "identity 95.00 needs review" in strips[0]["cells"][3]["text"]
    assert "needs review" not in strips[0]["cells"][2]["text"]
    assert [_shown(c) for c in strips[1]["cells"][1:]] == [None, "red", None, "blue"]
    assert "image missing" in strips[1]["cells"][1]["text"] and "image missing" in strips[1]["cells"][3]["text"]


def _variant_rows(tmp_path, layout: Layout) -> list[dict]:
    """v-1: 4 variants, 1 chosen, variant 3 not on disk; v-2: a narrow spread; v-3 the widest;
    and rows that are no variant grid: one variant, none, a failed pair."""
    inputs = _inputs(tmp_path)

    def pair(pair_id, scores, chosen, colours):
        for k, colour in colours.items():
            uri = layout.image(pair_id, "png") if k == chosen else layout.variant_image(pair_id, k, "png")
            _image(uri, colour)
        seeds = [100 * int(pair_id[-1]) + k for k in range(len(scores))]
        return {"pair_id": pair_id, "variant_seeds": seeds, "variant_scores": scores, "chosen_variant": chosen,
                "output_uri": layout.image(pair_id, "png"), "identity_score": scores[chosen], **inputs}  # fmt: skip

    return [
        pair("v-1", [50.0, 90.0, 70.0, 60.0], 1, {0: "red", 1: "green", 2: "blue"}),
        pair("v-2", [70.0, 71.0], 1, {0: "yellow", 1: "cyan"}),
        pair("v-3", [10.0, 95.0, 40.0], 1, {0: "magenta", 1: "black", 2: "white"}),
        pair("v-4", [80.0], 0, {0: "red"}),
        {"pair_id": "v-5", "output_uri": layout.image("v-5", "png"), **inputs},
        {**pair("v-6", [1.0, 99.0], 0, {}), "status": "failed", "error_code": "render_oom"},
    ]


def test_variants_are_grids_with_the_chosen_one_outlined(tmp_path):
    layout = Layout(str(tmp_path / "out"))
    parsed = _Tables(qa.variant_grids(_table(_variant_rows(tmp_path, layout)), max_pixels=MAX_PIXELS))
    grids = parsed.rows("variant-grids", "pair")
    assert [g["attrs"]["data-pair"] for g in grids] == ["v-3", "v-1", "v-2"]  # spreads 85, 40, 1
    v1 = grids[1]["cells"][1:]
    assert [c["attrs"]["data-variant"] for c in v1] == ["0", "1", "2", "3"]
    chosen = [c for c in v1 if "chosen" in c["attrs"]["class"].split()]
    assert [c["attrs"]["data-variant"] for c in chosen] == ["1"]  # exactly one outlined: the chosen index
    assert chosen[0]["text"].endswith("chosen")
    # the chosen cell shows the pair's image, the others their own variant files; #3 was not kept
    assert [_shown(c) for c in v1] == ["red", "green", "blue", None]
    assert "not kept or missing" in v1[3]["text"]
    for k, (cell, score) in enumerate(zip(v1, (50, 90, 70, 60))):
        assert f"#{k} · seed {100 + k} | score {score}.00" in cell["text"]
    for grid in grids:
        assert sum("chosen" in c["attrs"]["class"] for c in grid["cells"][1:]) == 1
    widest = _Tables(qa.variant_grids(_table(_variant_rows(tmp_path, layout)), count=1, max_pixels=MAX_PIXELS))
    assert [g["attrs"]["data-pair"] for g in widest.rows("variant-grids", "pair")] == ["v-3"]


def test_variant_images_lie_under_the_rows_output():
    assert Layout("s3://b/pre").variant_image("p-1", 2, "webp") == "s3://b/pre/variants/p-1/2.webp"
    assert Layout("/out").variant_image("p-1", 0, "jpg") == "/out/variants/p-1/0.jpg"
    row = {"pair_id": "p-1", "output_uri": "s3://b/pre/images/p-1.jpg", "chosen_variant": 1}
    assert qa.variant_image_uri(row, 1) == "s3://b/pre/images/p-1.jpg"
    assert qa.variant_image_uri(row, 3) == "s3://b/pre/variants/p-1/3.jpg"
    assert qa.variant_image_uri({**row, "output_uri": "/out/images/p-1.png"}, 0) == "/out/variants/p-1/0.png"
    assert qa.variant_image_uri({**row, "output_uri": "/elsewhere/p-1.png"}, 0) is None  # not the layout's key


def test_lowest_identity_scores_first_flagged_with_the_distribution(tmp_path):
    layout = Layout(str(tmp_path / "out"))
    inputs = _inputs(tmp_path)
    scores = [float(s) for s in np.random.default_rng(0).permutation(np.arange(20, 96, 5))]  # 16 scores
    rows = [
        {"pair_id": f"p-{s:.0f}", "identity_score": s, "needs_review": s < 32, **inputs,
         "output_uri": _image(layout.image(f"p-{s:.0f}", "png"), "blue")}
        for s in scores
    ]  # fmt: skip
    # a scene's step 2, scored low: its sheet shows what it was rendered into (step 1's render), not the photo
    rows += [
        {"pair_id": "s-1", "scene_id": "s", "step": 1, "identity_score": 90.0, **inputs,
         "output_uri": _image(layout.image("s-1", "png"), "yellow")},
        {"pair_id": "s-2", "scene_id": "s", "step": 2, "identity_score": 22.0, **inputs, "context_uri": None,
         "output_uri": _image(layout.image("s-2", "png"), "cyan")},
        {"pair_id": "broken", "status": "failed", "error_code": "image_unreadable", **inputs},
    ]  # fmt: skip
    parsed = _Tables(qa.lowest_identity(_table(rows), max_pixels=MAX_PIXELS))
    sheet = parsed.rows("lowest-identity", "lowest")
    assert [r["cells"][0]["text"].split(" | ")[0] for r in sheet] == [
        "p-20", "s-2", "p-25", "p-30", "p-35", "p-40", "p-45", "p-50", "p-55", "p-60", "p-65", "p-70",
    ]  # fmt: skip
    flagged = [r["cells"][0]["text"].split(" | ")[0] for r in sheet if "needs review" in r["cells"][0]["text"]]
    assert flagged == ["p-20", "p-25", "p-30"]
    assert "identity 20.00 needs review" in sheet[0]["cells"][0]["text"]
    assert "scene s step 2" in sheet[1]["cells"][0]["text"]
    assert [_shown(c) for c in sheet[1]["cells"][1:]] == ["yellow", "white", "cyan"]  # into step 1, product, output
    assert [_shown(c) for c in sheet[0]["cells"][1:]] == ["photo", "white", "blue"]
    everything = [*scores, 90.0, 22.0]
    p10, p50, p90 = np.percentile(everything, [10, 50, 90])  # the scores are on the 0.1 grid: exact
    mean = round(float(np.mean(everything)), 2)
    assert parsed.paragraphs["identity-distribution"] == (
        f"identity_score over 18 rendered rows: mean {mean:g} · p10 {p10:g} · p50 {p50:g} · p90 {p90:g}; "
        "needs_review: 3"
    )


def test_sections_are_left_out_for_a_manifest_without_the_columns(tmp_path):
    layout = Layout(str(tmp_path / "out"))
    rows = _scene_rows(tmp_path, layout, later_context=True)
    old = _table(rows, OLD_COLUMNS)
    assert qa.qa_sections(old, max_pixels=MAX_PIXELS) == []
    page = _Tables(render_report("r1", old, None, sample_size=2, max_pixels=MAX_PIXELS))
    assert not {"scene-strips", "variant-grids", "lowest-identity", "identity-distribution"} & set(page.ids)
    assert "sample" in page.ids  # the rest of the page as before
    # the columns present but no scene, no variants: only the identity section
    plain = _table([{**r, "scene_id": None, "step": None} for r in rows])
    ids = _Tables("".join(qa.qa_sections(plain, max_pixels=MAX_PIXELS))).ids
    assert "scene-strips" not in ids and "variant-grids" not in ids and "lowest-identity" in ids


def test_report_reads_the_columns_from_new_parts_and_not_from_old_ones(tmp_path):
    layout = Layout(str(tmp_path / "out"))
    old = _table(_scene_rows(tmp_path, layout, later_context=True), OLD_COLUMNS)
    storage.write_parquet(layout.manifest_part("old", 0), old)
    assert "scene_id" not in read_manifest_rows(layout, ["old"]).column_names
    assert qa.qa_sections(read_manifest_rows(layout, ["old"]), max_pixels=MAX_PIXELS) == []
    storage.write_parquet(layout.manifest_part("new", 0), _table(_variant_rows(tmp_path, layout)))
    storage.write_parquet(layout.manifest_part("new", 1), _table(_scene_rows(tmp_path, layout, later_context=True)))
    merged = read_manifest_rows(layout, ["old", "new"])
    assert {"scene_id", "step", "identity_score", "variant_scores", "chosen_variant"} <= set(merged.column_names)
    page = _Tables(storage.read_bytes(write_report(layout, "new", None, max_pixels=MAX_PIXELS)).decode())
    ids = page.ids
    # the new sections come after the random sample and before the failed pairs
    order = [ids.index(i) for i in ("sample", "scene-strips", "variant-grids", "lowest-identity", "failed-pairs")]
    assert order == sorted(order)
    assert [g["attrs"]["data-pair"] for g in page.rows("variant-grids", "pair")] == ["v-3", "v-1", "v-2"]
    assert [s["attrs"]["data-scene"] for s in page.rows("scene-strips", "scene")] == ["room-b", "room-a", "room-c"]
