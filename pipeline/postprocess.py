"""CPU stage after the model: paste back, encode, write the image, stamp the row. No torch.

Each rendered crop is resized back to its window and blended into the full photo with a
feather that ramps inside the region only (pixels outside are the photo's, bit for bit),
encoded (JPEG/PNG/WebP), and written to `images/<pair_id>.<ext>` *before* its manifest row
exists (the driver writes rows after this stage), so a row never points at a missing image.
Every row leaves with its final output-manifest fields; payload columns are dropped.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from pipeline import images, storage
from pipeline.blocks import set_columns
from pipeline.prepare import PAYLOAD_COLUMNS
from pipeline.resume import CARRIED_COLUMNS
from pipeline.state import Layout

__all__ = ["finish_batch"]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def finish_batch(
    batch: pa.Table, *, output: str, image_format: str, quality: int, feather_px: int, resolution: int,
    run_id: str, model_digest: str, settings_digest: str, steps: int, guidance_scale: float, scheduler: str,
) -> pa.Table:
    layout = Layout(output)
    n = batch.num_rows
    col = {c: batch[c].to_pylist() for c in ("pair_id", "action", "error_code", "error_message", "width", "height", "crop_box", "render_ms")}
    prev = {c: batch[f"prev_{c}"].to_pylist() for c in CARRIED_COLUMNS}
    status, output_uri, finished_at = ["failed"] * n, [None] * n, [None] * n
    # attempts at rendering the pair in this run (> 1 after worker deaths)
    attempt = batch["render_attempts"].to_pylist() if "render_attempts" in batch.column_names else [1] * n
    clip_score = batch["clip_score"].to_pylist() if "clip_score" in batch.column_names else [None] * n
    codes, messages, render_ms = col["error_code"], col["error_message"], col["render_ms"]
    width, height, crop_box = col["width"], col["height"], col["crop_box"]
    postprocess_ms = [0.0] * n
    for i in range(n):
        if col["action"][i] == "reuse":  # carried from an earlier run: its results, attempt 0
            status[i], output_uri[i] = prev["status"][i], prev["output_uri"][i]
            codes[i], messages[i] = prev["error_code"][i], prev["error_message"][i]
            width[i], height[i], crop_box[i] = prev["width"][i], prev["height"][i], prev["crop_box"][i]
            render_ms[i], finished_at[i], attempt[i] = prev["render_ms"][i], prev["finished_at"][i], 0
            clip_score[i] = prev["clip_score"][i]
            continue
        if not codes[i]:
            start = time.perf_counter()
            h, w = height[i], width[i]
            # as_buffer(): views of the block's memory; as_py() would copy each photo once more
            context = np.frombuffer(batch["context_raw"][i].as_buffer(), dtype=np.uint8).reshape(h, w, 3)
            hole_bits = np.frombuffer(batch["hole_bits"][i].as_buffer(), dtype=np.uint8)
            hole = np.unpackbits(hole_bits, count=h * w).reshape(h, w).view(bool)
            rendered = np.frombuffer(batch["rendered"][i].as_buffer(), dtype=np.uint8).reshape(resolution, resolution, 3)
            final = images.postprocess(context, rendered, hole, tuple(crop_box[i]), feather_px=feather_px)
            uri = layout.image(col["pair_id"][i], images.EXTENSIONS[image_format])
            storage.write_bytes(uri, images.encode_image(final, image_format, quality=quality))
            status[i], output_uri[i] = "ok", uri
            postprocess_ms[i] = (time.perf_counter() - start) * 1000
        finished_at[i] = _now()
    batch = batch.drop_columns(
        [c for c in batch.column_names if c in (*PAYLOAD_COLUMNS, "rendered", "action", "render_attempts") or c.startswith("prev_")]
    )
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
            "run_id": pa.array([run_id] * n, pa.string()),
            "model_digest": pa.array([model_digest] * n, pa.string()),
            "settings_digest": pa.array([settings_digest] * n, pa.string()),
            "steps": pa.array([steps] * n, pa.int64()),
            "guidance_scale": pa.array([guidance_scale] * n, pa.float64()),
            "scheduler": pa.array([scheduler] * n, pa.string()),
            "postprocess_ms": pa.array(postprocess_ms, pa.float64()),
        },
    )
