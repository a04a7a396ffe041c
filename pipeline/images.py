"""Image bytes in and out: decode (EXIF, limits, alpha) and encode. numpy + Pillow, no torch.

    context = decode_image(context_bytes, max_pixels=cfg.max_pixels)  # H x W x 3 uint8, EXIF applied
    product = decode_image(product_bytes, max_pixels=cfg.max_pixels, keep_alpha=True, premultiply=True)
    hole = decode_mask(mask_bytes, max_pixels=cfg.max_pixels)          # H x W bool
    data = encode_image(final, "jpeg")

Arrays in, arrays out (never PIL objects in Ray blocks: they would defeat its memory
accounting). A bad input raises `RowError(code, message)`, which the stage turns into a failed
row: `image_unreadable` or `too_large` here; a wrong argument (a programming error) raises
ValueError.
"""

from __future__ import annotations

import functools
import io
import warnings

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

from pipeline.schema import EXTENSIONS, RowError

__all__ = ["decode_image", "decode_mask", "encode_image"]

# Formats we open. Pillow knows many more, some of them risky on untrusted bytes (EPS runs
# Ghostscript). AVIF only where Pillow was built with it; MPO (multi-picture JPEGs from phone
# cameras) is read by the JPEG plugin in recent Pillow versions.
ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
_ORIENTATION_TAG = 0x0112
# Pillow reads 16-bit grayscale PNG/TIFF as I;16* (older versions: I); convert("L") clips them.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


# -- decoding ------------------------------------------------------------------------------


def decode_image(data: bytes, *, max_pixels: int, keep_alpha: bool = False, premultiply: bool = False) -> np.ndarray:
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


def decode_mask(data: bytes, *, max_pixels: int) -> np.ndarray:
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
        raise RowError(
            "too_large", f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
        )
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
