"""Typed settings of a render run, and the run's spec. Driver-side: no torch.

`RenderConfig` is what `jobs.render` builds from flags and `--config FILE` (YAML, same keys as
the flags with `_` for `-`; flags win). `validate()` raises `ConfigError` with one message
naming the bad value (a wrong type included): the job turns it into exit code 2 before any
work starts. The settings are one flat dataclass, grouped by comments, because its field names
are the YAML keys and the flags, one to one.

`RunSpec` is what the driver learns once, before any work, from the config, the manifest and
the model (`pipeline.run` builds it): frozen, small and picklable, it is all the stages know
about the run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from datetime import date
from typing import TYPE_CHECKING

from pipeline.schema import IMAGE_FORMATS, SCHEDULERS, SELECTIONS, name_problem

if TYPE_CHECKING:
    from pipeline.manifest import ManifestPlan

__all__ = ["ConfigError", "RenderConfig", "RunSpec", "has_type"]


class ConfigError(ValueError):
    """A bad setting: the message names it and the value received."""


@dataclass
class RenderConfig:
    # -- where --------------------------------------------------------------------------------
    manifest: str = ""  # Parquet/CSV/JSONL file, folder (hive partitions welcome) or glob; local or s3://
    partition_range: tuple[str, str] | None = None  # backfill: only partition_key= folders in [start, end]
    partition_key: str = "dt"  # the hive partition key of partition_range (values YYYY-MM-DD)
    output: str = ""  # local folder or s3://bucket/prefix; everything the run writes stays under it
    model: str = ""  # DTC checkpoint folder or s3:// prefix (jobs.make_model writes one)
    # -- what: the settings digest covers these, so changing one re-renders every pair ------------
    steps: int = 40  # DDIM steps (paper: 40)
    guidance_scale: float = 5.0  # classifier-free guidance (paper: 5); <= 1 disables CFG
    scheduler: str = "ddim"  # "ddim" (paper) or "dpmpp" (DPM-Solver++, good at ~20 steps)
    image_format: str = "jpeg"  # jpeg | png | webp. PNG is lossless but slow to encode
    jpeg_quality: int = 92  # also WebP quality
    crop_margin: float = 0.25  # the square window = region bbox grown by this fraction per side
    feather_px: int = 4  # paste-back ramp, inside the region only: outside pixels stay exact
    variants: int = 1  # renders per pair, each with its own seed, in the same model batches; the best is kept
    select: str = "identity"  # how the best variant is chosen: identity (the model's image encoder) | clip
    # -- scenes and review (no effect on pixels) ---------------------------------------------------
    keep_variants: bool = False  # also write the variants not chosen, to variants/<pair_id>/<k>.<ext>
    min_identity_score: float | None = None  # rendered rows scoring below it get needs_review = true
    max_scene_steps: int = 8  # a scene with more steps fails every row scene_invalid
    # -- how: resources and batching (no effect on pixels for a fixed batch composition) ----------
    batch_size: int = 8  # pairs per model call (one UNet call of 2B with CFG)
    actors: tuple[int, int] = (1, 1)  # GPU-stage actor pool (min, max); autoscales in between
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0 (CPU render)
    cpus_per_actor: float = 1.0  # a fraction keeps small machines from starving the read stages
    actor_resources: dict | None = None  # custom Ray resources per actor (YAML), e.g. {gpu_node: 1}: pins the pool
    torch_threads: int | None = None  # torch threads inside a CPU actor (Ray sets 1 for fractional CPUs)
    cpu_stage_cpus: float = 0.5  # per fetch/decode/postprocess task; fractional so stages overlap
    compile: bool = (
        False  # torch.compile the UNet and hint encoder in each actor (GPU: minutes of warm-up, then faster steps)
    )
    channels_last: bool = False  # NHWC convolutions for UNet, hint encoder and VAE (faster on GPU tensor cores)
    # -- which rows --------------------------------------------------------------------------------
    limit: int | None = None  # render at most this many manifest rows (in manifest order)
    force: bool = False  # re-render pairs that are already done
    retry_failed: bool = False  # re-try pairs whose latest row is failed (they are skipped otherwise)
    verify_images: bool = False  # reuse a done pair only if its image still exists (one HEAD per done pair)
    run_id: str | None = None  # default: UTC time + random suffix
    max_failed_fraction: float = 0.05  # above it the run exits 3: a nightly must not show green
    # -- inputs allowed ---------------------------------------------------------------------------
    allow_root: list[str] = field(
        default_factory=list
    )  # extra local folders inputs may come from; s3:// prefixes narrow S3
    allow_http: bool = False  # fetch http(s):// inputs (off: internal metadata endpoints are a risk)
    max_pixels: int = 50_000_000  # images above this fail with too_large before being decoded
    # -- metrics (METRICS.md) -----------------------------------------------------------------------
    no_metrics: bool = False  # render only; without weights metrics are skipped anyway (and the summary says so)
    inception_weights: str | None = None  # pt_inception-2015-12-05 weights file (path or s3://): FID/KID
    clip_model: str | None = None  # CLIP ViT-B/32 folder (path or s3://): region CLIP score
    fid_reference: str | None = None  # reserved: reference statistics for FID (not implemented; refused)
    metrics_random_weights: bool = False  # the extractors are random (demo): reports say so in large type
    # -- cluster and bookkeeping ---------------------------------------------------------------------
    address: str | None = (
        None  # Ray cluster to join ("auto": the local `ray start` one); default RAY_ADDRESS, else a Ray of its own
    )
    lock_stale_s: float = 300.0  # a _lock whose heartbeat is older than this is taken over
    # no batch reaching the driver for this long stops the run (exit 1) with a message naming the
    # stage that waits and what for (Ray's own no-progress timeout is 30 min); 0: never
    stall_timeout_s: float = 300.0
    manifest_part_rows: int = 1000  # output-manifest rows per part file (flushed at least every 30 s)
    fault_injection: dict | None = None  # chaos tests only (YAML): see pipeline.stages.faults

    def validate(self) -> RenderConfig:
        self._check_types()
        for name in ("manifest", "output", "model"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required")
        if self.partition_range is not None:
            start, end = self.partition_range
            for value in (start, end):
                if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(value)):
                    raise ConfigError(f"dates must be YYYY-MM-DD, got {value!r}")
                try:
                    date.fromisoformat(str(value))
                except ValueError as e:
                    raise ConfigError(f"{value!r} is not a date: {e}") from e
            if start > end:
                raise ConfigError(f"--start {start} is after --end {end}")
        if self.steps < 1 or self.steps > 1000:
            raise ConfigError(f"--steps must be in 1..1000, got {self.steps}")
        if not 0 <= self.guidance_scale <= 50:
            raise ConfigError(f"--guidance-scale must be in 0..50, got {self.guidance_scale}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"--scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.image_format not in IMAGE_FORMATS:
            raise ConfigError(f"--image-format must be one of {IMAGE_FORMATS}, got {self.image_format!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"--jpeg-quality must be in 1..100, got {self.jpeg_quality}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        lo, hi = self.actors
        if not 1 <= lo <= hi:
            raise ConfigError(f"--actors must be MIN,MAX with 1 <= MIN <= MAX, got {lo},{hi}")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ConfigError(f"--gpus-per-actor must be >= 0, got {self.gpus_per_actor}")
        if self.cpus_per_actor <= 0 or self.cpu_stage_cpus <= 0:
            raise ConfigError("--cpus-per-actor and cpu_stage_cpus must be > 0")
        for name, amount in (self.actor_resources or {}).items():
            # Ray's own message for a bad resource comes from inside the actor pool, mid-run
            if not isinstance(name, str) or not name or not has_type(amount, float) or amount < 0:
                raise ConfigError(f"actor_resources must map names to amounts >= 0, got {name!r}: {amount!r}")
        if self.limit is not None and self.limit < 0:
            raise ConfigError(f"--limit must be >= 0, got {self.limit}")
        if self.stall_timeout_s < 0:
            raise ConfigError(f"--stall-timeout-s must be >= 0 (0: no watchdog), got {self.stall_timeout_s}")
        if not 0 <= self.max_failed_fraction <= 1:
            raise ConfigError(f"--max-failed-fraction must be in 0..1, got {self.max_failed_fraction}")
        if self.run_id is not None and (problem := name_problem("--run-id", self.run_id)):
            raise ConfigError(problem)
        if not 0 <= self.crop_margin <= 4:
            raise ConfigError(f"crop_margin must be in 0..4, got {self.crop_margin}")
        if not 0 <= self.feather_px <= 64:
            raise ConfigError(f"feather_px must be in 0..64, got {self.feather_px}")
        if self.max_pixels < 1:
            raise ConfigError(f"max_pixels must be >= 1, got {self.max_pixels}")
        if not 1 <= self.variants <= 16:
            raise ConfigError(f"--variants must be in 1..16, got {self.variants}")
        if self.select not in SELECTIONS:
            raise ConfigError(f"--select must be one of {SELECTIONS}, got {self.select!r}")
        if self.select == "clip" and self.variants > 1 and not self.clip_model:
            raise ConfigError("--select clip needs --clip-model (the CLIP region score chooses the variant)")
        if self.keep_variants and self.variants < 2:
            raise ConfigError("--keep-variants needs --variants 2 or more")
        if not 1 <= self.max_scene_steps <= 64:
            raise ConfigError(f"--max-scene-steps must be in 1..64, got {self.max_scene_steps}")
        if self.fid_reference:
            raise ConfigError(
                "--fid-reference is not supported yet: FID compares against the shard's own context crops"
            )
        if self.output.startswith(("http://", "https://")):
            raise ConfigError(f"--output must be a local folder or s3://bucket/prefix, got {self.output!r}")
        return self

    def settings(self, resolution: int) -> dict:
        """What decides the pixels of a render (besides the model and the pair)."""
        return {
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "scheduler": self.scheduler,
            "resolution": resolution,
            "image_format": self.image_format,
            "jpeg_quality": self.jpeg_quality if self.image_format != "png" else None,
            "crop_margin": self.crop_margin,
            "feather_px": self.feather_px,
            # what the hint is made from: a change of it changes the model's input, so the digest
            # moves and earlier renders are not reused (the old hint came from the 224^2 encoder input)
            "hint": "product at working resolution",
        } | (
            # best of N: a different pair image (and scores) than one render; left out at N = 1
            # so that the digests of runs before variants existed still match
            {"variants": self.variants, "select": self.select} if self.variants > 1 else {}
        )

    def settings_digest(self, resolution: int) -> str:
        blob = json.dumps(self.settings(resolution), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_record(self) -> dict:
        """JSON-safe copy for runs/<run_id>.json (holds no credentials: none are settings)."""
        record = dataclasses.asdict(self)
        record["actors"] = list(self.actors)
        if self.partition_range is not None:
            record["partition_range"] = list(self.partition_range)
        return record

    @classmethod
    def keys(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def _check_types(self) -> None:
        """Every field against its annotation: a YAML `steps: twenty` is one clear line, not a
        TypeError deep in the run. Whole numbers pass as floats (`guidance_scale: 5`)."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int) and not isinstance(value, bool) and _accepts_float(hints[f.name]):
                # `guidance_scale: 5` and `--guidance-scale 5` must digest alike: one float, 5.0
                value = float(value)
                setattr(self, f.name, value)
            if not has_type(value, hints[f.name]):
                hint = hints[f.name]
                expected = str(hint).replace("typing.", "") if typing.get_args(hint) else hint.__name__
                raise ConfigError(f"{f.name} must be {expected}, got {type(value).__name__} {value!r}")


def _accepts_float(hint) -> bool:
    return hint is float or float in typing.get_args(hint)


def has_type(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(has_type(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple:
        return isinstance(value, tuple) and len(value) == len(args) and all(map(has_type, value, args))
    if origin is list:
        return isinstance(value, list) and all(has_type(v, args[0]) for v in value)
    return isinstance(value, origin or hint)


@dataclass(frozen=True)
class RunSpec:
    """One run, as the driver fixed it before any work: what every stage and the sink share."""

    cfg: RenderConfig  # validated; `output` absolute for local folders
    plan: ManifestPlan
    run_id: str
    model_digest: str  # sha256 over the checkpoint's weight files
    settings_digest: str  # RenderConfig.settings_digest at the model's resolution
    resolution: int  # the model's working resolution (R)
    product_size: int  # the image encoder's input size (S)
    metrics_protocol: dict | None  # what every metrics file records; None: no metrics

    @property
    def output(self) -> str:
        return self.cfg.output

    @property
    def with_metrics(self) -> bool:
        return self.metrics_protocol is not None
