"""CPU stage before the model: fetch + decode + preprocess, one pair at a time. No torch.

For each row to render: fetch the context, product and mask under the allowlist, decode
(EXIF orientation, pixel limit, alpha kept for products), build the region from the mask or
the bbox, and cut the model's inputs (square window around the region, resized to the
working resolution; product on grey at 224). A problem becomes the row's `error_code`.

Payloads travel as raw uint8 bytes (shapes are known from `width`/`height` and the model's
sizes; `prepare_pair` returns them as memoryviews of its arrays), never as PIL objects, and are
empty for rows that are not rendered:
`context_raw` (H*W*3, the whole photo for the paste-back), `hole_bits` (np.packbits of the
H*W region), `model_context` (R*R*3), `model_hole` (R*R), `model_product` (S*S*3),
`model_product_alpha` (S*S), plus `width`, `height`, `crop_box` and `prepare_ms` (this
stage's time per row, summed into the run record; not an output-manifest column).
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from pipeline import images
from pipeline.blocks import PAYLOAD_TYPE, set_columns
from pipeline.fetch import InputPolicy, fetch
from pipeline.images import RowError

__all__ = ["prepare_batch", "REQUIRED_COLUMNS", "PAYLOAD_COLUMNS"]

REQUIRED_COLUMNS = ("pair_id", "context_uri", "product_uri", "mask_uri", "bbox", "error_code", "error_message", "action")
PAYLOAD_COLUMNS = ("context_raw", "hole_bits", "model_context", "model_hole", "model_product", "model_product_alpha")


def _region(row_mask_uri, row_bbox, width: int, height: int, policy: InputPolicy, max_pixels: int) -> np.ndarray:
    if row_mask_uri:
        hole = images.decode_mask(fetch(row_mask_uri, policy), max_pixels=max_pixels)
        images.check_region(hole, width, height)
        return hole
    return images.region_from_bbox(list(row_bbox), width, height)


def _raw(array: np.ndarray) -> memoryview:
    """The array's bytes without a copy: pa.array copies each payload once, into the block."""
    return memoryview(np.ascontiguousarray(array)).cast("B")


def prepare_pair(
    context_uri: str, product_uri: str, mask_uri: str | None, bbox, *, policy: InputPolicy,
    resolution: int, product_size: int, max_pixels: int, crop_margin: float,
) -> dict:
    """One pair's payload columns (see the module docstring); raises RowError."""
    context = images.decode_image(fetch(context_uri, policy), max_pixels=max_pixels)
    height, width = context.shape[:2]
    hole = _region(mask_uri, bbox, width, height, policy, max_pixels)
    product = images.decode_image(fetch(product_uri, policy), max_pixels=max_pixels, keep_alpha=True, premultiply=True)
    model = images.preprocess(context, hole, product, resolution, product_size, margin=crop_margin)
    return {
        "context_raw": _raw(context),
        "hole_bits": _raw(np.packbits(hole)),
        "model_context": _raw(model["context"]),
        "model_hole": _raw(model["hole"].view(np.uint8)),  # bool is one byte, 0 or 1
        "model_product": _raw(model["product"]),
        "model_product_alpha": _raw(model["product_alpha"].view(np.uint8)),
        "width": width,
        "height": height,
        "crop_box": list(model["crop_box"]),
    }


def prepare_batch(
    batch: pa.Table, *, policy: InputPolicy, resolution: int, product_size: int, max_pixels: int, crop_margin: float,
) -> pa.Table:
    missing = [c for c in REQUIRED_COLUMNS if c not in batch.column_names]
    if missing:
        raise KeyError(f"prepare: batch lacks columns {missing}")
    n = batch.num_rows
    col = {c: batch[c].to_pylist() for c in REQUIRED_COLUMNS}
    payload: dict[str, list] = {c: [b""] * n for c in PAYLOAD_COLUMNS}
    width = batch["prev_width"].to_pylist() if "prev_width" in batch.column_names else [None] * n
    height = batch["prev_height"].to_pylist() if "prev_height" in batch.column_names else [None] * n
    crop_box = batch["prev_crop_box"].to_pylist() if "prev_crop_box" in batch.column_names else [None] * n
    codes, messages = col["error_code"], col["error_message"]
    prepare_ms = [0.0] * n
    for i in range(n):
        if col["action"][i] != "render" or codes[i]:
            continue
        start = time.perf_counter()
        try:
            row = prepare_pair(
                col["context_uri"][i], col["product_uri"][i], col["mask_uri"][i], col["bbox"][i],
                policy=policy, resolution=resolution, product_size=product_size,
                max_pixels=max_pixels, crop_margin=crop_margin,
            )
        except RowError as e:
            codes[i], messages[i] = e.code, e.message
            continue
        except Exception as e:  # noqa: BLE001 - a file no check foresaw must fail its row, not the job
            codes[i], messages[i] = "prepare_failed", f"{type(e).__name__}: {e}"[:500]
            continue
        finally:
            prepare_ms[i] = (time.perf_counter() - start) * 1000
        for c in PAYLOAD_COLUMNS:
            payload[c][i] = row[c]
        width[i], height[i], crop_box[i] = row["width"], row["height"], row["crop_box"]
    columns = {c: pa.array(v, PAYLOAD_TYPE) for c, v in payload.items()}
    columns.update(
        error_code=pa.array(codes, pa.string()), error_message=pa.array(messages, pa.string()),
        width=pa.array(width, pa.int64()), height=pa.array(height, pa.int64()),
        crop_box=pa.array(crop_box, pa.list_(pa.int64())), prepare_ms=pa.array(prepare_ms, pa.float64()),
    )
    return set_columns(batch, columns)
