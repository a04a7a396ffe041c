"""pipeline.clip_score on a tiny random CLIPModel saved in the real layout: preprocessing equal to
transformers' PIL-backed CLIP processor, scores equal to a computation done directly with
transformers on the same crop, and the crop/pad geometry on a hand-made image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import CLIPConfig, CLIPModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from pipeline.metrics.clip_score import ClipScorer, clip_pixel_values, pad_to_square, region_crop

GREY = 128


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> str:
    """ViT-B/32's image geometry (224 px, 32 px patches) at tiny widths."""
    config = CLIPConfig(
        text_config=dict(
            vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1,
        ),
        vision_config=dict(
            image_size=224, patch_size=32, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=2,
        ),
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("clip") / "clip-vit-b32-tiny")
    CLIPModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def scorer(clip_dir) -> ClipScorer:
    return ClipScorer(clip_dir, "cpu", batch_size=2)


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    # Photo-like (low frequency) content plus mild noise.
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    phase = rng.uniform(0, 6, size=3)
    base = np.stack([np.sin(4 * xx + phase[c]) * np.cos(3 * yy - phase[c]) for c in range(3)], -1)
    return np.clip(127.5 + 100 * base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def test_preprocessing_matches_the_pil_clip_processor():
    rng = np.random.default_rng(0)
    processor = CLIPImageProcessorPil()  # OpenAI's: shortest edge 224 bicubic, crop 224, CLIP mean/std
    for side in (37, 224, 500):  # up, none, down
        for image in (smooth_image(rng, side, side), rng.integers(0, 256, (side, side, 3), dtype=np.uint8)):
            ours = clip_pixel_values([image], 224)
            expected = processor(images=[image], return_tensors="pt")["pixel_values"]
            one_level = 1.0 / 255 / min(processor.image_std) + 1e-6
            difference = (ours - expected).abs()
            assert difference.max() <= one_level, side
            assert (difference > 1e-5).float().mean() < 1e-3, side  # PIL's fixed-point rounding, rarely


def test_score_equals_a_direct_transformers_computation(scorer, clip_dir):
    rng = np.random.default_rng(1)
    outputs = [smooth_image(rng, 120, 160), smooth_image(rng, 90, 90), smooth_image(rng, 300, 200)]
    boxes = [(20, 10, 100, 50), (0, 0, 90, 90), (15.5, 30.2, 150.7, 290)]
    products = [smooth_image(rng, 64, 40), smooth_image(rng, 50, 50), smooth_image(rng, 120, 300)]
    scores = scorer.score(outputs, boxes, products)
    assert scores.shape == (3,) and scores.dtype == np.float64

    # Independently: crop by slicing (fractional edges taken outwards), pad by hand, the
    # PIL-backed processor, and CLIPModel.forward's normalised image_embeds.
    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    processor = CLIPImageProcessorPil()
    crops = [outputs[0][10:50, 20:100], outputs[1], outputs[2][30:290, 15:151]]

    def padded(image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        side = max(height, width)
        square = np.full((side, side, 3), GREY, dtype=np.uint8)
        top, left = (side - height) // 2, (side - width) // 2
        square[top : top + height, left : left + width] = image
        return square

    pixel_values = processor(images=[padded(i) for i in crops + products], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        embeds = model(input_ids=torch.tensor([[0, 5, 2]]), pixel_values=pixel_values).image_embeds
    expected = 100 * (embeds[:3] * embeds[3:]).sum(-1).double().numpy()
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-3)
    # Batching (batch_size=2 split these 3 pairs) changes nothing.
    np.testing.assert_allclose(scorer.score(outputs[2:], boxes[2:], products[2:]), scores[2:], rtol=0, atol=1e-4)


def test_crop_and_pad_geometry(scorer):
    # A 60 x 40 (W x H) photo, blue everywhere but a red 20 x 10 region at x 10..30, y 5..15
    # with one green pixel marking its top-left corner.
    output = np.zeros((40, 60, 3), dtype=np.uint8)
    output[...] = (0, 0, 255)
    output[5:15, 10:30] = (255, 0, 0)
    output[5, 10] = (0, 255, 0)
    square = pad_to_square(region_crop(output, (10, 5, 30, 15)))
    # 20 wide, 10 high -> a 20 x 20 square, the crop centred vertically: 5 grey rows on top.
    expected = np.full((20, 20, 3), GREY, dtype=np.uint8)
    expected[5:15] = (255, 0, 0)
    expected[5, 0] = (0, 255, 0)
    assert np.array_equal(square, expected)
    # Odd margins: the extra row goes to the bottom.
    assert np.array_equal(pad_to_square(np.zeros((2, 5, 3), dtype=np.uint8))[:, 0, 0], [GREY, 0, 0, GREY, GREY])
    # A box overhanging the photo is clipped to it; one that misses it is an error.
    assert region_crop(output, (50, 30, 70, 50)).shape == (10, 10, 3)
    with pytest.raises(ValueError, match="covers no pixel"):
        region_crop(output, (60, 0, 70, 10))

    # Through the scorer: the region's own pixels as the product (unpadded; the scorer pads
    # it the same way) score 100; the same pixels shifted by a few pixels score less.
    product = output[5:15, 10:30].copy()
    same, shifted = scorer.score([output, output], [(10, 5, 30, 15), (6, 3, 26, 13)], [product, product])
    assert same == pytest.approx(100.0, abs=1e-4)
    assert shifted < same - 1e-3


def test_bad_arguments(scorer, tmp_path):
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="2 outputs, 1 boxes and 2 products"):
        scorer.score([image, image], [(0, 0, 4, 4)], [image, image])
    with pytest.raises(ValueError, match=r"H x W x 3 uint8 image, got \(8, 8, 4\)"):
        scorer.score([image], [(0, 0, 4, 4)], [np.zeros((8, 8, 4), dtype=np.uint8)])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ClipScorer(str(tmp_path / "missing"))
