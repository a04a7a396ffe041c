"""Typed settings of a training run. Driver-side: no torch.

`TrainConfig` declares every training option once (`pipeline.options.option`), as
`RenderConfig` does: `jobs.train` generates its flags from it and reads `--config FILE` (YAML,
the flags' names as keys, `-` or `_`; flags win). A bad type, range or choice is refused at
construction, a bad combination by `check()`, both as one `pipeline.config.ConfigError` line
naming the bad value; the job turns it into exit code 2 before any work. The options declared
`recipe=True` (`RECIPE_FIELDS`) decide the weights a run computes: their digest is recorded,
and a re-run that changes one is refused instead of resumed.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pipeline.config import RenderConfig
from pipeline.options import ConfigError, Options, bounds, default, digest_values, marked, option
from pipeline.schema import name_problem

__all__ = ["TrainConfig", "RECIPE_FIELDS", "EXPORTS", "SPLITS", "PUBLISHED_VGG19_SHA256_PREFIX"]

EXPORTS = ("best", "final")
# torchvision names weight files `<arch>-<first 8 hex of the file's sha256>.pth`: vgg19-dcbb9e9d.pth.
PUBLISHED_VGG19_SHA256_PREFIX = "dcbb9e9d"
SPLITS = ("train", "val")


class TrainConfig(Options):
    # -- where --------------------------------------------------------------------------------
    manifest: str = option(
        "", "training manifest (render columns + split train|val): file, folder or glob; local or s3://"
    )
    init_model: str = option("", "DTC folder to start from (jobs.make_model --from-parts), local or s3://")
    output: str = option("", "output folder or s3://bucket/prefix: checkpoints/, best/, model/, runs/, metrics/")
    run_id: str = option(
        "train", "names the Ray Train run, runs/<run_id>.json and metrics/<run_id>/: the same id resumes"
    )
    # -- length: `steps`/`epochs` may grow on resume (the learning rate is constant, so a longer
    # run passes through the shorter run's weights) ---------------------------------------------
    steps: int = option(1000, "optimiser steps; ignored when --epochs is set", ge=1)
    epochs: float | None = option(
        None, "train for this many passes over the train rows instead (steps = ceil(epochs * N / batch))", gt=0
    )
    # -- recipe (DTC_MODEL.md "Training"; recipe=True: a resumed run must keep them) ----------
    seed: int = option(0, "data order and every per-sample draw derive from it (and pair_id, epoch)", recipe=True)
    batch_size: int = option(8, "global batch per step, split evenly over the workers", ge=1, recipe=True)
    learning_rate: float = option(1e-5, "AdamW learning rate, constant (paper)", gt=0, recipe=True)
    # the paper does not say; torch's default
    weight_decay: float = option(0.01, "AdamW's decoupled weight decay", ge=0, recipe=True)
    adam_beta1: float = option(0.9, "AdamW beta1 (torch's default)", ge=0, lt=1, recipe=True)
    adam_beta2: float = option(0.999, "AdamW beta2 (torch's default)", ge=0, lt=1, recipe=True)
    adam_eps: float = option(1e-8, "AdamW eps (torch's default)", gt=0, recipe=True)
    # the x0 terms at large t have large gradients
    grad_clip: float = option(1.0, "max global gradient norm", gt=0, recipe=True)
    cfg_drop: float = option(
        0.2, "P(context -> the learnable null embedding), for classifier-free guidance", ge=0, le=1, recipe=True
    )
    bbox_mask_prob: float = option(
        0.5, "P(hole = the mask's bounding box instead of the fine mask) (Supp. 5.1)", ge=0, le=1, recipe=True
    )
    flip_prob: float = option(
        0.5, "P(joint horizontal flip of photo, hole, hint and product)", ge=0, le=1, recipe=True
    )
    rotate_degrees: float = option(
        15.0, "the image encoder's product view is rotated by U(-d, d) degrees", ge=0, le=180, recipe=True
    )
    perceptual_weight: float = option(
        1e-3,
        "lambda_vgg (DCI-VTON), the VGG term's weight; 0 trains without the VGG (no weights needed)",
        ge=0,
        recipe=True,
    )
    pixel_weight: float = option(0.1, "lambda_pix: MSE of the decoded x0 against the photo", ge=0, recipe=True)
    perceptual_every: int = option(
        1,
        "run the x0 decode (pixel + VGG terms) every this many steps: it costs more than a UNet step",
        ge=1,
        recipe=True,
    )
    vgg_weights: str | None = option(
        None, "torchvision's vgg19-dcbb9e9d.pth, path or s3://; needed when --perceptual-weight > 0", recipe=True
    )
    validation_timesteps: list[int] = option(
        [100, 300, 500, 700, 900], "the fixed validation grid of timesteps, each in 0..999", recipe=True
    )
    crop_margin: float = option(
        default(RenderConfig, "crop_margin"),
        "the render job's square window around the region",
        recipe=True,
        **bounds(RenderConfig, "crop_margin"),
    )
    bf16: bool = option(True, "bf16 autocast on GPU (fp32 master weights); CPU always runs fp32", recipe=True)
    # -- checkpoints, logs, export ------------------------------------------------------------------
    checkpoint_every: int = option(500, "steps between checkpoints (each with its validation loss)", ge=1)
    keep_checkpoints: int = option(
        2, "Ray Train keeps the last this many; the best by validation loss is kept apart", ge=1
    )
    log_every: int = option(10, "steps between progress lines and metrics/<run_id>/train.jsonl lines", ge=1)
    # the training page's grid (metrics/<run_id>/training.html): a person sees the model learn
    val_renders: int = option(
        4, "val pairs rendered at step 0 and each checkpoint for the training page's grid; 0 = none", ge=0
    )
    val_render_steps: int = option(8, "denoising steps of those renders (the render job's path, fewer steps)", ge=1)
    export: Literal[EXPORTS] = option(
        "best", "which weights become model/: best (lowest validation loss) or final (no val rows)"
    )
    # -- resources: may change on resume (2 workers x b compute what 1 worker x 2b does) ------------
    workers: int = option(1, "Ray Train workers (one GPU each on GPU clusters); DDP, gloo on CPU, nccl on GPU", ge=1)
    gpus_per_worker: float | None = option(
        None, "GPUs per worker (default: 1 when the cluster has GPUs, else 0)", ge=0
    )
    cpus_per_worker: float = option(
        1.0, "CPUs reserved per worker; a fraction keeps Ray Data's prepare tasks running on small machines", gt=0
    )
    torch_threads: int | None = option(None, "torch threads per worker (Ray gives a fractional-CPU worker 1)", ge=1)
    data_cpus: float = option(0.5, "CPUs per Ray Data read/prepare task", gt=0)
    prefetch_steps: int = option(
        2,
        "steps whose batches are read from the store and built in background threads ahead of the training one "
        "(0: in the step); changes when a batch is built, never what it holds",
        ge=0,
    )
    # -- the prepared-sample store (pipeline.train.store) ------------------------------------------
    prepare_only: bool = option(
        False, "prepare the store under <output>/prepared/ (or find it complete), print it and exit: no training"
    )
    store_part_rows: int = option(
        64, "manifest rows per store part: the unit a preparation task writes and a re-run skips", ge=1
    )
    # a sample is 0.36 MB (R=128) to 3.6 MB (R=512): a row group per sample costs ~1 KB of footer
    # and lets a random read fetch exactly the sample it needs
    store_row_group_rows: int = option(
        1, "rows per Parquet row group of a store part (the unit a reader fetches)", ge=1
    )
    gradient_checkpointing: bool = option(
        True, "recompute UNet, hint encoder and VAE-decoder activations in backward (less memory, slower)"
    )
    max_failures: int = option(2, "worker-group restarts from the latest checkpoint before the run fails", ge=0)
    # -- inputs allowed (as jobs.render) ----------------------------------------------------------
    allow_root: list[str] = option([], "extra local folder (or s3:// prefix) inputs may come from")
    allow_http: bool = option(False, "fetch http(s):// inputs")
    max_pixels: int = option(
        default(RenderConfig, "max_pixels"),
        "images above this many pixels are skipped too_large before being decoded",
        **bounds(RenderConfig, "max_pixels"),
    )
    # -- cluster and bookkeeping ---------------------------------------------------------------------
    address: str | None = option(None, "Ray cluster to join (default RAY_ADDRESS, else a local Ray of its own)")
    lock_stale_s: float = option(
        default(RenderConfig, "lock_stale_s"),
        "an output lock whose heartbeat is older than this many seconds is taken over",
        **bounds(RenderConfig, "lock_stale_s"),
    )
    fault_injection: dict | None = option(None, "chaos tests only (YAML): see pipeline.train.faults", flag=False)

    def check(self) -> TrainConfig:
        """The checks across fields and of values beyond a range (each field's type, range and
        choices were checked at construction)."""
        for name in ("manifest", "init_model", "output"):
            if not getattr(self, name):
                raise ConfigError(f"--{name.replace('_', '-')} is required")
        if problem := name_problem("--run-id", self.run_id):
            raise ConfigError(problem)
        if self.batch_size % self.workers:
            raise ConfigError(
                f"--batch-size {self.batch_size} must be a multiple of --workers {self.workers} "
                "(equal per-worker batches)"
            )
        if not self.validation_timesteps or not all(0 <= t <= 999 for t in self.validation_timesteps):
            raise ConfigError(f"validation_timesteps must be 1+ timesteps in 0..999, got {self.validation_timesteps}")
        if self.perceptual_weight > 0 and not self.vgg_weights and not self.prepare_only:
            raise ConfigError(
                f"--perceptual-weight {self.perceptual_weight} needs VGG19 weights: pass --vgg-weights PATH|s3://... "
                "(torchvision's vgg19-dcbb9e9d.pth), or --perceptual-weight 0 to train without the perceptual term"
            )
        if self.output.startswith(("http://", "https://")):
            raise ConfigError(f"--output must be a local folder or s3://bucket/prefix, got {self.output!r}")
        return self

    def recipe(self) -> dict:
        """The RECIPE_FIELDS with their values (the run record's `recipe`)."""
        return digest_values(self, "recipe")

    def recipe_digest(self, init_model_digest: str) -> str:
        blob = json.dumps({"init_model": init_model_digest, **self.recipe()}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_record(self) -> dict:
        """JSON-safe copy for runs/<run_id>.json (holds no credentials: none are settings)."""
        return self.model_dump(mode="json")


# The fields whose values change the weights a run computes (with the init model's digest).
RECIPE_FIELDS = marked(TrainConfig, "recipe")
