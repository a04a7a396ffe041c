"""`DTCPipeline`: Diffuse to Choose inference as a diffusers pipeline.

    pipe = DTCPipeline.from_pretrained("models/dtc-tiny")
    out = pipe(image=context, mask_image=hole, product_image=product,
               generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="uint8")

Inputs are batches at the model's working resolution (`pipe.config.resolution`, square) and
product size (`pipe.config.product_size`); cropping whole photos to that window is the render
job's preprocessing. Masks use the user's polarity: 1 = hole (the region to repaint).

The hint (the product pasted into the hole) comes best as `hint_image` + `hint_mask`, built on
the CPU from the full-resolution product (`compose.preprocess` does: the render job passes
them); without them `build_hint` makes it from the S x S encoder input, a fallback for callers
that only have that (it carries less detail: a 224^2 image stretched to a few hundred pixels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor
from transformers import Dinov2Model

from pipeline import schema
from pipeline.model.components import (
    DTCHintAdapter,
    DTCHintEncoder,
    DTCImageProjection,
    DTCUNet2DConditionModel,
    check_sd_style,
)
from pipeline.model.inputs import OUTPUT_TYPES, PipelineOutput, as_image_batch, as_mask_batch, convert_output
from pipeline.regions import largest_inscribed_rectangle

# DINOv2 was trained on ImageNet-normalised inputs.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SCHEDULERS = {"ddim": DDIMScheduler, "dpmpp": DPMSolverMultistepScheduler}
assert tuple(SCHEDULERS) == schema.SCHEDULERS, "schema.SCHEDULERS names the samplers; map each one here"
INPUT_LAYOUTS = ("sd", "pbe")


class SamplerChoice:
    """The sampler swap every pipeline of ours offers (DTC and Paint-by-Example alike): mixed in
    before `DiffusionPipeline`, it reads and sets only `self.scheduler`."""

    def use_scheduler(self, name: str) -> None:
        """Swap the sampler: "ddim" (paper default) or "dpmpp" (DPM-Solver++ 2M, ~20 steps)."""
        if name not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {name!r}")
        kwargs = {"algorithm_type": "dpmsolver++"} if name == "dpmpp" else {}
        self.scheduler = SCHEDULERS[name].from_config(self.scheduler.config, **kwargs)

    @property
    def scheduler_name(self) -> str:
        return next(k for k, cls in SCHEDULERS.items() if isinstance(self.scheduler, cls))


class DTCPipeline(SamplerChoice, DiffusionPipeline):
    r"""Diffuse to Choose: SD-1.5 inpainting conditioned on DINOv2 tokens of the product, plus a
    hint branch (product pasted into the hole, FiLM-fused into the UNet's skips).

    Components: `vae`, `unet` (`DTCUNet2DConditionModel`), `hint_encoder`, `hint_adapter`,
    `image_encoder` (transformers `Dinov2Model`), `image_projection`, `scheduler`.
    Config: `input_layout` ("sd": `[latents, mask(1 = hole), masked_latents]`, the
    StableDiffusionInpaintPipeline order; "pbe": `[latents, masked_latents, mask(1 = keep)]`),
    `resolution` (working size, square) and `product_size` (the image encoder's input size);
    `trained` (the DTC weights come from the training job's export: True; random init or
    assembled from parts: False; None: not recorded, a folder written before the flag) and
    `image_encoder_trained` (the image encoder holds pretrained weights, e.g. DINOv2 from
    `--from-parts`: True; random, as in the presets: False; None: not recorded). What the
    console and the QA page warn about (`checkpoint.weights_warning`).
    """

    model_cpu_offload_seq = "image_encoder->image_projection->hint_adapter->hint_encoder->unet->vae"
    # The identity score's encoder (`identity.IdentityScorer`): DINOv2, on ImageNet-normalised pixels.
    image_mean, image_std = IMAGENET_MEAN, IMAGENET_STD

    @property
    def identity_encoder(self) -> Dinov2Model:
        return self.image_encoder

    def __init__(
        self,
        vae: AutoencoderKL,
        unet: DTCUNet2DConditionModel,
        hint_encoder: DTCHintEncoder,
        hint_adapter: DTCHintAdapter,
        image_encoder: Dinov2Model,
        image_projection: DTCImageProjection,
        scheduler: DDIMScheduler | DPMSolverMultistepScheduler,
        input_layout: str = "sd",
        resolution: int = 512,
        product_size: int = 224,
        trained: bool | None = None,
        image_encoder_trained: bool | None = None,
    ):
        super().__init__()
        if input_layout not in INPUT_LAYOUTS:
            raise ValueError(f"input_layout must be one of {INPUT_LAYOUTS}, got {input_layout!r}")
        check_sd_style(unet.config)  # the FiLM walk implements SD-style UNets only
        self.register_modules(
            vae=vae,
            unet=unet,
            hint_encoder=hint_encoder,
            hint_adapter=hint_adapter,
            image_encoder=image_encoder,
            image_projection=image_projection,
            scheduler=scheduler,
        )
        self.register_to_config(
            input_layout=input_layout,
            resolution=resolution,
            product_size=product_size,
            trained=trained,
            image_encoder_trained=image_encoder_trained,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if resolution % self.vae_scale_factor:
            raise ValueError(f"resolution must be divisible by {self.vae_scale_factor}, got {resolution}")

    # -- scheduler -------------------------------------------------------------------------

    @classmethod
    def from_parts(
        cls,
        vae,
        unet,
        image_encoder,
        scheduler,
        *,
        image_encoder_trained: bool,
        product_size: int = 224,
        input_layout: str = "sd",
        **hint_options,
    ) -> DTCPipeline:
        """A DTC around a main UNet (taking its 9 channels in `input_layout`), a VAE and a DINOv2
        encoder (random presets and public checkpoints alike): the hint encoder copied from the
        UNet's encoder, the adapter and the token projection new, every new head at zero; the
        working resolution follows from the UNet and the VAE. Components in eval mode, as after
        `from_pretrained`. `hint_options` (`film_mode`) go to `DTCHintEncoder`, whose defaults
        they override. Untrained (`trained` False): only the training job's export is a trained DTC."""
        patch = image_encoder.config.patch_size
        if product_size % patch:
            raise ValueError(f"product_size must be a multiple of the DINOv2 patch size {patch}, got {product_size}")
        # created in this order so that a seed gives the same weights as it always did
        hint_encoder = DTCHintEncoder.from_unet(unet, **hint_options)
        hint_adapter = DTCHintAdapter(latent_channels=vae.config.latent_channels)
        tokens = (product_size // patch) ** 2 + 1
        projection = DTCImageProjection(image_encoder.config.hidden_size, unet.config.cross_attention_dim, tokens)
        resolution = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
        pipe = cls(
            vae=vae,
            unet=unet,
            hint_encoder=hint_encoder,
            hint_adapter=hint_adapter,
            image_encoder=image_encoder,
            image_projection=projection,
            scheduler=scheduler,
            input_layout=input_layout,
            resolution=resolution,
            product_size=product_size,
            trained=False,
            image_encoder_trained=image_encoder_trained,
        )
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.eval()
        return pipe

    # -- conditioning ------------------------------------------------------------------------

    def encode_product(self, product: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) floats in [0, 1] -> context tokens (B, T, cross_attention_dim)."""
        mean = torch.tensor(IMAGENET_MEAN, device=product.device, dtype=product.dtype)[:, None, None]
        std = torch.tensor(IMAGENET_STD, device=product.device, dtype=product.dtype)[:, None, None]
        tokens = self.image_encoder(pixel_values=(product - mean) / std).last_hidden_state
        return self.image_projection(tokens)

    def build_hint(
        self, hole: torch.Tensor, product: torch.Tensor, product_alpha: torch.Tensor | None
    ) -> torch.Tensor:
        """Product pixels ([-1, 1]) resized into the largest rectangle inside each hole, 0 elsewhere.

        The fallback hint, from the S x S encoder input, for callers without `hint_image` (the
        render job gives one, from the product at full resolution). The aspect ratio is not kept
        (paper). Only opaque product pixels go in when an alpha is given.
        """
        batch, _, height, width = hole.shape
        hint = torch.zeros(batch, 3, height, width, dtype=product.dtype, device=product.device)
        holes = hole[:, 0].bool().cpu().numpy()
        for i in range(batch):  # once per pair, before the denoising loop
            y0, x0, y1, x1 = largest_inscribed_rectangle(holes[i])
            box = (y1 - y0, x1 - x0)
            pixels = F.interpolate(product[i : i + 1] * 2 - 1, size=box, mode="bilinear", antialias=True)
            if product_alpha is not None:
                alpha = F.interpolate(product_alpha[i : i + 1], size=box, mode="bilinear", antialias=True)
                pixels = pixels * (alpha >= 0.5)
            hint[i, :, y0:y1, x0:x1] = pixels[0]
        return hint

    def unet_input(self, latents: torch.Tensor, image_latents: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
        """The UNet's 9 channels in the checkpoint's layout. `hole` is at latent size, 1 = hole."""
        if self.config.input_layout == "sd":
            return torch.cat([latents, hole, image_latents], dim=1)
        return torch.cat([latents, image_latents, 1 - hole], dim=1)

    def predict_noise(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        masked_image_latents: torch.Tensor,
        hole: torch.Tensor,
        hint_latents: torch.Tensor,
        context: torch.Tensor,
    ) -> torch.Tensor:
        """One DTC noise prediction: hint encoder -> FiLM parameters -> main UNet."""
        film = self.hint_encoder(self.unet_input(latents, hint_latents, hole), timestep, context)
        unet_input = self.unet_input(latents, masked_image_latents, hole)
        return self.unet(unet_input, timestep, context, skip_film=film).sample

    # -- call ----------------------------------------------------------------------------------

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
        r"""Render a batch.

        Args:
            image: context crops, uint8 (B, R, R, 3) or float (B, 3, R, R) in [0, 1]; R = `config.resolution`.
            mask_image: (B, R, R) or (B, 1, R, R), bool or {0, 1}; 1 = hole (region to repaint).
            product_image: product shots at `config.product_size`, same formats as `image`; a cut-out
                product should already be composited on neutral grey.
            product_alpha: optional (B, S, S) {0, 1}/bool opacity of the product; only opaque pixels
                go into the fallback hint's rectangle.
            hint_image: optional hint pixels at `config.resolution`, same formats as `image`: the
                product resized from its full resolution into the largest rectangle inside the hole
                (`compose.preprocess` builds it). Only read where `hint_mask` is set.
            hint_mask: (B, R, R) {0, 1}/bool, with `hint_image`: the opaque product pixels of that
                rectangle, inside the hole; the hint is 0 elsewhere. Without the pair, the hint is
                built from `product_image` (`build_hint`).
            generator: one CPU generator per pair (per-pair seeds make a pair's render independent of
                the batch it lands in), or one generator for the whole batch.
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
        alpha = None if product_alpha is None else as_mask_batch(product_alpha, "product_alpha", product_size, batch)
        empty = [i for i in range(batch) if not hole[i].any()]
        if empty:
            raise ValueError(f"mask_image: hole mask is empty for pair(s) {empty}: nothing to repaint")
        if (hint_image is None) != (hint_mask is None):
            raise ValueError("hint_image and hint_mask go together: give both or neither")
        if hint_image is not None:
            hint_image = as_image_batch(hint_image, "hint_image", size)
            hint_mask = as_mask_batch(hint_mask, "hint_mask", size, batch)
            if hint_image.shape[0] != batch:
                raise ValueError(f"hint_image has batch {hint_image.shape[0]}, image has {batch}")
            outside = [i for i in range(batch) if bool((hint_mask[i] > hole[i]).any())]
            if outside:
                raise ValueError(f"hint_mask reaches outside mask_image's hole for pair(s) {outside}")
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be pil|np|uint8|pt|latent, got {output_type!r}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        device, dtype = self._execution_device, self.unet.dtype
        do_cfg = guidance_scale > 1.0

        # 2. hint, [-1, 1]: the product in the largest rectangle inside each hole, 0 elsewhere;
        # given at working resolution (hint_image where hint_mask), or else built from the S x S input
        if hint_image is not None:
            hint = torch.where(hint_mask.bool(), hint_image * 2 - 1, 0.0)
        else:
            hint = self.build_hint(hole, product, alpha)

        # 3. image context: DINOv2 tokens -> cross-attention width; null embedding for CFG
        image, hole, product, hint = (t.to(device=device, dtype=dtype) for t in (image, hole, product, hint))
        context = self.encode_product(product)

        # 4. masked image latents, latent-size hole, hint latents (h0 = z_m + Adapter(hint))
        masked_image = (image * 2 - 1) * (1 - hole)
        scaling = self.vae.config.scaling_factor
        masked_image_latents = self.vae.encode(masked_image).latent_dist.sample(generator=generator) * scaling
        latent_size = size // self.vae_scale_factor
        hole_latent = F.interpolate(hole, size=(latent_size, latent_size))  # nearest, as SD inpainting
        hint_latents = masked_image_latents + self.hint_adapter(hint)

        # 5. CFG as one batch of 2B: [uncond | cond], the hint branch in both halves
        if do_cfg:
            context = torch.cat([self.image_projection.null_context(batch).to(dtype), context])
            masked_image_latents, hole_latent, hint_latents = (
                torch.cat([t, t]) for t in (masked_image_latents, hole_latent, hint_latents)
            )

        # 6. timesteps and initial noise
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = (
            randn_tensor(
                (batch, self.vae.config.latent_channels, latent_size, latent_size),
                generator=generator,
                device=device,
                dtype=dtype,
            )
            * self.scheduler.init_noise_sigma
        )

        # 7. denoising loop. The schedulers index their CPU tables with the timestep: they get
        # a CPU copy and the networks the device one, as a GPU scalar used as a CPU index would
        # make every step wait for the GPU (a host sync).
        timesteps = self.scheduler.timesteps
        cpu_timesteps = timesteps.cpu()
        for i in self.progress_bar(range(len(cpu_timesteps))):
            model_input = torch.cat([latents, latents]) if do_cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, cpu_timesteps[i])
            noise = self.predict_noise(
                model_input, timesteps[i], masked_image_latents, hole_latent, hint_latents, context
            )
            if do_cfg:
                noise_uncond, noise_cond = noise.chunk(2)
                noise = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
            latents = self.scheduler.step(noise, cpu_timesteps[i], latents).prev_sample

        if output_type == "latent":
            return PipelineOutput(images=latents) if return_dict else (latents,)

        # 8. decode, then keep the context's own pixels outside the hole
        decoded = (self.vae.decode(latents / scaling).sample / 2 + 0.5).clamp(0, 1)
        hole = hole[:batch]
        output = (image * (1 - hole) + decoded * hole).float()

        # 9. convert
        images = convert_output(output, output_type)
        return PipelineOutput(images=images) if return_dict else (images,)
