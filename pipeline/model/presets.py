"""Model presets: `tiny` (tests: < 5M parameters, 128 px), `sd15` (the paper's sizes: SD-1.5
inpainting UNet, SD VAE, DINOv2-g/14 at 224, 512 px) and `train-tiny` (the toy that learns on 2
CPUs in minutes: 64 px, a VAE of factor 4 so the latents are 16 x 16, DINOv2 at 56 px); and
`pbe-tiny`, a Paint-by-Example pipeline at `tiny`'s sizes (128 px, CLIP vision tower at 224),
saved in the hub's layout (`PBEPipeline.save_pretrained`). All are random-init: they fix shapes,
not behaviour; `train-tiny` is meant to get its VAE fitted on the synthetic domain first
(`python -m jobs.fit_vae`, pipeline/toy/vae_fit.py), because no diffusion training through a
random VAE gives meaningful pixels. Real weights come from `assemble.assemble_from_parts` (an
untrained warm start, see there for what it does and does not compute) and then fine-tuning, or
from a trained folder.

The sampler every preset gets is `schedule.sd_scheduler()`.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPVisionConfig, Dinov2Config, Dinov2Model

from pipeline.model.components import DTCHintAdapter, DTCUNet2DConditionModel
from pipeline.model.pipeline_dtc import DTCPipeline
from pipeline.model.pipeline_pbe import PBEImageEncoder, PBEPipeline
from pipeline.model.schedule import sd_scheduler
from pipeline.schema import PRESETS

# Presets only the training side builds (`jobs.fit_vae`); `jobs.make_model` keeps schema.PRESETS.
TRAIN_PRESETS = ("train-tiny",)
# Paint-by-Example presets (`build_pbe_preset`); `jobs.make_model` offers them beside PRESETS.
PBE_PRESETS = ("pbe-tiny",)
# train-tiny's image-encoder input: 4 x 4 patches of 14 px (16 tokens + CLS). The toy's identity
# (hue, label quadrant) survives 56 px; 224 would cost 16x the tokens for nothing here.
TRAIN_TINY_PRODUCT_SIZE = 56


def dinov2_config(preset: str) -> Dinov2Config:
    """DINOv2-g/14's config fields (SwiGLU FFN, layer scale, 518 px position grid); `tiny`
    keeps every field and shrinks only the widths and depth."""
    giant = dict(
        hidden_size=1536,
        num_hidden_layers=40,
        num_attention_heads=24,
        mlp_ratio=4,
        use_swiglu_ffn=True,
        image_size=518,
        patch_size=14,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        drop_path_rate=0.0,
        qkv_bias=True,
    )
    if preset in ("tiny", "train-tiny"):
        giant.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    return Dinov2Config(**giant)


def unet_config(preset: str) -> dict:
    if preset == "sd15":  # runwayml/stable-diffusion-inpainting unet/config.json
        return dict(
            sample_size=64,
            in_channels=9,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
        )
    if preset == "train-tiny":  # 16 x 16 latents at 64 px (tiny: 16 x 16 at 128 px)
        return dict(
            sample_size=16,
            in_channels=9,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=8,
        )
    return dict(
        sample_size=16,
        in_channels=9,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def vae_config(preset: str) -> dict:
    if preset == "train-tiny":  # factor 4 (three blocks): the label patch is ~3 latent pixels, not 1
        return dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(16, 32, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
            scaling_factor=1.0,  # set from the fitted latents' spread by jobs.fit_vae
        )
    widths = (128, 256, 512, 512) if preset == "sd15" else (8, 16, 32, 32)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=widths,
        layers_per_block=2 if preset == "sd15" else 1,
        latent_channels=4,
        norm_num_groups=32 if preset == "sd15" else 8,
        sample_size=512 if preset == "sd15" else 128,
        scaling_factor=0.18215,
    )


def build_preset(preset: str, seed: int = 0, **hint_options) -> DTCPipeline:
    """A random-init DTC of the preset's sizes. The same seed gives the same weights.
    `hint_options` (`film_mode`) go to `DTCHintEncoder`, whose defaults they override.

    Wrap in `with torch.device("meta"):` to get the shapes without allocating (sd15 is ~3B
    parameters, 12 GB in fp32).
    """
    if preset not in PRESETS + TRAIN_PRESETS:
        raise ValueError(f"preset must be one of {PRESETS + TRAIN_PRESETS}, got {preset!r}")
    torch.manual_seed(seed)
    unet = DTCUNet2DConditionModel(**unet_config(preset))
    vae = AutoencoderKL(**vae_config(preset))
    image_encoder = Dinov2Model(dinov2_config(preset))
    product_size = TRAIN_TINY_PRODUCT_SIZE if preset == "train-tiny" else 224
    pipe = DTCPipeline.from_parts(
        vae,
        unet,
        image_encoder,
        sd_scheduler(),
        image_encoder_trained=False,
        product_size=product_size,
        **hint_options,
    )
    if preset == "train-tiny":
        # the hint adapter must land on the VAE's latent grid: one stride-2 conv per factor of 2
        # (from_parts' default has three, for factor-8 VAEs); its last conv starts at zero, as there
        pipe.register_modules(hint_adapter=DTCHintAdapter(latent_channels=4, channels=(32, 64)).eval())
    return pipe


def pbe_clip_config(preset: str) -> CLIPVisionConfig:
    """PBE's image encoder config: CLIP ViT-L/14 at 224 (the hub's image_encoder/config.json);
    `pbe-tiny` shrinks the widths and the patch (7 x 7 tokens at 224) and keeps 4 layers, the
    fewest that give the mapper a block (PBE's mapper has (layers + 1) // 5)."""
    if preset != "pbe-tiny":
        raise ValueError(f"preset must be one of {PBE_PRESETS}, got {preset!r}")
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=224,
        patch_size=32,
        projection_dim=unet_config("tiny")["cross_attention_dim"],
        hidden_act="quick_gelu",
    )


def build_pbe_preset(preset: str, seed: int = 0) -> PBEPipeline:
    """A random-init Paint-by-Example pipeline of the preset's sizes (`tiny`'s UNet and VAE, a
    stock `UNet2DConditionModel` as PBE ships); the same seed gives the same weights. Untrained,
    random image encoder: its model_index.json says so."""
    config = pbe_clip_config(preset)
    torch.manual_seed(seed)
    pipe = PBEPipeline(
        vae=AutoencoderKL(**vae_config("tiny")),
        image_encoder=PBEImageEncoder(config),
        unet=UNet2DConditionModel(**unet_config("tiny")),
        scheduler=sd_scheduler(),
        trained=False,
        image_encoder_trained=False,
    )
    for module in (pipe.vae, pipe.image_encoder, pipe.unet):
        module.eval()
    return pipe
