"""Tiny random checkpoints in the real layouts, built by the tests (nothing is downloaded).

- `make_sd_inpainting(dir)`: a diffusers `StableDiffusionInpaintPipeline` folder as
  runwayml/stable-diffusion-inpainting ships it: model_index.json listing vae, text_encoder,
  tokenizer, unet (9 input channels), scheduler (PNDM), safety_checker, feature_extractor.
- `make_dinov2(dir)`: a transformers `Dinov2Model` folder with DINOv2-g/14's config fields
  (SwiGLU, layer scale, 518 px grid, patch 14) at tiny widths.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, Dinov2Model

from pipeline.model.presets import dinov2_config, unet_config, vae_config
from pipeline.model.schedule import SD_SCHEDULE


def _tiny_clip_tokenizer(folder: str) -> CLIPTokenizer:
    # A byte-level BPE vocabulary with no merges: every printable byte is a token.
    chars = [chr(c) for c in range(33, 127)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in chars:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))


def make_sd_inpainting(folder: str, seed: int = 0) -> str:
    torch.manual_seed(seed)
    text_cfg = dict(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=200,
    )
    vision_cfg = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    pipe = StableDiffusionInpaintPipeline(
        vae=AutoencoderKL(**vae_config("tiny")),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text_cfg)),
        tokenizer=_tiny_clip_tokenizer(tempfile.mkdtemp(prefix="tok-")),
        unet=UNet2DConditionModel(**unet_config("tiny")),
        scheduler=PNDMScheduler(skip_prk_steps=True, **{k: v for k, v in SD_SCHEDULE.items() if k != "clip_sample"}),
        safety_checker=StableDiffusionSafetyChecker(
            CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=16)
        ),
        feature_extractor=CLIPImageProcessorPil(crop_size=32, size={"shortest_edge": 32}),
        requires_safety_checker=True,
    )
    pipe.save_pretrained(folder)
    return folder


def make_dinov2(folder: str, seed: int = 0) -> str:
    torch.manual_seed(seed)
    model = Dinov2Model(dinov2_config("tiny"))
    model.config.architectures = ["Dinov2Model"]
    model.save_pretrained(folder)
    return folder
