"""Typed settings of a render run, and the run's spec. Driver-side: no torch.

`RenderConfig` declares every render option once (`pipeline.options.option`: type, default,
range, help, whether it changes pixels); `jobs.render` generates its flags from it and reads
`--config FILE` (YAML, the same keys with `_` for `-`; flags win). A bad type, range or choice
is refused at construction, a bad combination by `check()`: both raise `ConfigError` with
one message naming the bad value, which the job turns into exit code 2 before any work starts.
The settings are one flat model, grouped by comments, because its field names are the YAML
keys and the flags, one to one. The fields declared `pixels=True` make the settings digest.

`RunSpec` is what the driver learns once, before any work, from the config, the manifest and
the model (`pipeline.run` builds it): frozen, small and picklable, it is all the stages know
about the run.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Literal

from pydantic import field_validator

from pipeline.options import ConfigError, Options, bounds, digest_values, option
from pipeline.schema import IMAGE_FORMATS, SCHEDULERS, SELECTIONS, name_problem

if TYPE_CHECKING:
    from pipeline.manifest import ManifestPlan

__all__ = ["ConfigError", "RenderConfig", "RunSpec", "RENDER_DEFAULTS", "MAX_VARIANTS"]

# what every pair's render settings include besides the declared options: the model's input
# is made from this (a change of it moves the digest; the old hint came from the 224^2 encoder input)
HINT_SOURCE = "product at working resolution"


class RenderConfig(Options):
    # -- where --------------------------------------------------------------------------------
    manifest: str = option(
        "", "manifest file, folder (hive partitions welcome) or glob (Parquet, CSV, JSONL); local or s3://"
    )
    # backfill only (jobs.backfill sets it from --start/--end): only partition_key= folders in [start, end]
    partition_range: tuple[str, str] | None = option(None, "backfill: the partition dates [start, end]", flag=False)
    partition_key: str = option(
        "dt", "hive partition key of the backfill's partitions (values YYYY-MM-DD)", flag="backfill"
    )
    output: str = option("", "output folder or s3://bucket/prefix; everything the run writes stays under it")
    model: str = option(
        "", "DTC or Paint-by-Example checkpoint folder, s3:// prefix or packed file (jobs.make_model writes one)"
    )
    # -- what: pixels=True enters the settings digest, so changing one re-renders every pair ------
    steps: int = option(40, "denoising steps", ge=1, le=1000, pixels=True)  # the paper's 40 DDIM steps
    guidance_scale: float = option(
        5.0, "classifier-free guidance scale (the paper's 5); <= 1 disables CFG", ge=0, le=50, pixels=True
    )
    scheduler: Literal[SCHEDULERS] = option(
        "ddim", "sampler: ddim (paper) or dpmpp (DPM-Solver++, good at ~20 steps)", pixels=True
    )
    image_format: Literal[IMAGE_FORMATS] = option(
        "jpeg", "output image format (PNG is lossless but slow to encode)", pixels=True
    )
    jpeg_quality: int = option(92, "JPEG/WebP quality", ge=1, le=100, pixels=True)
    crop_margin: float = option(
        0.25, "the square window = region bbox grown by this fraction per side", ge=0, le=4, pixels=True
    )
    feather_px: int = option(
        4, "paste-back ramp, inside the region only: outside pixels stay exact", ge=0, le=64, pixels=True
    )
    variants: int = option(
        1,
        "renders per pair, each its own seed, in the same model batches; the best is kept",
        ge=1,
        le=16,
        pixels="unless_default",  # catalogs rendered before variants existed had one
    )
    select: Literal[SELECTIONS] = option(
        "identity",
        "how the best variant is chosen: identity (the model's image encoder) or clip (needs --clip-model)",
        pixels=True,
    )
    # -- scenes and review (no effect on pixels) ---------------------------------------------------
    keep_variants: bool = option(False, "also write the variants not chosen, to variants/<pair_id>/<k>.<ext>")
    min_identity_score: float | None = option(None, "rendered rows scoring below it get needs_review = true")
    max_scene_steps: int = option(8, "a scene with more steps fails every row scene_invalid", ge=1, le=64)
    # -- how: resources and batching -------------------------------------------------------------------
    # no pixels: a pair's image does not depend on its batch's size (each row has its own seed and noise)
    batch_size: int = option(8, "pairs per model call (one UNet call of 2B with CFG)", ge=1)
    actors: tuple[int, int] = option(
        (1, 1), "model actor pool MIN,MAX (or N); autoscales in between", metavar="MIN,MAX"
    )
    gpus_per_actor: float | None = option(
        None, "GPUs per model actor (default: 1 when the cluster has GPUs, else 0: CPU render)", ge=0
    )
    cpus_per_actor: float = option(
        1.0, "CPUs reserved per model actor; a fraction keeps small machines from starving the read stages", gt=0
    )
    actor_resources: dict | None = option(
        None, "custom Ray resources per model actor (YAML), e.g. {gpu_node: 1}: pins the pool", flag=False
    )
    torch_threads: int | None = option(
        None, "torch threads inside a CPU model actor (Ray sets 1 for fractional CPUs)", ge=1
    )
    cpu_stage_cpus: float = option(0.5, "CPUs per fetch/decode/postprocess task; fractional so stages overlap", gt=0)
    # compile and channels_last: the same computation in another kernel order; float rounding may
    # differ in the last bits, as between two GPU models, which the digest does not record either
    compile: bool = option(
        False, "torch.compile the UNet and hint encoder in each actor (GPU: minutes of warm-up, then faster steps)"
    )
    channels_last: bool = option(
        False, "NHWC convolutions for UNet, hint encoder and VAE (faster on GPU tensor cores)"
    )
    # -- which rows --------------------------------------------------------------------------------
    limit: int | None = option(None, "render at most this many manifest rows (in manifest order)", ge=0)
    force: bool = option(False, "re-render pairs that are already done")
    retry_failed: bool = option(False, "re-try pairs whose latest row is failed (they are skipped otherwise)")
    verify_images: bool = option(False, "reuse a done pair only if its image still exists (one HEAD per done pair)")
    verify_inputs: bool = option(
        False,
        "reuse a done pair only if its input files are unchanged since its render (a stat per input file "
        "locally, an S3 HEAD per input object, per done pair): catches a file replaced in place",
    )
    run_id: str | None = option(None, "run id (default: UTC time + random suffix)")
    max_failed_fraction: float = option(
        0.05, "exit 3 above this failed fraction: a nightly must not show green", ge=0, le=1
    )
    # -- inputs allowed ---------------------------------------------------------------------------
    allow_root: list[str] = option(
        [], "extra local folder inputs may come from; an s3://bucket/prefix limits S3 inputs to such prefixes"
    )
    allow_http: bool = option(False, "fetch http(s):// inputs (off: internal metadata endpoints are a risk)")
    max_pixels: int = option(50_000_000, "images above this many pixels fail too_large before being decoded", ge=1)
    # -- metrics (METRICS.md) -----------------------------------------------------------------------
    no_metrics: bool = option(
        False, "render only, skip FID/KID/CLIP (without weights they are skipped anyway, and the summary says so)"
    )
    inception_weights: str | None = option(None, "pt_inception-2015-12-05 weights file (path or s3://): FID/KID")
    clip_model: str | None = option(None, "CLIP ViT-B/32 folder (path or s3://): region CLIP score")
    fid_reference: str | None = option(None, "reserved: reference statistics for FID (not implemented; refused)")
    # YAML only: jobs.demo writes it into the config it renders with; a user never sets it
    metrics_random_weights: bool = option(
        False, "the extractors are random (demo): reports say so in large type", flag=False
    )
    # -- cluster and bookkeeping ---------------------------------------------------------------------
    address: str | None = option(
        None, "Ray cluster to join, or auto: the local `ray start` one (default RAY_ADDRESS, else a Ray of its own)"
    )
    lock_stale_s: float = option(
        300.0, "an output lock whose heartbeat is older than this many seconds is taken over", gt=0
    )
    # Ray's own no-progress timeout is 30 min
    stall_timeout_s: float = option(
        300.0,
        "exit 1, naming the stuck stage, when no batch reaches the driver for this many seconds (0: never)",
        ge=0,
    )
    manifest_part_rows: int = option(1000, "output-manifest rows per part file (flushed at least every 30 s)", ge=1)
    # well under a second per thousand rows in the driver; bench/noop.py compares both ways
    driver_plan_rows: int = option(
        10_000,
        "a manifest of up to this many rows is read, validated and resumed in the driver first: a run with "
        "nothing to render then starts neither Ray nor a model (0: always on the cluster)",
        ge=0,
        flag=False,
    )
    fault_injection: dict | None = option(None, "chaos tests only (YAML): see pipeline.stages.faults", flag=False)

    @field_validator("actors", mode="before")
    @classmethod
    def _min_max(cls, value):
        """`--actors 2,4`, `actors: [2, 4]`, `actors: 3` or `--actors 3` (MIN = MAX)."""
        try:
            if isinstance(value, str):
                parts = tuple(int(part) for part in value.strip("[]() ").replace(" ", "").split(","))
            else:
                parts = (value,) if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
        except (TypeError, ValueError):
            parts = ()
        if len(parts) not in (1, 2) or not all(isinstance(p, int) and not isinstance(p, bool) for p in parts):
            raise ValueError(f"actors must be MIN,MAX or N, got {value!r}")
        return parts * 2 if len(parts) == 1 else parts

    def check(self) -> RenderConfig:
        """The checks across fields and of values beyond a range (each field's type, range and
        choices were checked at construction)."""
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
        lo, hi = self.actors
        if not 1 <= lo <= hi:
            raise ConfigError(f"--actors must be MIN,MAX with 1 <= MIN <= MAX, got {lo},{hi}")
        for name, amount in (self.actor_resources or {}).items():
            # Ray's own message for a bad resource comes from inside the actor pool, mid-run
            number = isinstance(amount, int | float) and not isinstance(amount, bool)
            if not isinstance(name, str) or not name or not number or amount < 0:
                raise ConfigError(f"actor_resources must map names to amounts >= 0, got {name!r}: {amount!r}")
        if self.run_id is not None and (problem := name_problem("--run-id", self.run_id)):
            raise ConfigError(problem)
        if self.select == "clip" and self.variants > 1 and not self.clip_model:
            raise ConfigError("--select clip needs --clip-model (the CLIP region score chooses the variant)")
        if self.keep_variants and self.variants < 2:
            raise ConfigError("--keep-variants needs --variants 2 or more")
        if self.fid_reference:
            raise ConfigError(
                "--fid-reference is not supported yet: FID compares against the shard's own context crops"
            )
        if self.output.startswith(("http://", "https://")):
            raise ConfigError(f"--output must be a local folder or s3://bucket/prefix, got {self.output!r}")
        return self

    def settings(self, resolution: int) -> dict:
        """What decides the pixels of a render besides the model and the pair: every option
        declared `pixels=True`, the model's resolution and the hint's source. A value that
        cannot change the pixels is written the same whatever it is, so equal renders digest
        alike (and digests written before an option existed still match)."""
        settings = digest_values(self, "pixels")
        if self.image_format == "png":
            settings["jpeg_quality"] = None  # PNG is lossless: no quality
        if self.variants == 1:
            del settings["select"]  # nothing is chosen from one render
        return settings | {"resolution": resolution, "hint": HINT_SOURCE}

    def settings_digest(self, resolution: int) -> str:
        blob = json.dumps(self.settings(resolution), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_record(self) -> dict:
        """JSON-safe copy for runs/<run_id>.json (holds no credentials: none are settings)."""
        return self.model_dump(mode="json")


RENDER_DEFAULTS = RenderConfig()  # the declared defaults: the stage configs' and Serve's
MAX_VARIANTS = bounds(RenderConfig, "variants")["le"]  # Serve's cap on a request's variants too


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
    # what the model's weights make meaningless (checkpoint.weights_warning): console and QA page
    model_warning: str | None = None

    @property
    def output(self) -> str:
        return self.cfg.output

    @property
    def with_metrics(self) -> bool:
        return self.metrics_protocol is not None
