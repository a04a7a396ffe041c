"""`ServeArgs`: the app builder's arguments (`serve run pipeline.serve:app_builder key=value ...`,
or a Serve config file's `args:`). pydantic only: no Ray, no torch."""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from pipeline.config import MAX_VARIANTS, RENDER_DEFAULTS, RenderConfig
from pipeline.fetch import SERVE_NO_FOLDER, InputPolicy
from pipeline.options import bounds

__all__ = ["MAX_VARIANTS", "RENDER_DEFAULTS", "ServeArgs"]

# A request's defaults and limits are the batch job's option declarations (RenderConfig): the
# same defaults, the same ranges, and scheduler/format the same choices (their annotations).
Scheduler = RenderConfig.model_fields["scheduler"].annotation
ImageFormat = RenderConfig.model_fields["image_format"].annotation


class ServeArgs(BaseModel):
    """The app builder's arguments. `serve run ... key=value` passes strings: they are coerced
    (pydantic's lax mode; `allow_roots` also takes "a,b"). Unknown keys are refused, so a typo
    in a config file fails the deploy instead of being ignored."""

    model_config = ConfigDict(extra="forbid")

    model_uri: str  # DTC or Paint-by-Example checkpoint folder or s3:// prefix (jobs.make_model writes one)
    # -- batching: one model call per batch (per steps/guidance group inside it) --------------
    max_batch_size: int = Field(8, ge=1)  # requests per model call (each adds its `variants` renders); GPU memory
    batch_wait_timeout_s: float = Field(0.05, ge=0)  # how long a lone request waits for company
    # None: 2 * max_batch_size, so the next batch fills while one renders
    max_ongoing_requests: int | None = Field(None, ge=1)
    max_queued_requests: int = Field(64, ge=-1)  # beyond this Serve answers 503 (-1: unbounded)
    # -- what a request may carry ---------------------------------------------------------------
    max_request_bytes: int = Field(64 * 2**20, ge=1)  # whole body; three phone photos fit
    # per image, checked from the header before decoding: the batch job's --max-pixels
    max_pixels: int = Field(RENDER_DEFAULTS.max_pixels, **bounds(RenderConfig, "max_pixels"))
    max_steps: int = Field(100, ge=1)  # a request's `steps` cap: 1000 steps would hold the GPU for minutes
    # a request's `variants` cap: each variant is one more render in the model call (N * batch rows)
    max_variants: int = Field(MAX_VARIANTS, ge=1, le=MAX_VARIANTS)
    # when set (or api_token_env), requests need "Authorization: Bearer <token>"
    api_token: SecretStr | None = None
    api_token_env: str | None = None  # name of an env var holding the token (keeps it out of the Serve config)
    allow_roots: list[str] = Field(default_factory=list)  # local folders (or s3:// prefixes) JSON requests may name
    allow_http: bool = False  # fetch http(s):// URIs (off: internal metadata endpoints are a risk)
    # -- resources ------------------------------------------------------------------------------
    # per replica; 1 on GPU nodes (0 default: a GPU ask on a CPU node waits forever)
    num_gpus: float = Field(0, ge=0)
    num_cpus: float = Field(1, gt=0)  # per replica, for Ray's scheduling
    # CPU rendering: Ray gives an actor OMP_NUM_THREADS = its whole CPUs
    torch_threads: int | None = Field(None, ge=1)
    # -- defaults of a request --------------------------------------------------------------------
    steps: int = Field(RENDER_DEFAULTS.steps, **bounds(RenderConfig, "steps"))
    guidance_scale: float = Field(RENDER_DEFAULTS.guidance_scale, **bounds(RenderConfig, "guidance_scale"))
    scheduler: Scheduler = RENDER_DEFAULTS.scheduler  # fixed per deployment: it is part of the loaded pipeline
    image_format: ImageFormat = RENDER_DEFAULTS.image_format
    jpeg_quality: int = Field(RENDER_DEFAULTS.jpeg_quality, **bounds(RenderConfig, "jpeg_quality"))  # also WebP

    def input_policy(self) -> InputPolicy:
        """What requests may name: only the `allow_roots` given (local folders, real paths; an
        s3:// root limits S3 to such prefixes), http(s) with `allow_http`; refusals name these
        arguments, not the batch jobs' flags."""
        roots = [root if "://" in root else os.path.realpath(root) for root in self.allow_roots]
        return InputPolicy(
            SERVE_NO_FOLDER, tuple(roots), self.allow_http, roots_option="allow_roots=", http_option="allow_http=true"
        )

    @field_validator("allow_roots", mode="before")
    @classmethod
    def _split_roots(cls, value):
        if isinstance(value, str):  # `allow_roots=/data/a,/data/b` on the command line
            return [part for part in value.split(",") if part]
        return value

    @field_validator("api_token", "api_token_env", mode="before")
    @classmethod
    def _empty_is_none(cls, value):
        return None if value == "" else value

    @model_validator(mode="after")
    def _check(self) -> ServeArgs:
        if self.steps > self.max_steps:
            raise ValueError(f"steps ({self.steps}) is above max_steps ({self.max_steps})")
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                f"({self.max_batch_size}), or batches never fill"
            )
        return self
