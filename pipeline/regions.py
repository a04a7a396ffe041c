"""Where a pair is repainted: region from a mask or a bbox, its bounding box, the crop window,
and the hint's inscribed rectangle. numpy (Pillow for masks, through images.decode_mask); driver-safe.

    hole = region_of(mask_bytes, bbox, width, height, max_pixels=cfg.max_pixels)  # H x W bool, True = repaint
    box = crop_window(hole, width, height, cfg.crop_margin)  # the square window the model renders
    y0, x0, y1, x1 = largest_inscribed_rectangle(hole)       # where the hint pastes the product

A bad region raises `RowError`: `bad_bbox`, `region_too_small`, `region_empty`,
`mask_size_mismatch`.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.images import decode_mask
from pipeline.schema import RowError, normalised_hint, parse_bbox

__all__ = [
    "MIN_REGION_PX",
    "region_of",
    "region_from_bbox",
    "bbox_too_small",
    "check_region",
    "bounding_box",
    "filled_box",
    "crop_window",
    "crop",
    "largest_inscribed_rectangle",
]

# A region narrower than this (in photo pixels) cannot hold a recognisable product.
MIN_REGION_PX = 8


def region_of(mask: bytes | None, bbox, width: int, height: int, *, max_pixels: int) -> np.ndarray:
    """The H x W region to repaint from the mask's bytes, or else from the bbox."""
    if mask is not None:
        hole = decode_mask(mask, max_pixels=max_pixels)
        check_region(hole, width, height)
        return hole
    return region_from_bbox(bbox, width, height)


# -- region --------------------------------------------------------------------------------


def bbox_too_small(box: list[float], width_px: int | None = None, height_px: int | None = None) -> str | None:
    """Why the box covers under MIN_REGION_PX a side, or None. `width_px`/`height_px`: the
    pixels it covers once clipped to the photo; without them (no photo yet: row validation)
    the box's own, which clipping can only shrink, so a box too small here is too small in any photo."""
    if width_px is None or height_px is None:
        width_px = math.ceil(box[2]) - math.floor(box[0])
        height_px = math.ceil(box[3]) - math.floor(box[1])
    if width_px >= MIN_REGION_PX and height_px >= MIN_REGION_PX:
        return None
    return (
        f"bbox {box} covers {width_px}x{height_px} pixels of the photo; at least {MIN_REGION_PX}x{MIN_REGION_PX} "
        "needed" + normalised_hint(box)
    )


def region_from_bbox(bbox, width: int, height: int) -> np.ndarray:
    """[x0, y0, x1, y1] in displayed pixels -> H x W bool region.

    Every pixel the box touches is in (floor of the start, ceil of the end), so the product
    always fits. A box partly outside the photo is clipped to it and rendered: detectors and
    hand-drawn boxes run a few pixels past the edge, and the part inside is the region the
    user meant. One entirely outside, or one `schema.parse_bbox` refuses (NaN, negative,
    inverted), is `bad_bbox`; a clipped box under 8 px a side is `region_too_small`. Both say
    that bbox is in pixels when the box looks normalised (`schema.normalised_hint`).
    """
    box, problem = parse_bbox(bbox)
    if problem:
        raise RowError("bad_bbox", problem)
    x0, y0, x1, y1 = box
    if x0 >= width or y0 >= height:
        raise RowError("bad_bbox", f"bbox {box} lies outside the {width}x{height} photo" + normalised_hint(box))
    left, top = math.floor(x0), math.floor(y0)
    right, bottom = min(math.ceil(x1), width), min(math.ceil(y1), height)
    if problem := bbox_too_small(box, right - left, bottom - top):
        raise RowError("region_too_small", problem)
    hole = np.zeros((height, width), dtype=bool)
    hole[top:bottom, left:right] = True
    return hole


