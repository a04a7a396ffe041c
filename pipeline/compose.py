"""Pixels around the model: the model's inputs from a pair (preprocess) and the paste-back of
its render (postprocess), on torch's uint8 resize kernels.

    model_inputs = preprocess(context, hole, product, resolution=512, margin=cfg.crop_margin)
    # context, hole, product, product_alpha, hint, hint_mask, crop_box
    final = postprocess(context, rendered, hole, model_inputs["crop_box"], cfg.feather_px)  # RGB Pillow image

torch is imported lazily, by `resize_uint8`, in the workers' CPU stages and in Serve; the
driver never calls these.
"""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image

from pipeline.regions import bounding_box, crop, crop_window, filled_box, largest_inscribed_rectangle
from pipeline.schema import RowError

__all__ = ["NEUTRAL_GREY", "preprocess", "postprocess", "resize_uint8"]

NEUTRAL_GREY = 128


# -- pre/postprocessing --------------------------------------------------------------------------


def preprocess(
    context: np.ndarray,
    hole: np.ndarray,
    product: np.ndarray,
    resolution: int,
    product_size: int = 224,
    *,
    margin: float,
) -> dict:
    """Full photo + region + product -> the model's inputs for one pair.

    `product` is h x w x 4 uint8 with premultiplied alpha, as `decode_image(..., keep_alpha=True,
    premultiply=True)` gives it (an opaque RGBA array is its own premultiplied form).

    Returns `context` (R x R x 3 uint8, the window resized, antialiased bilinear), `hole` (R x R
    bool), `product` (S x S x 3 uint8: resized to fit, composited on neutral grey with its alpha,
    centred on a grey square), `product_alpha` (S x S bool, alpha >= 128 after the same resize
    and padding), `hint` (R x R x 3 uint8) with `hint_mask` (R x R bool), see `_hint`, and
    `crop_box` (the window in photo pixels, 4 ints; `margin` as in `crop_window`).

    The hole is resized by coverage (a model pixel is hole when any of its area is), not by
    nearest neighbour, which can drop a thin region entirely when the window shrinks ~10x; a
    slightly larger hole at model scale is harmless because `postprocess` only keeps pixels
    inside the original region.
    """
    height, width = context.shape[:2]
    if hole.shape != (height, width):
        raise ValueError(f"hole is {hole.shape} but context is {context.shape[:2]}")
    if product.ndim != 3 or product.shape[2] != 4:
        raise ValueError(f"product must be h x w x 4 (premultiplied RGBA), got shape {product.shape}")
    crop_box = crop_window(hole, width, height, margin)

    # 1. context window, antialiased bilinear (PIL's filter, torch's uint8 kernel: see
    # `resize_uint8`). The model sees this window only; the output keeps the photo.
    context_in = resize_uint8(crop(context, crop_box), resolution, resolution, "bilinear")

    # 2. hole, by coverage: a model pixel is hole when any photo pixel overlapping it is
    hole_in = _coverage(crop(hole, crop_box), resolution)

    # 3. product: alpha cuts it out. Resized with premultiplied alpha (no colour fringes), then
    # composited on grey and padded: the per-pixel work runs at 224^2, not at the shot's size.
    if product[..., 3].max() < 128:
        raise RowError("product_transparent", "product image is fully transparent (no pixel with alpha >= 128)")
    product_in, alpha_in = _square_resize(product, product_size)

    # 4. hint: the product at working resolution, from its full-resolution pixels (not from the
    # S^2 encoder input), stretched into the largest rectangle inside the model-scale hole
    hint, hint_mask = _hint(product, hole_in)
    return {
        "context": np.ascontiguousarray(context_in),
        "hole": np.ascontiguousarray(hole_in),
        "product": product_in,
        "product_alpha": alpha_in >= 128,
        "hint": hint,
        "hint_mask": hint_mask,
        "crop_box": tuple(int(v) for v in crop_box),
    }


