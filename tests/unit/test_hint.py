"""The DTC hint: the product at working resolution, built on the CPU from the full-resolution
product (compose.preprocess), carried as payload columns to the render stage, and turned into
the tensor the hint adapter receives (DTCPipeline.__call__).

The reference hint is computed independently: Pillow's own RGBA resize (which premultiplies
internally) of the straight-alpha product, an alpha >= 128 gate, and a brute-force search for
the largest rectangle inside the model-scale hole.
"""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from pipeline.compose import preprocess
from pipeline.config import RENDER_DEFAULTS
from pipeline.fetch import InputPolicy
from pipeline.images import decode_image
from pipeline.model.loading import load_pipeline
from pipeline.model.pipeline_dtc import DTCPipeline
from pipeline.model.renderer import Renderer
from pipeline.payload import MODEL_INPUTS
from pipeline.schema import RENDER
from pipeline.stages.prepare_stage import PrepareConfig, prepare_batch, prepare_pair
from pipeline.stages.render_stage import _Work

RESOLUTION, PRODUCT_SIZE = 48, 16
PHOTO_H, PHOTO_W = 120, 160
OUTER, INNER = (30, 20, 130, 100), (50, 40, 80, 70)  # x0, y0, x1, y1 of the ring's outside and its hole


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _photo() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (PHOTO_H, PHOTO_W, 3), dtype=np.uint8)


def _ring() -> np.ndarray:
    """A region with a hole in it: its bounding box is not inside it, the inscribed rectangle is."""
    hole = np.zeros((PHOTO_H, PHOTO_W), bool)
    hole[OUTER[1] : OUTER[3], OUTER[0] : OUTER[2]] = True
    hole[INNER[1] : INNER[3], INNER[0] : INNER[2]] = False
    return hole


def _product() -> np.ndarray:
    """Straight-alpha RGBA, 90 high x 60 wide: a transparent 6 px margin, a smooth colour field
    with a sharp stripe (fine detail), a half-transparent left edge (alpha 160, over the gate)
    and right edge (alpha 96, under it)."""
    height, width = 90, 60
    ys, xs = np.mgrid[0:height, 0:width]
    rgba = np.zeros((height, width, 4), np.uint8)
    rgba[..., 0] = 40 + 2 * ys
    rgba[..., 1] = 220 - 3 * xs
    rgba[..., 2] = 90 + ys + xs
    rgba[40:46, :, :3] = (250, 250, 20)  # the stripe
    rgba[6:84, 6:54, 3] = 255
    rgba[6:84, 6:12, 3] = 160
    rgba[6:84, 48:54, 3] = 96
    return rgba


def _brute_force_rectangle(hole: np.ndarray) -> tuple[tuple[int, int, int, int], int]:
    """The largest all-True rectangle (y0, x0, y1, x1) by trying every one (O(n^4), with a 1-D
    prefix sum per row span), and how many rectangles have that area."""
    height, width = hole.shape
    best, best_area, ties = None, 0, 0
    for y0 in range(height):
        for y1 in range(y0 + 1, height + 1):
            full = hole[y0:y1].all(axis=0)
            misses = np.concatenate([[0], np.cumsum(~full)])  # misses in [x0, x1) = misses[x1] - misses[x0]
            x0, x1 = np.meshgrid(np.arange(width + 1), np.arange(width + 1), indexing="ij")
            ok = (x1 > x0) & (misses[x1] - misses[x0] == 0)
            areas = np.where(ok, (x1 - x0) * (y1 - y0), 0)
            top = int(areas.max())
            if top > best_area:
                i, j = np.unravel_index(int(areas.argmax()), areas.shape)
                best, best_area, ties = (y0, int(i), y1, int(j)), top, int((areas == top).sum())
            elif top == best_area and top:
                ties += int((areas == top).sum())
    return best, ties


