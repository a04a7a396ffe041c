"""`PBEPipeline`: Paint-by-Example checkpoints (the hub's `Fantasy-Studio/Paint-by-Example`
folder) rendered through our path, with `DTCPipeline`'s call signature.

    pipe = PBEPipeline.from_pretrained("models/pbe")      # a PaintByExamplePipeline folder
    out = pipe(image=context, mask_image=hole, product_image=product,
               generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="uint8")

diffusers keeps `PaintByExamplePipeline` under `pipelines/deprecated/` (untested upstream); we own
the small part we run and never import that module (tests do, to prove this one equal to it):
- `PBEImageEncoder`: PBE's `PaintByExampleImageEncoder` (CLIP vision tower -> pooled CLS ->
  mapper of `BasicTransformerBlock`s -> LayerNorm -> projection, plus the learnt
  `uncond_vector` for classifier-free guidance), with the same state_dict keys and config
  (`CLIPVisionConfig`, `projection_dim`), so the hub's weights load as they are;
- `PBEPipeline.__call__`: PBE's steps in PBE's order (the initial noise drawn before the masked
  image's VAE sample, both from each pair's generator), the UNet input in the `pbe` layout
  `[latents, masked latents, mask (1 = keep)]`, CFG as `[uncond_vector | product]`.

What differs from diffusers' class, on purpose: the product comes as the S x S image the render
job prepares (on grey, already resized) and is CLIP-normalised here, where PBE's
`CLIPImageProcessor` would resize and centre-crop a photo; the sampler is DDIM over SD's
schedule (`schedule.sd_scheduler`), not the folder's PNDM; and, as `DTCPipeline` step 8, the
context's own pixels are kept outside the hole (PBE returns the whole decoded image, so its
pixels match ours inside the hole; its latents match ours up to rounding, as it VAE-encodes the
masked images one at a time: tests/unit/test_pbe.py states the tolerance). `hint_image`,
`hint_mask` and `product_alpha` are accepted and unused: PBE has no hint branch.
"""

from __future__ import annotations

import json
import os

import diffusers
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, PNDMScheduler, UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from transformers import CLIPImageProcessorPil, CLIPPreTrainedModel, CLIPVisionConfig, CLIPVisionModel
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from pipeline.model.checkpoint import PBE_CLASS_NAME, check_sd_schedule
from pipeline.model.inputs import OUTPUT_TYPES, PipelineOutput, as_image_batch, as_mask_batch, convert_output
from pipeline.model.pipeline_dtc import SamplerChoice
from pipeline.model.schedule import SD_SCHEDULE, sd_scheduler

__all__ = ["PBEImageEncoder", "PBEPipeline"]


class PBEMapper(nn.Module):
    """PBE's mapper: one single-head transformer block per 5 CLIP layers, on the pooled token."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        width = config.hidden_size
        self.blocks = nn.ModuleList(
            BasicTransformerBlock(width, 1, width, activation_fn="gelu", attention_bias=True)
            for _ in range((config.num_hidden_layers + 1) // 5)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return hidden_states


class PBEImageEncoder(CLIPPreTrainedModel):
    """Product image (CLIP-normalised, B x 3 x S x S) -> one context token (B, 1, projection_dim).

    Module names are PBE's (`model`, `mapper.blocks`, `final_layer_norm`, `proj_out`,
    `uncond_vector`): the hub's image_encoder/ weights load into it unchanged."""

    config_class = CLIPVisionConfig  # the hub's image_encoder/config.json is a clip_vision_model config
    main_input_name = "pixel_values"

    def __init__(self, config: CLIPVisionConfig):
        super().__init__(config)
        self.proj_size = config.projection_dim
        self.model = CLIPVisionModel(config)
        self.mapper = PBEMapper(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size)
        self.proj_out = nn.Linear(config.hidden_size, self.proj_size)
        # the unconditional context of classifier-free guidance, learnt with the model
        self.uncond_vector = nn.Parameter(torch.randn((1, 1, self.proj_size)))
        self.post_init()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.model(pixel_values=pixel_values).pooler_output
        return self.proj_out(self.final_layer_norm(self.mapper(pooled[:, None])))


