"""Online rendering: the DTC model behind Ray Serve, one HTTP request per (photo, product) pair.

    serve run pipeline.serve:app_builder model_uri=models/dtc-tiny [max_batch_size=8 num_gpus=1 ...]
    serve deploy infra/serve.yaml          # a running cluster; the RayService embeds the same config

HTTP on 127.0.0.1:8000 unless `http_options` say otherwise. The API (DESIGN.md "Serve API"):

    POST /v1/render   multipart/form-data: files `context`, `product`, and a `mask` file or a
                      `bbox` field ("[x0, y0, x1, y1]"); optional `pair_id`, `seed`, `steps`,
                      `guidance_scale`, `variants` (1..max_variants), `format` (jpeg|png|webp).
                      application/json: `context_uri`, `product_uri`, `mask_uri` or `bbox`, and
                      the same options; URIs pass the allowlist of pipeline.fetch.
                      200 -> image bytes (the context photo's size; pixels outside the region
                      untouched), headers X-Seed, X-Model-Digest, X-Render-Ms, X-Batch-Size,
                      X-Identity-Score (the image's, 2 decimals), X-Pair-Id when the request
                      named one, and with variants > 1 X-Variant-Seeds, X-Variant-Scores (comma-
                      separated, in variant order) and X-Chosen-Variant (the index answered).
    GET  /healthz     200 {"status": "ok", ...} from a replica whose model is loaded and usable;
                      503 once it is not (a fatal CUDA error: Serve then replaces the replica).
                      Before the first replica has loaded, Serve has no replica to route to:
                      the probe waits, then gets Serve's 408 (see "Decisions").
    GET  /v1/stats    this replica's counters: requests, rendered, variants_rendered (renders made
                      for answered requests: their variants summed), model_calls, batch sizes, errors.

    curl -H "Authorization: Bearer $TOKEN" -F context=@photo.jpg -F product=@shoe.png \\
         -F bbox='[40, 60, 200, 220]' -F pair_id=sku-123 http://127.0.0.1:8000/v1/render -o out.jpg

Errors are JSON {"code", "message"}: 400 bad input (row codes of schema.ERROR_CODES such as
`image_unreadable`, `bad_bbox`, `uri_not_allowed`, `invalid_pair_id`, plus `missing_file`,
`missing_uri`, `region_missing`, `region_ambiguous`, `bad_json`, `bad_option`, `unknown_field`,
`duplicate_field`, `bad_multipart`, `bad_request`, `unsupported_media_type`, `prepare_failed`),
401 `unauthorized`, 404 `not_found`, 405 `method_not_allowed`, 413 `body_too_large` /
`too_large` (pixels), 502 `fetch_failed` (object storage did not answer), 503 `oom`, 500
`render_failed` / `internal`. Serve itself answers 503 when `max_queued_requests` overflow and
408 after `http_options.request_timeout_s`.

Decisions:
- One deployment, `DTCServer`, with a plain `__call__(Request)`: three routes do not need
  FastAPI, whose own 422 bodies would sit between us and the error contract. Multipart bodies
  are parsed by Starlette's `request.form()` on python-multipart (pinned in pyproject.toml),
  with our limits: the body is bounded while it streams in (`http.BoundedReceive`), plain
  fields at 64 KiB, no more parts than there are fields; images must come as file parts.
- The model loads in `__init__`: Serve routes no request to a replica before its constructor
  returns, so no request ever waits on a load, an autoscaled replica only takes traffic once it
  can render, and a bad `model_uri` fails the deploy instead of crash-looping a replica. The
  price: DESIGN's "/healthz 503 before the model is loaded" shows up as Serve's wait/408 while
  no replica is up yet. Loading in a background thread would answer 503, but Serve would then
  route renders to replicas still loading (for minutes after a scale-up with sd15 weights).
- `app_builder` checks the checkpoint before binding: `serve run` then ends at once with one
  line naming the problem and exit code 1 (a `click.ClickException`, which the `serve` CLI
  prints as `Error: ...`); a failure after Serve has started makes `serve run` print pages
  and exit 0. For `serve run` against a remote cluster, a local `model_uri` must exist where
  the CLI runs too (s3:// URIs are checked the same from anywhere).
- Batching: `@serve.batch` collects requests; each (steps, guidance_scale) group of a batch is
  ONE `Renderer.render` call with those as arguments (the job's batched call: CFG as 2B,
  per-pair generators, so a pair's pixels do not depend on its batch-mates beyond 1 uint8
  level). If a group's call fails, its members are rendered one by one, so only the culprit
  fails; a device fault fails the group at once and marks the replica broken.
- Variants: a request with `variants` N adds N render rows to its group's one model call (seeds
  `rows.variant_seeds(seed, N)`, `seed` first), laid out by the render stage's `rows.VariantRows`,
  as the render job's `--variants` rides in its batches; each request's renders are scored and
  the best kept by `model.identity.best_variants`, the render stage's own rule (identity score,
  the first of equals), so the online answer is the batch job's chosen image. X-Seed stays the
  request's seed; X-Variant-Seeds names the rest.
- Per-pair preparation is the batch job's own `prepare_pair` (fetch under the allowlist,
  decode, region, model inputs and hint), and the paste-back is `compose.postprocess` with
  RenderConfig's crop margin and feather: online and batch renders of a pair agree.
- Decode/preprocess and paste-back/encode run in the default thread pool, the model in its
  own single thread: the event loop keeps accepting requests (which form the next batch)
  while the model runs, and torch only ever runs in one thread.
- Default seed: with `pair_id`, `rows.stable_seed(pair_id)`, the batch job's default, so an
  online render of a catalog pair reproduces the batch seed; without, a stable hash of the
  request's content (context, product, mask bytes or bbox), so the same request gives the same
  bytes whether sent as files or URIs. X-Seed returns it.
- The token protects everything but /healthz (load balancers probe without credentials); it
  comes from `api_token` or, better outside tests, from the env var named by `api_token_env`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import click
import numpy as np
from pydantic import ValidationError
from ray import serve
from ray.serve import Application
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pipeline.compose import postprocess
from pipeline.images import encode_image
from pipeline.model.checkpoint import CheckpointError, check_model_checkpoint, model_digest
from pipeline.payload import MODEL_INPUT_SPECS
from pipeline.rows import VariantRows
from pipeline.schema import RowError
from pipeline.serve.args import RENDER_DEFAULTS, ServeArgs
from pipeline.serve.http import CONTENT_TYPES, ApiError, RenderRequest, error_response, parse_request, request_seed
from pipeline.stages.prepare_stage import PrepareConfig, prepare_pair

__all__ = ["ServeSetupError", "DTCServer", "app_builder"]

# "ray.serve" so these lines land in the replica's Serve log with its replica id.
log = logging.getLogger("ray.serve")


class ServeSetupError(click.ClickException):
    """The app cannot be built: bad args or model. A ClickException, so the `serve` CLI prints
    its one line (`Error: ...`) and exits 1; anywhere else an ordinary exception."""


@dataclass
class Job:
    """A prepared request: the model's inputs, what the paste-back needs, and the options.
    (Not the PreparedPair itself: its encoded uploads are not needed past the seed.)"""

    model: dict  # compose.preprocess: context, hole, product, product_alpha, hint, hint_mask, crop_box
    context: np.ndarray  # H x W x 3, the whole photo
    hole: np.ndarray  # H x W bool
    seed: int
    steps: int
    guidance_scale: float
    variants: int  # renders of the pair in the model call, seeds rows.variant_seeds(seed, variants)
    image_format: str
    pair_id: str | None


@dataclass
class Rendered:
    image: np.ndarray | None = None  # R x R x 3 uint8, the chosen variant
    error: ApiError | None = None
    batch_size: int = 0  # requests that shared the model call
    render_ms: float = 0.0  # wall time of that model call
    seeds: list[int] | None = None  # every variant's seed, the request's own first
    scores: list[float] | None = None  # every variant's identity score
    chosen: int = 0  # the variant answered


@serve.deployment(name="DTCServer")
class DTCServer:
    def __init__(self, args: ServeArgs):
        import ray

        from pipeline.model.renderer import Renderer

        # 1. settings, token, allowlist
        self.args = args
        self._token = self._api_token(args)
        self.policy = args.input_policy()  # only the allow_roots given; refusals name Serve's arguments
        # 2. the model, in the one thread that will ever run it. The device follows what Ray
        # gave this replica (a config file may override num_gpus), not a guess.
        device = "cuda" if ray.get_gpu_ids() else "cpu"
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dtc-model")
        self.renderer = self._model_thread.submit(
            Renderer.from_pretrained,
            args.model_uri,
            device=device,
            scheduler=args.scheduler,
            torch_threads=args.torch_threads,
        ).result()
        self.model_digest = model_digest(args.model_uri)
        self.prepare_config = PrepareConfig(
            self.policy,
            self.renderer.resolution,
            self.renderer.product_size,
            max_pixels=args.max_pixels,
            crop_margin=RENDER_DEFAULTS.crop_margin,
        )
        # 3. batching from the args (the decorator's numbers are placeholders)
        self._render_batch.set_max_batch_size(args.max_batch_size)
        self._render_batch.set_batch_wait_timeout_s(args.batch_wait_timeout_s)
        # 4. counters for /v1/stats; `broken` is set by an error that leaves the model unusable
        self.requests, self.rendered, self.variants_rendered = 0, 0, 0
        self.batch_sizes: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.broken: str | None = None
        log.info("DTCServer ready: model %s (%s) on %s", args.model_uri, self.model_digest[:12], device)

    @staticmethod
    def _api_token(args: ServeArgs) -> bytes | None:
        if args.api_token_env:
            value = os.environ.get(args.api_token_env)
            if not value:  # fail the deploy rather than serve without the auth someone asked for
                raise RuntimeError(
                    f"api_token_env={args.api_token_env} but that environment variable is empty or unset"
                )
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
            return error_response(e)
        except Exception as e:  # noqa: BLE001 - one bad request must never take the replica down
            log.exception("unexpected error on %s %s", request.method, path)
            self.errors["internal"] += 1
            return error_response(ApiError(500, "internal", f"{type(e).__name__}: {e}"[:500]))

    @staticmethod
    def _method(request: Request, *allowed: str) -> None:
        if request.method not in allowed:
            raise ApiError(
                405, "method_not_allowed", f"{request.url.path} takes {'/'.join(allowed)}, got {request.method}"
            )

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
        return JSONResponse({"status": "ok", "model_digest": self.model_digest, "device": self.renderer.device})

    def check_health(self) -> None:
        """Serve's periodic probe: a replica whose model is unusable is replaced."""
        if self.broken:
            raise RuntimeError(self.broken)

    def _stats(self) -> dict:
        return {
            "requests": self.requests,
            "rendered": self.rendered,
            "variants_rendered": self.variants_rendered,
            "model_calls": self.renderer.model_calls,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "errors": dict(self.errors),
            "model_digest": self.model_digest,
        }

    # 2. one request ---------------------------------------------------------------------------------

    async def _render(self, request: Request) -> Response:
        parsed = await parse_request(request, self.args, self.policy)
        try:
            job = await asyncio.to_thread(self._prepare, parsed)
        except RowError as e:
            raise ApiError.from_row_error(e) from e
        except Exception as e:  # a file no check foresaw fails its request, as prepare_failed fails a job's row
            log.exception("preparing a request failed")
            raise ApiError(400, "prepare_failed", f"{type(e).__name__}: {e}"[:500]) from e
        del parsed  # the uploads: the job holds decoded pixels only
        result: Rendered = await self._render_batch(job)
        if result.error is not None:
            raise result.error
        data = await asyncio.to_thread(self._finish, job, result.image)
        self.rendered += 1
        headers = {
            "X-Seed": str(job.seed),
            "X-Model-Digest": self.model_digest,
            "X-Render-Ms": f"{result.render_ms:.1f}",
            "X-Batch-Size": str(result.batch_size),
            "X-Identity-Score": f"{result.scores[result.chosen]:.2f}",
        }
        if job.variants > 1:
            headers["X-Variant-Seeds"] = ",".join(str(seed) for seed in result.seeds)
            headers["X-Variant-Scores"] = ",".join(f"{score:.2f}" for score in result.scores)
            headers["X-Chosen-Variant"] = str(result.chosen)
        if job.pair_id is not None:
            headers["X-Pair-Id"] = job.pair_id  # the name rule's charset: safe in a header
        return Response(data, media_type=CONTENT_TYPES[job.image_format], headers=headers)

    def _prepare(self, request: RenderRequest) -> Job:
        """Fetch (JSON requests), decode, region, model inputs: the batch job's per-pair path."""
        pair = prepare_pair(request.context, request.product, request.mask, request.bbox, self.prepare_config)
        return Job(
            pair.model,
            pair.context,
            pair.hole,
            seed=request_seed(request, pair.sources),
            steps=request.steps,
            guidance_scale=request.guidance_scale,
            variants=request.variants,
            image_format=request.image_format,
            pair_id=request.pair_id,
        )

    def _finish(self, job: Job, rendered: np.ndarray) -> bytes:
        final = postprocess(
            job.context, rendered, job.hole, job.model["crop_box"], feather_px=RENDER_DEFAULTS.feather_px
        )
        return encode_image(final, job.image_format, quality=self.args.jpeg_quality)

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
        except Exception as e:  # noqa: BLE001 - sorted out per request
            error = self._model_error(e, alone=len(members) == 1)
            for i in members:
                if error is None:  # alone, only the culprit fails
                    await self._render_group(jobs, [i], results)
                else:
                    results[i] = Rendered(error=error)
            return
        render_ms = (time.perf_counter() - start) * 1000
        self.batch_sizes[len(members)] += 1
        self.variants_rendered += sum(jobs[i].variants for i in members)
        for k, i in enumerate(members):
            rendered[k].batch_size, rendered[k].render_ms = len(members), render_ms
            results[i] = rendered[k]

    def _model_call(self, jobs: list[Job]) -> list[Rendered]:
        """The render job's batched call, with this group's steps and guidance: every variant of
        every request in it (request i's N_i rows one after the other), then each request's
        variants scored and the best kept by the render stage's rule (model thread only)."""
        from pipeline.model.identity import best_variants  # torch: in the replica only

        rows = VariantRows([job.seed for job in jobs], [job.variants for job in jobs])
        # each request's model inputs once per variant, in the order the render stage feeds them
        context, hole, product, product_alpha, hint, hint_mask = (
            rows.repeat(np.stack([job.model[c.key] for job in jobs])) for c in MODEL_INPUT_SPECS
        )
        rendered = self.renderer.render(
            context,
            hole,
            product,
            product_alpha,
            rows.seeds,
            steps=jobs[0].steps,
            guidance_scale=jobs[0].guidance_scale,
            hint=hint,
            hint_mask=hint_mask,
        )
        results: list[Rendered | None] = [None] * len(jobs)
        # best_variants takes N renders per pair: one encoder forward per distinct N of the group
        for n in sorted(set(rows.counts.tolist())):
            members = [i for i, job in enumerate(jobs) if job.variants == n]
            chosen, scores = best_variants(
                self.renderer.identity,
                rendered[rows.rows(members)],
                hole[rows.rows(members)],
                np.stack([jobs[i].model["product"] for i in members]),
                n,
            )
            for k, i in enumerate(members):
                best = int(chosen[k])
                image = rendered[rows.first[i] + best]
                seeds = rows.seeds[rows.rows(i)].tolist()
                results[i] = Rendered(image=image, seeds=seeds, scores=scores[k].tolist(), chosen=best)
        return results

    def _model_error(self, error: Exception, alone: bool) -> ApiError | None:
        """What a failed model call means for its requests; None: try them one by one."""
        renderer = self.renderer
        if renderer.is_device_fault(error):  # the CUDA context is poisoned: every later call fails too
            self.broken = f"CUDA error, replica needs replacing: {error}"[:500]
            log.error(self.broken)
            return ApiError(500, "render_failed", f"{type(error).__name__}: {error}"[:500])
        if renderer.is_out_of_memory(error):
            renderer.free_memory()
            if alone:
                return ApiError(
                    503,
                    "oom",
                    "the request does not fit in GPU memory even alone; retry later or send a smaller image",
                )
        if not alone:
            log.warning("a model call on a group failed (%s): rendering its requests one by one", error)
            return None
        log.error("render failed", exc_info=error)
        return ApiError(500, "render_failed", f"{type(error).__name__}: {error}"[:500])


def app_builder(args: dict) -> Application:
    """`serve run pipeline.serve:app_builder model_uri=DIR [key=value ...]` (see ServeArgs).

    Refuses bad args and a missing or malformed checkpoint here, before Serve starts anything
    (ServeSetupError, one line). The deployment options set here are defaults: a Serve config
    file's `deployments:` entry for DTCServer (infra/serve.yaml, the RayService) overrides them."""
    try:
        config = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args)
    except ValidationError as e:
        raise ServeSetupError(f"bad app arguments: {e}") from e
    # the replicas may run in another folder than `serve run`: local paths mean what they meant here
    local = {"model_uri": config.model_uri} if "://" not in config.model_uri else {}
    roots = [root if "://" in root else os.path.abspath(root) for root in config.allow_roots]
    config = config.model_copy(update={**{k: os.path.abspath(v) for k, v in local.items()}, "allow_roots": roots})
    try:
        check_model_checkpoint(config.model_uri)
    except CheckpointError as e:
        raise ServeSetupError(f"model_uri: {e}") from e
    return DTCServer.options(
        max_ongoing_requests=config.max_ongoing_requests or 2 * config.max_batch_size,
        max_queued_requests=config.max_queued_requests,
        ray_actor_options={"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
    ).bind(config)
