"""Scenes and variants through the render job: real local Ray, tiny model, PNG output (pixels
compare exactly). A scene renders step by step into the previous step's pixels; its faults,
resume and staleness follow DESIGN.md "Scenes and variants"; variants ride in the same batches.
"""

from __future__ import annotations

import io
import json
import os
import signal
import time

import numpy as np
import pyarrow as pa
import pytest
from helpers import FAST, read_manifest, subprocess_render, wait_for_parts
from helpers import render_args as _render_args
from PIL import Image

from jobs.render import main as render
from pipeline import images, regions, storage
from pipeline.config import RENDER_DEFAULTS
from pipeline.sample_catalog import make_catalog, make_scene_catalog
from pipeline.stages.scene_stage import pixels_digest

SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("scene_id", pa.string()),
        ("step", pa.int64()),
        ("context_uri", pa.string()),
        ("product_uri", pa.string()),
        ("bbox", pa.list_(pa.float64())),
        ("seed", pa.int64()),
    ]
)


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory) -> str:
    """Photos scene-000..003 and products item-1..3 of each (make_scene_catalog's images)."""
    folder = tmp_path_factory.mktemp("scene-images")
    make_scene_catalog(str(folder), n_scenes=4, steps=3)
    return str(folder)


def _scene(images_dir: str, scene: str, photo: int, steps: list[int], changes: dict | None = None) -> list[dict]:
    """Rows of `scene` on photo `photo`, step k with item k's product and cell (k - 1) % 3."""
    table = storage.read_parquet(os.path.join(images_dir, "manifest.parquet")).to_pylist()
    cells = {(r["scene_id"], r["step"]): r for r in table}
    rows = []
    for k in steps:
        base = cells[(f"scene-{photo:03d}", (k - 1) % 3 + 1)]
        row = {
            "pair_id": f"{scene}-{k}" if steps.count(k) == 1 else f"{scene}-{k}-{len(rows)}",
            "scene_id": scene,
            "step": k,
            "context_uri": os.path.join(images_dir, f"images/scene-{photo:03d}.jpg") if k == 1 else None,
            "product_uri": os.path.join(images_dir, base["product_uri"]),
            "bbox": base["bbox"],
            "seed": None,
        }
        rows.append({**row, **(changes or {}).get(k, {})})
    return rows


def render_args(manifest, output, model, images_dir: str, *flags: str) -> list[str]:
    """The photos and products sit in the images fixture's folder, not beside the manifests."""
    return [*_render_args(manifest, output, model, *flags), "--allow-root", images_dir]


def _write(path, rows: list[dict]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    storage.write_parquet(str(path), pa.Table.from_pylist(rows, schema=SCHEMA))
    return str(path)


def _by_pair(output, run_id: str) -> dict[str, dict]:
    return {r["pair_id"]: r for r in read_manifest(str(output), run_id).to_pylist()}


def _pixels(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(storage.read_bytes(uri))).convert("RGB"))