def _unpremultiply_table() -> np.ndarray:
    """(alpha << 8 | colour) -> round(colour * 255 / alpha), clipped at 255 (a colour above its
    alpha, i.e. not premultiplied, clips rather than wraps); 0 where alpha < 128 (gated out)."""
    alpha, colour = np.arange(256)[:, None], np.arange(256)[None, :]
    table = np.minimum((colour * 255 + alpha // 2) // np.maximum(alpha, 1), 255)
    return np.where(alpha >= 128, table, 0).astype(np.uint8).ravel()


_UNPREMULTIPLY = _unpremultiply_table()


def _hint(rgba: np.ndarray, hole: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The DTC hint of a premultiplied product for an R x R model hole: (R x R x 3 uint8, R x R bool).

    The product is resized straight from its own resolution into the hole's largest inscribed
    rectangle (`regions.largest_inscribed_rectangle`), aspect not kept (paper), antialiased
    bilinear on the premultiplied colours (no fringes from transparent pixels), then
    un-premultiplied: round(colour * 255 / alpha). The mask is the rectangle's pixels whose
    resized alpha is >= 128; the hint is 0 wherever the mask is False. Built here, on the CPU
    stage, because the full-resolution product is only here: the GPU stage sees model sizes.
    """
    y0, x0, y1, x1 = largest_inscribed_rectangle(hole)
    small = resize_uint8(rgba, x1 - x0, y1 - y0, "bilinear")
    alpha = small[..., 3]
    opaque = alpha >= 128
    # one lookup per channel in the (alpha, colour) table: integer division per pixel costs more
    # than the resize itself
    colour = np.take(_UNPREMULTIPLY, (alpha.astype(np.uint16) << 8)[..., None] | small[..., :3])
    size = hole.shape[0]
    hint = np.zeros((size, size, 3), dtype=np.uint8)
    hint[y0:y1, x0:x1] = colour
    hint_mask = np.zeros((size, size), dtype=bool)
    hint_mask[y0:y1, x0:x1] = opaque
    return hint, hint_mask


def _square_resize(rgba: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Fit the premultiplied product in size x size (aspect kept), on neutral grey, centred:
    (rgb, alpha). Resizing premultiplied colours keeps transparent pixels from lending colour to
    the edge; then "over" neutral grey: colour + grey * (1 - alpha)."""
    height, width = rgba.shape[:2]
    scale = size / max(height, width)
    fit = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = resize_uint8(rgba, fit[0], fit[1], "bicubic")
    # (colour * 255 + grey * (255 - a) + 127) // 255 = colour + (grey * (255 - a) + 127) // 255
    grey_part = ((NEUTRAL_GREY * (255 - np.arange(256)) + 127) // 255).astype(np.uint16)
    over = small[..., :3].astype(np.uint16)  # in place from here: numpy's mixed-type broadcasts are slow
    over += np.take(grey_part, small[..., 3])[..., None]
    np.minimum(over, 255, out=over)
    top, left = (size - fit[1]) // 2, (size - fit[0]) // 2
    out_rgb = np.full((size, size, 3), NEUTRAL_GREY, dtype=np.uint8)
    out_rgb[top : top + fit[1], left : left + fit[0]] = over
    out_alpha = np.zeros((size, size), dtype=np.uint8)
    out_alpha[top : top + fit[1], left : left + fit[0]] = small[..., 3]
    return out_rgb, out_alpha


def postprocess(
    context: np.ndarray, rendered: np.ndarray, hole: np.ndarray, crop_box: tuple[int, int, int, int], feather_px: int
) -> Image.Image:
    """Put the rendered window back into the full photo: an RGB Pillow image, H x W, the form
    `encode_image` takes without copying the photo again (np.asarray() gives its pixels).

    The window is resized to its size in the photo and blended with an alpha that is 0 outside
    the region and ramps up inside it: 1/feather_px on the region's edge, 1 from feather_px
    pixels in (iterated 3x3 erosions). Pixels outside the region are copied from `context`
    bit for bit. The photo's own border does not count as an edge: a region touching it is
    fully rendered there (there is no original pixel beyond to blend with).
    """
    height, width = context.shape[:2]
    x0, y0, x1, y1 = (int(v) for v in crop_box)
    side = x1 - x0
    if y1 - y0 != side or side <= 0:
        raise ValueError(f"crop_box must be a non-empty square, got {crop_box}")
    if rendered.ndim != 3 or rendered.shape[0] != rendered.shape[1] or rendered.shape[2] != 3:
        raise ValueError(f"rendered must be R x R x 3, got shape {rendered.shape}")
    if hole.shape != (height, width):
        raise ValueError(f"hole is {hole.shape} but context is {context.shape[:2]}")

    result = Image.fromarray(context)  # the photo's one copy on this path, into Pillow's memory
    box = bounding_box(hole)
    if box is None:
        return result
    if box[0] < x0 or box[1] < y0 or box[2] > x1 or box[3] > y1:
        raise ValueError(f"crop_box {crop_box} does not contain the region {box}: use crop_window")
    # The weight is computed on the region's bounding box grown by the feather, within the photo,
    # so the erosion sees the real pixels around the region; it is non-zero only on the region,
    # which lies inside the window, so blending within the window covers every changed pixel.
    pad = feather_px + 1
    left, top = max(box[0] - pad, 0), max(box[1] - pad, 0)
    right, bottom = min(box[2] + pad, width), min(box[3] + pad, height)
    weight = _feather_weight(hole[top:bottom, left:right], feather_px)
    bl, bt, br, bb = max(left, x0), max(top, y0), min(right, x1), min(bottom, y1)
    weight = weight[bt - top : bb - top, bl - left : br - left]
    new = resize_uint8(rendered, side, side, "bicubic")[bt - y0 : bb - y0, bl - x0 : br - x0]
    # Integer blend, (original * (255 - weight) + new * weight + 127) // 255 per channel, done
    # by Pillow's masked paste, which computes exactly that in C (tests/unit/test_images.py),
    # faster than numpy's version. Where the weight is 0 (everything outside the region) it is the
    # original, bit for bit.
    result.paste(Image.fromarray(new), (bl, bt), Image.fromarray(weight))
    return result


def resize_uint8(array: np.ndarray, width: int, height: int, mode: str) -> np.ndarray:
    """H x W x C uint8 -> height x width x C uint8, antialiased "bilinear" or "bicubic".

    PIL's resampling filters, computed by torch's uint8 kernels (the ones `F.interpolate(...,
    antialias=True)` runs on a channels-last uint8 tensor, written to match PIL's
    `Image.resize`: equal within 2 levels, tests/unit/test_images.py), several times faster than
    PIL on one thread (bench/data_path.py measures the whole CPU path).
    torch is imported here, in the workers' CPU stages; the driver never calls this. Channels
    are filtered independently: an RGBA image is not premultiplied as PIL does, so pass an
    opaque or an already premultiplied one."""
    import torch

    if array.dtype != np.uint8 or array.ndim != 3:
        raise ValueError(f"resize_uint8 needs H x W x C uint8, got {array.dtype} {array.shape}")
    if array.shape[:2] == (height, width):
        return np.ascontiguousarray(array)
    # A C-contiguous H x W x C array is a channels-last tensor, the layout the fast uint8 kernels
    # read. F.interpolate would return a new channels-first tensor, and turning that back to
    # H x W x C costs as much as the resize; the kernels' `out=` form writes straight into a
    # channels-last view of the numpy array we return instead (same pixels, tested).
    with warnings.catch_warnings():  # a read-only array is only read here
        warnings.simplefilter("ignore", UserWarning)
        source = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).unsqueeze(0)
    result = np.empty((height, width, array.shape[2]), dtype=np.uint8)
    target = torch.from_numpy(result).permute(2, 0, 1).unsqueeze(0)
    kernels = {"bilinear": torch.ops.aten._upsample_bilinear2d_aa, "bicubic": torch.ops.aten._upsample_bicubic2d_aa}
    kernel = kernels[mode]
    kernel.out(source, [height, width], False, None, None, out=target)
    return result


def _coverage(hole: np.ndarray, size: int) -> np.ndarray:
    """H x W bool -> size x size bool: true where any source pixel overlapping the output pixel
    is true. Output pixel i spans [i*n/size, (i+1)*n/size) of n source pixels, so it sees
    pixels floor(i*n/size) .. ceil((i+1)*n/size)-1. Separable, one axis at a time: an OR of the
    k-th pixel of every window, for k up to the longest window (a few gathers, not a loop over
    pixels). A rectangle (every bbox region) covers the rectangle of output pixels
    floor(start*size/n) .. ceil(end*size/n)-1 on each axis, found without the gathers."""
    hole = np.asarray(hole, dtype=bool)
    box = filled_box(hole)
    if box is not None:
        (x0, y0, x1, y1), (height, width), out = box, hole.shape, np.zeros((size, size), dtype=bool)
        out[(y0 * size) // height : -(-(y1 * size) // height), (x0 * size) // width : -(-(x1 * size) // width)] = True
        return out

    def along(values: np.ndarray, axis: int) -> np.ndarray:
        n = values.shape[axis]
        i = np.arange(size)
        start, end = (i * n) // size, -(-(i + 1) * n // size)
        out = np.take(values, start, axis=axis)
        for k in range(1, int((end - start).max())):
            out |= np.take(values, np.minimum(start + k, end - 1), axis=axis)
        return out

    return along(along(hole, 1), 0)


def _feather_weight(region: np.ndarray, feather_px: int) -> np.ndarray:
    """Blend weight 0..255 (uint8): round(255 * k / feather_px), where k counts the region and
    its first feather_px-1 erosions holding the pixel: 0 outside, ramping to 255 inside."""
    steps = max(feather_px, 1)
    levels = (np.arange(steps + 1, dtype=np.uint16) * 510 + steps) // (2 * steps)  # k -> round(255 k / steps)
    levels = levels.astype(np.uint8)
    box = filled_box(region)
    if box is not None:
        # A rectangle (every bbox region): each erosion moves every side with a non-region
        # pixel beyond it in by one, so k = min(steps, 1 + distance to the nearest such side),
        # per axis, then the smaller of the two axes. Same weights as the erosions (tested).
        def ramp(n: int, start: int, end: int) -> np.ndarray:
            position = np.arange(n)
            distance = np.full(n, steps)
            if start > 0:
                distance = np.minimum(distance, position - start)
            if end < n:
                distance = np.minimum(distance, end - 1 - position)
            inside = (position >= start) & (position < end)
            return levels[np.where(inside, np.minimum(distance + 1, steps), 0)]

        # levels rise with k, so the weight of the smaller k is the smaller weight
        (height, width), (x0, y0, x1, y1) = region.shape, box
        return np.minimum(ramp(height, y0, y1)[:, None], ramp(width, x0, x1)[None, :])
    count = region.astype(np.uint8)
    mask = region.astype(bool)
    for _ in range(feather_px - 1):
        # 3x3 erosion, separable: 1x3 then 3x1, each the AND of three shifted views of an
        # edge-replicated copy, so the crop's edge (the photo's border, or pixels known to be
        # outside the region) never erodes by itself; far faster than PIL's MinFilter.
        padded = np.pad(mask, ((0, 0), (1, 1)), mode="edge")
        mask = padded[:, :-2] & padded[:, 1:-1] & padded[:, 2:]
        padded = np.pad(mask, ((1, 1), (0, 0)), mode="edge")
        mask = padded[:-2] & padded[1:-1] & padded[2:]
        count += mask
    return levels[count]
