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
from pipeline.output.layout import Layout
from pipeline.schema import (
    CARRIED_COLUMNS,
    EXTENSIONS,
    FAILED,
    OK,
    PREV,
    REUSE,
    SKIPPED,
    STAGES,
    require_columns,
    set_columns,
)

__all__ = ["FinishConfig", "finish_batch"]


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
    image_format: str = "jpeg"  # jpeg | png | webp
    quality: int = 92  # JPEG/WebP quality
    feather_px: int = 4  # paste-back ramp, inside the region only
    num_cpus: float = 0.5
    batch_size: int = 8

    def map_options(self) -> dict:
        return {"batch_size": self.batch_size, "num_cpus": self.num_cpus}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _write_image(batch: pa.Table, i: int, box: list[int], config: FinishConfig, layout: Layout) -> str:
    """Row i's render pasted into its photo, encoded and written; returns the image's URI."""
    h, w, r = batch["height"][i].as_py(), batch["width"][i].as_py(), config.resolution
    # as_buffer(): views of the block's memory; as_py() would copy each photo once more
    context = np.frombuffer(batch["context_raw"][i].as_buffer(), dtype=np.uint8).reshape(h, w, 3)
    hole_bits = np.frombuffer(batch["hole_bits"][i].as_buffer(), dtype=np.uint8)
    hole = np.unpackbits(hole_bits, count=h * w).reshape(h, w).view(bool)
    rendered = np.frombuffer(batch["rendered"][i].as_buffer(), dtype=np.uint8).reshape(r, r, 3)
    final = compose.postprocess(context, rendered, hole, tuple(box), feather_px=config.feather_px)
    uri = layout.image(batch["pair_id"][i].as_py(), EXTENSIONS[config.image_format])
    storage.write_bytes(uri, images.encode_image(final, config.image_format, quality=config.quality))
    return uri


def finish_batch(batch: pa.Table, *, config: FinishConfig) -> pa.Table:
    """The stage (a `map_batches` function): every row leaves as its output-manifest row."""
    require_columns("finish", batch)
    layout, n = Layout(config.output), batch.num_rows
    col = {
        c: batch[c].to_pylist()
        for c in ("action", "error_code", "error_message", "width", "height", "crop_box", "render_ms")
    }
    prev = {c: batch[PREV + c].to_pylist() for c in CARRIED_COLUMNS}
    status, output_uri, finished_at = [FAILED] * n, [None] * n, [None] * n
    # attempts at rendering the pair in this run (> 1 after worker deaths)
    attempt = batch["render_attempts"].to_pylist() if "render_attempts" in batch.column_names else [1] * n
    clip_score = batch["clip_score"].to_pylist() if "clip_score" in batch.column_names else [None] * n
    codes, messages, render_ms = col["error_code"], col["error_message"], col["render_ms"]
    width, height, crop_box = col["width"], col["height"], col["crop_box"]
    postprocess_ms = [0.0] * n
    for i in range(n):
        if col["action"][i] == REUSE:  # carried from an earlier run: its results, attempt 0
            status[i], output_uri[i] = prev["status"][i], prev["output_uri"][i]
            codes[i], messages[i] = prev["error_code"][i], prev["error_message"][i]
            width[i], height[i], crop_box[i] = prev["width"][i], prev["height"][i], prev["crop_box"][i]
            render_ms[i], finished_at[i], attempt[i] = prev["render_ms"][i], prev["finished_at"][i], 0
            clip_score[i] = prev["clip_score"][i]
            continue
        if not codes[i]:
            start = time.perf_counter()
            status[i], output_uri[i] = OK, _write_image(batch, i, crop_box[i], config, layout)
            postprocess_ms[i] = (time.perf_counter() - start) * 1000
        elif codes[i] == "superseded":  # a later partition's row of this pair is rendered instead
            status[i], attempt[i] = SKIPPED, 0
        finished_at[i] = _now()
    batch = batch.drop_columns([c for c in STAGES["finish"].drops if c in batch.column_names])
    return set_columns(
        batch,
        {
            "status": pa.array(status, pa.string()),
            "error_code": pa.array([c or None for c in codes], pa.string()),
            "error_message": pa.array([m or None for m in messages], pa.string()),
            "output_uri": pa.array(output_uri, pa.string()),
            "width": pa.array(width, pa.int64()),
            "height": pa.array(height, pa.int64()),
            "crop_box": pa.array(crop_box, pa.list_(pa.int64())),
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
