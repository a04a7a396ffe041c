"""Online rendering: the DTC model behind Ray Serve, one HTTP request per (photo, product) pair.

    serve run pipeline.serve:app_builder model_uri=models/dtc-tiny [max_batch_size=8 num_gpus=1 ...]
    serve deploy infra/serve.yaml          # a running cluster; the RayService embeds the same config

HTTP on 127.0.0.1:8000 unless `http_options` say otherwise. The API (DESIGN.md "Serve API"):

    POST /v1/render   multipart/form-data: files `context`, `product`, and a `mask` file or a
                      `bbox` field ("[x0, y0, x1, y1]"); optional `seed`, `steps`,
                      `guidance_scale`, `format` (jpeg|png|webp).
                      application/json: `context_uri`, `product_uri`, `mask_uri` or `bbox`, and
                      the same options; URIs pass the allowlist of pipeline.fetch.
                      200 -> image bytes (the context photo's size; pixels outside the region
                      untouched), headers X-Seed, X-Model-Digest, X-Render-Ms, X-Batch-Size.
    GET  /healthz     200 {"status": "ok", ...} from a replica whose model is loaded and usable;
                      503 once it is not (a fatal CUDA error: Serve then replaces the replica).
                      Before the first replica has loaded, Serve has no replica to route to:
                      the probe waits, then gets Serve's 408 (see "Decisions").
    GET  /v1/stats    this replica's counters: requests, rendered, model_calls, batch sizes, errors.

    curl -H "Authorization: Bearer $TOKEN" -F context=@photo.jpg -F product=@shoe.png \
         -F bbox='[40, 60, 200, 220]' http://127.0.0.1:8000/v1/render -o out.jpg

Errors are JSON {"code", "message"}: 400 bad input (codes of images.py/fetch.py such as
`image_unreadable`, `bad_bbox`, `uri_not_allowed`, plus `missing_file`, `missing_uri`,
`region_missing`, `region_ambiguous`, `bad_json`, `bad_option`, `unknown_field`,
`duplicate_field`, `bad_multipart`, `unsupported_media_type`, `prepare_failed`), 401
`unauthorized`, 404 `not_found`, 405 `method_not_allowed`, 413 `body_too_large` /
`too_large` (pixels), 502 `fetch_failed` (object storage did not answer), 503 `oom`, 500
`render_failed`. Serve itself answers 503 when `max_queued_requests` overflow and 408 after
`http_options.request_timeout_s`.

Decisions:
- One deployment, `DTCServer`, with a plain `__call__(Request)`: three routes do not need
  FastAPI, and FastAPI's own 422 bodies and multipart support (python-multipart, not
  installed) would sit between us and the error contract. Multipart is parsed here (stdlib
  header parsing; the body is already in memory, bounded by `max_request_bytes`).
- The model loads in `__init__`: Serve routes no request to a replica before its constructor
  returns, so no request ever waits on a load, an autoscaled replica only takes traffic once it
  can render, and a bad `model_uri` fails the deploy instead of crash-looping a replica. The
  price: DESIGN's "/healthz 503 before the model is loaded" shows up as Serve's wait/408 while
  no replica is up yet. Loading in a background thread would answer 503, but Serve would then
  route renders to replicas still loading (for minutes after a scale-up with sd15 weights).
- Batching: `@serve.batch` collects requests; each (steps, guidance_scale) group of a batch is
  ONE `DTCRenderer.render` call (the job's batched call: CFG as 2B, per-pair generators, so a
  pair's pixels do not depend on its batch-mates beyond 1 uint8 level). If a group's call
  fails, its members are rendered one by one, so only the culprit fails.
- Decode/preprocess and paste-back/encode run in the default thread pool, the model in its
  own single thread: the event loop keeps accepting requests (which form the next batch)
  while the model runs, and torch only ever runs in one thread.
- Default seed: a stable hash of the request's content (context, product, mask bytes or
  bbox), so the same request gives the same bytes whether sent as files or URIs; X-Seed
  returns it. Crop margin and feather are RenderConfig's defaults: online and batch renders
  of a pair agree.
- The token protects everything but /healthz (load balancers probe without credentials); it
  comes from `api_token` or, better outside tests, from the env var named by `api_token_env`.
"""

