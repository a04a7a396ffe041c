"""The DTC model against oracles that do not use the code under test (issue 13, "Model fidelity").

Each test rebuilds what it checks from stock diffusers / transformers modules, torch functionals
or the DDIM formula, so a bug in our forward cannot hide in the expected value:

- FiLM: the DTC UNet equals stock `UNet2DConditionModel` fed `s * (1 + gamma) + beta - s` as
  ControlNet residuals, both FiLM modes, even and odd latent sizes;
- the hint encoder is a copy of the UNet's encoder half (weights and forward);
- the hint encoder sees `[latents, hole, z_m + Adapter(hint)]`, the UNet `[latents, hole, z_m]`;
- a denoising step of `__call__` is `eps_u + s (eps_c - eps_u)` followed by unclamped DDIM;
- an assembled model samples with DDIM over the SD schedule, whatever scheduler its SD folder ships;
- gradient checkpointing changes no gradient.

Tiny configs, fixed seeds, fp32 on CPU.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from helpers import SD15_FILM_SITES

from pipeline.model.components import DTCHintEncoder, DTCUNet2DConditionModel
from pipeline.model.pipeline_dtc import DTCPipeline
from pipeline.model.presets import build_preset, unet_config

ENCODER_PARTS = ("conv_in", "time_proj", "time_embedding", "down_blocks", "mid_block")
# Same kernels on both sides; the residual form (s + (s * (1 + g) + b - s)) rounds differently
# from s * (1 + g) + b by a few ulps, nothing more.
ATOL = 1e-5


def _sd_alphas_cumprod() -> torch.Tensor:
    """SD-1.x's scaled-linear schedule, from its definition (float64)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def _ddim_step(eps: torch.Tensor, t: int, prev_t: int, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic DDIM (eta = 0), no x0 clipping; the step past 0 lands on alphas_cumprod[0]."""
    acp = _sd_alphas_cumprod()
    a_t, a_prev = float(acp[t]), float(acp[prev_t] if prev_t >= 0 else acp[0])
    x0 = (sample - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps, x0


def _record_scheduler_steps(pipe: DTCPipeline) -> list[tuple]:
    """Wrap the pipeline's scheduler.step; returns the list it fills with (eps, t, sample, output)."""
    calls: list[tuple] = []
    step = pipe.scheduler.step

    def recording_step(model_output, timestep, sample, *args, **kwargs):
        out = step(model_output, timestep, sample, *args, **kwargs)
        calls.append((model_output.clone(), int(timestep), sample.clone(), out))
        return out

    pipe.scheduler.step = recording_step
    return calls


def _stock_skips(unet: UNet2DConditionModel, sample, t, context) -> list[torch.Tensor]:
    """A stock UNet's skips (conv_in's output, then each down block's) and its mid output,
    read with forward hooks: the FiLM sites, in order."""
    skips: list[torch.Tensor] = []
    hooks = [unet.conv_in.register_forward_hook(lambda m, a, out: skips.append(out.clone()))]
    for block in unet.down_blocks:
        hooks.append(block.register_forward_hook(lambda m, a, out: skips.extend(r.clone() for r in out[1])))
    hooks.append(unet.mid_block.register_forward_hook(lambda m, a, out: skips.append(out.clone())))
    try:
        unet(sample, t, context)
    finally:
        for h in hooks:
            h.remove()
    return skips


def _film_by_hand(heads, skips, mode: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """gamma, beta = Conv1x1(h) (spatial) or Linear(mean_hw(h)) (channel), from the head weights."""
    film = []
    for head, h in zip(heads, skips, strict=True):
        if mode == "spatial":
            out = F.conv2d(h, head.weight, head.bias)
        else:
            out = F.linear(h.mean(dim=(2, 3)), head.weight, head.bias)[:, :, None, None]
        film.append((out[:, : h.shape[1]], out[:, h.shape[1] :]))
    return film


def _adapter_by_hand(adapter, hint: torch.Tensor) -> torch.Tensor:
    """Conv(s2)-SiLU-Conv(s2)-SiLU-Conv(s2)-SiLU-Conv(s1), 3x3 padding 1 (DTC_MODEL.md)."""
    convs = [m for m in adapter.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4
    x = hint
    for i, (conv, stride) in enumerate(zip(convs, (2, 2, 2, 1))):
        x = F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=1)
        x = F.silu(x) if i < 3 else x
    return x


def _randomise_film(pipe: DTCPipeline, seed: int = 1) -> None:
    """Non-zero FiLM heads and adapter, so the hint branch changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in pipe.hint_encoder.film_heads:
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.05)
            head.bias.copy_(torch.randn(head.bias.shape, generator=g) * 0.05)
        last = pipe.hint_adapter.net[-1]
        last.weight.copy_(torch.randn(last.weight.shape, generator=g) * 0.1)
        last.bias.copy_(torch.randn(last.bias.shape, generator=g) * 0.1)


def _pair_inputs(pipe: DTCPipeline, batch: int, box=(24, 40, 88, 96), seed: int = 0):
    """uint8 images and products, and a rectangular hole (y0, x0, y1, x1): the hint rectangle is the hole."""
    g = torch.Generator().manual_seed(seed)
    size, psize = pipe.config.resolution, pipe.config.product_size
    image = torch.randint(0, 256, (batch, size, size, 3), generator=g, dtype=torch.uint8)
    product = torch.randint(0, 256, (batch, psize, psize, 3), generator=g, dtype=torch.uint8)
    y0, x0, y1, x1 = box
    hole = torch.zeros(batch, 1, size, size)
    hole[:, :, y0:y1, x0:x1] = 1
    hint = torch.zeros(batch, 3, size, size)
    pixels = product.permute(0, 3, 1, 2).float() / 255 * 2 - 1
    hint[:, :, y0:y1, x0:x1] = F.interpolate(pixels, size=(y1 - y0, x1 - x0), mode="bilinear", antialias=True)
    return image, hole, product, hint


def _masked_latents_and_noise(pipe: DTCPipeline, image, hole, seed: int):
    """One pair's z_m and initial latents, drawn from its generator in the pipeline's order."""
    g = torch.Generator().manual_seed(seed)
    masked = (image.permute(0, 3, 1, 2).float() / 127.5 - 1) * (1 - hole)
    z_m = pipe.vae.encode(masked).latent_dist.sample(generator=g) * pipe.vae.config.scaling_factor
    latents = torch.randn(z_m.shape, generator=g)
    return z_m, latents


@pytest.fixture(scope="module")
def tiny() -> DTCPipeline:
    pipe = build_preset("tiny")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def assembled(tmp_path_factory) -> dict:
    """An SD-inpainting folder whose scheduler is an old-style PNDM config (no clip_sample, no
    set_alpha_to_one, no steps_offset: DDIM's defaults for all three are wrong for SD), a DINOv2
    folder, and the DTC assembled from them, saved and loaded back."""
    from parts import make_dinov2, make_sd_inpainting

    from pipeline.model.assemble import assemble_from_parts
    from pipeline.model.loading import load_pipeline, save_pipeline

    root = tmp_path_factory.mktemp("fidelity")
    sd_dir, dino_dir, out = str(root / "sd"), str(root / "dino"), str(root / "dtc")
    make_sd_inpainting(sd_dir)
    make_dinov2(dino_dir)
    scheduler_config = os.path.join(sd_dir, "scheduler", "scheduler_config.json")
    with open(scheduler_config, "w") as f:
        json.dump(
            {
                "_class_name": "PNDMScheduler",
                "_diffusers_version": "0.6.0",
                "beta_end": 0.012,
                "beta_schedule": "scaled_linear",
                "beta_start": 0.00085,
                "num_train_timesteps": 1000,
                "skip_prk_steps": True,
                "trained_betas": None,
            },
            f,
        )
    save_pipeline(assemble_from_parts(sd_dir, dino_dir), out)
    return {"sd": sd_dir, "dino": dino_dir, "out": out, "pipe": load_pipeline(out)}


# -- scheduler -----------------------------------------------------------------------------------


def test_assembled_scheduler_is_ddim_over_the_sd_schedule(assembled, tiny):
    with open(os.path.join(assembled["out"], "scheduler", "scheduler_config.json")) as f:
        saved = json.load(f)
    expected = {
        "_class_name": "DDIMScheduler",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
    }
    assert {k: saved.get(k) for k in expected} == expected
    # One owner: the presets build the same scheduler.
    public = lambda config: {k: v for k, v in dict(config).items() if not k.startswith("_")}  # noqa: E731
    assert public(tiny.scheduler.config) == public(assembled["pipe"].scheduler.config)
    alphas_cumprod = assembled["pipe"].scheduler.alphas_cumprod.double()
    torch.testing.assert_close(alphas_cumprod, _sd_alphas_cumprod(), rtol=1e-6, atol=0)


def test_a_render_step_is_unclamped_ddim(assembled):
    pipe = copy.deepcopy(assembled["pipe"])
    calls = _record_scheduler_steps(pipe)
    image, hole, product, _ = _pair_inputs(pipe, 1)
    pipe(
        image,
        hole[:, 0],
        product,
        num_inference_steps=2,
        generator=[torch.Generator().manual_seed(5)],
        output_type="latent",
    )
    assert [t for _, t, _, _ in calls] == [501, 1]  # "leading" spacing with SD's steps_offset = 1
    for (eps, t, sample, out), prev_t in zip(calls, (1, -499)):
        prev, x0 = _ddim_step(eps, t, prev_t, sample)
        torch.testing.assert_close(out.pred_original_sample, x0, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(out.prev_sample, prev, atol=1e-4, rtol=1e-5)
    # At t = 501 the predicted x0 leaves [-1, 1] by far; clip_sample=True would have clamped it.
    assert calls[0][3].pred_original_sample.abs().max() > 1.5


def test_assembly_refuses_a_folder_trained_on_another_schedule(assembled, tmp_path):
    import shutil

    from pipeline.model.assemble import assemble_from_parts
    from pipeline.model.checkpoint import CheckpointError

    sd_dir = str(tmp_path / "sd")
    shutil.copytree(assembled["sd"], sd_dir)
    path = os.path.join(sd_dir, "scheduler", "scheduler_config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump(dict(config, beta_end=0.02, beta_schedule="linear"), f)
    with pytest.raises(CheckpointError, match=r"beta_end=0.02; the SD-1.x schedule has 0.012"):
        assemble_from_parts(sd_dir, assembled["dino"])


# -- FiLM against stock diffusers ---------------------------------------------------------------


@pytest.mark.parametrize("size", [(16, 16), (15, 17)], ids=["even", "odd"])
@pytest.mark.parametrize("film_mode", ["spatial", "channel"])
def test_film_equals_stock_unet_with_additive_residuals(film_mode, size):
    torch.manual_seed(0)
    cfg = unet_config("tiny")
    unet = DTCUNet2DConditionModel(**cfg).eval()
    encoder = DTCHintEncoder.from_unet(unet, film_mode=film_mode).eval()
    with torch.no_grad():  # a hint encoder that is no longer the UNet's copy, with live heads
        for name, p in encoder.named_parameters():
            p.add_(torch.randn_like(p) * (0.05 if name.startswith("film_heads") else 0.02))

    stock = UNet2DConditionModel(**cfg).eval()
    stock.load_state_dict(unet.state_dict())
    stock_hint = UNet2DConditionModel(**cfg).eval()
    for name in ENCODER_PARTS:
        getattr(stock_hint, name).load_state_dict(getattr(encoder, name).state_dict())

    g = torch.Generator().manual_seed(3)
    main_in = torch.randn(2, 9, *size, generator=g)
    hint_in = torch.randn(2, 9, *size, generator=g)
    context = torch.randn(2, 7, cfg["cross_attention_dim"], generator=g)
    t = torch.tensor(437)

    upsample_sizes = []
    hook = unet.up_blocks[0].upsamplers[0].register_forward_pre_hook(lambda m, args: upsample_sizes.append(args[1]))
    with torch.no_grad():
        # the hint encoder's forward is the stock encoder half, then the heads
        film = _film_by_hand(encoder.film_heads, _stock_skips(stock_hint, hint_in, t, context), film_mode)
        got_film = encoder(hint_in, t, context)
        assert len(got_film) == len(film) == encoder.num_film_sites
        for (g_got, b_got), (g_ref, b_ref) in zip(got_film, film):
            torch.testing.assert_close(g_got, g_ref, atol=ATOL, rtol=1e-5)
            torch.testing.assert_close(b_got, b_ref, atol=ATOL, rtol=1e-5)

        skips = _stock_skips(stock, main_in, t, context)
        residuals = [s * (1 + gamma) + beta - s for s, (gamma, beta) in zip(skips, film, strict=True)]
        expected = stock(
            main_in,
            t,
            context,
            down_block_additional_residuals=tuple(residuals[:-1]),
            mid_block_additional_residual=residuals[-1],
        ).sample
        plain = stock(main_in, t, context).sample
        got = unet(main_in, t, context, skip_film=film).sample
    hook.remove()
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)
    assert (expected - plain).abs().max() > 1e-2  # the modulation is large enough to be seen
    assert got.shape == (2, 4, *size)
    # Odd sizes take diffusers' forward_upsample_size path: the upsampler is told the skip's size.
    assert upsample_sizes == [torch.Size(size) if size[0] % 2 else None]


def test_sd15_unet_film_forward_on_meta():
    skip_shapes = SD15_FILM_SITES
    with torch.device("meta"):
        unet = DTCUNet2DConditionModel(**unet_config("sd15"))
        sample, context, t = torch.empty(2, 9, 64, 64), torch.empty(2, 257, 768), torch.tensor(10)
        spatial = [(torch.empty(2, c, s, s), torch.empty(2, c, s, s)) for c, s in skip_shapes]
        channel = [(torch.empty(2, c, 1, 1), torch.empty(2, c, 1, 1)) for c, _ in skip_shapes]
        outs = [unet(sample, t, context, skip_film=film).sample for film in (spatial, channel)]
    assert unet.num_upsamplers == 3 and len(skip_shapes) == 13
    assert all(out.shape == (2, 4, 64, 64) and out.device.type == "meta" for out in outs)


# -- hint encoder --------------------------------------------------------------------------------


def _assert_encoder_is_copy(encoder: DTCHintEncoder, unet: UNet2DConditionModel) -> None:
    mine = {k: v for k, v in encoder.state_dict().items() if not k.startswith("film_heads.")}
    theirs = {k: v for k, v in unet.state_dict().items() if k.split(".")[0] in ENCODER_PARTS}
    assert mine.keys() == theirs.keys() and len(mine) > 0
    unequal = [k for k in mine if not torch.equal(mine[k], theirs[k])]
    assert not unequal, unequal[:5]
    shared = [k for k in mine if mine[k].data_ptr() == theirs[k].data_ptr()]
    assert not shared, shared[:5]  # a copy: training one must not move the other


def test_hint_encoder_weights_are_the_unets_encoder(assembled):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config("tiny"))
    for mode in ("spatial", "channel"):
        _assert_encoder_is_copy(DTCHintEncoder.from_unet(unet, film_mode=mode), unet)
    # Assembled from parts, saved and loaded: both the main UNet and the hint encoder's copy are
    # the SD folder's UNet bit for bit.
    source = UNet2DConditionModel.from_pretrained(assembled["sd"], subfolder="unet")
    pipe = assembled["pipe"]
    _assert_encoder_is_copy(pipe.hint_encoder, source)
    source_weights = source.state_dict()
    assert pipe.unet.state_dict().keys() == source_weights.keys()
    assert all(torch.equal(v, source_weights[k]) for k, v in pipe.unet.state_dict().items())


def test_hint_encoder_receives_masked_latents_plus_adapter_hint(tiny):
    pipe = DTCPipeline(**copy.deepcopy(tiny.components), resolution=tiny.config.resolution)
    pipe.set_progress_bar_config(disable=True)
    _randomise_film(pipe)
    image, hole, product, hint = _pair_inputs(pipe, 1)
    seen_hint, seen_unet = [], []
    h1 = pipe.hint_encoder.register_forward_pre_hook(lambda m, args: seen_hint.append(args[0].clone()))
    h2 = pipe.unet.register_forward_pre_hook(lambda m, args: seen_unet.append(args[0].clone()))
    pipe(
        image,
        hole[:, 0],
        product,
        num_inference_steps=1,
        guidance_scale=5.0,
        generator=[torch.Generator().manual_seed(7)],
        output_type="latent",
    )
    h1.remove()
    h2.remove()

    with torch.no_grad():
        z_m, latents = _masked_latents_and_noise(pipe, image, hole, seed=7)
        adapted = _adapter_by_hand(pipe.hint_adapter, hint)
    r = pipe.config.resolution // pipe.vae_scale_factor
    hole_latent = F.interpolate(hole, size=(r, r), mode="nearest")
    assert adapted.shape == z_m.shape and adapted.abs().max() > 1e-2
    for half in seen_hint[0].chunk(2) + seen_unet[0].chunk(2):  # CFG: the hint branch in both halves
        torch.testing.assert_close(half[:, :4], latents, atol=1e-5, rtol=0)
        torch.testing.assert_close(half[:, 4:5], hole_latent, atol=0, rtol=0)  # "sd" layout: 1 = hole
    for half in seen_hint[0].chunk(2):
        torch.testing.assert_close(half[:, 5:], z_m + adapted, atol=1e-5, rtol=0)
    for half in seen_unet[0].chunk(2):
        torch.testing.assert_close(half[:, 5:], z_m, atol=1e-5, rtol=0)


# -- classifier-free guidance ---------------------------------------------------------------------


def test_a_denoising_step_is_cfg_over_two_predict_noise_calls(tiny):
    pipe = DTCPipeline(**copy.deepcopy(tiny.components), resolution=tiny.config.resolution)
    pipe.set_progress_bar_config(disable=True)
    _randomise_film(pipe)
    calls = _record_scheduler_steps(pipe)
    seeds, scale = [3, 4], 3.0
    image, hole, product, hint = _pair_inputs(pipe, 2)
    pipe(
        image,
        hole[:, 0],
        product,
        num_inference_steps=2,
        guidance_scale=scale,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="latent",
    )

    with torch.no_grad():
        pairs = [_masked_latents_and_noise(pipe, image[i : i + 1], hole[i : i + 1], s) for i, s in enumerate(seeds)]
        z_m, latents = (torch.cat(parts) for parts in zip(*pairs))
        r = pipe.config.resolution // pipe.vae_scale_factor
        hole_latent = F.interpolate(hole, size=(r, r), mode="nearest")
        hint_latents = z_m + _adapter_by_hand(pipe.hint_adapter, hint)
        mean = torch.tensor((0.485, 0.456, 0.406))[:, None, None]
        std = torch.tensor((0.229, 0.224, 0.225))[:, None, None]
        pixels = (product.permute(0, 3, 1, 2).float() / 255 - mean) / std
        tokens = pipe.image_encoder(pixel_values=pixels).last_hidden_state
        proj = pipe.image_projection.proj
        context = F.linear(tokens, proj.weight, proj.bias)
        null = pipe.image_projection.null_embedding.expand(2, -1, -1)
        t = torch.tensor(calls[0][1])
        eps_u = pipe.predict_noise(latents, t, z_m, hole_latent, hint_latents, null)
        eps_c = pipe.predict_noise(latents, t, z_m, hole_latent, hint_latents, context)
    assert (eps_c - eps_u).abs().max() > 1e-3  # else swapped halves would go unnoticed

    eps, timestep, sample, out = calls[0]
    assert timestep == 501
    torch.testing.assert_close(sample, latents, atol=1e-5, rtol=0)
    torch.testing.assert_close(eps, eps_u + scale * (eps_c - eps_u), atol=ATOL, rtol=1e-5)
    prev, _ = _ddim_step(eps_u + scale * (eps_c - eps_u), 501, 1, latents)
    torch.testing.assert_close(out.prev_sample, prev, atol=1e-4, rtol=1e-5)


# -- training ------------------------------------------------------------------------------------


def test_gradient_checkpointing_keeps_the_gradients(tiny):
    pipe = DTCPipeline(**copy.deepcopy(tiny.components), resolution=tiny.config.resolution)
    _randomise_film(pipe)
    trainable = {n: getattr(pipe, n) for n in ("unet", "hint_encoder", "hint_adapter", "image_projection")}
    for module in trainable.values():
        module.train()
    g = torch.Generator().manual_seed(0)
    r = pipe.config.resolution // pipe.vae_scale_factor
    latents, z_m, target = (torch.randn(2, 4, r, r, generator=g) for _ in range(3))
    hole = (torch.rand(2, 1, r, r, generator=g) > 0.5).float()
    hint = torch.randn(2, 3, pipe.config.resolution, pipe.config.resolution, generator=g)
    num_tokens, width = pipe.image_projection.config.num_tokens, pipe.image_encoder.config.hidden_size
    tokens = torch.randn(2, num_tokens, width, generator=g)

    def gradients() -> dict[str, torch.Tensor]:
        for module in trainable.values():
            module.zero_grad(set_to_none=True)
        eps = pipe.predict_noise(
            latents, torch.tensor(600), z_m, hole, z_m + pipe.hint_adapter(hint), pipe.image_projection(tokens)
        )
        F.mse_loss(eps, target).backward()
        return {
            f"{n}.{k}": p.grad.clone()
            for n, m in trainable.items()
            for k, p in m.named_parameters()
            if p.grad is not None  # the null embedding takes no part in a conditional pass
        }

    plain = gradients()
    calls = {"unet": 0, "hint_encoder": 0}

    def counting(name):
        def checkpoint(module, *args):
            calls[name] += 1
            return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

        return checkpoint

    for name in calls:
        trainable[name].enable_gradient_checkpointing(counting(name))
        assert trainable[name].is_gradient_checkpointing
    checkpointed = gradients()
    assert all(n > 0 for n in calls.values()), calls  # both modules really recomputed blocks
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], atol=1e-7, rtol=1e-5, msg=key)
    # the hint encoder's body learns (through the FiLM heads), so its checkpointing matters
    assert plain["hint_encoder.down_blocks.0.resnets.0.conv1.weight"].abs().max() > 0
