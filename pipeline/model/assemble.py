"""Assemble an untrained DTC from public parts: the starting point for fine-tuning.

    python -m jobs.make_model --from-parts --sd-inpainting sd-inpaint/ --dinov2 dinov2-giant/ --out dtc/
    python -m jobs.make_model --from-parts --pbe paint-by-example/ --dinov2 dinov2-giant/ --out dtc-pbe/

The parts it expects (local folders or `s3://` prefixes, in the layouts the hub ships):
- `--sd-inpainting`: SD-1.5 inpainting in diffusers format, i.e. a download of
  `stable-diffusion-v1-5/stable-diffusion-inpainting` (the mirror of
  `runwayml/stable-diffusion-inpainting`, since removed from the hub): model_index.json plus
  unet/ (9 input channels), vae/ and scheduler/; its text encoder, tokenizer and safety checker
  are not used;
- or `--pbe`: Paint-by-Example in diffusers format, `Fantasy-Studio/Paint-by-Example`
  (model_index.json `_class_name` "PaintByExamplePipeline"): unet/ (9 input channels, trained on
  `[latents, masked latents, mask = 1 keep]`), vae/ and scheduler/ (PNDM over SD's training
  schedule); its CLIP image encoder, safety checker and feature extractor are not used (DINOv2
  replaces the encoder);
- `--dinov2`: DINOv2 ViT-g/14 in transformers format, `facebook/dinov2-giant` (hidden size 1536;
  other DINOv2 sizes work, the projection follows their width).

What it builds:
- main UNet: the source's UNet, unchanged (no weight surgery), in the input layout it was trained
  with: "sd" for SD inpainting, "pbe" for Paint-by-Example (`DTCPipeline.unet_input`);
- hint encoder: a copy of that UNet's conv_in, time embedding, down and mid blocks, FiLM heads at 0;
- hint adapter: fresh, last conv at 0; image projection: fresh `Linear(dinov2 hidden -> cross
  attention width)` and a random null embedding;
- image encoder: the DINOv2 checkpoint as it is; VAE: the source's or `--vae`; scheduler:
  `schedule.sd_scheduler()` (DDIM over the SD schedule, no x0 clipping), whatever scheduler class
  and settings the source folder ships; the folder's training schedule must be SD's.

What that model is, and is not. With the zero inits, its noise prediction is exactly the source
UNet's *for the same encoder_hidden_states* (tests/unit/test_model.py checks it). But DTC never
feeds it the context it was trained on (SD's CLIP text embeddings, PBE's CLIP image embedding):
its context is a fresh, random projection of DINOv2 tokens (and, for CFG, a random null
embedding), an input the UNet has never seen, and the hint branch starts at zero, so the product
has no trained path into the render. An assembled model is therefore not a usable inpainter,
neither of the product nor of plain background: it is a warm start for the fine-tuning job
(DTC_MODEL.md, "Training"), which trains the projection, the hint branch and the UNet together,
and it renders usefully only after that. From PBE, the UNet already inpaints *a reference
object* into a region (the paper's "PBE + DINOv2" row is this UNet fed DINOv2 tokens); from SD
inpainting, it inpaints from a text prompt.

The paper says it starts from "Stable Diffusion v1-5"; read literally, that is the text-to-image
checkpoint (`stable-diffusion-v1-5/stable-diffusion-v1-5`, 4 input channels) with 5 zero-initialised
input channels added for the masked-image latents and the mask, in the `pbe` layout
(`[latents, masked latents, mask = 1 keep]`). This module does not build that variant: it needs
an inpainting UNet (9 channels) and keeps its weights bit-for-bit.
"""

from __future__ import annotations

import json
import os

from diffusers import AutoencoderKL
from transformers import Dinov2Model

from pipeline.model.checkpoint import (
    PBE_CLASS_NAME,
    CheckpointError,
    check_checkpoint,
    check_sd_schedule,
    local_checkpoint,
)
from pipeline.model.components import DTCUNet2DConditionModel
from pipeline.model.pipeline_dtc import DTCPipeline
from pipeline.model.schedule import sd_scheduler

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


def _check_source_class(index: dict, uri: str, input_layout: str) -> None:
    """A Paint-by-Example folder under `--pbe`, and only there: both sources hold a 9-channel UNet,
    but in different channel orders, so one given as the other would load and train on scrambled
    inputs without a word. SD-inpainting folders are held to no class name (assembly never asked for
    one); PBE's is what diffusers itself loads a PBE folder by."""
    name = index.get("_class_name")
    if input_layout == "pbe" and name != PBE_CLASS_NAME:
        raise CheckpointError(
            f"{uri} is a {name!r} folder, not Paint-by-Example (model_index.json _class_name {PBE_CLASS_NAME!r})"
        )
    if input_layout == "sd" and name == PBE_CLASS_NAME:
        raise CheckpointError(f"{uri} is a Paint-by-Example folder (its UNet takes the pbe layout): give it as --pbe")


def assemble_from_parts(
    source: str, dinov2: str, vae: str | None = None, product_size: int = 224, input_layout: str = "sd", **hint_options
) -> DTCPipeline:
    """An untrained DTC from a source pipeline folder (SD inpainting for `input_layout` "sd",
    Paint-by-Example for "pbe") and a DINOv2 folder, local or s3://.

    Untrained means: the source UNet's noise for the same context, but a context (projected
    DINOv2 tokens) that UNet has never seen; see the module docstring before rendering with it.
    `hint_options` (`film_mode`) go to `DTCHintEncoder`.
    """
    source_dir = local_checkpoint(source)
    index = check_checkpoint(source_dir, required=("unet", "vae", "scheduler"))
    _check_source_class(index, source, input_layout)
    check_sd_schedule(source_dir, source)
    unet = DTCUNet2DConditionModel.from_pretrained(source_dir, subfolder="unet")
    if unet.config.in_channels != 9:
        raise CheckpointError(
            f"{source}/unet has in_channels={unet.config.in_channels}; DTC needs an inpainting UNet (9)"
        )
    vae_model = (
        AutoencoderKL.from_pretrained(local_checkpoint(vae))
        if vae
        else AutoencoderKL.from_pretrained(source_dir, subfolder="vae")
    )
    dino_dir = local_checkpoint(dinov2)
    _check_dinov2(dino_dir, dinov2)
    image_encoder = Dinov2Model.from_pretrained(dino_dir)
    pipe = DTCPipeline.from_parts(
        vae_model,
        unet,
        image_encoder,
        sd_scheduler(),
        image_encoder_trained=True,
        product_size=product_size,
        input_layout=input_layout,
        **hint_options,
    )
    return pipe
