"""CPU stage after the model: paste back, encode, write the image, stamp the row.

Each rendered window is resized back to its place and blended into the full photo with a
feather that ramps inside the region only (pixels outside are the photo's, bit for bit:
`compose.postprocess`), encoded (JPEG/PNG/WebP), and written to `images/<pair_id>.<ext>`
*before* its manifest row exists (the driver writes rows after this stage), so a row never
points at a missing image. Reused rows get the earlier run's results (attempt 0); a backfill row
superseded by a later partition's row of its pair is `skipped`. Every row
leaves with its final output-manifest fields; payload columns are dropped. torch runs here
only inside the resize kernels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from pipeline import compose, images, storage
from pipeline.config import RENDER_DEFAULTS
from pipeline.output.layout import Layout
from pipeline.payload import RENDERED, VARIANT_RENDERS, Sizes, unpack_photo
from pipeline.resume import URI_COLUMNS, inputs_version
from pipeline.schema import (
    CARRIED_COLUMNS,
    EXTENSIONS,
    FAILED,
    OK,
    OUTPUT_FIELDS,
    PREV,
    REUSE,
    SKIPPED,
    STAGES,
    require_columns,
    set_columns,
)
from pipeline.stages import scene_stage

__all__ = ["FinishConfig", "finish_batch"]

# A row's results that a reused row takes from the earlier run's (PREV + name), beside status and
# output_uri: the rest of `schema.CARRIED_COLUMNS` but the timings and the CLIP score.
_RESULTS = (
    "error_code",
    "error_message",
    "width",
    "height",
    "crop_box",
    "identity_score",
    "variant_seeds",
    "variant_scores",
    "chosen_variant",
    "inputs_version",  # the last three computed here: the input files' versions, then a scene step's digests
    "context_digest",
    "pixels_digest",
)
_TYPES = {f.name: f.type for f in OUTPUT_FIELDS}


@dataclass(frozen=True)
class FinishConfig:
    """How renders become images, and the run's stamp on every row."""

    output: str  # the run's --output (images/ goes under it)
    run_id: str
    model_digest: str
    settings_digest: str
    resolution: int  # R: the rendered windows are R x R x 3
    steps: int
    guidance_scale: float
    scheduler: str
    image_format: str = RENDER_DEFAULTS.image_format  # jpeg | png | webp
    quality: int = RENDER_DEFAULTS.jpeg_quality  # JPEG/WebP quality
    feather_px: int = RENDER_DEFAULTS.feather_px  # paste-back ramp, inside the region only
    min_identity_score: float | None = None  # rows scoring below it get needs_review (None: none do)
    num_cpus: float = RENDER_DEFAULTS.cpu_stage_cpus
    batch_size: int = RENDER_DEFAULTS.batch_size

    def map_options(self) -> dict:
        return {"batch_size": self.batch_size, "num_cpus": self.num_cpus}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _write_image(
    batch: pa.Table, i: int, box: list[int], config: FinishConfig, layout: Layout, scene_id: str | None
) -> tuple[str, str | None, str | None]:
    """Row i's render pasted into its photo, encoded and written; returns the image's URI and,
    for a scene step, its context and pixels digests (its pixels also go, lossless, where the
    next step reads them). With kept variants (`variant_renders`), the ones not chosen go to
    variants/<pair_id>/<k>.<ext>."""
    sizes = Sizes(resolution=config.resolution)
    context, hole = unpack_photo(batch, i)
    rendered = RENDERED.unpack(batch[RENDERED.name][i].as_buffer(), sizes)
    final = compose.postprocess(context, rendered, hole, tuple(box), feather_px=config.feather_px)
    pair_id, ext = batch["pair_id"][i].as_py(), EXTENSIONS[config.image_format]
    uri = layout.image(pair_id, ext)
    storage.write_bytes(uri, images.encode_image(final, config.image_format, quality=config.quality))
    digests = None, None
    if scene_id is not None:
        pixels = np.asarray(final)
        storage.write_bytes(layout.scene_pixels(scene_id, pair_id), images.encode_image(pixels, "png"))
        digests = scene_stage.pixels_digest(context), scene_stage.pixels_digest(pixels)
    kept = batch[VARIANT_RENDERS.name][i]
    if kept.is_valid:
        renders = VARIANT_RENDERS.unpack(kept.as_buffer(), sizes, stacked=True)
        chosen = batch["chosen_variant"][i].as_py()
        for k in (k for k in range(len(renders)) if k != chosen):
            pixels = compose.postprocess(context, renders[k], hole, tuple(box), feather_px=config.feather_px)
            encoded = images.encode_image(pixels, config.image_format, quality=config.quality)
            storage.write_bytes(layout.variant_image(pair_id, k, ext), encoded)
    return (uri, *digests)