from __future__ import annotations

import asyncio
import email.message
import email.parser
import email.policy
import email.utils
import hashlib
import hmac
import json
import logging
import math
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from ray import serve
from ray.serve import Application
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pipeline import images
from pipeline.config import IMAGE_FORMATS, SCHEDULERS, RenderConfig
from pipeline.fetch import InputPolicy, fetch
from pipeline.schema import RowError
from pipeline.manifest import stable_seed
from pipeline.model.checkpoint import model_digest

__all__ = ["ServeArgs", "DTCServer", "app_builder", "default_seed"]

# "ray.serve" so these lines land in the replica's Serve log with its replica id.
log = logging.getLogger("ray.serve")

RENDER_DEFAULTS = RenderConfig()  # crop margin, feather, JPEG quality: the same as the batch job
CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
OPTION_FIELDS = ("bbox", "seed", "steps", "guidance_scale", "format")
MULTIPART_FIELDS = ("context", "product", "mask", *OPTION_FIELDS)
JSON_FIELDS = ("context_uri", "product_uri", "mask_uri", *OPTION_FIELDS)
MAX_SEED = 2**63 - 1  # int64, as the manifest's seed column
# Row-error codes that are not the client's fault, or not a plain 400.
STATUS_OF_CODE = {"too_large": 413, "fetch_failed": 502}


class ServeArgs(BaseModel):
    """The app builder's arguments. `serve run ... key=value` passes strings: they are coerced
    (pydantic's lax mode; `allow_roots` also takes "a,b"). Unknown keys are refused, so a typo
    in a config file fails the deploy instead of being ignored."""

    model_config = ConfigDict(extra="forbid")

    model_uri: str  # DTC checkpoint folder or s3:// prefix (jobs.make_model writes one)
    # -- batching: one model call per batch (per steps/guidance group inside it) --------------
    max_batch_size: int = Field(8, ge=1)  # pairs per model call; bounded by GPU memory
    batch_wait_timeout_s: float = Field(0.05, ge=0)  # how long a lone request waits for company
    max_ongoing_requests: int | None = Field(None, ge=1)  # None: 2 * max_batch_size, so the next batch fills while one renders
    max_queued_requests: int = Field(64, ge=-1)  # beyond this Serve answers 503 (-1: unbounded)
    # -- what a request may carry ---------------------------------------------------------------
    max_request_bytes: int = Field(64 * 2**20, ge=1)  # whole body; three phone photos fit
    max_pixels: int = Field(50_000_000, ge=1)  # per image, checked from the header before decoding
    max_steps: int = Field(100, ge=1)  # a request's `steps` cap: 1000 steps would hold the GPU for minutes
    api_token: SecretStr | None = None  # when set (or api_token_env), requests need "Authorization: Bearer <token>"
    api_token_env: str | None = None  # name of an env var holding the token (keeps it out of the Serve config)
    allow_roots: list[str] = Field(default_factory=list)  # local folders (or s3:// prefixes) JSON requests may name
    allow_http: bool = False  # fetch http(s):// URIs (off: internal metadata endpoints are a risk)
    # -- resources ------------------------------------------------------------------------------
    num_gpus: float = Field(0, ge=0)  # per replica; 1 on GPU nodes (0 default: a GPU ask on a CPU node waits forever)
    num_cpus: float = Field(1, gt=0)  # per replica, for Ray's scheduling
    torch_threads: int | None = Field(None, ge=1)  # CPU rendering: Ray gives an actor OMP_NUM_THREADS = its whole CPUs
    # -- defaults of a request --------------------------------------------------------------------
    steps: int = Field(RENDER_DEFAULTS.steps, ge=1)
    guidance_scale: float = Field(RENDER_DEFAULTS.guidance_scale, ge=0, le=50)
    scheduler: str = RENDER_DEFAULTS.scheduler  # fixed per deployment: it is part of the loaded pipeline
    image_format: str = RENDER_DEFAULTS.image_format
    jpeg_quality: int = Field(RENDER_DEFAULTS.jpeg_quality, ge=1, le=100)  # also WebP quality

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
    def _check(self) -> "ServeArgs":
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {self.image_format!r}")
        if self.steps > self.max_steps:
            raise ValueError(f"steps ({self.steps}) is above max_steps ({self.max_steps})")
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size ({self.max_batch_size}), "
                "or batches never fill"
            )
        return self


