"""CPU stage before the model: fetch + decode + preprocess, one pair at a time.

For each row to render: fetch the context, product and mask under the allowlist, decode
(EXIF orientation, pixel limit, alpha kept for products), build the region from the mask or
the bbox, and cut the model's inputs (square window around the region, resized to the
working resolution; product on grey at the image encoder's size; the hint, the product resized
from its full resolution into the largest rectangle inside the hole). A problem becomes the row's
`error_code`. `prepare_pair` is the per-pair path, and Serve calls it too: an online render
and a batch render of the same pair see the same pixels.

Payloads travel as raw uint8 bytes (shapes are known from `width`/`height` and the model's
sizes), never as PIL objects, and are empty for rows that are not rendered: `context_raw`
(H*W*3, the whole photo for the paste-back), `hole_bits` (np.packbits of the H*W region),
`model_context` (R*R*3), `model_hole` (R*R), `model_product` (S*S*3), `model_product_alpha`
(S*S), `model_hint` (R*R*3) and `model_hint_mask` (R*R), plus `width`, `height`, `crop_box` and
`prepare_ms` (this stage's time per row, summed into the run record; not an output-manifest
column). torch runs here only inside the resize kernels (`compose.resize_uint8`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline import compose, images, regions
from pipeline.fetch import InputPolicy, fetch
from pipeline.schema import PAYLOAD_COLUMNS, PAYLOAD_TYPE, PREV, RENDER, STAGES, RowError, require_columns, set_columns

__all__ = ["PrepareConfig", "PreparedPair", "prepare_pair", "payloads", "prepare_batch"]


@dataclass(frozen=True)
class PrepareConfig:
    """What the prepare stage needs: where inputs may come from and the model's sizes."""

    policy: InputPolicy  # the allowlist every fetched URI passes
    resolution: int  # the model's working resolution R
    product_size: int  # the image encoder's input size S
    max_pixels: int = 50_000_000  # images above this fail with too_large before being decoded
    crop_margin: float = 0.25  # the square window = region bbox grown by this fraction per side
    num_cpus: float = 0.5  # per task; fractional so stages overlap on small machines
    batch_size: int = 8  # rows per task call: the model's batch size

    def map_options(self) -> dict:
        return {"batch_size": self.batch_size, "num_cpus": self.num_cpus}


@dataclass
class PreparedPair:
    """One pair, decoded and cut for the model."""

    context: np.ndarray  # H x W x 3 uint8, the whole photo (the paste-back's base)
    hole: np.ndarray  # H x W bool, the region
    model: dict  # compose.preprocess: context, hole, product, product_alpha, hint, hint_mask, crop_box
    sources: tuple[bytes, bytes, bytes | None]  # the encoded context, product and mask read

    @property
    def width(self) -> int:
        return self.context.shape[1]

    @property
    def height(self) -> int:
        return self.context.shape[0]


def prepare_pair(
    context: bytes | str, product: bytes | str, mask: bytes | str | None, bbox, config: PrepareConfig
) -> PreparedPair:
    """Each input as its bytes (an upload) or a URI (fetched under `config.policy`); the region
    from the mask, else the bbox. Raises RowError for a bad pair."""
    context_bytes = _read(context, config.policy)
    photo = images.decode_image(context_bytes, max_pixels=config.max_pixels)
    height, width = photo.shape[:2]
    mask_bytes = None if mask is None else _read(mask, config.policy)
    hole = regions.region_of(mask_bytes, bbox, width, height, max_pixels=config.max_pixels)
    product_bytes = _read(product, config.policy)
    cutout = images.decode_image(product_bytes, max_pixels=config.max_pixels, keep_alpha=True, premultiply=True)
    model = compose.preprocess(photo, hole, cutout, config.resolution, config.product_size, margin=config.crop_margin)
    return PreparedPair(photo, hole, model, (context_bytes, product_bytes, mask_bytes))


def _read(source: bytes | str, policy: InputPolicy) -> bytes:
    return source if isinstance(source, bytes) else fetch(source, policy)


def _raw(array: np.ndarray) -> memoryview:
    """The array's bytes without a copy: pa.array copies each payload once, into the block."""
    return memoryview(np.ascontiguousarray(array)).cast("B")


def payloads(pair: PreparedPair) -> dict[str, memoryview]:
    model = pair.model
    return {
        "context_raw": _raw(pair.context),
        "hole_bits": _raw(np.packbits(pair.hole)),
        "model_context": _raw(model["context"]),
        "model_hole": _raw(model["hole"].view(np.uint8)),  # bool is one byte, 0 or 1
        "model_product": _raw(model["product"]),
        "model_product_alpha": _raw(model["product_alpha"].view(np.uint8)),
        "model_hint": _raw(model["hint"]),
        "model_hint_mask": _raw(model["hint_mask"].view(np.uint8)),
    }


def prepare_batch(batch: pa.Table, *, config: PrepareConfig) -> pa.Table:
    """The stage (a `map_batches` function): every row to render gets its payloads or its error."""
    require_columns("prepare", batch)
    n = batch.num_rows
    col = {c: batch[c].to_pylist() for c in STAGES["prepare"].requires}
    payload: dict[str, list] = {c: [b""] * n for c in PAYLOAD_COLUMNS}
    # reused rows keep the earlier run's sizes and window
    width, height, crop_box = (
        [None] * n if PREV + c not in batch.column_names else batch[PREV + c].to_pylist()
        for c in ("width", "height", "crop_box")
    )
    codes, messages = col["error_code"], col["error_message"]
    prepare_ms = [0.0] * n
    for i in range(n):
        if col["action"][i] != RENDER or codes[i]:
            continue
        start = time.perf_counter()
        try:
            pair = prepare_pair(
                col["context_uri"][i], col["product_uri"][i], col["mask_uri"][i], col["bbox"][i], config
            )
        except RowError as e:
            codes[i], messages[i] = e.code, e.message
            continue
        except Exception as e:  # noqa: BLE001 - a file no check foresaw must fail its row, not the job
            codes[i], messages[i] = "prepare_failed", f"{type(e).__name__}: {e}"[:500]
            continue
        finally:
            prepare_ms[i] = (time.perf_counter() - start) * 1000
        for c, value in payloads(pair).items():
            payload[c][i] = value
        width[i], height[i], crop_box[i] = pair.width, pair.height, list(pair.model["crop_box"])
    columns = {c: pa.array(v, PAYLOAD_TYPE) for c, v in payload.items()}
    columns.update(
        error_code=pa.array(codes, pa.string()),
        error_message=pa.array(messages, pa.string()),
        width=pa.array(width, pa.int64()),
        height=pa.array(height, pa.int64()),
        crop_box=pa.array(crop_box, pa.list_(pa.int64())),
        prepare_ms=pa.array(prepare_ms, pa.float64()),
    )
    return set_columns(batch, columns)
