"""Paint-by-Example folders through our path (issue 31, acceptance 1): `pbe-tiny` is the hub's
layout (diffusers' deprecated `PaintByExamplePipeline` loads it), `PBEImageEncoder` holds the
deprecated encoder's weights under the same keys, and `PBEPipeline` renders what the deprecated
class renders on the same inputs, seeds and sampler (the oracle). The deprecated module is
imported here only: the project never imports it."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from pipeline.model.checkpoint import CheckpointError, check_dtc_checkpoint, check_model_checkpoint, weights_warning
from pipeline.model.loading import load_pipeline
from pipeline.model.pipeline_pbe import PBEImageEncoder, PBEPipeline
from pipeline.model.presets import pbe_clip_config
from pipeline.model.renderer import Renderer

# Max abs difference allowed between our path and diffusers' class (fp32, CPU). Measured: ~2e-5
# on latents of mean |x| ~2.6, ~3e-6 on pixels; the only difference in computation is that
# diffusers encodes the masked images one at a time and we encode the batch at once.
TOLERANCE = 1e-4


@pytest.fixture
def deprecated_pbe(monkeypatch):
    """diffusers' deprecated class, able to read the hub's model_index.json: the hub names the
    image encoder's library `paint_by_example`, a module diffusers 0.42 moved under
    `pipelines/deprecated/` without an alias, so `PaintByExamplePipeline.from_pretrained` on the
    hub's own folder fails to resolve it; the alias restores what that name meant."""
    import diffusers.pipelines
    from diffusers.pipelines.deprecated import paint_by_example

    monkeypatch.setattr(diffusers.pipelines, "paint_by_example", paint_by_example, raising=False)
    return paint_by_example


def _inputs(batch: int, size: int, product_size: int):
    g = torch.Generator().manual_seed(3)
    image = torch.rand(batch, 3, size, size, generator=g)
    hole = torch.zeros(batch, 1, size, size)
    hole[0, :, 32:96, 40:100] = 1
    hole[1:, :, 16:64, 24:120] = 1
    product = torch.rand(batch, 3, product_size, product_size, generator=g)
    return image, hole, product


def test_our_path_renders_what_diffusers_paint_by_example_renders(pbe_tiny_dir, deprecated_pbe):
    ours = load_pipeline(pbe_tiny_dir, scheduler="ddim")
    theirs = deprecated_pbe.PaintByExamplePipeline.from_pretrained(pbe_tiny_dir)
    assert isinstance(ours, PBEPipeline) and ours.scheduler.config.clip_sample is False
    # the same sampler on both sides: DDIM from our config (the folder's PNDM is a training schedule)
    theirs.scheduler = DDIMScheduler.from_config(ours.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    image, hole, product = _inputs(2, ours.config.resolution, ours.config.product_size)
    mean, std = (torch.tensor(v)[:, None, None] for v in (ours.image_mean, ours.image_std))
    for output_type in ("latent", "pt"):
        args = dict(num_inference_steps=3, guidance_scale=5.0, output_type=output_type)
        mine = ours(image=image, mask_image=hole, product_image=product, generator=_generators(), **args).images
        # diffusers takes [-1, 1] images, mask 1 = repaint, and the product CLIP-normalised
        reference = theirs(
            example_image=(product - mean) / std, image=image * 2 - 1, mask_image=hole, generator=_generators(), **args
        ).images
        if output_type == "latent":
            assert (mine - reference).abs().max() <= TOLERANCE
        else:  # ours keeps the context's pixels outside the hole; diffusers returns the whole decode
            assert ((mine - reference).abs() * hole).max() <= TOLERANCE
            assert torch.equal(mine * (1 - hole), image * (1 - hole))
            assert (mine * hole).std() > 0.01  # a render, not a copy of the context


def _generators() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in (7, 8)]