class ApiError(Exception):
    """A request that gets a JSON error answer instead of an image."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message

    @classmethod
    def from_row_error(cls, error: RowError) -> "ApiError":
        return cls(STATUS_OF_CODE.get(error.code, 400), error.code, error.message)


@dataclass
class RenderRequest:
    """A parsed request: either uploaded bytes or URIs for each input, plus options."""

    context: bytes | None
    product: bytes | None
    mask: bytes | None
    context_uri: str | None
    product_uri: str | None
    mask_uri: str | None
    bbox: list | None
    seed: int | None
    steps: int
    guidance_scale: float
    image_format: str


@dataclass
class Job:
    """A prepared request: the model's inputs plus what the paste-back needs."""

    model: dict  # images.preprocess output: context, hole, product, product_alpha, crop_box
    context: np.ndarray  # H x W x 3, the whole photo
    hole: np.ndarray  # H x W bool
    seed: int
    steps: int
    guidance_scale: float
    image_format: str


@dataclass
class Rendered:
    image: np.ndarray | None = None  # R x R x 3 uint8
    error: ApiError | None = None
    batch_size: int = 0  # requests that shared the model call
    render_ms: float = 0.0  # wall time of that model call


def default_seed(context: bytes, product: bytes, mask: bytes | None, bbox) -> int:
    """stable_seed of a sha256 over the inputs' content (length-prefixed, so parts cannot
    run into each other). A bbox counts as its float values: "[10, 20, 90, 99]" and
    "[10.0, 20, 90, 99]" are the same request."""
    region = b"mask" + mask if mask is not None else b"bbox" + json.dumps([float(v) for v in bbox]).encode()
    digest = hashlib.sha256()
    for part in (context, product, region):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return stable_seed(digest.hexdigest())


# -- request parsing (pure functions: the event loop runs them, they do no I/O) ---------------------


def _parse_multipart(body: bytes, content_type: str) -> dict[str, bytes]:
    """RFC 7578 form data -> {field name: content bytes}. Files and plain fields alike."""
    header = email.message.Message()
    header["content-type"] = content_type
    boundary = header.get_boundary()
    if not boundary:
        raise ApiError(400, "bad_multipart", "multipart/form-data without a boundary parameter")
    # Every part is preceded by CRLF "--boundary"; the body's first delimiter may lack the CRLF.
    chunks = (b"\r\n" + body).split(b"\r\n--" + boundary.encode("latin-1"))
    if len(chunks) < 2 or not chunks[-1].startswith(b"--"):
        raise ApiError(400, "bad_multipart", "multipart body does not end with its closing boundary")
    fields: dict[str, bytes] = {}
    for chunk in chunks[1:-1]:
        head, separator, content = chunk.partition(b"\r\n\r\n")
        if not separator:
            raise ApiError(400, "bad_multipart", "a multipart part has no header/content separator")
        # After the boundary: optional transport padding, CRLF, then the part's header lines.
        head = head.split(b"\r\n", 1)[1] if b"\r\n" in head else b""
        part = email.parser.BytesHeaderParser(policy=email.policy.HTTP).parsebytes(head + b"\r\n\r\n")
        name = part.get_param("name", header="content-disposition")
        if part.get_content_disposition() != "form-data" or not name:
            raise ApiError(400, "bad_multipart", "every part needs Content-Disposition: form-data; name=...")
        name = email.utils.collapse_rfc2231_value(name)
        if name not in MULTIPART_FIELDS:
            raise ApiError(400, "unknown_field", f"unknown field {name!r}; expected some of {list(MULTIPART_FIELDS)}")
        if name in fields:
            raise ApiError(400, "duplicate_field", f"field {name!r} appears more than once")
        fields[name] = content
    return fields


