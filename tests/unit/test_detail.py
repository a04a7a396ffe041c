"""The detail catalog (`make_training_catalog(kind="detail")`) and its weights-free metrics
(`pipeline.toy.detail_eval`), against synthetic ground truth: the true composites score perfectly,
an empty hole scores chance, the copy-pasted hint sits in between."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.make_training_catalog import main as make_catalog
from pipeline.config import RENDER_DEFAULTS
from pipeline.model.presets import TRAIN_TINY_PRODUCT_SIZE, unet_config, vae_config
from pipeline.toy import catalog, detail_eval, synthetic_eval


@pytest.fixture(scope="module")
def detail(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("detail"))
    assert make_catalog(["--out", folder, "--kind", "detail", "--pairs", "24", "--test-pairs", "8"]) == 0
    rows = pq.read_table(os.path.join(folder, "manifest.parquet")).to_pylist()
    test = pq.read_table(os.path.join(folder, "test.parquet")).to_pylist()
    return folder, rows, test


def _images(folder: str, test: list[dict], key) -> dict[str, np.ndarray]:
    return {r["pair_id"]: detail_eval._load(folder, key(r)) for r in test}


def test_test_codes_are_unseen_and_test_hues_lie_between_train_bands(detail):
    folder, rows, test = detail
    for row in rows:
        assert catalog.code_split(row["code"]) == row["split"] == catalog.detail_hue_split(row["hue"])
    assert {catalog.code_split(r["code"]) for r in test} == {"test"}
    assert {catalog.detail_hue_split(r["hue"]) for r in test} == {"test"}
    for r in test:  # a narrow band: train hues on both sides, 10 deg from its centre
        centre = catalog.band_centre(r["hue"])
        assert abs(r["hue"] - centre) <= catalog.BAND_DEG / 2
        assert catalog.detail_hue_split(centre - catalog.BAND_DEG) == catalog.detail_hue_split(centre + 10) == "train"
    assert {r["code"] for r in rows}.isdisjoint(r["code"] for r in test)
    swaps = [r for r in test if r["role"] == "swap"]
    assert len(swaps) == 8 and all(r["code"] != r["scene_code"] for r in swaps)
    with open(os.path.join(folder, "catalog.json")) as f:
        metadata = json.load(f)
    assert metadata["cell_px"] == catalog.detail_geometry()["cell_px"] > 8  # pixels per cell at 64 px
    assert metadata["latent_px_per_cell"] > 2 and len(metadata["test_codes"]) == 64


def test_the_geometry_is_the_train_tiny_presets():
    factor = 2 ** (len(vae_config("train-tiny")["block_out_channels"]) - 1)
    assert factor == catalog.DETAIL_VAE_FACTOR
    assert unet_config("train-tiny")["sample_size"] * factor == catalog.DETAIL_RESOLUTION
    assert RENDER_DEFAULTS.crop_margin == catalog.DETAIL_CROP_MARGIN


def test_the_toy_kind_is_unchanged_and_a_bad_kind_is_refused(tmp_path):
    catalog.make_training_catalog(str(tmp_path), n_pairs=4)
    rows = pq.read_table(tmp_path / "manifest.parquet").to_pylist()
    assert "quadrant" in rows[0] and "code" not in rows[0]
    assert not (tmp_path / "catalog.json").exists()
    with pytest.raises(SystemExit) as refused:
        make_catalog(["--out", str(tmp_path), "--kind", "glyph"])
    assert refused.value.code == 2


def test_the_true_composites_score_perfectly_and_an_empty_hole_scores_chance(detail):
    folder, _, test = detail
    truth = detail_eval.evaluate_detail(
        test, _images(folder, test, lambda r: r["target_uri"] or r["context_uri"]), folder
    )
    assert truth["detail_acc"] == truth["code_exact"] == truth["swap"] == 1.0
    assert truth["hue_error_deg"] < 1 and truth["hue_slope"] == pytest.approx(1, abs=0.1)
    assert truth["masked_ssim"] == pytest.approx(1.0) and truth["masked_psnr_db"] > 60
    empty = detail_eval.evaluate_detail(test, _images(folder, test, lambda r: r["context_uri"]), folder)
    assert empty["hue_error_deg"] == detail_eval.CHANCE["hue_error_deg"] and empty["hue_slope"] is None
    assert empty["swap"] == detail_eval.CHANCE["swap"] and empty["code_exact"] == 0
    assert empty["masked_ssim"] < 0.6 and empty["own_rows"] == 8 and empty["missing_rows"] == 0


def test_the_copy_pasted_hint_carries_the_code_and_the_hue(detail):
    folder, _, test = detail
    pasted = synthetic_eval.copy_paste_images(os.path.join(folder, "test.parquet"), 64, TRAIN_TINY_PRODUCT_SIZE)
    scores = detail_eval.evaluate_detail(test, pasted, folder)
    assert scores["detail_acc"] >= 0.75 and scores["swap"] == 1.0
    assert scores["hue_error_deg"] < 2 and scores["hue_slope"] == pytest.approx(1, abs=0.15)
    del pasted["test-0000-own"]
    assert detail_eval.evaluate_detail(test, pasted, folder)["missing_rows"] == 1


def test_read_code_reads_every_code_drawn():
    rng = np.random.default_rng(0)
    mask = np.zeros((80, 90), bool)
    mask[10:70, 20:80] = True
    for code in (0, 511, 0b101010101, *rng.integers(0, 512, 5)):
        drawing = catalog.detail_image(200.0, int(code))[..., :3]
        image = np.full((80, 90, 3), 128, np.uint8)
        image[10:70, 20:80] = np.asarray(Image.fromarray(drawing).resize((60, 60)))
        assert detail_eval.read_code(image, mask) == catalog.code_bits(int(code))


def test_within_band_slope():
    rng = np.random.default_rng(1)
    true = [catalog.band_centre(b * 60 + 15) + x for b in range(6) for x in rng.uniform(-5, 5, 4)]
    centres = [catalog.band_centre(h) for h in true]
    assert detail_eval.within_band_slope(true, true) == pytest.approx(1)
    assert detail_eval.within_band_slope(true, centres) == pytest.approx(0)  # the band-centre painter
    offsets = {c: 7.0 * k for k, c in enumerate(sorted(set(centres)))}  # one offset per band is not slope
    banded = [c + 0.5 * (h - c) + offsets[c] for h, c in zip(true, centres)]
    assert detail_eval.within_band_slope(true, banded) == pytest.approx(0.5)
    assert detail_eval.within_band_slope(true[:1], true[:1]) is None


def test_masked_ssim_and_psnr_look_at_the_region_only():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 255, (48, 48, 3)).astype(np.uint8)
    mask = np.zeros((48, 48), bool)
    mask[12:36, 12:36] = True
    changed = image.copy()
    changed[:6] = 0  # outside the region, beyond SSIM's window
    assert detail_eval.masked_ssim(image, changed, mask) == pytest.approx(1.0)
    noisy = (image.astype(int) + rng.normal(0, 40, image.shape)).clip(0, 255).astype(np.uint8)
    assert detail_eval.masked_ssim(image, noisy, mask) < 0.9
    assert 10 < detail_eval.masked_psnr(image, noisy, mask) < 25


def test_eval_synthetic_scores_a_detail_catalog_with_the_detail_metrics(detail, capsys):
    from jobs.eval_synthetic import main as eval_synthetic

    folder, _, test = detail
    assert catalog.catalog_kind(folder) == "detail" and catalog.catalog_kind(os.path.dirname(folder)) == "toy"
    assert eval_synthetic(["--test-manifest", os.path.join(folder, "test.parquet"), "--copy-paste"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    pasted = synthetic_eval.copy_paste_images(os.path.join(folder, "test.parquet"), 64, TRAIN_TINY_PRODUCT_SIZE)
    assert printed == {"run_id": "copy-paste", **detail_eval.evaluate_detail(test, pasted, folder)}


def test_the_qa_page_shows_the_detail_metrics_beside_the_hue_error():
    from pipeline.metrics.report import _identity

    page = _identity({"detail_acc": 0.91, "code_exact": 0.5, "hue_error_deg": 9.5, "hue_slope": 0.2, "swap": 1.0})
    for label in ("detail accuracy", "code exact", "hue error", "within-band hue slope", "swap test"):
        assert label in page
    assert "label quadrant" not in page  # a colour-toy metric the detail scores do not have
    assert "label quadrant" in _identity({"hue_error_deg": 12.0, "quadrant_acc": 0.3})