def test_scenes_render_in_order_losslessly_and_fail_as_the_contract_says(ray_address, tiny_model_dir, images_dir):
    folder = os.path.join(os.path.dirname(images_dir), "scene-manifest")
    first = (
        _scene(images_dir, "A", 0, [1, 2, 3])
        + _scene(images_dir, "B", 1, [1, 2, 3], {2: {"product_uri": os.path.join(images_dir, "images/gone.png")}})
        + _scene(images_dir, "C", 2, [1, 3])  # a gap
        + _scene(images_dir, "D", 2, [1, 2, 2])  # a repeated step
        + _scene(images_dir, "E", 3, list(range(1, 10)))  # over --max-scene-steps 8
        + _scene(images_dir, "F", 3, [1, 3])
    )
    _write(os.path.join(folder, "a.parquet"), first)
    _write(os.path.join(folder, "b.parquet"), _scene(images_dir, "F", 3, [2]))  # F's step 2 in another file
    output = os.path.join(folder, "out")
    args = render_args(folder, output, tiny_model_dir, images_dir, *FAST, "--run-id", "s1", "--no-metrics")
    assert render([*args, "--max-failed-fraction", "0.9"]) == 0  # most rows fail, on purpose
    rows = _by_pair(output, "s1")
    assert len(rows) == len(first) + 1

    # A: every pixel outside the regions is the photo's; step 1's region keeps step 1's render
    photo = images.decode_image(storage.read_bytes(rows["A-1"]["context_uri"]), max_pixels=RENDER_DEFAULTS.max_pixels)
    h, w = photo.shape[:2]
    holes = {
        k: regions.region_of(None, rows[f"A-{k}"]["bbox"], w, h, max_pixels=RENDER_DEFAULTS.max_pixels)
        for k in (1, 2, 3)
    }
    final, step1 = _pixels(rows["A-3"]["output_uri"]), _pixels(rows["A-1"]["output_uri"])
    outside = ~(holes[1] | holes[2] | holes[3])
    assert np.array_equal(final[outside], photo[outside])
    assert np.array_equal(final[holes[1]], step1[holes[1]])  # no generation loss between steps
    assert not np.array_equal(final[holes[3]], photo[holes[3]])  # step 3 painted its region
    # each step was rendered into exactly its predecessor's pixels, as their digests show
    assert rows["A-1"]["context_digest"] == pixels_digest(photo)
    for k in (1, 2, 3):
        row = rows[f"A-{k}"]
        assert row["status"] == "ok" and row["pixels_digest"] == pixels_digest(_pixels(row["output_uri"]))
        lossless = os.path.join(output, "scenes", "A", f"A-{k}.png")
        assert pixels_digest(_pixels(lossless)) == row["pixels_digest"]
        if k > 1:
            assert row["context_digest"] == rows[f"A-{k - 1}"]["pixels_digest"]
        assert row["identity_score"] is not None and row["context_uri"] == rows["A-1"]["context_uri"]

    # B: step 2's product is missing; step 3 has nothing to be rendered into
    assert rows["B-1"]["status"] == "ok"
    assert rows["B-2"]["error_code"] == "image_missing"
    assert rows["B-3"]["error_code"] == "upstream_failed" and "step 2 (B-2)" in rows["B-3"]["error_message"]
    # C, D, E: every row of a bad scene fails
    for scene, why in (("C", "gap"), ("D", "more than once"), ("E", "over --max-scene-steps")):
        bad = [r for p, r in rows.items() if r["scene_id"] == scene]
        assert bad and all(r["error_code"] == "scene_invalid" and why in r["error_message"] for r in bad), scene
    # F: rows from two files meet and render in step order
    assert [rows[f"F-{k}"]["status"] for k in (1, 2, 3)] == ["ok"] * 3
    assert rows["F-2"]["context_digest"] == rows["F-1"]["pixels_digest"]
    assert rows["F-3"]["context_digest"] == rows["F-2"]["pixels_digest"]
    record = json.loads(storage.read_bytes(os.path.join(output, "runs", "s1.json")))
    assert record["counts"]["identity_score"]["all"]["n"] == record["counts"]["ok"] == 7


def test_a_scene_cut_short_resumes_and_a_changed_step_makes_the_later_ones_stale(
    ray_address, tiny_model_dir, images_dir, tmp_path
):
    g, h = _scene(images_dir, "G", 0, [1, 2, 3]), _scene(images_dir, "H", 1, [1, 2])
    manifest = _write(tmp_path / "m" / "scenes.parquet", [g[0], g[1], *h, g[2]])
    output = tmp_path / "out"
    args = render_args(manifest, output, tiny_model_dir, images_dir, *FAST, "--no-metrics")
    # a nightly cut off after 4 rows: G's steps 1-2 and all of H are done, G's step 3 is not
    assert render([*args, "--run-id", "r1", "--limit", "4"]) == 0
    assert sorted(_by_pair(output, "r1")) == ["G-1", "G-2", "H-1", "H-2"]
    assert render([*args, "--run-id", "r2"]) == 0
    r2 = _by_pair(output, "r2")
    assert {p: r["attempt"] for p, r in r2.items()} == {"G-1": 0, "G-2": 0, "H-1": 0, "H-2": 0, "G-3": 1}
    assert r2["G-3"]["status"] == "ok" and r2["G-3"]["context_digest"] == r2["G-2"]["pixels_digest"]

    # step 1 rendered again (here: a new seed, by a run of its own) ...
    new_seed = {1: {"seed": 7}}
    alone = _write(tmp_path / "m1" / "step1.parquet", _scene(images_dir, "G", 0, [1], new_seed))
    assert render(render_args(alone, output, tiny_model_dir, images_dir, *FAST, "--no-metrics", "--run-id", "r3")) == 0
    assert _by_pair(output, "r3")["G-1"]["attempt"] == 1
    # ... makes steps 2-3 stale: their context is no longer step 1's output; nothing else renders
    changed = _write(tmp_path / "m2" / "scenes.parquet", [*_scene(images_dir, "G", 0, [1, 2, 3], new_seed), *h])
    assert (
        render(render_args(changed, output, tiny_model_dir, images_dir, *FAST, "--no-metrics", "--run-id", "r4")) == 0
    )
    r4 = _by_pair(output, "r4")
    assert {p: r["attempt"] for p, r in r4.items()} == {"G-1": 0, "G-2": 1, "G-3": 1, "H-1": 0, "H-2": 0}
    assert r4["G-2"]["context_digest"] == r4["G-1"]["pixels_digest"] != r2["G-1"]["pixels_digest"]