def _text(value: bytes, name: str) -> str:
    try:
        return value.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise ApiError(400, "bad_option", f"field {name!r} is not UTF-8 text") from e


def _int_option(value, name: str, low: int, high: int) -> int:
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError as e:
            raise ApiError(400, "bad_option", f"{name} must be an integer, got {value!r}") from e
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, "bad_option", f"{name} must be an integer in {low}..{high}, got {value!r}")
    return value


def _float_option(value, name: str, low: float, high: float) -> float:
    try:
        number = float(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else math.nan
    except ValueError:
        number = math.nan
    if not low <= number <= high:  # NaN fails too
        raise ApiError(400, "bad_option", f"{name} must be a number in {low}..{high}, got {value!r}")
    return number


def _bbox(value) -> list:
    if isinstance(value, str):  # the form field, or a JSON client that sent the CSV spelling
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ApiError(400, "bad_bbox", f"bbox must be a JSON array [x0, y0, x1, y1], got {value!r}") from e
    if not isinstance(value, list) or len(value) != 4 or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        raise ApiError(400, "bad_bbox", f"bbox must be 4 numbers [x0, y0, x1, y1], got {value!r}")
    return value  # region_from_bbox checks the values against the photo


def _options(raw: dict, args: ServeArgs, has_mask: bool) -> dict:
    """Region and options shared by both request kinds; `raw` holds str (form) or JSON values."""
    if has_mask and raw.get("bbox") is not None:
        raise ApiError(400, "region_ambiguous", "send a mask or a bbox, not both")
    if not has_mask and raw.get("bbox") is None:
        raise ApiError(400, "region_missing", "no region: send a mask or a bbox [x0, y0, x1, y1]")
    image_format = raw.get("format") or args.image_format
    if image_format not in IMAGE_FORMATS:
        raise ApiError(400, "bad_option", f"format must be one of {list(IMAGE_FORMATS)}, got {image_format!r}")
    seed, steps, guidance = raw.get("seed"), raw.get("steps"), raw.get("guidance_scale")
    return {
        "bbox": None if has_mask else _bbox(raw["bbox"]),
        "seed": None if seed in (None, "") else _int_option(seed, "seed", 0, MAX_SEED),
        "steps": args.steps if steps in (None, "") else _int_option(steps, "steps", 1, args.max_steps),
        "guidance_scale": args.guidance_scale if guidance in (None, "") else _float_option(guidance, "guidance_scale", 0, 50),
        "image_format": image_format,
    }


def parse_request(content_type: str, body: bytes, args: ServeArgs, policy: InputPolicy) -> RenderRequest:
    """Body -> RenderRequest, or ApiError naming what is wrong. URIs are checked against the
    allowlist here, before anything is fetched."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "multipart/form-data":
        fields = _parse_multipart(body, content_type)
        for name in ("context", "product"):
            if name not in fields:
                raise ApiError(400, "missing_file", f"multipart field {name!r} (a file) is missing")
        raw = {name: _text(fields[name], name) for name in OPTION_FIELDS if name in fields}
        options = _options(raw, args, has_mask="mask" in fields)
        return RenderRequest(fields["context"], fields["product"], fields.get("mask"), None, None, None, **options)
    if media_type == "application/json":
        try:
            raw = json.loads(body)
        except ValueError as e:  # UnicodeDecodeError is a ValueError
            raise ApiError(400, "bad_json", f"body is not valid JSON: {e}") from e
        if not isinstance(raw, dict):
            raise ApiError(400, "bad_json", f"body must be a JSON object, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(JSON_FIELDS))
        if unknown:
            raise ApiError(400, "unknown_field", f"unknown fields {unknown}; expected some of {list(JSON_FIELDS)}")
        uris = {}
        for name in ("context_uri", "product_uri", "mask_uri"):
            value = raw.get(name)
            if name == "mask_uri" and value in (None, ""):  # optional: the bbox names the region instead
                continue
            if not isinstance(value, str) or not value:
                raise ApiError(400, "missing_uri", f"{name} must be a non-empty string, got {value!r}")
            try:
                policy.check(value)
            except RowError as e:
                raise ApiError.from_row_error(e) from e
            uris[name] = value
        options = _options(raw, args, has_mask="mask_uri" in uris)
        return RenderRequest(None, None, None, uris["context_uri"], uris["product_uri"], uris.get("mask_uri"), **options)
    raise ApiError(
        400, "unsupported_media_type", f"Content-Type must be multipart/form-data or application/json, got {media_type or 'none'!r}"
    )


def _error(error: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse({"code": error.code, "message": error.message}, status_code=error.status, headers=headers)


# -- the deployment ------------------------------------------------------------------------------


@serve.deployment(name="DTCServer")
class DTCServer:
    def __init__(self, args: ServeArgs):
        import ray

        from pipeline.render import DTCRenderer

        # 1. settings, token, allowlist
        self.args = args
        self._token = self._api_token(args)
        roots = [root if "://" in root else os.path.realpath(root) for root in args.allow_roots]
        # A server has no manifest folder: "s3://" stands in for it (no local root, no S3 prefix),
        # so only the roots given are allowed; an s3:// root limits S3 to such prefixes.
        self.policy = InputPolicy("s3://", tuple(roots), args.allow_http)
        # 2. the model, in the one thread that will ever run it. The device follows what Ray
        # gave this replica (a config file may override num_gpus), not a guess.
        self.device = "cuda" if ray.get_gpu_ids() else "cpu"
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dtc-model")
        self.renderer = self._model_thread.submit(
            DTCRenderer, args.model_uri, args.steps, args.guidance_scale, args.scheduler, self.device, args.torch_threads
        ).result()
        self.torch = self.renderer.torch
        self.model_digest = model_digest(args.model_uri)
        self.resolution = self.renderer.resolution
        self.product_size = self.renderer.pipe.config.product_size
        # 3. batching from the args (the decorator's numbers are placeholders)
        self._render_batch.set_max_batch_size(args.max_batch_size)
        self._render_batch.set_batch_wait_timeout_s(args.batch_wait_timeout_s)
        # 4. counters for /v1/stats; `broken` is set by an error that leaves the model unusable
        self.requests, self.rendered = 0, 0
        self.batch_sizes: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.broken: str | None = None
        log.info("DTCServer ready: model %s (%s) on %s", args.model_uri, self.model_digest[:12], self.device)

    @staticmethod
    def _api_token(args: ServeArgs) -> bytes | None:
        if args.api_token_env:
            value = os.environ.get(args.api_token_env)
            if not value:  # fail the deploy rather than serve without the auth someone asked for
                raise RuntimeError(f"api_token_env={args.api_token_env} but that environment variable is empty or unset")
            return value.encode()
        return args.api_token.get_secret_value().encode() if args.api_token else None

    # 1. routing ---------------------------------------------------------------------------------

    async def __call__(self, request: Request) -> Response:
        path = request.scope["path"]
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):  # under a route_prefix other than "/"
            path = path[len(root) :] or "/"
        try:
            if path == "/healthz":
                self._method(request, "GET", "HEAD")  # load balancers probe with either
                return self._health()
            self._authorize(request)
            if path == "/v1/stats":
                self._method(request, "GET")
                return JSONResponse(self._stats())
            if path == "/v1/render":
                self._method(request, "POST")
                self.requests += 1
                return await self._render(request)
            raise ApiError(404, "not_found", f"no route {path}; try POST /v1/render, GET /healthz, GET /v1/stats")
        except ApiError as e:
            self.errors[e.code] += 1
            return _error(e)
        except Exception as e:  # noqa: BLE001 - one bad request must never take the replica down
            log.exception("unexpected error on %s %s", request.method, path)
            self.errors["internal"] += 1
            return _error(ApiError(500, "internal", f"{type(e).__name__}: {e}"[:500]))

    @staticmethod
    def _method(request: Request, *allowed: str) -> None:
        if request.method not in allowed:
            raise ApiError(405, "method_not_allowed", f"{request.url.path} takes {'/'.join(allowed)}, got {request.method}")

    def _authorize(self, request: Request) -> None:
        if self._token is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken must not tell how much of a guessed token was right
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._token):
            raise ApiError(401, "unauthorized", "missing or wrong token: send Authorization: Bearer <token>")

    def _health(self) -> JSONResponse:
        if self.broken:
            return JSONResponse({"code": "unhealthy", "message": self.broken}, status_code=503)
        return JSONResponse({"status": "ok", "model_digest": self.model_digest, "device": self.device})

    def check_health(self) -> None:
        """Serve's periodic probe: a replica whose model is unusable is replaced."""
        if self.broken:
            raise RuntimeError(self.broken)

    def _stats(self) -> dict:
        return {
            "requests": self.requests,
            "rendered": self.rendered,
            "model_calls": self.renderer.model_calls,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "errors": dict(self.errors),
            "model_digest": self.model_digest,
        }

    # 2. one request ---------------------------------------------------------------------------------

    async def _render(self, request: Request) -> Response:
        body = await self._read_body(request)
        parsed = parse_request(request.headers.get("content-type", ""), body, self.args, self.policy)
        del body  # the parts live on in `parsed`; do not hold the body twice while rendering
        try:
            job = await asyncio.to_thread(self._prepare, parsed)
        except RowError as e:
            raise ApiError.from_row_error(e) from e
        except Exception as e:  # a file no check foresaw fails its request, as prepare_failed fails a job's row
            log.exception("preparing a request failed")
            raise ApiError(400, "prepare_failed", f"{type(e).__name__}: {e}"[:500]) from e
        result: Rendered = await self._render_batch(job)
        if result.error is not None:
            raise result.error
        data = await asyncio.to_thread(self._finish, job, result.image)
        self.rendered += 1
        return Response(
            data,
            media_type=CONTENT_TYPES[job.image_format],
            headers={
                "X-Seed": str(job.seed),
                "X-Model-Digest": self.model_digest,
                "X-Render-Ms": f"{result.render_ms:.1f}",
                "X-Batch-Size": str(result.batch_size),
            },
        )

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it is known to be too big: from Content-Length
        before reading anything, else (chunked, or a lying header) while streaming it."""
        limit = self.args.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise ApiError(400, "bad_request", f"Content-Length {declared!r} is not a number")
            if int(declared) > limit:
                raise ApiError(413, "body_too_large", f"body of {int(declared)} bytes is over the limit of {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "body_too_large", f"body is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _prepare(self, request: RenderRequest) -> Job:
        """Fetch (JSON requests), decode, region, preprocess: CPU work in a pool thread."""
        args, policy = self.args, self.policy
        context_bytes = request.context if request.context is not None else fetch(request.context_uri, policy)
        context = images.decode_image(context_bytes, max_pixels=args.max_pixels)
        height, width = context.shape[:2]
        mask_bytes = request.mask
        if mask_bytes is None and request.mask_uri:
            mask_bytes = fetch(request.mask_uri, policy)
        if mask_bytes is not None:
            hole = images.decode_mask(mask_bytes, max_pixels=args.max_pixels)
            images.check_region(hole, width, height)
        else:
            hole = images.region_from_bbox(request.bbox, width, height)
        product_bytes = request.product if request.product is not None else fetch(request.product_uri, policy)
        product = images.decode_image(product_bytes, max_pixels=args.max_pixels, keep_alpha=True, premultiply=True)
        model = images.preprocess(context, hole, product, self.resolution, self.product_size, margin=RENDER_DEFAULTS.crop_margin)
        seed = request.seed if request.seed is not None else default_seed(context_bytes, product_bytes, mask_bytes, request.bbox)
        return Job(model, context, hole, seed, request.steps, request.guidance_scale, request.image_format)

    def _finish(self, job: Job, rendered: np.ndarray) -> bytes:
        final = images.postprocess(job.context, rendered, job.hole, job.model["crop_box"], feather_px=RENDER_DEFAULTS.feather_px)
        return images.encode_image(final, job.image_format, quality=self.args.jpeg_quality)

    # 3. batches ---------------------------------------------------------------------------------

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _render_batch(self, jobs: list[Job]) -> list[Rendered]:
        """One model call per (steps, guidance_scale) group of the batch. Never raises: a
        failure becomes the failed requests' Rendered.error (serve.batch would otherwise fail
        every request of the batch)."""
        results: list[Rendered | None] = [None] * len(jobs)
        groups: dict[tuple[int, float], list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault((job.steps, job.guidance_scale), []).append(i)
        for members in groups.values():
            await self._render_group(jobs, members, results)
        return results

    async def _render_group(self, jobs: list[Job], members: list[int], results: list) -> None:
        start = time.perf_counter()
        try:
            rendered = await asyncio.get_running_loop().run_in_executor(
                self._model_thread, self._model_call, [jobs[i] for i in members]
            )
        except Exception as e:  # noqa: BLE001 - sorted out below, per request
            if len(members) > 1 and not self.broken:
                # Out of memory, or one pair the model cannot take: alone, only the culprit fails.
                log.warning("a model call on %d requests failed (%s): rendering them one by one", len(members), e)
                for i in members:
                    await self._render_group(jobs, [i], results)
                return
            results[members[0]] = Rendered(error=self._model_error(e))
            return
        render_ms = (time.perf_counter() - start) * 1000
        self.batch_sizes[len(members)] += 1
        for k, i in enumerate(members):
            results[i] = Rendered(image=rendered[k], batch_size=len(members), render_ms=render_ms)

    def _model_call(self, jobs: list[Job]) -> np.ndarray:
        """The render job's batched call (runs in the model thread only). DTCRenderer holds one
        steps/guidance pair; this group's are set first, which is safe because this single
        thread is the only caller."""
        renderer = self.renderer
        renderer.steps, renderer.guidance_scale = jobs[0].steps, jobs[0].guidance_scale
        return renderer.render(
            np.stack([job.model["context"] for job in jobs]),
            np.stack([job.model["hole"] for job in jobs]),
            np.stack([job.model["product"] for job in jobs]),
            np.stack([job.model["product_alpha"] for job in jobs]),
            np.asarray([job.seed for job in jobs], dtype=np.int64),
        )

    def _model_error(self, error: Exception) -> ApiError:
        if isinstance(error, self.torch.OutOfMemoryError):
            if self.device == "cuda":
                self.torch.cuda.empty_cache()
            return ApiError(503, "oom", "the request does not fit in GPU memory even alone; retry later or send a smaller image")
        if self.device == "cuda" and "CUDA error" in str(error):
            # A device-side fault poisons the CUDA context: every later call would fail too.
            self.broken = f"CUDA error, replica needs replacing: {error}"[:500]
            log.error(self.broken)
        log.exception("render failed", exc_info=error)
        return ApiError(500, "render_failed", f"{type(error).__name__}: {error}"[:500])


def app_builder(args: dict) -> Application:
    """`serve run pipeline.serve:app_builder model_uri=DIR [key=value ...]` (see ServeArgs).

    The deployment options set here are defaults: a Serve config file's `deployments:` entry
    for DTCServer (infra/serve.yaml, the RayService) overrides them."""
    config = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args)
    return DTCServer.options(
        max_ongoing_requests=config.max_ongoing_requests or 2 * config.max_batch_size,
        max_queued_requests=config.max_queued_requests,
        ray_actor_options={"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
    ).bind(config)