def test_image_encoder_keys_and_weights_are_the_deprecated_encoders(pbe_tiny_dir, deprecated_pbe):
    config = pbe_clip_config("pbe-tiny")
    ours, theirs = PBEImageEncoder(config), deprecated_pbe.PaintByExampleImageEncoder(config)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours = PBEImageEncoder.from_pretrained(pbe_tiny_dir, subfolder="image_encoder").eval()
    theirs = deprecated_pbe.PaintByExampleImageEncoder.from_pretrained(pbe_tiny_dir, subfolder="image_encoder").eval()
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    pixels = torch.randn(2, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond, uncond = theirs(pixels, return_uncond_vector=True)
        assert torch.equal(ours(pixels), cond) and torch.equal(ours.uncond_vector, uncond)


def test_pbe_tiny_is_the_hub_layout_and_the_driver_reads_its_sizes(pbe_tiny_dir, tmp_path):
    with open(os.path.join(pbe_tiny_dir, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == "PaintByExamplePipeline"
    assert index["image_encoder"] == ["paint_by_example", "PaintByExampleImageEncoder"]
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"] and index["trained"] is False
    checked = check_model_checkpoint(pbe_tiny_dir)
    assert (checked["resolution"], checked["product_size"], checked["input_layout"]) == (128, 224, "pbe")
    assert weights_warning(checked) is not None  # untrained, and says so

    # a folder the hub never ships: a UNet that is not 9-channel, and a pipeline we do not run
    bad = shutil.copytree(pbe_tiny_dir, tmp_path / "bad")
    unet_config = bad / "unet" / "config.json"
    unet_config.write_text(json.dumps({**json.loads(unet_config.read_text()), "in_channels": 4}))
    with pytest.raises(CheckpointError, match="in_channels=4"):
        check_model_checkpoint(str(bad))
    shutil.copy(os.path.join(pbe_tiny_dir, "unet", "config.json"), unet_config)
    scheduler_config = bad / "scheduler" / "scheduler_config.json"
    scheduler_config.write_text(json.dumps({**json.loads(scheduler_config.read_text()), "beta_schedule": "linear"}))
    with pytest.raises(CheckpointError, match="beta_schedule='linear'"):  # refused on the driver, before any work
        check_model_checkpoint(str(bad))
    (bad / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionInpaintPipeline"}))
    with pytest.raises(CheckpointError, match="not a DTCPipeline or a PaintByExamplePipeline"):
        check_model_checkpoint(str(bad))
    # where only a DTC will do (jobs.train's --init-model), a PBE folder is named as one, with the way on
    with pytest.raises(CheckpointError, match="is a Paint-by-Example folder, not a DTCPipeline.*--from-parts --pbe"):
        check_dtc_checkpoint(pbe_tiny_dir)


def test_renderer_runs_pbe_with_dtc_arguments_and_scores_with_clip(pbe_tiny_dir):
    renderer = Renderer(load_pipeline(pbe_tiny_dir, scheduler="ddim"), "cpu")
    size, product_size = renderer.resolution, renderer.product_size
    image, hole, product = _inputs(2, size, product_size)
    context = (image.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    products = (product.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    holes = hole[:, 0].bool().numpy()
    args = dict(steps=2, guidance_scale=5.0)
    alpha = np.ones((2, product_size, product_size), dtype=bool)
    # DTC's hint arguments are accepted and unused; a pair renders alone as in its batch (1 level)
    hint = np.zeros_like(context)
    rendered = renderer.render(context, holes, products, alpha, np.array([7, 8]), hint=hint, hint_mask=holes, **args)
    alone = renderer.render(context[1:], holes[1:], products[1:], alpha[1:], np.array([8]), **args)
    assert np.abs(alone.astype(int) - rendered[1:].astype(int)).max() <= 1
    assert not np.array_equal(rendered[0], context[0])
    assert renderer.identity.encoder is renderer.pipe.image_encoder.model  # its CLIP vision tower
    scores = renderer.identity.score(rendered, holes, products)
    assert scores.shape == (2,) and np.isfinite(scores).all()