def test_variants_ride_in_one_batch_keep_the_best_and_are_in_the_settings(
    ray_address, tiny_model_dir, images_dir, tmp_path
):
    manifest = make_catalog(str(tmp_path / "catalog"), n_pairs=4, bad_rows=False)
    output = tmp_path / "out"
    args = render_args(manifest, output, tiny_model_dir, images_dir, *FAST, "--no-metrics")
    assert render([*args, "--run-id", "v4", "--variants", "4", "--keep-variants", "--min-identity-score", "60"]) == 0
    v4 = _by_pair(output, "v4")
    for pair_id, row in v4.items():
        seeds, scores, chosen = row["variant_seeds"], row["variant_scores"], row["chosen_variant"]
        assert len(set(seeds)) == 4 and len(scores) == 4 and chosen == int(np.argmax(scores))
        assert row["identity_score"] == scores[chosen] and row["needs_review"] == (scores[chosen] < 60)
        kept = sorted(os.listdir(output / "variants" / pair_id))
        assert kept == [f"{k}.png" for k in range(4) if k != chosen]

    # the chosen image is a single render with the chosen seed (DESIGN: within 1 level)
    table = storage.read_parquet(manifest)
    seeds = [v4[p]["variant_seeds"][v4[p]["chosen_variant"]] for p in table["pair_id"].to_pylist()]
    single = tmp_path / "catalog" / "single.parquet"  # beside the catalog: its relative paths hold
    storage.write_parquet(str(single), table.append_column("seed", pa.array(seeds, pa.int64())))
    assert (
        render([*render_args(single, tmp_path / "single-out", tiny_model_dir, images_dir, *FAST, "--no-metrics")]) == 0
    )
    for pair_id, row in v4.items():
        one = _pixels(str(tmp_path / "single-out" / "images" / f"{pair_id}.png")).astype(int)
        assert np.abs(one - _pixels(row["output_uri"])).max() <= 1, pair_id

    # another N is another setting: every pair is rendered again
    assert render([*args, "--run-id", "v2", "--variants", "2"]) == 0
    v2 = _by_pair(output, "v2")
    assert {r["attempt"] for r in v2.values()} == {1}
    assert {r["settings_digest"] for r in v2.values()}.isdisjoint({r["settings_digest"] for r in v4.values()})


def test_a_killed_run_with_scenes_and_variants_resumes_keeping_its_choices(
    ray_address, tiny_model_dir, images_dir, tmp_path
):
    rows = [r for s in range(6) for r in _scene(images_dir, f"K{s}", s % 4, [1, 2])]
    manifest = _write(tmp_path / "m" / "k.parquet", rows)
    output = tmp_path / "out"
    args = [
        *render_args(manifest, output, tiny_model_dir, images_dir, *FAST, "--no-metrics", "--variants", "2"),
        *("--batch-size", "1", "--address", ray_address, "--config", str(tmp_path / "k.yaml")),
    ]
    (tmp_path / "k.yaml").write_text("manifest_part_rows: 1\nlock_stale_s: 3\n")
    first = subprocess_render([*args, "--run-id", "k1"], tmp_path / "first.log")
    try:
        wait_for_parts(first, output, "k1", 2, tmp_path / "first.log")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    done = {p: r for p, r in _by_pair(output, "k1").items() if r["status"] == "ok"}
    assert 0 < len(done) < len(rows)
    time.sleep(3.5)  # the killed run's lock goes stale
    assert render([*args, "--run-id", "k2"]) == 0
    k2 = _by_pair(output, "k2")
    assert len(k2) == len(rows) and {r["status"] for r in k2.values()} == {"ok"}
    for pair_id, row in done.items():  # finished before the kill: carried, choices kept
        assert k2[pair_id]["attempt"] == 0
        assert (k2[pair_id]["chosen_variant"], k2[pair_id]["variant_scores"]) == (
            row["chosen_variant"],
            row["variant_scores"],
        )
    for s in range(6):  # every scene's step 2 was rendered into its step 1's current output
        assert k2[f"K{s}-2"]["context_digest"] == k2[f"K{s}-1"]["pixels_digest"]
    assert sum(r["attempt"] == 1 for r in k2.values()) == len(rows) - len(done)
