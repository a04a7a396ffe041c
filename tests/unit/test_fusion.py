"""The hint branch's fusion forms (`schema.FUSION_FORMS`): FiLM spatial and channel, additive
residuals, cross-attention, off. Each fresh form computes the stock UNet; each trained one hears
the hint (but off); a folder records its form; models made the old way render as they did."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import ROOT

from pipeline.model.loading import load_pipeline, save_pipeline
from pipeline.model.packed import unpack
from pipeline.model.presets import build_preset
from pipeline.model.renderer import Renderer
from pipeline.schema import FUSION_FORMS

NOISE_ATOL = 1e-6


def _latent_inputs(pipe, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    r = pipe.config.resolution // pipe.vae_scale_factor
    latents, masked = torch.randn(2, 4, r, r, generator=g), torch.randn(2, 4, r, r, generator=g)
    hole = (torch.rand(2, 1, r, r, generator=g) > 0.5).float()
    hint = torch.randn(2, 4, r, r, generator=g)
    context = torch.randn(
        2, pipe.image_projection.config.num_tokens, pipe.unet.config.cross_attention_dim, generator=g
    )
    return latents, torch.tensor(501), masked, hole, hint, context


def _perturb(pipe, seed: int = 1) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in pipe.hint_encoder.film_heads.parameters():
            p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("form", FUSION_FORMS)
def test_a_fresh_form_is_the_stock_unet_and_a_trained_one_hears_the_hint(form, tmp_path):
    pipe = build_preset("train-tiny", seed=0, film_mode=form)
    latents, t, masked, hole, hint, context = _latent_inputs(pipe)
    stock_input = torch.cat([latents, hole, masked], dim=1)
    with torch.no_grad():
        fresh = pipe.predict_noise(latents, t, masked, hole, hint, context)
        stock = pipe.unet(stock_input, t, context).sample  # no skip_film: diffusers' own forward
    torch.testing.assert_close(fresh, stock, atol=NOISE_ATOL, rtol=0)

    _perturb(pipe)
    with torch.no_grad():
        trained = pipe.predict_noise(latents, t, masked, hole, hint, context)
        other_hint = pipe.predict_noise(latents, t, masked, hole, hint.flip(-1), context)
    heard = float((trained - other_hint).abs().max())
    assert heard == 0.0 if form == "off" else heard > 1e-4

    save_pipeline(pipe, str(tmp_path / form))
    loaded = load_pipeline(str(tmp_path / form), device="cpu", dtype=torch.float32)
    assert loaded.hint_encoder.config.film_mode == form  # the folder records its form
    with torch.no_grad():
        again = loaded.predict_noise(latents, t, masked, hole, hint, context)
    torch.testing.assert_close(again, trained, atol=NOISE_ATOL, rtol=0)

    loaded.hint_encoder.silence_()  # the inference ablation "hint branch off"
    with torch.no_grad():
        silenced = loaded.predict_noise(latents, t, masked, hole, hint, context)
    torch.testing.assert_close(silenced, loaded.unet(stock_input, t, context).sample, atol=NOISE_ATOL, rtol=0)


@pytest.mark.parametrize("form", ["add", "xattn"])
def test_the_new_heads_get_a_gradient_from_step_one(form):
    pipe = build_preset("train-tiny", seed=0, film_mode=form)
    latents, t, masked, hole, hint, context = _latent_inputs(pipe)
    pipe.predict_noise(latents, t, masked, hole, hint, context).pow(2).mean().backward()
    outputs = [h.out if form == "xattn" else h for h in pipe.hint_encoder.film_heads]
    assert all(float(o.weight.grad.abs().sum()) > 0 for o in outputs)  # zero-init, not dead


def test_an_unknown_form_is_refused():
    with pytest.raises(ValueError, match="film_mode must be one of"):
        build_preset("train-tiny", film_mode="concat")


# Renders of the former channel weights (models/train-tiny-channel.safetensors, the committed ones
# until spatial FiLM became the default) and of a seeded spatial model, made before the fusion
# forms existed (3 DDIM steps, CFG 5, fixed inputs): a model made the old way renders the same.
OLD_RENDERS = {
    "channel": (3029530, [140, 121, 103, 104, 102, 99], [110, 107, 106, 105, 101, 101]),
    "spatial": (3315071, [94, 47, 87, 103, 115, 145], [238, 255, 255, 255, 255, 247]),
}


def _render(folder: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    context = rng.integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    hole = np.zeros((2, 64, 64), bool)
    hole[:, 16:48, 12:44] = True
    product = rng.integers(0, 255, (2, 56, 56, 3), dtype=np.uint8)
    hint = rng.integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    pipe = load_pipeline(folder, device="cpu", dtype=torch.float32)
    return Renderer(pipe, "cpu").render(
        context, hole, product, np.ones((2, 56, 56), bool), np.array([3, 4]),
        steps=3, guidance_scale=5.0, hint=hint, hint_mask=hole.copy(),
    )  # fmt: skip


def test_models_made_with_the_old_modes_render_as_before(tmp_path):
    spatial = build_preset("train-tiny", seed=0, film_mode="spatial")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in spatial.hint_encoder.film_heads.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    save_pipeline(spatial, str(tmp_path / "spatial"))
    folders = {
        "channel": unpack(f"{ROOT}/models/train-tiny-channel.safetensors", str(tmp_path / "channel")),
        "spatial": str(tmp_path / "spatial"),
    }
    for mode, folder in folders.items():
        out = _render(folder)
        total, row, other = OLD_RENDERS[mode]
        assert (int(out.astype(np.int64).sum()), out[0, 30, 20:26, 0].tolist(), out[1, 40, 30:36, 1].tolist()) == (
            total,
            row,
            other,
        ), mode
