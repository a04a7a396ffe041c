"""Typed settings of a training run. Driver-side: no torch.

`TrainConfig` is what `jobs.train` builds from flags and `--config FILE` (YAML, the flags' names
as keys, `-` or `_`; flags win), as `jobs.render` does for `RenderConfig`. `validate()` raises
`pipeline.config.ConfigError` with one message naming the bad value; the job turns it into exit
code 2 before any work. The recipe fields (`RECIPE_FIELDS`) decide the weights a run computes:
their digest is recorded, and a re-run that changes one is refused instead of resumed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field

from pipeline.config import ConfigError, has_type
from pipeline.schema import name_problem

__all__ = ["TrainConfig", "RECIPE_FIELDS", "EXPORTS", "SPLITS", "PUBLISHED_VGG19_SHA256_PREFIX"]

EXPORTS = ("best", "final")
# torchvision names weight files `<arch>-<first 8 hex of the file's sha256>.pth`: vgg19-dcbb9e9d.pth.
PUBLISHED_VGG19_SHA256_PREFIX = "dcbb9e9d"
SPLITS = ("train", "val")
# The fields whose values change the weights a run computes (with the init model's digest). A
# resumed run must keep them; `steps`/`epochs` may grow (the learning rate is constant, so a
# longer run passes through the shorter run's weights) and the resources may change
# (`workers`: 2 workers x b compute what 1 worker x 2b does).
RECIPE_FIELDS = (
    "seed",
    "batch_size",
    "learning_rate",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_eps",
    "grad_clip",
    "cfg_drop",
    "bbox_mask_prob",
    "flip_prob",
    "rotate_degrees",
    "perceptual_weight",
    "pixel_weight",
    "perceptual_every",
    "vgg_weights",
    "validation_timesteps",
    "crop_margin",
    "bf16",
)


@dataclass
class TrainConfig:
    # -- where --------------------------------------------------------------------------------
    manifest: str = ""  # training manifest (render columns + `split`): file, folder or glob; local or s3://
    init_model: str = ""  # DTC folder to start from (`jobs.make_model --from-parts`), local or s3://
    output: str = ""  # local folder or s3://bucket/prefix: checkpoints/, best/, model/, runs/, metrics/
    run_id: str = "train"  # names the Ray Train run, runs/<run_id>.json and metrics/<run_id>/: the same id resumes
    # -- length --------------------------------------------------------------------------------
    steps: int = 1000  # optimiser steps; ignored when `epochs` is set
    epochs: float | None = None  # train for this many passes over the train rows (steps = ceil(epochs * N / batch))
    # -- recipe (DTC_MODEL.md "Training"; RECIPE_FIELDS: a resumed run must keep them) ----------
    seed: int = 0  # data order and every per-sample draw derive from it (and pair_id, epoch)
    batch_size: int = 8  # global batch per step, split evenly over the workers
    learning_rate: float = 1e-5  # AdamW, constant (paper)
    weight_decay: float = 0.01  # AdamW's decoupled weight decay (the paper does not say; torch's default)
    adam_beta1: float = 0.9  # AdamW betas and eps: torch's defaults
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm (the x0 terms at large t have large gradients)
    cfg_drop: float = 0.2  # P(context -> the learnable null embedding), for classifier-free guidance
    bbox_mask_prob: float = 0.5  # P(hole = the mask's bounding box instead of the fine mask) (Supp. 5.1)
    flip_prob: float = 0.5  # P(joint horizontal flip of photo, hole, hint and product)
    rotate_degrees: float = 15.0  # the image encoder's product view is rotated by U(-d, d) degrees
    perceptual_weight: float = 1e-3  # lambda_vgg (DCI-VTON); 0 trains without the VGG (no weights needed)
    pixel_weight: float = 0.1  # lambda_pix: MSE of the decoded x0 against the photo
    perceptual_every: int = 1  # run the x0 decode (pixel + VGG terms) every this many steps: it costs > a UNet step
    vgg_weights: str | None = (
        None  # torchvision's vgg19-dcbb9e9d.pth, path or s3://; needed when perceptual_weight > 0
    )
    validation_timesteps: list[int] = field(default_factory=lambda: [100, 300, 500, 700, 900])  # the fixed val grid
    crop_margin: float = 0.25  # the render job's square window around the region
    bf16: bool = True  # bf16 autocast on GPU (fp32 master weights); CPU always runs fp32
    # -- checkpoints, logs, export ------------------------------------------------------------------
    checkpoint_every: int = 500  # steps between checkpoints (each with its validation loss)
    keep_checkpoints: int = 2  # Ray Train keeps the last this many; the best by validation loss is kept apart
    log_every: int = 10  # steps between progress lines and metrics/<run_id>/train.jsonl lines
    export: str = "best"  # which weights become model/: best (lowest validation loss) or final
    # -- resources ---------------------------------------------------------------------------------
    workers: int = 1  # Ray Train workers (one GPU each on GPU clusters); DDP, gloo on CPU, nccl on GPU
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_worker: float = 1.0  # a fraction keeps Ray Data's prepare tasks running on small machines
    torch_threads: int | None = None  # torch threads per worker (Ray gives a fractional-CPU worker 1)
    data_cpus: float = 0.5  # per Ray Data read/prepare task
    gradient_checkpointing: bool = True  # recompute UNet, hint encoder and VAE-decoder activations in backward
    max_failures: int = 2  # worker-group restarts from the latest checkpoint before the run fails
    # -- inputs allowed (as jobs.render) ----------------------------------------------------------
    allow_root: list[str] = field(default_factory=list)  # extra local folders inputs may come from; s3:// narrows
    allow_http: bool = False  # fetch http(s):// inputs
    max_pixels: int = 50_000_000  # images above this are skipped with too_large before being decoded
    # -- cluster and bookkeeping ---------------------------------------------------------------------
    address: str | None = None  # Ray address; default RAY_ADDRESS or a local Ray of its own
    lock_stale_s: float = 300.0  # a _lock whose heartbeat is older than this is taken over
    fault_injection: dict | None = None  # chaos tests only (YAML): see pipeline.train.faults

    def validate(self) -> TrainConfig:
        self._check_types()
        for name in ("manifest", "init_model", "output"):
            if not getattr(self, name):
                raise ConfigError(f"--{name.replace('_', '-')} is required")
        if problem := name_problem("--run-id", self.run_id):
            raise ConfigError(problem)
        self._check_ranges()
        if self.perceptual_weight > 0 and not self.vgg_weights:
            raise ConfigError(
                f"--perceptual-weight {self.perceptual_weight} needs VGG19 weights: pass --vgg-weights PATH|s3://... "
                "(torchvision's vgg19-dcbb9e9d.pth), or --perceptual-weight 0 to train without the perceptual term"
            )
        if self.output.startswith(("http://", "https://")):
            raise ConfigError(f"--output must be a local folder or s3://bucket/prefix, got {self.output!r}")
        return self

    def _check_ranges(self) -> None:
        checks = [
            (self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (self.epochs is None or self.epochs > 0, f"--epochs must be > 0, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.workers >= 1, f"--workers must be >= 1, got {self.workers}"),
            (
                self.batch_size % self.workers == 0,
                f"--batch-size {self.batch_size} must be a multiple of --workers {self.workers} "
                "(equal per-worker batches)",
            ),
            (self.learning_rate > 0, f"--learning-rate must be > 0, got {self.learning_rate}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "adam_beta1 and adam_beta2 must be in [0, 1)"),
            (self.adam_eps > 0, f"adam_eps must be > 0, got {self.adam_eps}"),
            (self.grad_clip > 0, f"--grad-clip must be > 0, got {self.grad_clip}"),
            (
                self.perceptual_weight >= 0 and self.pixel_weight >= 0,
                "--perceptual-weight and --pixel-weight must be >= 0",
            ),
            (self.perceptual_every >= 1, f"--perceptual-every must be >= 1, got {self.perceptual_every}"),
            (0 <= self.rotate_degrees <= 180, f"--rotate-degrees must be in 0..180, got {self.rotate_degrees}"),
            (
                all(0 <= t <= 999 for t in self.validation_timesteps) and len(self.validation_timesteps) >= 1,
                f"validation_timesteps must be 1+ timesteps in 0..999, got {self.validation_timesteps}",
            ),
            (0 <= self.crop_margin <= 4, f"crop_margin must be in 0..4, got {self.crop_margin}"),
            (self.checkpoint_every >= 1, f"--checkpoint-every must be >= 1, got {self.checkpoint_every}"),
            (self.keep_checkpoints >= 1, f"--keep-checkpoints must be >= 1, got {self.keep_checkpoints}"),
            (self.log_every >= 1, f"--log-every must be >= 1, got {self.log_every}"),
            (self.export in EXPORTS, f"--export must be one of {EXPORTS}, got {self.export!r}"),
            (self.gpus_per_worker is None or self.gpus_per_worker >= 0, "--gpus-per-worker must be >= 0"),
            (self.cpus_per_worker > 0 and self.data_cpus > 0, "--cpus-per-worker and data_cpus must be > 0"),
            (self.torch_threads is None or self.torch_threads >= 1, "--torch-threads must be >= 1"),
            (self.max_failures >= 0, f"--max-failures must be >= 0, got {self.max_failures}"),
            (self.max_pixels >= 1, f"max_pixels must be >= 1, got {self.max_pixels}"),
        ]
        checks += [
            (0 <= getattr(self, p) <= 1, f"{p} must be in 0..1, got {getattr(self, p)}")
            for p in ("cfg_drop", "bbox_mask_prob", "flip_prob")
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def recipe(self) -> dict:
        """The RECIPE_FIELDS with their values (the run record's `recipe`)."""
        return {name: getattr(self, name) for name in RECIPE_FIELDS}

    def recipe_digest(self, init_model_digest: str) -> str:
        blob = json.dumps({"init_model": init_model_digest, **self.recipe()}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_record(self) -> dict:
        """JSON-safe copy for runs/<run_id>.json (holds no credentials: none are settings)."""
        return dataclasses.asdict(self)

    @classmethod
    def keys(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def _check_types(self) -> None:
        """Every field against its annotation (as RenderConfig does): a YAML `steps: ten` is one line."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, hint = getattr(self, f.name), hints[f.name]
            floats = hint is float or float in typing.get_args(hint)
            if floats and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)  # `learning_rate: 1` and `1.0` must digest alike
                setattr(self, f.name, value)
            if not has_type(value, hint):
                expected = str(hint).replace("typing.", "") if typing.get_args(hint) else hint.__name__
                raise ConfigError(f"{f.name} must be {expected}, got {type(value).__name__} {value!r}")
