"""The DTC model against diffusers itself: FiLM plumbing, layouts, CFG, seeds, save/load."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from helpers import SD15_FILM_SITES

from pipeline.model.components import DTCHintEncoder
from pipeline.model.loading import load_pipeline
from pipeline.model.pipeline_dtc import DTCPipeline
from pipeline.model.presets import build_preset

# fp32 on CPU: a zero-initialised FiLM is an exact identity, so the DTC forward runs the same
# kernels as the stock one. 1e-6 leaves room for a different kernel choice, nothing more.
NOISE_ATOL = 1e-6


def _inputs(pipe: DTCPipeline, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size, psize = pipe.config.resolution, pipe.config.product_size
    image = torch.randint(0, 256, (batch, size, size, 3), generator=g, dtype=torch.uint8)
    hole = torch.zeros(batch, size, size)
    for i in range(batch):  # a different region per pair
        y0, x0 = 16 + 8 * i, 24 + 4 * i
        hole[i, y0 : y0 + 64, x0 : x0 + 48] = 1
    product = torch.randint(0, 256, (batch, psize, psize, 3), generator=g, dtype=torch.uint8)
    return image, hole, product


def _latent_inputs(pipe: DTCPipeline, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    r = pipe.config.resolution // pipe.vae_scale_factor
    latents = torch.randn(batch, 4, r, r, generator=g)
    masked = torch.randn(batch, 4, r, r, generator=g)
    hole = (torch.rand(batch, 1, r, r, generator=g) > 0.5).float()
    hint = torch.randn(batch, 4, r, r, generator=g)
    context = torch.randn(
        batch, pipe.image_projection.config.num_tokens, pipe.unet.config.cross_attention_dim, generator=g
    )
    t = torch.tensor(501)
    return latents, t, masked, hole, hint, context


def _render(pipe, image, hole, product, seeds, steps=3, **kw):
    return pipe(
        image,
        hole,
        product,
        num_inference_steps=steps,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="uint8",
        **kw,
    ).images


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_pipeline(tiny_model_dir)


def test_tiny_preset_is_small():
    pipe = build_preset("tiny")
    params = sum(p.numel() for m in pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters())
    assert params < 5_000_000 and pipe.hint_encoder.num_film_sites == 5


def test_fresh_dtc_predicts_the_stock_unets_noise(tiny, tiny_model_dir):
    stock = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet").eval()
    assert type(stock) is UNet2DConditionModel
    latents, t, masked, hole, hint, context = _latent_inputs(tiny)
    with torch.no_grad():
        dtc = tiny.predict_noise(latents, t, masked, hole, hint, context)
        ref = stock(torch.cat([latents, hole, masked], dim=1), t, context).sample
    torch.testing.assert_close(dtc, ref, atol=NOISE_ATOL, rtol=0)
    # ... and the FiLM plumbing is live: non-zero heads change the prediction.
    modulated = copy.deepcopy(tiny)
    for head in modulated.hint_encoder.film_heads:
        torch.nn.init.normal_(head.weight, std=0.1)
    with torch.no_grad():
        changed = modulated.predict_noise(latents, t, masked, hole, hint, context)
    assert (changed - ref).abs().max() > 1e-3


def test_channel_film_mode_is_identity_when_fresh(tiny):
    encoder = DTCHintEncoder.from_unet(tiny.unet, film_mode="channel").eval()
    latents, t, masked, hole, hint, context = _latent_inputs(tiny)
    with torch.no_grad():
        film = encoder(torch.cat([latents, hole, hint], 1), t, context)
        assert all(g.shape[2:] == (1, 1) for g, _ in film)
        out = tiny.unet(torch.cat([latents, hole, masked], 1), t, context, skip_film=film).sample
        ref = tiny.unet(torch.cat([latents, hole, masked], 1), t, context).sample
    torch.testing.assert_close(out, ref, atol=NOISE_ATOL, rtol=0)


def test_from_parts_matches_sd_inpainting_unet_and_pbe_layout(tmp_path):
    from parts import make_dinov2, make_sd_inpainting

    from jobs.make_model import main

    sd_dir, dino_dir, out = str(tmp_path / "sd"), str(tmp_path / "dino"), str(tmp_path / "dtc")
    make_sd_inpainting(sd_dir)
    make_dinov2(dino_dir)
    assert main(["--from-parts", "--sd-inpainting", sd_dir, "--dinov2", dino_dir, "--out", out]) == 0
    pipe = load_pipeline(out)
    # DINOv2's own weights, the DTC parts new: untrained (checkpoint.weights_warning says so)
    assert (pipe.config.trained, pipe.config.image_encoder_trained) == (False, True)
    source = UNet2DConditionModel.from_pretrained(sd_dir, subfolder="unet").eval()
    assert pipe.image_projection.config.num_tokens == 257  # CLS + 16x16 patches of 224 / 14
    latents, t, masked, hole, hint, context = _latent_inputs(pipe)
    with torch.no_grad():
        dtc = pipe.predict_noise(latents, t, masked, hole, hint, context)
        ref = source(torch.cat([latents, hole, masked], dim=1), t, context).sample
    torch.testing.assert_close(dtc, ref, atol=NOISE_ATOL, rtol=0)

    # The 9 channels handed to the UNet, in each layout, for the same pair.
    image, hole_px, product = _inputs(pipe, 1)
    with torch.no_grad():
        expected_masked = (
            pipe.vae.encode(
                (image.permute(0, 3, 1, 2).float() / 127.5 - 1) * (1 - hole_px[:, None])
            ).latent_dist.sample(generator=[torch.Generator().manual_seed(7)])
            * pipe.vae.config.scaling_factor
        )
    r = pipe.config.resolution // pipe.vae_scale_factor
    expected_hole = torch.nn.functional.interpolate(hole_px[:, None], size=(r, r))
    for layout in ("sd", "pbe"):
        variant = DTCPipeline(**pipe.components, input_layout=layout, resolution=pipe.config.resolution)
        variant.set_progress_bar_config(disable=True)
        seen = []
        handle = variant.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
        _render(variant, image, hole_px, product, [7], steps=1, guidance_scale=1.0)
        handle.remove()
        unet_in = seen[0]
        if layout == "sd":  # [latents, mask (1 = hole), masked latents]
            torch.testing.assert_close(unet_in[:, 4:5], expected_hole)
            torch.testing.assert_close(unet_in[:, 5:9], expected_masked, atol=1e-5, rtol=0)
        else:  # PBE: [latents, masked latents, mask (1 = keep)]
            torch.testing.assert_close(unet_in[:, 4:8], expected_masked, atol=1e-5, rtol=0)
            torch.testing.assert_close(unet_in[:, 8:9], 1 - expected_hole)


def test_from_parts_pbe_keeps_pbes_unet_bit_for_bit(pbe_warm):
    pipe = load_pipeline(pbe_warm["model"])
    assert (pipe.config.input_layout, pipe.config.trained, pipe.config.image_encoder_trained) == ("pbe", False, True)
    source = UNet2DConditionModel.from_pretrained(pbe_warm["pbe"], subfolder="unet").eval()
    ours, theirs = pipe.unet.state_dict(), source.state_dict()
    assert ours.keys() == theirs.keys()
    assert [k for k in theirs if not torch.equal(ours[k], theirs[k])] == []
    # Zero-init heads: PBE's noise, its channels in its own order, for the same context.
    latents, t, masked, hole, hint, context = _latent_inputs(pipe)
    with torch.no_grad():
        dtc = pipe.predict_noise(latents, t, masked, hole, hint, context)
        ref = source(torch.cat([latents, masked, 1 - hole], dim=1), t, context).sample
    torch.testing.assert_close(dtc, ref, atol=NOISE_ATOL, rtol=0)


def test_from_parts_refuses_a_source_under_the_wrong_flag(pbe_warm, tmp_path, capsys):
    from parts import make_sd_inpainting

    from jobs.make_model import main

    sd_dir, out = make_sd_inpainting(str(tmp_path / "sd")), str(tmp_path / "o")
    dino, pbe = pbe_warm["dinov2"], pbe_warm["pbe"]
    assert main(["--from-parts", "--sd-inpainting", pbe, "--dinov2", dino, "--out", out]) == 2
    assert "is a Paint-by-Example folder (its UNet takes the pbe layout): give it as --pbe" in capsys.readouterr().err
    assert main(["--from-parts", "--pbe", sd_dir, "--dinov2", dino, "--out", out]) == 2
    assert "is a 'StableDiffusionInpaintPipeline' folder, not Paint-by-Example" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        main(["--from-parts", "--pbe", pbe, "--sd-inpainting", sd_dir, "--dinov2", dino, "--out", out])
    assert refused.value.code == 2
    assert "--sd-inpainting: not allowed with argument --pbe" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_from_parts_names_whats_missing(tmp_path, capsys):
    from parts import make_dinov2, make_sd_inpainting

    from jobs.make_model import main

    sd_dir, dino_dir = str(tmp_path / "sd"), str(tmp_path / "dino")
    make_sd_inpainting(sd_dir)
    make_dinov2(dino_dir)
    os.remove(os.path.join(sd_dir, "unet", "diffusion_pytorch_model.safetensors"))
    assert main(["--from-parts", "--sd-inpainting", sd_dir, "--dinov2", dino_dir, "--out", str(tmp_path / "o")]) == 2
    assert "unet/ has no weights file" in capsys.readouterr().err
    os.remove(os.path.join(dino_dir, "config.json"))
    assert (
        main(
            [
                "--from-parts",
                "--sd-inpainting",
                str(tmp_path / "nope"),
                "--dinov2",
                dino_dir,
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "no checkpoint folder" in capsys.readouterr().err


def test_cfg_as_one_batch_equals_separate_passes(tiny):
    latents, t, masked, hole, hint, context = _latent_inputs(tiny)
    null = tiny.image_projection.null_context(2)
    scale = 5.0
    with torch.no_grad():
        both = tiny.predict_noise(
            torch.cat([latents] * 2),
            t,
            torch.cat([masked] * 2),
            torch.cat([hole] * 2),
            torch.cat([hint] * 2),
            torch.cat([null, context]),
        )
        uncond_b, cond_b = both.chunk(2)
        uncond = tiny.predict_noise(latents, t, masked, hole, hint, null)
        cond = tiny.predict_noise(latents, t, masked, hole, hint, context)
    # float32 sums are reordered by batch size (BLAS blocking), and the guidance amplifies them
    # by up to 2 * scale + 1: 1e-4 is still orders of magnitude below a swapped or dropped half.
    assert (cond - uncond).abs().max() > 1e-2
    torch.testing.assert_close(
        uncond_b + scale * (cond_b - uncond_b), uncond + scale * (cond - uncond), atol=1e-4, rtol=0
    )


def test_per_pair_seeds_batch_invariance_and_determinism(tiny):
    image, hole, product = _inputs(tiny, 4)
    seeds = [11, 12, 13, 14]
    batch = _render(tiny, image, hole, product, seeds)
    again = _render(tiny, image, hole, product, seeds)
    assert batch.tobytes() == again.tobytes()  # same batch twice: identical bytes
    alone = _render(tiny, image[2:3], hole[2:3], product[2:3], seeds[2:3])
    diff = np.abs(alone[0].astype(int) - batch[2].astype(int)).max()
    assert diff <= 1, f"pair differs by {diff} uint8 levels between batch of 1 and batch of 4"
    # outside the hole the context is kept exactly
    keep = hole[2].numpy() == 0
    assert (batch[2][keep] == image[2].numpy()[keep]).all()
    assert not (batch[2][~keep] == image[2].numpy()[~keep]).all()


def test_output_types_and_dpmpp_scheduler(tiny):
    image, hole, product = _inputs(tiny, 1)
    g = lambda: [torch.Generator().manual_seed(3)]  # noqa: E731
    as_uint8 = tiny(image, hole, product, num_inference_steps=2, generator=g(), output_type="uint8").images
    as_pt = tiny(image, hole, product, num_inference_steps=2, generator=g(), output_type="pt").images
    as_pil = tiny(image, hole, product, num_inference_steps=2, generator=g(), output_type="pil").images
    assert as_pt.shape == (1, 3, 128, 128) and as_pt.dtype == torch.float32
    assert np.array_equal(np.asarray(as_pil[0]), as_uint8[0])
    dpm = DTCPipeline(**tiny.components, resolution=128)
    dpm.use_scheduler("dpmpp")
    assert dpm.scheduler_name == "dpmpp" and dpm.scheduler.config.algorithm_type == "dpmsolver++"
    out = dpm(image, hole, product, num_inference_steps=3, generator=g(), output_type="uint8").images
    assert out.shape == (1, 128, 128, 3)
    with pytest.raises(ValueError, match="scheduler must be one of"):
        dpm.use_scheduler("euler")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("image", torch.zeros(1, 64, 64, 3, dtype=torch.uint8), "must be 128x128 .* got 64x64"),
        (
            "image",
            torch.zeros(1, 128, 128, 4, dtype=torch.uint8),
            r"uint8 must be \(B, H, W, 3\), got shape \(1, 128, 128, 4\)",
        ),
        ("image", torch.zeros(1, 1, 128, 128), r"got shape \(1, 1, 128, 128\)"),
        ("mask_image", torch.full((1, 128, 128), 0.5), r"must be binary .* got values \[0.5\]"),
        ("mask_image", torch.zeros(1, 128, 128), "hole mask is empty"),
        ("product_image", torch.zeros(1, 100, 100, 3, dtype=torch.uint8), "must be 224x224"),
    ],
)
def test_bad_inputs_name_the_value(tiny, field, value, message):
    image, hole, product = _inputs(tiny, 1)
    kwargs = {"image": image, "mask_image": hole, "product_image": product, field: value}
    with pytest.raises(ValueError, match=message):
        tiny(**kwargs, num_inference_steps=1, output_type="uint8")


def test_sd15_film_sites_have_the_paper_shapes():
    with torch.device("meta"):
        pipe = build_preset("sd15", film_mode="spatial")  # one gamma per pixel: the sites' sides
        assert pipe.config.resolution == 512 and pipe.image_projection.config.num_tokens == 257
        assert pipe.image_encoder.config.hidden_size == 1536
        sample = torch.empty(2, 9, 64, 64)
        film = pipe.hint_encoder(sample, torch.tensor(10), torch.empty(2, 257, 768))
    assert len(film) == 13
    assert [(g.shape[1], g.shape[2]) for g, _ in film] == SD15_FILM_SITES
    assert all(g.shape == b.shape and g.shape[-1] == g.shape[-2] for g, b in film)


def test_save_load_roundtrip(tiny, tmp_path):
    from pipeline.model.checkpoint import model_digest
    from pipeline.model.loading import save_pipeline

    image, hole, product = _inputs(tiny, 2)
    reference = _render(tiny, image, hole, product, [1, 2])
    local = str(tmp_path / "saved")
    digest = save_pipeline(tiny, local)
    assert model_digest(local) == digest
    assert _render(load_pipeline(local), image, hole, product, [1, 2]).tobytes() == reference.tobytes()


def test_missing_or_malformed_checkpoint_is_one_clear_error(tiny_model_dir, tmp_path):
    import shutil

    from pipeline.model.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        load_pipeline(str(tmp_path / "absent"))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    os.remove(broken / "hint_encoder" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="hint_encoder/ has no weights file"):
        load_pipeline(str(broken))
    shutil.rmtree(broken)
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model_index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="model_index.json is not valid JSON"):
        load_pipeline(str(broken))
    (broken / "model_index.json").unlink()
    with pytest.raises(CheckpointError, match="model_index.json is missing"):
        load_pipeline(str(broken))


def test_attention_is_sdpa_and_channels_last_keeps_the_output(tiny_model_dir):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from pipeline.model.loading import optimize_pipeline

    plain = load_pipeline(tiny_model_dir)
    # SDPA (F.scaled_dot_product_attention: flash / memory-efficient kernels on GPU) everywhere
    for module in (plain.unet, plain.hint_encoder, plain.vae):
        processors = getattr(module, "attn_processors", {})
        assert all(isinstance(p, AttnProcessor2_0) for p in processors.values()), module.__class__.__name__
    assert plain.unet.attn_processors and plain.image_encoder.config._attn_implementation == "sdpa"

    image, hole, product = _inputs(plain, 2)
    expected = _render(plain, image, hole, product, [5, 6], steps=2)
    fast = optimize_pipeline(load_pipeline(tiny_model_dir), channels_last=True)
    assert fast.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    got = _render(fast, image, hole, product, [5, 6], steps=2)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1  # same kernels up to rounding
