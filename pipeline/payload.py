"""The bytes between stages: one spec per payload column, with its pack and unpack. Driver-safe.

    columns = pack_pair(pair.context, pair.hole, pair.model)          # prepare stage
    context, hole = unpack_photo(block, i)                            # finish stage, scene steps
    hole = MODEL_HOLE.unpack(data, Sizes(resolution, product_size))   # render stage

Payloads travel as raw uint8 bytes in `PAYLOAD_TYPE` columns, never as PIL objects or pickles,
and are empty for rows that are not rendered. A column's shape comes from the run's sizes: the
row's photo (`height` x `width`, columns of the block), the model's working resolution R, or the
image encoder's input size S. Its kind says how its pixels are stored: `image` H x W x 3 uint8;
`mask` bool, one byte (0 or 1) per pixel; `bits` bool, packed 8 pixels a byte (`np.packbits`).

    column               frame     kind    written by   read by
    context_raw          photo     image   prepare      finish, scene steps (the paste-back's base)
    hole_bits            photo     bits    prepare      finish, scene steps (the region)
    model_context        R         image   prepare      render (the square window around the region)
    model_hole           R         mask    prepare      render
    model_product        S         image   prepare      render (the product on grey)
    model_product_alpha  S         mask    prepare      render
    model_hint           R         image   prepare      render (the product inside the hole)
    model_hint_mask      R         mask    prepare      render
    box_hole, box_hint,  R         as model_hole, model_hint, model_hint_mask: the training prepare
      box_hint_mask                stage's bounding-box region (`train.dataset`, read by `train.samples`)
    rendered             R         image   render       finish, scene steps (the chosen variant)
    variant_renders      R         image   render       finish (every variant, N stacked: --keep-variants)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

__all__ = [
    "PAYLOAD_TYPE",
    "Sizes",
    "PayloadColumn",
    "CONTEXT_RAW",
    "HOLE_BITS",
    "MODEL_INPUT_SPECS",
    "RENDERED",
    "VARIANT_RENDERS",
    "BOX_SPECS",
    "SPECS",
    "PAYLOAD_COLUMNS",
    "MODEL_INPUTS",
    "pack_pair",
    "unpack_photo",
]

PAYLOAD_TYPE = pa.large_binary()  # raw uint8 image bytes; 64-bit offsets: a block of photos can pass 2 GiB
IMAGE, MASK, BITS = "image", "mask", "bits"


@dataclass(frozen=True)
class Sizes:
    """The sizes a payload's shape comes from: the run's model sizes and, for the photo
    columns, the row's photo (a reader gives those its columns need)."""

    resolution: int = 0  # R: the model's working resolution
    product_size: int = 0  # S: the image encoder's input size
    height: int = 0  # the row's photo
    width: int = 0


@dataclass(frozen=True)
class PayloadColumn:
    name: str
    frame: str  # whose height x width: "photo" (the row's), "model" (R x R) or "product" (S x S)
    kind: str  # IMAGE (x 3 uint8), MASK (bool, a byte per pixel) or BITS (bool, 8 pixels a byte)
    key: str | None = None  # its array in compose.preprocess's dict (the model inputs)

    def shape(self, sizes: Sizes) -> tuple[int, ...]:
        side = {
            "photo": (sizes.height, sizes.width),
            "model": (sizes.resolution, sizes.resolution),
            "product": (sizes.product_size, sizes.product_size),
        }[self.frame]
        return (*side, 3) if self.kind == IMAGE else side

    @property
    def dtype(self) -> type:
        """What `unpack` gives: uint8 pixels, or a bool region."""
        return np.uint8 if self.kind == IMAGE else np.bool_

    def pack(self, array: np.ndarray) -> memoryview:
        """The array's bytes (a stack of them too), without a copy where it is contiguous:
        pa.array copies each payload once, into the block."""
        if self.kind == BITS:
            array = np.packbits(array)
        elif self.kind == MASK:
            array = array.view(np.uint8)  # bool is one byte, 0 or 1
        return memoryview(np.ascontiguousarray(array)).cast("B")

    def unpack(self, data, sizes: Sizes, stacked: bool = False) -> np.ndarray:
        """`data` (bytes or an Arrow buffer) back as the array; a view of it, no copy (but
        BITS, unpacked). `stacked`: several arrays one after the other (variant_renders)."""
        shape = self.shape(sizes)
        raw = np.frombuffer(data, dtype=np.uint8)
        if self.kind == BITS:
            return np.unpackbits(raw, count=math.prod(shape)).reshape(shape).view(bool)
        array = raw.reshape((-1, *shape) if stacked else shape)
        return array.view(bool) if self.kind == MASK else array


CONTEXT_RAW = PayloadColumn("context_raw", "photo", IMAGE)
HOLE_BITS = PayloadColumn("hole_bits", "photo", BITS)
# the render stage's inputs, in the order Renderer.render takes them
MODEL_INPUT_SPECS = (
    PayloadColumn("model_context", "model", IMAGE, "context"),
    PayloadColumn("model_hole", "model", MASK, "hole"),
    PayloadColumn("model_product", "product", IMAGE, "product"),
    PayloadColumn("model_product_alpha", "product", MASK, "product_alpha"),
    PayloadColumn("model_hint", "model", IMAGE, "hint"),
    PayloadColumn("model_hint_mask", "model", MASK, "hint_mask"),
)
RENDERED = PayloadColumn("rendered", "model", IMAGE)
# the training job's: the same pair prepared with its mask's bounding box as the region
BOX_SPECS = (
    PayloadColumn("box_hole", "model", MASK, "hole"),
    PayloadColumn("box_hint", "model", IMAGE, "hint"),
    PayloadColumn("box_hint_mask", "model", MASK, "hint_mask"),
)
VARIANT_RENDERS = PayloadColumn("variant_renders", "model", IMAGE)

PAYLOAD_COLUMNS = tuple(c.name for c in (CONTEXT_RAW, HOLE_BITS, *MODEL_INPUT_SPECS))  # the prepare stage's
MODEL_INPUTS = tuple(c.name for c in MODEL_INPUT_SPECS)  # what the render stage reads and drops
SPECS = {c.name: c for c in (CONTEXT_RAW, HOLE_BITS, *MODEL_INPUT_SPECS, RENDERED, VARIANT_RENDERS, *BOX_SPECS)}


def pack_pair(context: np.ndarray, hole: np.ndarray, model: dict) -> dict[str, memoryview]:
    """A prepared pair's payload columns: the whole photo and region, and the model's inputs
    (`model`: compose.preprocess's dict)."""
    return {
        CONTEXT_RAW.name: CONTEXT_RAW.pack(context),
        HOLE_BITS.name: HOLE_BITS.pack(hole),
        **{c.name: c.pack(model[c.key]) for c in MODEL_INPUT_SPECS},
    }


def unpack_photo(block: pa.Table, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Row i's `context_raw` and `hole_bits` back as the H x W x 3 photo and H x W bool region
    (views of the block's memory, no copy of the photo)."""
    sizes = Sizes(height=block["height"][i].as_py(), width=block["width"][i].as_py())
    return (
        CONTEXT_RAW.unpack(block[CONTEXT_RAW.name][i].as_buffer(), sizes),
        HOLE_BITS.unpack(block[HOLE_BITS.name][i].as_buffer(), sizes),
    )