def check_region(hole: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """Check a decoded mask against the context photo; returns its bounding box (x0, y0, x1, y1),
    ends exclusive. `mask_size_mismatch`, `region_empty`, `region_too_small` otherwise."""
    if hole.shape != (height, width):
        raise RowError(
            "mask_size_mismatch",
            f"mask is {hole.shape[1]}x{hole.shape[0]} but the photo is {width}x{height} "
            "(both as displayed, after EXIF orientation)",
        )
    box = bounding_box(hole)
    if box is None:
        raise RowError("region_empty", "mask has no white (>= 128) pixel: nothing to repaint")
    x0, y0, x1, y1 = box
    if x1 - x0 < MIN_REGION_PX or y1 - y0 < MIN_REGION_PX:
        raise RowError(
            "region_too_small",
            f"mask region spans {x1 - x0}x{y1 - y0} pixels; at least {MIN_REGION_PX}x{MIN_REGION_PX} needed",
        )
    return box


def bounding_box(hole: np.ndarray) -> tuple[int, int, int, int] | None:
    rows = np.flatnonzero(hole.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(hole.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def filled_box(hole: np.ndarray) -> tuple[int, int, int, int] | None:
    """The bounding box of a region that is a rectangle (every bbox region), else None: the
    direct paths of `_coverage` and `_feather_weight`."""
    box = bounding_box(hole)
    if box is None or not hole[box[1] : box[3], box[0] : box[2]].all():
        return None
    return box


# -- crop window -----------------------------------------------------------------------------


def crop_window(hole: np.ndarray, width: int, height: int, margin: float) -> tuple[int, int, int, int]:
    """The square window (x0, y0, x1, y1), ends exclusive, that the model renders.

    Side = the region's longer side * (1 + 2 * margin), capped at the photo's short side but
    never below the region's longer side; centred on the region and shifted to lie inside the
    photo. The window therefore always contains the whole region.

    A region longer than the photo's short side (a wide shelf in a panorama) cannot fit any
    square inside the photo. Rather than leave part of the region untouched, the window is then
    exactly the region's longer side and reaches past the photo along the short axis (the photo
    centred in it): `crop` pads that overhang by repeating edge pixels for the model, and
    `postprocess` only writes back pixels inside the photo. Only then can the box have
    coordinates below 0 or beyond the photo.
    """
    box = bounding_box(hole)
    if box is None:
        raise RowError("region_empty", "region has no pixel: nothing to repaint")
    rx0, ry0, rx1, ry1 = box
    longest = max(rx1 - rx0, ry1 - ry0)
    side = max(longest, min(math.ceil(longest * (1 + 2 * margin)), width, height))

    def place(start: int, end: int, size: int) -> int:
        if side > size:  # only on the short axis of an oversized region: centre the photo
            return (size - side) // 2
        # floor keeps the region inside even when side - (end - start) is odd.
        return min(max(math.floor((start + end) / 2 - side / 2), 0), size - side)

    x0, y0 = place(rx0, rx1, width), place(ry0, ry1, height)
    return x0, y0, x0 + side, y0 + side


def crop(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """`image[y0:y1, x0:x1]`, where a box reaching past the photo is padded with edge pixels."""
    x0, y0, x1, y1 = box
    height, width = image.shape[:2]
    inner = image[max(y0, 0) : min(y1, height), max(x0, 0) : min(x1, width)]
    pad = [(max(-y0, 0), max(y1 - height, 0)), (max(-x0, 0), max(x1 - width, 0))] + [(0, 0)] * (image.ndim - 2)
    if not any(p for pair in pad for p in pair):
        return inner
    return np.pad(inner, pad, mode="edge")


# -- hint rectangle ---------------------------------------------------------------------------


def largest_inscribed_rectangle(hole: np.ndarray) -> tuple[int, int, int, int]:
    """Largest axis-aligned rectangle made only of True pixels: `(y0, x0, y1, x1)`, ends exclusive.

    DTC pastes the product into this rectangle to build the hint. The search runs the classic
    "largest rectangle in a histogram" row by row (O(H*W)) over the hole's bounding box; a hole
    that fills its bounding box (every bbox row of the manifest) is answered directly.
    """
    hole = np.asarray(hole)
    if hole.ndim != 2:
        raise ValueError(f"hole mask must be 2-D (H, W), got shape {hole.shape}")
    hole = hole.astype(bool, copy=False)
    bounds = bounding_box(hole)
    if bounds is None:
        raise ValueError("hole mask is empty: no pixel to paste the hint into")
    ox, oy, right, bottom = bounds
    box = hole[oy:bottom, ox:right]
    if box.all():
        return oy, ox, oy + box.shape[0], ox + box.shape[1]

    best = (0, 0, 0, 0, 0)  # area, y0, x0, y1, x1 (box coordinates)
    heights = np.zeros(box.shape[1] + 1, dtype=np.int64)  # sentinel 0 at the end flushes the stack
    for y, row in enumerate(box):
        heights[:-1] = np.where(row, heights[:-1] + 1, 0)
        hs = heights.tolist()
        stack: list[int] = []  # column indices with increasing heights
        for x, h in enumerate(hs):
            while stack and hs[stack[-1]] >= h:
                height = hs[stack.pop()]
                left = stack[-1] + 1 if stack else 0
                if height * (x - left) > best[0]:
                    best = (height * (x - left), y + 1 - height, left, y + 1, x)
            stack.append(x)
    _, y0, x0, y1, x1 = best
    return oy + y0, ox + x0, oy + y1, ox + x1
