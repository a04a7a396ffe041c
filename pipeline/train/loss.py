"""The training forward and its losses: the inference conditioning and `predict_noise`, with gradient.

    model = TrainableDTC(pipe, vgg)              # trainable: unet, hint_encoder, hint_adapter, image_projection
    losses = model(batch, decode=True, weights=LossWeights(pixel=0.1, perceptual=1e-3))
    losses["loss"].backward()

The forward is the inference pipeline's, step for step (`DTCPipeline.__call__` steps 2-5 and
`predict_noise`; tests/unit/test_train_parity.py compares them):

    z0   = s * VAE.encode(2x - 1)       z_m = s * VAE.encode((2x - 1)(1 - hole))   (posterior mean + std * draw)
    c    = null if drop else Linear(DINOv2(norm(x_r)))                             (both terms always in the graph)
    m    = nearest(hole, L x L);        h0 = z_m + Adapter(hint)
    z_t  = DDPM add_noise(z0, eps, t);  eps_hat = pipe.predict_noise(z_t, t, z_m, m, h0, c)
    L    = MSE(eps_hat, eps) [+ pixel * MSE(D(x0_hat), 2x - 1) + perceptual * VGG(D(x0_hat), x)]
    x0_hat = (z_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)   (from the same pass)

The VAE and DINOv2 are frozen (encoded without gradient); the decode of x0_hat runs with
gradient through the frozen VAE decoder, and only on the steps the caller asks for. `drop`
selects with `torch.where`, so the projection and the null embedding are in every step's graph
and DDP needs no `find_unused_parameters`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn

from pipeline.model.pipeline_dtc import IMAGENET_MEAN, IMAGENET_STD, DTCPipeline
from pipeline.train.samples import TrainBatch
from pipeline.train.vgg import VGG19Features, perceptual_loss

__all__ = ["TRAINABLE", "LossWeights", "TrainableDTC"]

TRAINABLE = ("unet", "hint_encoder", "hint_adapter", "image_projection")


@dataclass(frozen=True)
class LossWeights:
    pixel: float = 0.1  # lambda_pix
    perceptual: float = 1e-3  # lambda_vgg

    @property
    def decodes(self) -> bool:
        return self.pixel > 0 or self.perceptual > 0


@dataclass
class Conditioning:
    """The inputs of one `predict_noise` call, as the inference pipeline builds them."""

    latents: torch.Tensor  # z0, the clean latents (training's own: inference starts from noise)
    masked_image_latents: torch.Tensor
    hole_latent: torch.Tensor
    hint_latents: torch.Tensor
    context: torch.Tensor


class TrainableDTC(nn.Module):
    """The four trainable components as one module (DDP wraps this), the frozen ones beside it."""

    def __init__(self, pipe: DTCPipeline, vgg: VGG19Features | None = None):
        super().__init__()
        for name in TRAINABLE:
            self.add_module(name, getattr(pipe, name))
        # Frozen parts stay outside the module tree: DDP neither broadcasts nor buckets them.
        self._frozen = {"pipe": pipe, "vgg": vgg}
        pipe.vae.requires_grad_(False).eval()
        pipe.image_encoder.requires_grad_(False).eval()
        if pipe.hint_encoder.config.film_mode == "off":
            # No hint branch: the adapter feeds nothing, so it would never get a gradient, and DDP
            # (more than one worker) fails a step in which a parameter it reduces got none.
            pipe.hint_adapter.requires_grad_(False)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # same betas: SD's 1000 steps
        self.register_buffer("alphas_cumprod", self.noise_scheduler.alphas_cumprod.clone(), persistent=False)
        self.last_decode_s = 0.0

    @property
    def pipe(self) -> DTCPipeline:
        return self._frozen["pipe"]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """In a fixed order (the optimizer state's); a frozen part (the adapter of a model with the
        hint branch off) is left out."""
        return [p for name in TRAINABLE for p in getattr(self, name).parameters() if p.requires_grad]

    def condition(self, batch: TrainBatch) -> Conditioning:
        """`DTCPipeline.__call__` steps 3-4 (one branch of step 5: CFG drop picks null per sample)."""
        pipe, scaling = self.pipe, self.pipe.vae.config.scaling_factor
        with torch.no_grad():
            image = batch.image * 2 - 1
            masked_image = image * (1 - batch.hole)
            latents = _posterior(pipe.vae.encode(image).latent_dist, batch.latent_noise) * scaling
            masked = _posterior(pipe.vae.encode(masked_image).latent_dist, batch.masked_latent_noise) * scaling
            mean = torch.tensor(IMAGENET_MEAN, device=image.device, dtype=image.dtype)[:, None, None]
            std = torch.tensor(IMAGENET_STD, device=image.device, dtype=image.dtype)[:, None, None]
            tokens = pipe.image_encoder(pixel_values=(batch.product - mean) / std).last_hidden_state
        projected = self.image_projection(tokens)
        null = self.image_projection.null_context(len(batch)).to(projected.dtype)
        context = torch.where(batch.drop[:, None, None], null, projected)
        latent_size = image.shape[-1] // pipe.vae_scale_factor
        hole_latent = F.interpolate(batch.hole, size=(latent_size, latent_size))  # nearest, as SD inpainting
        hint_latents = masked + self.hint_adapter(batch.hint)
        return Conditioning(latents, masked, hole_latent, hint_latents, context)

    def forward(self, batch: TrainBatch, decode: bool = False, weights: LossWeights = LossWeights()) -> dict:
        """The losses of one batch (each a scalar tensor; `loss` is their weighted sum)."""
        cond = self.condition(batch)
        noisy = self.noise_scheduler.add_noise(cond.latents, batch.noise, batch.timesteps)
        eps_hat = self.pipe.predict_noise(
            noisy, batch.timesteps, cond.masked_image_latents, cond.hole_latent, cond.hint_latents, cond.context
        )
        losses = {"mse": F.mse_loss(eps_hat.float(), batch.noise.float())}
        if decode and weights.decodes:
            start = _synced_clock(noisy.device)
            losses.update(self.decoded_losses(noisy, eps_hat, batch, weights))
            self.last_decode_s = _synced_clock(noisy.device) - start  # the decode's forward, for the step timings
        loss = losses["mse"]
        for name, weight in (("pixel", weights.pixel), ("perceptual", weights.perceptual)):
            if name in losses:
                loss = loss + weight * losses[name]
        losses["loss"] = loss
        return losses

    def decoded_losses(self, noisy, eps_hat, batch: TrainBatch, weights: LossWeights) -> dict:
        """The x0 terms: x0_hat from this pass's noise prediction, decoded with gradient."""
        abar = self.alphas_cumprod.to(noisy.device)[batch.timesteps].view(-1, 1, 1, 1)
        x0_hat = (noisy - (1 - abar).sqrt() * eps_hat) / abar.sqrt()
        decoded = self.pipe.vae.decode(x0_hat / self.pipe.vae.config.scaling_factor).sample.float()
        out = {"pixel": F.mse_loss(decoded, batch.image * 2 - 1)}
        vgg = self._frozen["vgg"]
        if weights.perceptual > 0:
            if vgg is None:
                raise ValueError("perceptual weight > 0 needs the VGG19 (load_vgg19)")
            out["perceptual"] = perceptual_loss(vgg, (decoded + 1) / 2, batch.image)
        return out


def _synced_clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _posterior(distribution, draw: torch.Tensor) -> torch.Tensor:
    """`DiagonalGaussianDistribution.sample()` with the draw given: mean + std * draw."""
    return distribution.mean + distribution.std * draw.to(distribution.mean.dtype)