class PBEPipeline(SamplerChoice, DiffusionPipeline):
    r"""Paint-by-Example: SD-1.x inpainting UNet (9 channels, `pbe` layout) conditioned on one
    CLIP token of the product. No hint branch.

    Components: `vae`, `image_encoder` (`PBEImageEncoder`), `unet` (diffusers'
    `UNet2DConditionModel`), `scheduler`. Config, as `DTCPipeline`'s (what the renderer, the
    render stage and Serve read): `input_layout` ("pbe"), `resolution` (UNet sample size x the
    VAE's factor), `product_size` (the CLIP tower's image size), `trained` and
    `image_encoder_trained` (None for the hub's folder, which records neither; False for
    `pbe-tiny`).
    """

    model_cpu_offload_seq = "image_encoder->unet->vae"
    # The identity score's encoder (`identity.IdentityScorer`): the CLIP vision tower, on CLIP's
    # normalisation (the model's own encoder, as DTC's score uses its DINOv2).
    image_mean, image_std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    def __init__(
        self,
        vae: AutoencoderKL,
        image_encoder: PBEImageEncoder,
        unet: UNet2DConditionModel,
        scheduler: DDIMScheduler,
        input_layout: str = "pbe",
        resolution: int | None = None,
        product_size: int | None = None,
        trained: bool | None = None,
        image_encoder_trained: bool | None = None,
    ):
        super().__init__()
        self.register_modules(vae=vae, image_encoder=image_encoder, unet=unet, scheduler=scheduler)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if unet.config.in_channels != 9:
            raise ValueError(f"a Paint-by-Example UNet takes 9 input channels, got {unet.config.in_channels}")
        # The sizes follow from the components (the hub's model_index.json records none); given
        # (a config written by save_pretrained), they must agree.
        sizes = {
            "input_layout": ("pbe", input_layout),
            "resolution": (unet.config.sample_size * self.vae_scale_factor, resolution),
            "product_size": (image_encoder.config.image_size, product_size),
        }
        for key, (derived, given) in sizes.items():
            if given is not None and given != derived:
                raise ValueError(f"{key} {given!r} disagrees with the components, which give {derived!r}")
        self.register_to_config(
            **{key: derived for key, (derived, _) in sizes.items()},
            trained=trained,
            image_encoder_trained=image_encoder_trained,
        )

    @property
    def identity_encoder(self) -> CLIPVisionModel:
        return self.image_encoder.model

    # -- folders --------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder: str, dtype: torch.dtype = torch.float32) -> PBEPipeline:
        """A local PaintByExamplePipeline folder (the hub's layout). Its model_index.json names
        diffusers' deprecated classes (`["paint_by_example", "PaintByExampleImageEncoder"]`),
        which `DiffusionPipeline.from_pretrained` would import: each component loads through its
        own `from_pretrained` instead. The folder's scheduler (PNDM) is checked for SD's training
        schedule and replaced by `sd_scheduler()`; safety_checker and feature_extractor are unused."""
        with open(os.path.join(folder, "model_index.json")) as f:
            index = json.load(f)
        check_sd_schedule(folder, folder)
        pipe = cls(
            vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", dtype=dtype),
            image_encoder=PBEImageEncoder.from_pretrained(folder, subfolder="image_encoder", dtype=dtype),
            unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet", dtype=dtype),
            scheduler=sd_scheduler(),
            trained=index.get("trained"),
            image_encoder_trained=index.get("image_encoder_trained"),
        )
        for module in (pipe.vae, pipe.image_encoder, pipe.unet):
            module.eval()
        return pipe

    def save_pretrained(self, save_directory: str, safe_serialization: bool = True, **_) -> None:
        """Write the hub's layout (what `from_pretrained` and diffusers' deprecated class read):
        model_index.json naming `PaintByExamplePipeline`, a PNDM scheduler over SD's schedule (as
        the hub ships), a CLIP feature extractor at the product size, no safety checker; plus our
        `trained` flags (diffusers' class ignores them)."""
        os.makedirs(save_directory, exist_ok=True)
        for name in ("vae", "unet"):
            getattr(self, name).save_pretrained(
                os.path.join(save_directory, name), safe_serialization=safe_serialization
            )
        self.image_encoder.config.architectures = ["PaintByExampleImageEncoder"]
        self.image_encoder.save_pretrained(os.path.join(save_directory, "image_encoder"))
        schedule = {k: v for k, v in SD_SCHEDULE.items() if k != "clip_sample"}  # PNDM has no x0 clipping
        PNDMScheduler(skip_prk_steps=True, **schedule).save_pretrained(os.path.join(save_directory, "scheduler"))
        size = self.config.product_size
        CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size=size).save_pretrained(
            os.path.join(save_directory, "feature_extractor")
        )
        index = {
            "_class_name": PBE_CLASS_NAME,
            "_diffusers_version": diffusers.__version__,
            "feature_extractor": ["transformers", "CLIPImageProcessor"],
            "image_encoder": ["paint_by_example", "PaintByExampleImageEncoder"],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", "PNDMScheduler"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
        for key in ("trained", "image_encoder_trained"):
            if self.config[key] is not None:
                index[key] = self.config[key]
        with open(os.path.join(save_directory, "model_index.json"), "w") as f:
            json.dump(index, f, indent=2)

    # -- call ------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        image,
        mask_image,
        product_image,
        product_alpha=None,
        hint_image=None,
        hint_mask=None,
        num_inference_steps: int = 40,
        guidance_scale: float = 5.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> PipelineOutput | tuple:
        r"""Render a batch; the arguments are `DTCPipeline.__call__`'s (`product_alpha`,
        `hint_image` and `hint_mask` are accepted and unused: PBE has no hint branch).

        Args:
            image: context crops, uint8 (B, R, R, 3) or float (B, 3, R, R) in [0, 1]; R = `config.resolution`.
            mask_image: (B, R, R) or (B, 1, R, R), bool or {0, 1}; 1 = hole (region to repaint).
            product_image: product shots at `config.product_size`, same formats as `image`.
            generator: one CPU generator per pair, or one for the whole batch.
            output_type: "pil", "np", "uint8", "pt" or "latent".
        """
        # 1. check inputs
        size, product_size = self.config.resolution, self.config.product_size
        image = as_image_batch(image, "image", size)
        batch = image.shape[0]
        hole = as_mask_batch(mask_image, "mask_image", size, batch)
        product = as_image_batch(product_image, "product_image", product_size)
        if product.shape[0] != batch:
            raise ValueError(f"product_image has batch {product.shape[0]}, image has {batch}")
        empty = [i for i in range(batch) if not hole[i].any()]
        if empty:
            raise ValueError(f"mask_image: hole mask is empty for pair(s) {empty}: nothing to repaint")
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be {'|'.join(OUTPUT_TYPES)}, got {output_type!r}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        device, dtype = self._execution_device, self.unet.dtype
        do_cfg = guidance_scale > 1.0

        # 2. product context: one CLIP token; PBE's learnt uncond_vector is CFG's [uncond | cond] half
        image, hole, product = (t.to(device=device, dtype=dtype) for t in (image, hole, product))
        mean = torch.tensor(self.image_mean, device=device, dtype=dtype)[:, None, None]
        std = torch.tensor(self.image_std, device=device, dtype=dtype)[:, None, None]
        context = self.image_encoder((product - mean) / std)
        if do_cfg:
            context = torch.cat([self.image_encoder.uncond_vector.to(dtype).expand(batch, -1, -1), context])

        # 3. timesteps, then the initial noise: PBE draws it before the masked image's VAE sample
        # (step 4), so each generator's first numbers are the noise, as in diffusers' class
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latent_size = size // self.vae_scale_factor
        latents = (
            randn_tensor(
                (batch, self.vae.config.latent_channels, latent_size, latent_size),
                generator=generator,
                device=device,
                dtype=dtype,
            )
            * self.scheduler.init_noise_sigma
        )

        # 4. masked image latents and the latent-size mask, in PBE's polarity (1 = keep)
        keep = 1 - hole
        scaling = self.vae.config.scaling_factor
        masked_image = (image * 2 - 1) * keep
        masked_image_latents = self.vae.encode(masked_image).latent_dist.sample(generator=generator) * scaling
        keep_latent = F.interpolate(keep, size=(latent_size, latent_size))  # nearest, as PBE
        if do_cfg:
            masked_image_latents, keep_latent = (torch.cat([t, t]) for t in (masked_image_latents, keep_latent))

        # 5. denoising loop; the schedulers get a CPU copy of the timestep (see DTCPipeline step 7)
        timesteps = self.scheduler.timesteps
        cpu_timesteps = timesteps.cpu()
        for i in self.progress_bar(range(len(cpu_timesteps))):
            model_input = torch.cat([latents, latents]) if do_cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, cpu_timesteps[i])
            model_input = torch.cat([model_input, masked_image_latents, keep_latent], dim=1)
            noise = self.unet(model_input, timesteps[i], encoder_hidden_states=context).sample
            if do_cfg:
                noise_uncond, noise_cond = noise.chunk(2)
                noise = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
            latents = self.scheduler.step(noise, cpu_timesteps[i], latents).prev_sample

        if output_type == "latent":
            return PipelineOutput(images=latents) if return_dict else (latents,)

        # 6. decode, then keep the context's own pixels outside the hole (DTCPipeline step 8)
        decoded = (self.vae.decode(latents / scaling).sample / 2 + 0.5).clamp(0, 1)
        output = (image * keep + decoded * hole).float()

        # 7. convert
        images = convert_output(output, output_type)
        return PipelineOutput(images=images) if return_dict else (images,)
