"""Assemble an untrained DTC from public parts: the starting point for fine-tuning.

    python -m jobs.make_model --from-parts --sd-inpainting sd-inpaint/ --dinov2 dinov2-giant/ --out dtc/

- main UNet: the SD-inpainting UNet, unchanged (input layout "sd", so no weight surgery);
- hint encoder: a copy of that UNet's conv_in, time embedding, down and mid blocks, FiLM heads at 0;
- hint adapter: fresh, last conv at 0; image projection: fresh `Linear(dinov2 hidden -> 768)`;
- image encoder: the DINOv2 checkpoint as it is; VAE: the SD one or `--vae`; scheduler: DDIM
  over the SD noise schedule.
With the zero inits, the result predicts exactly the SD-inpainting UNet's noise.
"""

from __future__ import annotations

import json
import os

from diffusers import AutoencoderKL, DDIMScheduler
from transformers import Dinov2Model

from pipeline.model.checkpoint import CheckpointError, check_checkpoint, local_checkpoint
from pipeline.model.components import DTCHintAdapter, DTCHintEncoder, DTCImageProjection, DTCUNet2DConditionModel
from pipeline.model.pipeline_dtc import DTCPipeline

__all__ = ["assemble_from_parts"]


def _check_dinov2(folder: str, uri: str) -> None:
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(f"{uri} is not a DINOv2 checkpoint: config.json is missing")
    with open(config_path) as f:
        model_type = json.load(f).get("model_type")
    if model_type != "dinov2":
        raise CheckpointError(f"{uri} is a {model_type!r} checkpoint, expected model_type 'dinov2'")
    if not any(n.endswith((".safetensors", ".bin")) for n in os.listdir(folder)):
        raise CheckpointError(f"{uri}: no weights file (model.safetensors or pytorch_model.bin)")


def assemble_from_parts(
    sd_inpainting: str,
    dinov2: str,
    vae: str | None = None,
    film_mode: str = "spatial",
    product_size: int = 224,
) -> DTCPipeline:
    """An untrained DTC from an SD-inpainting pipeline folder and a DINOv2 folder (local or s3://)."""
    sd_dir = local_checkpoint(sd_inpainting)
    check_checkpoint(sd_dir, required=("unet", "vae", "scheduler"))
    unet = DTCUNet2DConditionModel.from_pretrained(sd_dir, subfolder="unet")
    if unet.config.in_channels != 9:
        raise CheckpointError(
            f"{sd_inpainting}/unet has in_channels={unet.config.in_channels}; DTC needs an inpainting UNet (9)"
        )
    vae_model = (
        AutoencoderKL.from_pretrained(local_checkpoint(vae))
        if vae
        else AutoencoderKL.from_pretrained(sd_dir, subfolder="vae")
    )
    dino_dir = local_checkpoint(dinov2)
    _check_dinov2(dino_dir, dinov2)
    image_encoder = Dinov2Model.from_pretrained(dino_dir)
    patch = image_encoder.config.patch_size
    if product_size % patch:
        raise ValueError(f"product_size must be a multiple of the DINOv2 patch size {patch}, got {product_size}")
    scheduler = DDIMScheduler.from_pretrained(sd_dir, subfolder="scheduler")
    pipe = DTCPipeline(
        vae=vae_model,
        unet=unet,
        hint_encoder=DTCHintEncoder.from_unet(unet, film_mode=film_mode),
        hint_adapter=DTCHintAdapter(latent_channels=vae_model.config.latent_channels),
        image_encoder=image_encoder,
        image_projection=DTCImageProjection(
            image_encoder.config.hidden_size, unet.config.cross_attention_dim, (product_size // patch) ** 2 + 1
        ),
        scheduler=scheduler,
        input_layout="sd",
        resolution=unet.config.sample_size * 2 ** (len(vae_model.config.block_out_channels) - 1),
        product_size=product_size,
    )
    for component in (pipe.hint_encoder, pipe.hint_adapter, pipe.image_projection):
        component.eval()
    return pipe
