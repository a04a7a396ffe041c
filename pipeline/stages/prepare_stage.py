"""CPU stage before the model: fetch + decode + preprocess, one pair at a time.

For each row to render: fetch the context, product and mask under the allowlist, decode
(EXIF orientation, pixel limit, alpha kept for products), build the region from the mask or
the bbox, and cut the model's inputs (square window around the region, resized to the
working resolution; product on grey at the image encoder's size; the hint, the product resized
from its full resolution into the largest rectangle inside the hole). A problem becomes the row's
`error_code`. `prepare_pair` is the per-pair path, and Serve calls it too: an online render
and a batch render of the same pair see the same pixels.

The payloads (`pipeline.payload`: raw uint8 bytes, one spec per column, empty for rows that are
not rendered) are the whole photo and its region for the paste-back and the model's six inputs,
plus `width`, `height`, `crop_box` and `prepare_ms` (this stage's time per row, summed into the
run record; not an output-manifest column). torch runs here only inside the resize kernels
(`compose.resize_uint8`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline import compose, images, regions
from pipeline.config import RENDER_DEFAULTS
from pipeline.fetch import InputPolicy, fetch
from pipeline.payload import PAYLOAD_COLUMNS, PAYLOAD_TYPE, pack_pair
from pipeline.schema import PREV, RENDER, STAGES, RowError, require_columns, set_columns
from pipeline.stages import scene_stage

__all__ = ["PrepareConfig", "PreparedPair", "prepare_pair", "prepare_into", "step_columns", "prepare_batch"]


@dataclass(frozen=True)
class PrepareConfig:
    """What the prepare stage needs: where inputs may come from and the model's sizes."""

    policy: InputPolicy  # the allowlist every fetched URI passes
    resolution: int  # the model's working resolution R
    product_size: int  # the image encoder's input size S
    max_pixels: int = RENDER_DEFAULTS.max_pixels  # images above this fail with too_large before being decoded
    crop_margin: float = RENDER_DEFAULTS.crop_margin  # the square window = region bbox grown by this fraction per side
    num_cpus: float = RENDER_DEFAULTS.cpu_stage_cpus  # per task; fractional so stages overlap on small machines
    batch_size: int = RENDER_DEFAULTS.batch_size  # rows per task call: the model's batch size

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

    def payloads(self) -> dict[str, memoryview]:
        """The pair's payload columns (`pipeline.payload`)."""
        return pack_pair(self.context, self.hole, self.model)


def prepare_pair(
    context: bytes | str, product: bytes | str, mask: bytes | str | None, bbox, config: PrepareConfig
) -> PreparedPair:
    """Each input as its bytes (an upload) or a URI (fetched under `config.policy`); the region
    from the mask, else the bbox. Raises RowError for a bad pair."""
    context_bytes = _read(context, config.policy)
    photo = images.decode_image(context_bytes, max_pixels=config.max_pixels)
    mask_bytes = None if mask is None else _read(mask, config.policy)
    product_bytes = _read(product, config.policy)
    pair = prepare_into(photo, product_bytes, mask_bytes, bbox, config)
    pair.sources = (context_bytes, product_bytes, mask_bytes)
    return pair


def prepare_into(
    photo: np.ndarray, product: bytes, mask: bytes | None, bbox, config: PrepareConfig, *, cut: bool = True
) -> PreparedPair:
    """A pair whose photo is already pixels: a decoded photo, or a scene's previous step
    (`stages.scene_stage`). `cut=False` checks the region and the product without cutting the
    model's inputs (a later scene step, whose photo is not rendered yet). Raises RowError."""
    height, width = photo.shape[:2]
    hole = regions.region_of(mask, bbox, width, height, max_pixels=config.max_pixels)
    cutout = images.decode_image(product, max_pixels=config.max_pixels, keep_alpha=True, premultiply=True)
    if not cut:
        return PreparedPair(photo, hole, {}, (b"", product, mask))
    model = compose.preprocess(photo, hole, cutout, config.resolution, config.product_size, margin=config.crop_margin)
    return PreparedPair(photo, hole, model, (b"", product, mask))


def _read(source: bytes | str, policy: InputPolicy) -> bytes:
    return source if isinstance(source, bytes) else fetch(source, policy)


def step_columns(photo: np.ndarray, product: bytes, mask: bytes | None, bbox, config: PrepareConfig) -> dict:
    """A later scene step's columns (one row) as `prepare_batch` gives a pair's, cut from the
    previous step's pixels `photo` (the render stage calls it between steps). Raises RowError."""
    start = time.perf_counter()
    pair = prepare_into(photo, product, mask, bbox, config)
    columns = {c: pa.array([value], PAYLOAD_TYPE) for c, value in pair.payloads().items()}
    return columns | {
        "width": pa.array([pair.width], pa.int64()),
        "height": pa.array([pair.height], pa.int64()),
        "crop_box": pa.array([list(pair.model["crop_box"])], pa.list_(pa.int64())),
        "prepare_ms": pa.array([(time.perf_counter() - start) * 1000], pa.float64()),
    }


def _column(batch: pa.Table, name: str, n: int) -> list:
    return batch[name].to_pylist() if name in batch.column_names else [None] * n


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
    # a scene's first step to render, and the steps after it (stages.scene_stage)
    scene_context = _column(batch, scene_stage.SCENE_CONTEXT, n)
    rest = _column(batch, scene_stage.SCENE_REST, n)
    for i in range(n):
        if col["action"][i] != RENDER or codes[i]:
            continue
        start = time.perf_counter()
        try:
            context = col["context_uri"][i]
            if scene_context[i] is not None:  # rendered into the previous step's lossless pixels
                context = scene_stage.read_scene_context(scene_context[i])
            pair = prepare_pair(context, col["product_uri"][i], col["mask_uri"][i], col["bbox"][i], config)
            if rest[i] is not None:
                rest[i] = scene_stage.prepare_rest(
                    rest[i],
                    pair.context,
                    lambda photo, product, mask, bbox: prepare_into(photo, product, mask, bbox, config, cut=False),
                    lambda uri: fetch(uri, config.policy),
                )
        except RowError as e:
            codes[i], messages[i] = e.code, e.message
            continue
        except Exception as e:  # noqa: BLE001 - a file no check foresaw must fail its row, not the job
            codes[i], messages[i] = "prepare_failed", f"{type(e).__name__}: {e}"[:500]
            continue
        finally:
            prepare_ms[i] = (time.perf_counter() - start) * 1000
        for c, value in pair.payloads().items():
            payload[c][i] = value
        width[i], height[i], crop_box[i] = pair.width, pair.height, list(pair.model["crop_box"])
    columns = {c: pa.array(v, PAYLOAD_TYPE) for c, v in payload.items()}
    if scene_stage.SCENE_REST in batch.column_names:
        columns[scene_stage.SCENE_REST] = pa.array(rest, pa.large_binary())
    columns.update(
        error_code=pa.array(codes, pa.string()),
        error_message=pa.array(messages, pa.string()),
        width=pa.array(width, pa.int64()),
        height=pa.array(height, pa.int64()),
        crop_box=pa.array(crop_box, pa.list_(pa.int64())),
        prepare_ms=pa.array(prepare_ms, pa.float64()),
    )
    return set_columns(batch, columns)
