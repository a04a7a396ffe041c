"""Stage 0 of the `train-tiny` recipe: a small VAE fitted on the synthetic domain, then frozen.

    python -m jobs.fit_vae --manifest toy/manifest.parquet --out models/train-tiny-init

The `tiny` preset's VAE is random: a diffusion model trained through it learns latents no decoder
turns into the photo. So the toy first fits `presets.vae_config("train-tiny")` (factor 4, 16 x 16
latents at 64 px) on the training rows' own model inputs: the photo windows and the masked
windows exactly as `TrainableDTC.condition` encodes them (`2x - 1`, the hole at 0), prepared by
the render job's `prepare_pair` (`local_samples`, no Ray), with horizontal flips. Loss: pixel MSE
of the decoded posterior draw + `kl_weight` x KL (SD's VAE used a tiny KL too: the latents stay
informative). Then `scaling_factor` = 1 / std of the train latents, so the diffusion model sees
unit-variance latents as SD's 0.18215 gives SD's. The result is an *untrained* train-tiny DTC
(random UNet, hint branch, projection; the fitted VAE) for `jobs.train --init-model`, with
`vae_fit.json` beside it: the settings, the loss curve and the PSNR on the val rows.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.fetch import InputPolicy
from pipeline.manifest import plan_manifest
from pipeline.schema import DEFAULT_FILM_MODE
from pipeline.stages.prepare_stage import PrepareConfig
from pipeline.train.dataset import prepare_training_batch, read_training_files
from pipeline.train.samples import SampleSet

__all__ = ["VaeFitConfig", "local_samples", "fit_vae", "vae_psnr", "make_train_tiny", "FIT_FILE"]

FIT_FILE = "vae_fit.json"


@dataclass(frozen=True)
class VaeFitConfig:
    steps: int = 800  # Adam steps: ~2 CPU-minutes at batch 16, 64 px
    batch_size: int = 16  # images per step (photo and masked windows mixed)
    learning_rate: float = 1e-3  # from scratch: a toy VAE, not a fine-tune
    kl_weight: float = 1e-6  # small, as SD's VAE: reconstruction first
    seed: int = 0  # model init and the batch draws
    film_mode: str = DEFAULT_FILM_MODE  # the hint branch's fusion form (schema: the fusion table's choice)
    log_every: int = 50  # steps between loss-curve points


def local_samples(manifest: str, resolution: int, product_size: int) -> tuple[SampleSet, SampleSet]:
    """(train, val) samples of a local training manifest, in-process: the training job's own read
    and prepare functions (`dataset.read_training_files`, `prepare_training_batch`) without Ray."""
    plan = plan_manifest(manifest)
    config = PrepareConfig(InputPolicy(plan.base_dir), resolution=resolution, product_size=product_size)
    rows: dict[str, list] = {"train": [], "val": []}
    for i in range(len(plan.files)):
        for batch in read_training_files({"file_index": [i]}, plan=plan, conflicts_ref=[]):
            for row in prepare_training_batch(batch, config=config).to_pylist():
                if not row["error_code"]:
                    rows[row["split"]].append(row)
    train, val = (SampleSet.from_rows(rows[s], resolution, product_size) for s in ("train", "val"))
    return train, val


def _images(samples: SampleSet) -> torch.Tensor:
    """The windows as the DTC encodes them: photos and masked photos, 2N x 3 x R x R in [-1, 1]."""
    photo = torch.from_numpy(samples.context).permute(0, 3, 1, 2).float() / 127.5 - 1
    hole = torch.from_numpy(samples.hole)[:, None].float()
    return torch.cat([photo, photo * (1 - hole)])


def fit_vae(vae, samples: SampleSet, cfg: VaeFitConfig, say=print) -> list[dict]:
    """Fit `vae` in place on `samples`; returns the loss curve (one point per `log_every` steps)."""
    images = _images(samples)
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.Adam(vae.parameters(), lr=cfg.learning_rate)
    vae.train()
    curve, window, began = [], [], time.perf_counter()
    for step in range(cfg.steps):
        picks = torch.randint(0, len(images), (cfg.batch_size,), generator=generator)
        batch = images[picks]
        flip = torch.rand(cfg.batch_size, generator=generator) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        posterior = vae.encode(batch).latent_dist
        decoded = vae.decode(
            posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        ).sample
        mse = F.mse_loss(decoded, batch)
        loss = mse + cfg.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        window.append(float(mse.detach()))
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            curve.append({"step": step + 1, "mse": round(float(np.mean(window)), 6)})
            say(
                f"[fit_vae] step {step + 1}/{cfg.steps} mse {curve[-1]['mse']:.5f}"
                f" ({time.perf_counter() - began:.0f}s)"
            )
            window = []
    vae.eval()
    return curve


@torch.no_grad()
def vae_psnr(vae, samples: SampleSet) -> float:
    """PSNR (dB, [0, 255] scale) of decode(posterior mean) against the photo windows."""
    photo = torch.from_numpy(samples.context).permute(0, 3, 1, 2).float() / 127.5 - 1
    mse = []
    for chunk in photo.split(64):
        decoded = vae.decode(vae.encode(chunk).latent_dist.mean).sample.clamp(-1, 1)
        mse.append(((decoded - chunk) / 2).pow(2).mean(dim=(1, 2, 3)))
    return float(10 * torch.log10(1 / torch.cat(mse).mean()))


@torch.no_grad()
def _latent_std(vae, samples: SampleSet) -> float:
    return float(torch.cat([vae.encode(c).latent_dist.mean for c in _images(samples).split(64)]).std())


def make_train_tiny(manifest: str, out: str, cfg: VaeFitConfig = VaeFitConfig(), say=print) -> dict:
    """Stage 0: fit the VAE on `manifest`'s train rows, build an untrained train-tiny DTC around it
    (same `seed`: same UNet init), save it to `out` with `vae_fit.json`; returns that record."""
    from pipeline.model.loading import save_pipeline
    from pipeline.model.presets import build_preset

    pipe = build_preset("train-tiny", seed=cfg.seed, film_mode=cfg.film_mode)
    train, val = local_samples(manifest, pipe.config.resolution, pipe.config.product_size)
    say(f"[fit_vae] {len(train)} train and {len(val)} val windows at {pipe.config.resolution} px")
    began = time.perf_counter()
    torch.manual_seed(cfg.seed)
    curve = fit_vae(pipe.vae, train, cfg, say)
    std = _latent_std(pipe.vae, train)
    pipe.vae.register_to_config(scaling_factor=round(1 / std, 6))
    pipe.vae.requires_grad_(False)
    record = {
        "config": asdict(cfg),
        "manifest": os.path.abspath(manifest),
        "train_rows": len(train),
        "val_rows": len(val),
        "seconds": round(time.perf_counter() - began, 1),
        "scaling_factor": pipe.vae.config.scaling_factor,
        "psnr_train_db": round(vae_psnr(pipe.vae, train), 2),
        "psnr_val_db": round(vae_psnr(pipe.vae, val), 2) if len(val) else None,
        "curve": curve,
    }
    save_pipeline(pipe, out)
    with open(os.path.join(out, FIT_FILE), "w") as f:
        json.dump(record, f, indent=1)
    return record
