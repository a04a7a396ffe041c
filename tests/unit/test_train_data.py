"""Training data without Ray: the render job's preprocessing, the deterministic order, per-sample draws.

The read and prepare stages run here as plain functions on one manifest file (the Ray Data graph
calls exactly these); tests/integration/test_train.py runs them through Ray.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline import compose, images, regions
from pipeline.config import RENDER_DEFAULTS
from pipeline.fetch import InputPolicy
from pipeline.manifest import pair_id_conflicts, plan_manifest
from pipeline.stages.prepare_stage import PrepareConfig, prepare_batch, prepare_pair
from pipeline.stages.read_stage import planned_batches
from pipeline.toy.catalog import make_training_catalog
from pipeline.train.dataset import TRAIN_PAYLOADS, prepare_training_batch, read_training_files
from pipeline.train.samples import Augment, SampleSet, build_batch, positions, sample_at

R, S = 128, 224


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> str:
    return make_training_catalog(str(tmp_path_factory.mktemp("train-catalog")), n_pairs=8, bad_rows=True)


@pytest.fixture(scope="module")
def prepared(catalog) -> pa.Table:
    plan = plan_manifest(catalog)
    config = PrepareConfig(InputPolicy(plan.base_dir), resolution=R, product_size=S)
    rows = read_training_files({"file_index": [0]}, plan=plan, conflicts_ref=[])
    return pa.concat_tables([prepare_training_batch(batch, config=config) for batch in rows])


def test_training_preprocessing_is_the_render_jobs(catalog, prepared):
    plan = plan_manifest(catalog)
    config = PrepareConfig(InputPolicy(plan.base_dir), resolution=R, product_size=S)
    (rows,) = list(planned_batches(plan, 0, pair_id_conflicts(plan), None, 64))
    rendered = prepare_batch(rows, config=config)  # the render job's prepare stage on the same rows
    assert rendered["pair_id"].to_pylist() == prepared["pair_id"].to_pylist()
    assert rendered["error_code"].to_pylist() == prepared["error_code"].to_pylist()
    for column in ("model_context", "model_hole", "model_product", "model_hint", "model_hint_mask"):
        assert rendered[column].to_pylist() == prepared[column].to_pylist(), column


def test_the_box_variant_is_prepare_pair_on_the_masks_bounding_box(catalog, prepared):
    plan = plan_manifest(catalog)
    config = PrepareConfig(InputPolicy(plan.base_dir), resolution=R, product_size=S)
    rows = {r["pair_id"]: r for r in prepared.to_pylist()}
    mask_rows = [
        r for r in next(planned_batches(plan, 0, pair_id_conflicts(plan), None, 64)).to_pylist() if r["mask_uri"]
    ]
    assert mask_rows
    for row in mask_rows:
        fine = prepare_pair(row["context_uri"], row["product_uri"], row["mask_uri"], None, config)
        box = regions.bounding_box(fine.hole)
        expected = prepare_pair(row["context_uri"], row["product_uri"], None, [float(v) for v in box], config).model
        got = rows[row["pair_id"]]
        hole = np.frombuffer(got["box_hole"], dtype=bool).reshape(R, R)
        assert np.array_equal(hole, expected["hole"]) and got["box_hint"] == expected["hint"].tobytes()
        # the box hole is the fine hole's bounding box at model scale, and contains it
        assert regions.filled_box(hole) == regions.bounding_box(fine.model["hole"])
        assert not (fine.model["hole"] & ~hole).any()
    for row in prepared.to_pylist():  # bbox rows: their own box, no second copy
        if not row["error_code"] and row["pair_id"] not in {r["pair_id"] for r in mask_rows}:
            assert row["box_hole"] == b"" and row["model_hole"]


def test_bad_rows_keep_the_render_jobs_error_codes(prepared):
    codes = dict(zip(prepared["pair_id"].to_pylist(), prepared["error_code"].to_pylist()))
    assert codes.pop("bad-missing-context") == "image_missing"
    assert codes.pop("bad-bbox-outside") == "bad_bbox"
    assert set(codes.values()) == {""}
    bad = prepared.filter(pa.compute.not_equal(prepared["error_code"], ""))
    assert all(bad[c].to_pylist() == [b""] * bad.num_rows for c in TRAIN_PAYLOADS)


def test_the_order_is_a_pure_function_of_seed_and_step():
    n, batch = 7, 4
    one = [sample_at(p, 3, n) for step in range(5) for p in positions(step, batch, 0, 1)]
    two = [sample_at(p, 3, n) for step in range(5) for rank in range(2) for p in positions(step, batch, rank, 2)]
    assert one == two  # 2 workers x 2 take exactly what 1 worker x 4 takes, in the same order
    resumed = [sample_at(p, 3, n) for step in range(3, 5) for p in positions(step, batch, 0, 1)]
    assert resumed == one[12:]
    epochs = [e for _, e in one]
    assert epochs == sorted(epochs) and epochs[-1] == 2  # 20 positions over 7 samples: epochs 0, 1, 2
    for epoch in range(2):  # every epoch visits every sample once
        assert sorted(i for i, e in one if e == epoch) == list(range(n))
    assert [sample_at(p, 4, n) for p in range(7)] != [sample_at(p, 3, n) for p in range(7)]


def _samples(prepared) -> SampleSet:
    rows = [r for r in prepared.to_pylist() if not r["error_code"]]
    return SampleSet.from_rows(rows, R, S)


def test_a_samples_draws_do_not_depend_on_its_batch(prepared):
    samples = _samples(prepared)
    augment = Augment(bbox_mask_prob=0.5, flip_prob=0.5, rotate_degrees=15, cfg_drop=0.5)
    picks = [(0, 0), (3, 0), (5, 1), (0, 1)]
    together = build_batch(samples, picks, 0, augment, (4, 16, 16))
    for j, pick in enumerate(picks):
        alone = build_batch(samples, [pick], 0, augment, (4, 16, 16))
        for name, value in alone.__dict__.items():
            assert torch.equal(value[0], getattr(together, name)[j]), (pick, name)
    assert not torch.equal(together.noise[0], together.noise[3])  # another epoch, other draws
    # over many draws every augmentation happens, at about its rate
    many = build_batch(
        samples, [(i % len(samples), e) for e in range(16) for i in range(len(samples))], 0, augment, (4, 16, 16)
    )
    assert 0.35 < float(many.drop.float().mean()) < 0.65
    assert len(set(many.timesteps.tolist())) > 60


def test_a_flip_of_the_prepared_pair_is_the_preprocessing_of_the_flipped_pair(catalog, prepared):
    """Flipping the model inputs (as the augmentation does) equals preprocessing the mirrored photo,
    region and product: the hint builder's rectangle and resize are mirror-symmetric (bbox rows; a
    fine mask's inscribed rectangle may break a tie the other way), within 1 level."""
    plan = plan_manifest(catalog)
    row = next(r for r in next(planned_batches(plan, 0, pair_id_conflicts(plan), None, 64)).to_pylist() if r["bbox"])
    limit = RENDER_DEFAULTS.max_pixels
    photo = images.decode_image(open(row["context_uri"], "rb").read(), max_pixels=limit)
    product = images.decode_image(
        open(row["product_uri"], "rb").read(), max_pixels=limit, keep_alpha=True, premultiply=True
    )
    hole = regions.region_from_bbox(row["bbox"], photo.shape[1], photo.shape[0])
    margin = RENDER_DEFAULTS.crop_margin
    plain = compose.preprocess(photo, hole, product, R, S, margin=margin)
    mirrored = compose.preprocess(photo[:, ::-1], hole[:, ::-1], product[:, ::-1], R, S, margin=margin)
    for key in ("context", "hole", "hint", "hint_mask", "product"):
        flipped = plain[key][:, ::-1].astype(int)
        assert np.abs(flipped - mirrored[key].astype(int)).max() <= 1, key
