"""One optimiser step, the validation loss, and a worker's state on disk. No Ray: unit-testable.

    learner = Learner(TrainableDTC(pipe, vgg), cfg, device="cpu")
    stats = learner.train_step(step, samples)          # zero_grad, forward, backward, clip, AdamW
    val = learner.validation_loss(val_samples)         # the fixed (t, noise) grid
    learner.save(folder, state) / learner.load(folder)  # trainable weights, optimizer state, step
    learner.close()                                     # the prefetch threads

`samples` is a sample source (`reader.StoreReader` in the job, `samples.SampleSet` in memory).
A step's batch is a pure function of (seed, step, the source): the next `cfg.prefetch_steps`
steps' batches are read and built in background threads (`reader.Prefetcher`) while this one
trains, and `StepStats.data_s` is the time the step still waited for its batch.

Gradients are zeroed at the start of a step, not the end, so a caller can inspect the step's
gradients after it (tests/unit/test_train_gradients.py does). Under DDP `forward_model` is the
wrapped module (gradients are averaged across workers in backward) and clipping sees the
averaged gradients, the same on every worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.train.config import TrainConfig
from pipeline.train.loss import TRAINABLE, LossWeights, TrainableDTC
from pipeline.train.reader import Prefetcher
from pipeline.train.samples import Augment, TrainBatch, build_batch, build_validation_batch, positions, sample_at

__all__ = ["StepStats", "Learner", "WEIGHTS_FILE", "OPTIMIZER_FILE", "STATE_FILE", "load_trainable"]

WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE = "trainable.safetensors", "optimizer.pt", "state.json"


@dataclass
class StepStats:
    loss: float
    mse: float
    pixel: float | None
    perceptual: float | None
    grad_norm: float
    data_s: float  # the step's wait for its batch (read, augment, collate) that prefetch did not hide
    compute_s: float  # forward + backward + optimizer, the decode included
    decode_s: float  # the decode's forward alone (VAE decode + VGG), 0 when it did not run
    load_s: float = 0.0  # building the batch (read, augment, collate), in a prefetch thread or not


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # honest timings; steps are long enough that it costs little


class Learner:
    def __init__(
        self,
        model: TrainableDTC,
        cfg: TrainConfig,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world: int = 1,
        forward_model: nn.Module | None = None,
    ):
        self.model, self.cfg, self.device = model, cfg, torch.device(device)
        self.forward_model = forward_model or model
        self.rank, self.world = rank, world
        self.params = model.trainable_parameters()
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
        )
        self.weights = LossWeights(pixel=cfg.pixel_weight, perceptual=cfg.perceptual_weight)
        self.augment = Augment(cfg.bbox_mask_prob, cfg.flip_prob, cfg.rotate_degrees, cfg.cfg_drop)
        pipe = model.pipe
        size = pipe.config.resolution // pipe.vae_scale_factor
        self.latent_shape = (pipe.vae.config.latent_channels, size, size)
        self.feed: Prefetcher | None = None
        self.feed_source = None

    def autocast(self):
        if self.device.type == "cuda" and self.cfg.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def decodes_at(self, step: int) -> bool:
        return self.weights.decodes and step % self.cfg.perceptual_every == 0

    def batch(self, step: int, samples) -> TrainBatch:
        """This worker's share of step `step`'s global batch (on the CPU): a pure function of the step."""
        picks = [
            sample_at(p, self.cfg.seed, len(samples))
            for p in positions(step, self.cfg.batch_size, self.rank, self.world)
        ]
        return build_batch(samples, picks, self.cfg.seed, self.augment, self.latent_shape)

    def train_step(self, step: int, samples, end: int | None = None) -> StepStats:
        """Step `step` (0-based): this worker's share of the global batch, then one AdamW update.
        The next steps' batches (before `end`) are built meanwhile."""
        start = time.perf_counter()
        if self.feed_source is not samples:
            self.close()
            self.feed_source = samples
            self.feed = Prefetcher(lambda k: self.batch(k, samples), self.cfg.prefetch_steps, end)
        batch, load_s = self.feed.get(step)
        batch = batch.to(self.device)
        data_done = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        decode = self.decodes_at(step)
        with self.autocast():
            losses = self.forward_model(batch, decode=decode, weights=self.weights)
        if not torch.isfinite(losses["loss"]):
            raise FloatingPointError(
                f"the loss is {float(losses['loss'].detach())} at step {step}: nothing is updated"
            )
        losses["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        if not torch.isfinite(grad_norm):  # on one worker means on all: the gradients are all-reduced
            raise FloatingPointError(f"the gradient norm is {float(grad_norm)} at step {step}: nothing is updated")
        self.optimizer.step()
        _sync(self.device)
        done = time.perf_counter()

        def value(name: str) -> float | None:
            return float(losses[name].detach()) if name in losses else None

        return StepStats(
            loss=value("loss"),
            mse=value("mse"),
            pixel=value("pixel"),
            perceptual=value("perceptual"),
            grad_norm=float(grad_norm),
            data_s=data_done - start,
            compute_s=done - data_done,
            decode_s=self.model.last_decode_s if decode else 0.0,
            load_s=load_s,
        )

    def close(self) -> None:
        """Stops the prefetch threads (a batch being built is finished first)."""
        if self.feed is not None:
            self.feed.close()
        self.feed, self.feed_source = None, None

    @torch.no_grad()
    def validation_loss(self, samples) -> float | None:
        """Mean eps-MSE over every (validation pair, grid timestep); this worker's share, all-reduced."""
        grid = self.cfg.validation_timesteps
        items = [(i, k) for i in range(len(samples)) for k in range(len(grid))][self.rank :: self.world]
        if not len(samples):
            return None
        self.model.eval()
        per_call = max(1, self.cfg.batch_size // self.world)
        total = torch.zeros(2, dtype=torch.float64)
        for start in range(0, len(items), per_call):
            chunk = items[start : start + per_call]
            batch = build_validation_batch(samples, chunk, self.cfg.seed, grid, self.latent_shape).to(self.device)
            with self.autocast():
                mse = self.model(batch)["mse"]
            total += torch.tensor([float(mse) * len(chunk), len(chunk)], dtype=torch.float64)
        if self.world > 1:
            total = _all_reduce(total, self.device)
        return float(total[0] / total[1])

    # -- state on disk --------------------------------------------------------------------------

    def save(self, folder: str, state: dict) -> None:
        """Trainable weights (safetensors), optimizer state and `state` (JSON) into a local folder."""
        os.makedirs(folder, exist_ok=True)
        weights = {
            f"{name}.{k}": v.detach().contiguous().cpu()
            for name in TRAINABLE
            for k, v in getattr(self.model, name).state_dict().items()
        }
        save_file(weights, os.path.join(folder, WEIGHTS_FILE))
        torch.save(self.optimizer.state_dict(), os.path.join(folder, OPTIMIZER_FILE))
        with open(os.path.join(folder, STATE_FILE), "w") as f:
            json.dump(state, f, indent=1)

    def load(self, folder: str) -> dict:
        """The inverse of `save`: weights and optimizer state in place; returns the saved state."""
        load_trainable(self.model, folder)
        optimizer_state = torch.load(os.path.join(folder, OPTIMIZER_FILE), map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(optimizer_state)
        with open(os.path.join(folder, STATE_FILE)) as f:
            return json.load(f)


def load_trainable(modules, folder: str) -> None:
    """Trainable weights from `folder`'s WEIGHTS_FILE into `modules` (a TrainableDTC or a pipeline)."""
    weights = load_file(os.path.join(folder, WEIGHTS_FILE))
    for name in TRAINABLE:
        prefix = f"{name}."
        part = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        getattr(modules, name).load_state_dict(part, strict=True)


def _all_reduce(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    import torch.distributed as dist

    moved = tensor.to(device)
    dist.all_reduce(moved)
    return moved.cpu()