def _reference_hint(product_rgba: np.ndarray, hole: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hint, hint_mask, resized alpha) from Pillow and the brute-force rectangle."""
    (y0, x0, y1, x1), ties = _brute_force_rectangle(hole)
    assert ties == 1, "the test's ring must have one largest rectangle"
    small = np.asarray(Image.fromarray(product_rgba, "RGBA").resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR))
    hint = np.zeros((*hole.shape, 3), np.uint8)
    mask = np.zeros(hole.shape, bool)
    alpha = np.zeros(hole.shape, np.uint8)
    gate = small[..., 3] >= 128
    hint[y0:y1, x0:x1] = np.where(gate[..., None], small[..., :3], 0)
    mask[y0:y1, x0:x1] = gate
    alpha[y0:y1, x0:x1] = small[..., 3]
    return hint, mask, alpha


def _model_inputs() -> dict:
    # the stage's decode
    product = decode_image(_png(_product()), max_pixels=RENDER_DEFAULTS.max_pixels, keep_alpha=True, premultiply=True)
    return preprocess(_photo(), _ring(), product, RESOLUTION, PRODUCT_SIZE, margin=RENDER_DEFAULTS.crop_margin)


def test_hint_is_the_full_resolution_product_in_the_inscribed_rectangle():
    out = _model_inputs()
    hint, mask = out["hint"], out["hint_mask"]
    assert hint.shape == (RESOLUTION, RESOLUTION, 3) and hint.dtype == np.uint8
    assert mask.shape == (RESOLUTION, RESOLUTION) and mask.dtype == bool
    ref_hint, ref_mask, ref_alpha = _reference_hint(_product(), out["hole"])
    (y0, x0, y1, x1), _ = _brute_force_rectangle(out["hole"])
    ys, xs = np.nonzero(out["hole"])
    assert (y0, x0, y1, x1) != (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)  # the ring's hole matters
    assert (y1 - y0) * 90 != (x1 - x0) * 60  # stretched: aspect not kept

    # outside the rectangle: exactly nothing
    outside = np.ones(mask.shape, bool)
    outside[y0:y1, x0:x1] = False
    assert not mask[outside].any() and not hint[outside].any()
    # the gate: the same pixels, except where the two resizes may round an alpha of ~128 apart
    near_threshold = np.abs(ref_alpha.astype(int) - 128) <= 1
    assert np.array_equal(mask[~near_threshold], ref_mask[~near_threshold])
    assert mask.sum() > 0.5 * (y1 - y0) * (x1 - x0)
    # not gated: 0; gated: Pillow's colours within 2 levels
    assert not hint[~mask].any()
    both = mask & ref_mask
    assert np.abs(hint[both].astype(int) - ref_hint[both].astype(int)).max() <= 2
    # across the middle row: the gate opens at the alpha-160 edge (6/60 of the width in, past the
    # transparent margin) and closes where the alpha-96 edge starts (48/60)
    columns = np.nonzero(mask[(y0 + y1) // 2])[0] - x0
    width = x1 - x0
    assert abs(columns.min() - 6 / 60 * width) <= 1 and abs(columns.max() + 1 - 48 / 60 * width) <= 1


def test_prepare_pair_and_the_render_stage_see_the_preprocess_hint(tmp_path):
    photo, ring, product = _photo(), _ring(), _product()
    for name, pixels in (("context.png", photo), ("mask.png", ring.astype(np.uint8) * 255), ("product.png", product)):
        (tmp_path / name).write_bytes(_png(pixels))
    expected = _model_inputs()
    config = PrepareConfig(policy=InputPolicy(str(tmp_path)), resolution=RESOLUTION, product_size=PRODUCT_SIZE)

    pair = prepare_pair(_png(photo), _png(product), _png(ring.astype(np.uint8) * 255), None, config)
    assert np.array_equal(pair.model["hint"], expected["hint"])
    assert np.array_equal(pair.model["hint_mask"], expected["hint_mask"])

    # the columns path: prepare_batch's payloads, stacked by the render stage as it feeds the model
    block = pa.table(
        {
            "pair_id": ["p1"],
            "context_uri": [str(tmp_path / "context.png")],
            "product_uri": [str(tmp_path / "product.png")],
            "mask_uri": [str(tmp_path / "mask.png")],
            "bbox": pa.array([None], pa.list_(pa.float64())),
            "seed": [1],
            "error_code": pa.array([None], pa.string()),
            "error_message": pa.array([None], pa.string()),
            "action": [RENDER],
        }
    )
    prepared = prepare_batch(block, config=config)
    assert prepared["error_code"][0].as_py() is None, prepared["error_message"][0]
    inputs = dict(zip(MODEL_INPUTS, _Work(prepared, [0], RESOLUTION, PRODUCT_SIZE).inputs(np.asarray([0]))))
    assert np.array_equal(inputs["model_hint"][0], expected["hint"])
    assert inputs["model_hint_mask"].dtype == bool
    assert np.array_equal(inputs["model_hint_mask"][0], expected["hint_mask"])


# -- the pipeline's hint tensor -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_pipeline(tiny_model_dir)


def _live_adapter(tiny) -> DTCPipeline:
    """A copy whose adapter's last conv is not zero (so the hint reaches the hint encoder)."""
    pipe = DTCPipeline(**copy.deepcopy(tiny.components), resolution=tiny.config.resolution)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        last = pipe.hint_adapter.net[-1]
        last.weight.copy_(torch.randn(last.weight.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    return pipe


def _pipeline_inputs(pipe: DTCPipeline, batch: int = 2):
    g = torch.Generator().manual_seed(0)
    size, psize = pipe.config.resolution, pipe.config.product_size
    image = torch.randint(0, 256, (batch, size, size, 3), generator=g, dtype=torch.uint8)
    product = torch.randint(0, 256, (batch, psize, psize, 3), generator=g, dtype=torch.uint8)
    hole = torch.zeros(batch, size, size, dtype=torch.bool)
    hole[:, 20:100, 16:90] = True
    hint = torch.randint(0, 256, (batch, size, size, 3), generator=g, dtype=torch.uint8)
    hint_mask = torch.zeros(batch, size, size, dtype=torch.bool)
    hint_mask[0, 30:90, 20:80] = torch.rand(60, 60, generator=g) > 0.3  # ragged, as a product's alpha gate
    hint_mask[1, 25:95, 40:70] = True
    return image, hole, product, hint, hint_mask


@contextlib.contextmanager
def _adapter_inputs(pipe: DTCPipeline):
    """Collects what the hint adapter is called with: the hint tensor."""
    seen: list[torch.Tensor] = []
    handle = pipe.hint_adapter.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        yield seen
    finally:
        handle.remove()


def test_pipeline_hint_is_hint_image_where_hint_mask(tiny):
    pipe = _live_adapter(tiny)
    image, hole, product, hint, hint_mask = _pipeline_inputs(pipe)
    expected = torch.where(hint_mask[:, None], hint.permute(0, 3, 1, 2).float() / 127.5 - 1, 0.0)
    kwargs = dict(num_inference_steps=1, generator=[torch.Generator().manual_seed(s) for s in (1, 2)])

    with _adapter_inputs(pipe) as seen:
        pipe(image, hole, product, hint_image=hint, hint_mask=hint_mask, output_type="latent", **kwargs)
    assert len(seen) == 1  # once per call: CFG reuses the hint latents in both halves
    torch.testing.assert_close(seen[0], expected, atol=1e-6, rtol=0)
    assert (seen[0][~hint_mask[:, None].expand(-1, 3, -1, -1)] == 0).all()

    # the Renderer passes them through from numpy (the render stage's path)
    renderer = Renderer(pipe, "cpu")
    arrays = (image.numpy(), hole.numpy(), product.numpy(), np.ones(product.shape[:3], bool), np.asarray([1, 2]))
    with _adapter_inputs(pipe) as seen:
        renderer.render(*arrays, steps=1, guidance_scale=5.0, hint=hint.numpy(), hint_mask=hint_mask.numpy())
    torch.testing.assert_close(seen[0], expected, atol=1e-6, rtol=0)


def test_pipeline_without_hint_image_builds_the_fallback_hint(tiny):
    pipe = _live_adapter(tiny)
    image, hole, product, _, _ = _pipeline_inputs(pipe)
    alpha = torch.ones(2, pipe.config.product_size, pipe.config.product_size, dtype=torch.bool)
    renderer = Renderer(pipe, "cpu")  # as Serve calls it today: no hint, no hint_mask
    arrays = (image.numpy(), hole.numpy(), product.numpy(), alpha.numpy(), np.asarray([1, 2]))
    with _adapter_inputs(pipe) as seen:
        renderer.render(*arrays, steps=1, guidance_scale=5.0)
    product_float = product.permute(0, 3, 1, 2).float() / 255
    fallback = pipe.build_hint(hole[:, None].float(), product_float, alpha[:, None].float())
    torch.testing.assert_close(seen[0], fallback, atol=0, rtol=0)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(hint_mask=None), "hint_image and hint_mask go together"),
        (dict(hint_image=None), "hint_image and hint_mask go together"),
        (dict(hint_image=torch.zeros(2, 64, 64, 3, dtype=torch.uint8)), "hint_image must be 128x128"),
        (dict(hint_mask=torch.ones(2, 128, 128, dtype=torch.bool)), "hint_mask reaches outside mask_image's hole"),
        (dict(mask_image=torch.zeros(2, 128, 128, dtype=torch.bool)), r"hole mask is empty for pair\(s\) \[0, 1\]"),
    ],
)
def test_bad_hint_inputs_name_the_value(tiny, change, message):
    image, hole, product, hint, hint_mask = _pipeline_inputs(tiny)
    kwargs = dict(image=image, mask_image=hole, product_image=product, hint_image=hint, hint_mask=hint_mask) | change
    with pytest.raises(ValueError, match=message):
        tiny(**kwargs, num_inference_steps=1, output_type="latent")
