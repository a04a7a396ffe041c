"""Per-row image work in numpy + PIL (torch only for its uint8 resize kernels, imported lazily in
the workers): decode, region, crop window, pre/postprocess, encode.

    context = decode_image(context_bytes)                         # H x W x 3 uint8, EXIF applied
    product = decode_image(product_bytes, keep_alpha=True, premultiply=True)  # h x w x 4 uint8
    hole = region_from_bbox(bbox, W, H)  or  decode_mask(mask_bytes) + check_region(hole, W, H)
    model_inputs = preprocess(context, hole, product, resolution=512)
    final = postprocess(context, rendered, hole, model_inputs["crop_box"])
    data = encode_image(final, "jpeg")

Arrays in, arrays out (never PIL objects in Ray blocks: they would defeat its memory
accounting), but for `postprocess`, whose Pillow image goes straight to `encode_image`. A bad
input raises `RowError(code, message)`, which the stage turns into a failed row; a wrong
argument (a programming error) raises ValueError.

Row error codes raised here: `image_unreadable`, `too_large`, `bad_bbox`, `region_too_small`,
`region_empty`, `mask_size_mismatch`, `product_transparent`.
"""

from __future__ import annotations

import functools
import io
import math
import warnings

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

__all__ = [
    "EXTENSIONS",
    "MIN_REGION_PX",
    "resize_uint8",
    "RowError",
    "decode_image",
    "decode_mask",
    "region_from_bbox",
    "check_region",
    "crop_window",
    "crop",
    "preprocess",
    "postprocess",
    "encode_image",
]

EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}
# A region narrower than this (in photo pixels) cannot hold a recognisable product.
MIN_REGION_PX = 8
# Formats we open. Pillow knows many more, some of them risky on untrusted bytes (EPS runs
# Ghostscript). AVIF only where Pillow was built with it; MPO (multi-picture JPEGs from phone
# cameras) is read by the JPEG plugin in recent Pillow versions.
ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
NEUTRAL_GREY = 128
_ORIENTATION_TAG = 0x0112
# Pillow reads 16-bit grayscale PNG/TIFF as I;16* (older versions: I); convert("L") clips them.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class RowError(Exception):
    """A row-level problem: becomes `status=failed`, `error_code`, `error_message`, never a crash."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# -- decoding ------------------------------------------------------------------------------


def decode_image(
    data: bytes, *, max_pixels: int = 50_000_000, keep_alpha: bool = False, premultiply: bool = False
) -> np.ndarray:
    """Encoded bytes -> H x W x 3 uint8 RGB (H x W x 4 RGBA with `keep_alpha`), as displayed.

    The pixel count is checked from the header before any pixel is decoded (`too_large`).
    EXIF orientation is applied. Grayscale, palette (with transparency), CMYK, 16-bit (scaled
    to 8 bits, not clipped), LA and RGBA inputs are handled; without alpha in the file, alpha
    is 255. With `premultiply` (and `keep_alpha`) the colours come multiplied by alpha
    (Pillow's "RGBa"), the form `preprocess` takes a product in. Truncated or non-image bytes
    raise `image_unreadable`. The array may be read-only (Pillow's own buffer, not a copy):
    copy it before writing into it.
    """
    if premultiply and not keep_alpha:
        raise ValueError("premultiply needs keep_alpha")
    image = _open(data, max_pixels)
    try:
        if image.mode in _SIXTEEN_BIT_MODES:
            gray = _sixteen_to_eight(np.asarray(image))
            channels = [gray] * 3 + ([np.full_like(gray, 255)] if keep_alpha else [])
            return np.ascontiguousarray(np.stack(channels, axis=-1))
        if image.mode == "F":  # no agreed range (0..1? 0..255?) to map to 8 bits
            raise RowError("image_unreadable", "32-bit float images are not supported")
        # convert("RGBA") also turns a palette/L/RGB `transparency` key into a real alpha
        # channel, and Pillow undoes the Adobe inversion of CMYK JPEGs when reading them.
        mode = "RGBA" if keep_alpha else "RGB"
        try:
            pixels = image if image.mode == mode else image.convert(mode)  # the common case: no copy
            # Pillow premultiplies from RGBA only; an image without alpha is its own premultiplied form.
            if premultiply and image.has_transparency_data:
                pixels = pixels.convert("RGBa")
        except ValueError as e:
            raise RowError("image_unreadable", f"cannot convert a {image.mode} image to {mode} ({e})") from e
        return _pixels(pixels)
    finally:
        image.close()


def _pixels(image: Image.Image) -> np.ndarray:
    """np.asarray(image), without its copy for 4-byte modes (RGBA, premultiplied RGBa): Pillow
    lends those pixels through the Arrow C interface, and the read-only array keeps them alive
    after the image is closed. RGB is stored as 4 bytes too, so its H x W x 3 array needs the
    copy; an image Pillow split over several memory blocks (over 16 MB) cannot be lent."""
    if image.mode in ("RGBA", "RGBa"):
        try:
            pixels = pa.array(image).values  # fixed_size_list<uint8>[4] -> its uint8 values
        except ValueError:  # several blocks
            return np.asarray(image)
        flat = np.frombuffer(pixels.buffers()[1], dtype=np.uint8, count=len(pixels), offset=pixels.offset)
        return flat.reshape(image.height, image.width, 4)
    return np.asarray(image)


def decode_mask(data: bytes, *, max_pixels: int = 50_000_000) -> np.ndarray:
    """Mask bytes -> H x W bool, True (white, >= 128) = the region to repaint.

    Any mode is read as luminance after EXIF orientation; 16-bit masks are scaled first. A mask
    with an alpha channel counts transparent pixels as not painted (luminance times alpha).
    """
    image = _open(data, max_pixels)
    try:
        if image.mode in _SIXTEEN_BIT_MODES:
            return _sixteen_to_eight(np.asarray(image)) >= 128
        if image.has_transparency_data:
            luminance_alpha = np.asarray(image.convert("RGBA").convert("LA"), dtype=np.uint16)
            return (luminance_alpha[..., 0] * luminance_alpha[..., 1] + 127) // 255 >= 128
        return np.asarray(image.convert("L")) >= 128
    finally:
        image.close()


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open, check the size from the header, load every pixel, apply EXIF orientation."""
    if not data:
        raise RowError("image_unreadable", "the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # We check the size ourselves, against our own limit, right below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=_open_formats())
    except Image.DecompressionBombError as e:  # over twice Pillow's own limit (~179 MP)
        raise RowError("too_large", f"image is over the pixel limit ({e})") from e
    except (OSError, ValueError, SyntaxError) as e:  # UnidentifiedImageError is an OSError
        raise RowError("image_unreadable", f"not a readable {'/'.join(_open_formats())} image ({e})") from e
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise RowError("too_large", f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
    if width == 0 or height == 0:
        image.close()
        raise RowError("image_unreadable", f"image has no pixels ({width}x{height})")
    try:
        # load() raises on truncated data as long as ImageFile.LOAD_TRUNCATED_IMAGES stays
        # False (Pillow's default, which we never change): a half-downloaded JPEG must fail
        # rather than render on top of grey.
        image.load()
        if image.getexif().get(_ORIENTATION_TAG, 1) != 1:  # skip the copy in the common case
            transposed = ImageOps.exif_transpose(image)
            image.close()
            image = transposed
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        image.close()
        raise RowError("image_unreadable", f"image data is broken or truncated ({e})") from e
    return image


@functools.cache
def _open_formats() -> tuple[str, ...]:
    Image.init()  # registers every plugin, so the list below is the one this Pillow has
    return tuple(f for f in ALLOWED_FORMATS if f in Image.OPEN)


def _sixteen_to_eight(values: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255 rounded (v * 255 / 65535). Pillow's convert("L") would clip instead."""
    values = np.clip(values.astype(np.int64), 0, 65535)
    return ((values * 255 + 32767) // 65535).astype(np.uint8)


# -- region --------------------------------------------------------------------------------


def region_from_bbox(bbox, width: int, height: int) -> np.ndarray:
    """[x0, y0, x1, y1] in displayed pixels -> H x W bool region.

    Every pixel the box touches is in (floor of the start, ceil of the end), so the product
    always fits. A box partly outside the photo is clipped; one entirely outside, NaN,
    negative or inverted is `bad_bbox`; a clipped box under 8 px a side is `region_too_small`.
    """
    try:
        x0, y0, x1, y1 = (float(v) for v in bbox)
    except (TypeError, ValueError) as e:
        raise RowError("bad_bbox", f"bbox {bbox!r} must be 4 numbers [x0, y0, x1, y1]") from e
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise RowError("bad_bbox", f"bbox {[x0, y0, x1, y1]} has a value that is not finite")
    if min(x0, y0, x1, y1) < 0:
        raise RowError("bad_bbox", f"bbox {[x0, y0, x1, y1]} has a negative coordinate")
    if x1 <= x0 or y1 <= y0:
        raise RowError("bad_bbox", f"bbox {[x0, y0, x1, y1]} is empty or inverted: need x0 < x1 and y0 < y1")
    if x0 >= width or y0 >= height:
        raise RowError("bad_bbox", f"bbox {[x0, y0, x1, y1]} lies outside the {width}x{height} photo")
    left, top = math.floor(x0), math.floor(y0)
    right, bottom = min(math.ceil(x1), width), min(math.ceil(y1), height)
    if right - left < MIN_REGION_PX or bottom - top < MIN_REGION_PX:
        raise RowError(
            "region_too_small",
            f"bbox {[x0, y0, x1, y1]} covers {right - left}x{bottom - top} pixels of the photo; at least {MIN_REGION_PX}x{MIN_REGION_PX} needed",
        )
    hole = np.zeros((height, width), dtype=bool)
    hole[top:bottom, left:right] = True
    return hole


def check_region(hole: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """Check a decoded mask against the context photo; returns its bounding box (x0, y0, x1, y1),
    ends exclusive. `mask_size_mismatch`, `region_empty`, `region_too_small` otherwise."""
    if hole.shape != (height, width):
        raise RowError(
            "mask_size_mismatch",
            f"mask is {hole.shape[1]}x{hole.shape[0]} but the photo is {width}x{height} (both as displayed, after EXIF orientation)",
        )
    box = _bounding_box(hole)
    if box is None:
        raise RowError("region_empty", "mask has no white (>= 128) pixel: nothing to repaint")
    x0, y0, x1, y1 = box
    if x1 - x0 < MIN_REGION_PX or y1 - y0 < MIN_REGION_PX:
        raise RowError(
            "region_too_small", f"mask region spans {x1 - x0}x{y1 - y0} pixels; at least {MIN_REGION_PX}x{MIN_REGION_PX} needed"
        )
    return box


def _bounding_box(hole: np.ndarray) -> tuple[int, int, int, int] | None:
    rows = np.flatnonzero(hole.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(hole.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _filled_box(hole: np.ndarray) -> tuple[int, int, int, int] | None:
    """The bounding box of a region that is a rectangle (every bbox region), else None: the
    direct paths of `_coverage` and `_feather_weight`."""
    box = _bounding_box(hole)
    if box is None or not hole[box[1] : box[3], box[0] : box[2]].all():
        return None
    return box


# -- crop window -----------------------------------------------------------------------------


def crop_window(hole: np.ndarray, width: int, height: int, margin: float = 0.25) -> tuple[int, int, int, int]:
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
    box = _bounding_box(hole)
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


# -- pre/postprocessing --------------------------------------------------------------------------


def preprocess(
    context: np.ndarray,
    hole: np.ndarray,
    product: np.ndarray,
    resolution: int,
    product_size: int = 224,
    margin: float = 0.25,
) -> dict:
    """Full photo + region + product -> the model's inputs for one pair.

    `product` is h x w x 4 uint8 with premultiplied alpha, as `decode_image(..., keep_alpha=True,
    premultiply=True)` gives it (an opaque RGBA array is its own premultiplied form).

    Returns `context` (R x R x 3 uint8, the window resized, antialiased bilinear), `hole` (R x R
    bool), `product` (S x S x 3 uint8: resized to fit, composited on neutral grey with its alpha,
    centred on a grey square), `product_alpha` (S x S bool, alpha >= 128 after the same resize
    and padding) and `crop_box` (the window in photo pixels, 4 ints; `margin` as in `crop_window`).

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
    return {
        "context": np.ascontiguousarray(context_in),
        "hole": np.ascontiguousarray(hole_in),
        "product": product_in,
        "product_alpha": alpha_in >= 128,
        "crop_box": tuple(int(v) for v in crop_box),
    }


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
    context: np.ndarray,
    rendered: np.ndarray,
    hole: np.ndarray,
    crop_box: tuple[int, int, int, int],
    feather_px: int = 4,
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
    box = _bounding_box(hole)
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
    # by Pillow's masked paste, which computes exactly that in C (tests/test_images.py) at 2x
    # numpy's speed. Where the weight is 0 (everything outside the region) it is the
    # original, bit for bit.
    result.paste(Image.fromarray(new), (bl, bt), Image.fromarray(weight))
    return result


def resize_uint8(array: np.ndarray, width: int, height: int, mode: str) -> np.ndarray:
    """H x W x C uint8 -> height x width x C uint8, antialiased "bilinear" or "bicubic".

    PIL's resampling filters, computed by torch's uint8 kernels (the ones `F.interpolate(...,
    antialias=True)` runs on a channels-last uint8 tensor, written to match PIL's
    `Image.resize`: equal within 2 levels, tests/test_images.py) at 4-5x PIL's speed on one
    thread: resizes were half the CPU cost of a pair around the model (bench/data_path.py).
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
    kernel = {"bilinear": torch.ops.aten._upsample_bilinear2d_aa, "bicubic": torch.ops.aten._upsample_bicubic2d_aa}[mode]
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
    box = _filled_box(hole)
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
    box = _filled_box(region)
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
        # outside the region) never erodes by itself. ~50x faster than PIL's MinFilter.
        padded = np.pad(mask, ((0, 0), (1, 1)), mode="edge")
        mask = padded[:, :-2] & padded[:, 1:-1] & padded[:, 2:]
        padded = np.pad(mask, ((1, 1), (0, 0)), mode="edge")
        mask = padded[:-2] & padded[1:-1] & padded[2:]
        count += mask
    return levels[count]


# -- encoding ------------------------------------------------------------------------------


def encode_image(image: np.ndarray | Image.Image, fmt: str, quality: int = 90) -> bytes:
    """H x W x 3 uint8 array (or `postprocess`'s RGB image) -> JPEG, PNG (lossless,
    compress_level 1 for speed) or WebP bytes."""
    if fmt not in EXTENSIONS:
        raise ValueError(f"image format must be one of {sorted(EXTENSIONS)}, got {fmt!r}")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be H x W x 3 uint8, got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    elif image.mode != "RGB":
        raise ValueError(f"image must be an RGB image, got mode {image.mode}")
    buffer = io.BytesIO()
    if fmt == "jpeg":
        image.save(buffer, format="JPEG", quality=quality)
    elif fmt == "png":
        image.save(buffer, format="PNG", compress_level=1)
    else:
        image.save(buffer, format="WEBP", quality=quality)
    return buffer.getvalue()