def finish_batch(batch: pa.Table, *, config: FinishConfig) -> pa.Table:
    """The stage (a `map_batches` function): every row leaves as its output-manifest row."""
    require_columns("finish", batch)
    layout, n = Layout(config.output), batch.num_rows
    col = {c: batch[c].to_pylist() for c in (*_RESULTS[:-3], "action", "render_ms")}
    col |= {c: [None] * n for c in _RESULTS[-3:]}
    uris = [batch[c].to_pylist() for c in URI_COLUMNS]
    prev = {c: batch[PREV + c].to_pylist() for c in CARRIED_COLUMNS}
    status, output_uri, finished_at = [FAILED] * n, [None] * n, [None] * n
    # attempts at rendering the pair in this run (> 1 after worker deaths)
    attempt = batch["render_attempts"].fill_null(1).to_pylist()
    clip_score = batch["clip_score"].to_pylist() if "clip_score" in batch.column_names else [None] * n
    render_ms, postprocess_ms = col["render_ms"], [0.0] * n
    scene_ids = batch["scene_id"].to_pylist() if "scene_id" in batch.column_names else [None] * n
    for i in range(n):
        if col["action"][i] == REUSE:  # carried from an earlier run: its results, attempt 0
            status[i], output_uri[i] = prev["status"][i], prev["output_uri"][i]
            for c in _RESULTS:
                col[c][i] = prev[c][i]
            render_ms[i], finished_at[i], attempt[i] = prev["render_ms"][i], prev["finished_at"][i], 0
            clip_score[i] = prev["clip_score"][i]
            continue
        if not col["error_code"][i]:
            start = time.perf_counter()
            # after the render (the files were read by the prepare stage): a file replaced while
            # its row rendered is recorded as the new one, and only --verify-inputs reads these
            col["inputs_version"][i] = inputs_version([u[i] for u in uris])
            written = _write_image(batch, i, col["crop_box"][i], config, layout, scene_ids[i])
            status[i], (output_uri[i], col["context_digest"][i], col["pixels_digest"][i]) = OK, written
            postprocess_ms[i] = (time.perf_counter() - start) * 1000
        elif col["error_code"][i] == "superseded":  # a later partition's row of this pair is rendered instead
            status[i], attempt[i] = SKIPPED, 0
        finished_at[i] = _now()
    batch = batch.drop_columns([c for c in STAGES["finish"].drops if c in batch.column_names])
    threshold = config.min_identity_score
    # `not s >= threshold`: a score that is not a number (a degenerate render) is held back too
    review = [None if s is None else bool(threshold is not None and not s >= threshold) for s in col["identity_score"]]
    return set_columns(
        batch,
        {
            "status": pa.array(status, pa.string()),
            "error_code": pa.array([c or None for c in col["error_code"]], pa.string()),
            "error_message": pa.array([m or None for m in col["error_message"]], pa.string()),
            "output_uri": pa.array(output_uri, pa.string()),
            **{c: pa.array(col[c], _TYPES[c]) for c in _RESULTS if c not in ("error_code", "error_message")},
            "needs_review": pa.array(review, pa.bool_()),
            "render_ms": pa.array(render_ms, pa.float64()),
            "finished_at": pa.array(finished_at, pa.string()),
            "attempt": pa.array(attempt, pa.int64()),
            "clip_score": pa.array(clip_score, pa.float64()),
            "run_id": pa.array([config.run_id] * n, pa.string()),
            "model_digest": pa.array([config.model_digest] * n, pa.string()),
            "settings_digest": pa.array([config.settings_digest] * n, pa.string()),
            "steps": pa.array([config.steps] * n, pa.int64()),
            "guidance_scale": pa.array([config.guidance_scale] * n, pa.float64()),
            "scheduler": pa.array([config.scheduler] * n, pa.string()),
            "postprocess_ms": pa.array(postprocess_ms, pa.float64()),
        },
    )
