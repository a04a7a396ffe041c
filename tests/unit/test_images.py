"""pipeline.images, regions and compose on real encoded bytes: decoding edge cases, region and
crop math, compositing."""

from __future__ import annotations

import contextlib
import functools
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline import compose, images, regions
from pipeline.compose import postprocess, resize_uint8
from pipeline.config import RENDER_DEFAULTS
from pipeline.images import encode_image
from pipeline.regions import check_region, crop, region_from_bbox
from pipeline.schema import EXTENSIONS, RowError

# The stage passes the run's --max-pixels and --crop-margin; these tests use the defaults (the
# crop window's expected boxes are worked out for a margin of 0.25), a test may pass its own.
decode_image = functools.partial(images.decode_image, max_pixels=RENDER_DEFAULTS.max_pixels)
decode_mask = functools.partial(images.decode_mask, max_pixels=RENDER_DEFAULTS.max_pixels)
crop_window = functools.partial(regions.crop_window, margin=0.25)
preprocess = functools.partial(compose.preprocess, margin=0.25)


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _png_bytes(width: int, height: int, bit_depth: int, color_type: int, raw: bytes) -> bytes:
    """A PNG written by hand: lets a test claim any size or bit depth in the header."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@contextlib.contextmanager
def _row_error(code: str):
    with pytest.raises(RowError) as info:
        yield info
    assert info.value.code == code, info.value
    assert info.value.message


def _noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# -- decoding ------------------------------------------------------------------------------


def test_rgb_png_round_trip_and_alpha_default():
    pixels = _noise(12, 20)
    assert np.array_equal(decode_image(_encode(Image.fromarray(pixels))), pixels)
    rgba = decode_image(_encode(Image.fromarray(pixels)), keep_alpha=True)
    assert rgba.shape == (12, 20, 4) and rgba.dtype == np.uint8
    assert np.array_equal(rgba[..., :3], pixels) and (rgba[..., 3] == 255).all()


def test_grayscale_decodes_to_three_equal_channels():
    gray = np.arange(200, dtype=np.uint8).reshape(10, 20)
    out = decode_image(_encode(Image.fromarray(gray)))
    assert out.shape == (10, 20, 3)
    assert all(np.array_equal(out[..., c], gray) for c in range(3))


def test_sixteen_bit_png_is_scaled_not_clipped():
    gray16 = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    out = decode_image(_encode(Image.fromarray(gray16)))  # Pillow reads it as mode I;16
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]  # convert("L") would give [0, 255, 255, 255]

    rgb16 = np.array([[[65535, 0, 32896], [257, 514, 0]]], dtype=">u2")  # 1 x 2, 16-bit RGB
    raw = b"\x00" + rgb16.tobytes()
    out = decode_image(_png_bytes(2, 1, 16, 2, raw))
    assert out.tolist() == [[[255, 0, 128], [1, 2, 0]]]


def test_palette_png_with_transparency():
    palette_image = Image.new("P", (4, 2))
    palette_image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette_image.putdata([0, 1, 0, 1, 1, 1, 0, 0])
    data = _encode(palette_image, transparency=1)
    rgba = decode_image(data, keep_alpha=True)
    assert rgba.shape == (2, 4, 4)
    assert rgba[..., 3].tolist() == [[255, 0, 255, 0], [0, 0, 255, 255]]
    assert rgba[0, 0, :3].tolist() == [255, 0, 0]
    assert decode_image(data).shape == (2, 4, 3)


def test_la_and_rgba_keep_alpha():
    la = np.stack([np.full((3, 5), 200, np.uint8), np.arange(15, dtype=np.uint8).reshape(3, 5) * 17], axis=-1)
    out = decode_image(_encode(Image.fromarray(la)), keep_alpha=True)
    assert out[..., 0].tolist() == out[..., 2].tolist() and (out[..., 0] == 200).all()
    assert np.array_equal(out[..., 3], la[..., 1])
    rgba = np.concatenate([_noise(3, 5), np.full((3, 5, 1), 7, np.uint8)], axis=-1)
    assert np.array_equal(decode_image(_encode(Image.fromarray(rgba)), keep_alpha=True), rgba)


def test_premultiplied_decode():
    # Pillow's own premultiplication for images with alpha (RGBA, LA, a palette's transparent
    # index); an image without alpha comes back as is, alpha 255.
    rgba = np.random.default_rng(5).integers(0, 256, (6, 9, 4), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(rgba).convert("RGBa"))
    assert np.array_equal(decode_image(_encode(Image.fromarray(rgba)), keep_alpha=True, premultiply=True), expected)
    la = Image.fromarray(rgba[..., [0, 3]], "LA")
    assert np.array_equal(
        decode_image(_encode(la), keep_alpha=True, premultiply=True), np.asarray(la.convert("RGBA").convert("RGBa"))
    )
    palette = Image.fromarray(rgba[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette.info["transparency"] = 0
    out = decode_image(_encode(palette), keep_alpha=True, premultiply=True)
    assert (out[np.asarray(palette) == 0] == 0).all() and (out[np.asarray(palette) != 0][:, 3] == 255).all()
    opaque = _noise(6, 9)
    out = decode_image(_encode(Image.fromarray(opaque)), keep_alpha=True, premultiply=True)
    assert np.array_equal(out[..., :3], opaque) and (out[..., 3] == 255).all()
    with pytest.raises(ValueError):
        decode_image(_encode(Image.fromarray(opaque)), premultiply=True)


@pytest.mark.parametrize("side", [300, 2100])  # one Pillow memory block (lent, no copy); several (copied)
def test_rgba_pixels_outlive_the_image(side):
    import gc

    rgba = np.random.default_rng(side).integers(0, 256, (side, side // 3, 4), dtype=np.uint8)
    out = decode_image(_encode(Image.fromarray(rgba)), keep_alpha=True)  # the image is closed inside
    gc.collect()
    assert out.shape == rgba.shape and out.flags.c_contiguous and np.array_equal(out, rgba)


def test_cmyk_jpeg_decodes_to_rgb():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    out = decode_image(_encode(cmyk, "JPEG", quality=95))
    assert out.shape == (16, 16, 3)
    assert np.abs(out.astype(int) - [255, 0, 0]).max() <= 8


def test_exif_orientation_is_applied():
    stored = _noise(20, 40)  # 40 wide, 20 high as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = decode_image(_encode(Image.fromarray(stored), exif=exif.tobytes()))
    assert out.shape == (40, 20, 3)  # displayed: 20 wide, 40 high
    assert np.array_equal(out, np.rot90(stored, k=-1))  # clockwise: stored top-left -> top-right

    # The usual case, a camera JPEG.
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:10, :10] = (255, 0, 0)
    out = decode_image(_encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes()))
    assert out.shape == (40, 20, 3)
    assert out[2, 17, 0] > 200 and out[2, 2, 0] < 40 and out[30, 17, 0] < 40

    mask = np.zeros((20, 40), dtype=np.uint8)
    mask[:, :8] = 255
    decoded_mask = decode_mask(_encode(Image.fromarray(mask), exif=exif.tobytes()))
    assert decoded_mask.shape == (40, 20) and decoded_mask[:8].all() and not decoded_mask[8:].any()


def test_decode_mask_threshold_and_alpha():
    gray = np.array([[0, 127, 128, 255]], dtype=np.uint8)
    assert decode_mask(_encode(Image.fromarray(gray))).tolist() == [[False, False, True, True]]
    rgb = np.zeros((1, 2, 3), np.uint8) + 255
    assert decode_mask(_encode(Image.fromarray(rgb))).tolist() == [[True, True]]
    rgba = np.array([[[255, 255, 255, 255], [255, 255, 255, 0]]], dtype=np.uint8)  # white, but see-through
    assert decode_mask(_encode(Image.fromarray(rgba))).tolist() == [[True, False]]
    gray16 = np.array([[0, 32896, 65535]], dtype=np.uint16)
    assert decode_mask(_encode(Image.fromarray(gray16))).tolist() == [[False, True, True]]


def test_pixel_limit_is_checked_from_the_header():
    # 100000 x 100000 claimed, no pixel data worth the name: must fail before any allocation.
    bomb = _png_bytes(100_000, 100_000, 8, 2, b"")
    with _row_error("too_large"):
        decode_image(bomb)
    with _row_error("too_large"):
        decode_mask(bomb)
    # Below Pillow's own limit but above ours: our check, from the header too.
    medium = _png_bytes(10_000, 6_000, 8, 2, b"")
    with _row_error("too_large"):
        decode_image(medium)
    with _row_error("too_large"):
        decode_image(_encode(Image.fromarray(_noise(20, 20))), max_pixels=399)


@pytest.mark.parametrize(
    "data", [b"", b"definitely not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20], ids=["empty", "text", "broken-png"]
)
def test_unreadable_bytes(data):
    with _row_error("image_unreadable"):
        decode_image(data)


def test_truncated_jpeg_is_unreadable():
    data = _encode(Image.fromarray(_noise(64, 64)), "JPEG", quality=90)
    assert decode_image(data).shape == (64, 64, 3)
    with _row_error("image_unreadable"):
        decode_image(data[: len(data) // 2])
    with _row_error("image_unreadable"):
        decode_mask(data[: len(data) // 2])


def test_unsupported_format_is_refused():
    data = _encode(Image.fromarray(_noise(8, 8)), "PPM")  # Pillow reads it; we do not open it
    with _row_error("image_unreadable"):
        decode_image(data)


# -- region and crop window ------------------------------------------------------------------


def test_region_from_bbox_pixels():
    hole = region_from_bbox([10, 20, 30, 50], width=100, height=80)
    assert hole.shape == (80, 100) and hole.sum() == 20 * 30
    assert hole[20:50, 10:30].all()
    # Fractional coordinates: every touched pixel is in.
    hole = region_from_bbox([10.5, 20.2, 30.1, 49.9], width=100, height=80)
    assert check_region(hole, 100, 80) == (10, 20, 31, 50)
    # Partly outside: clipped.
    hole = region_from_bbox([90, 70, 150, 200], width=100, height=80)
    assert check_region(hole, 100, 80) == (90, 70, 100, 80)


@pytest.mark.parametrize(
    "bbox, code",
    [
        ([float("nan"), 0, 10, 10], "bad_bbox"),
        ([0, 0, float("inf"), 10], "bad_bbox"),
        ([-1, 0, 10, 10], "bad_bbox"),
        ([20, 0, 10, 10], "bad_bbox"),
        ([0, 10, 10, 10], "bad_bbox"),
        ([100, 0, 120, 20], "bad_bbox"),  # starts right of the photo
        ([0, 80, 20, 100], "bad_bbox"),  # starts below it
        ([1, 2, 3], "bad_bbox"),
        ([0, 0, 7, 20], "region_too_small"),
        ([95, 0, 120, 20], "region_too_small"),  # only 5 px left after clipping
    ],
)
def test_region_from_bbox_errors(bbox, code):
    with _row_error(code):
        region_from_bbox(bbox, width=100, height=80)


def test_check_region_errors():
    with _row_error("mask_size_mismatch"):
        check_region(np.ones((10, 20), bool), width=10, height=20)
    with _row_error("region_empty"):
        check_region(np.zeros((20, 10), bool), width=10, height=20)
    thin = np.zeros((40, 40), bool)
    thin[5:30, 10:17] = True  # 7 px wide
    with _row_error("region_too_small"):
        check_region(thin, 40, 40)
    ring = np.zeros((40, 40), bool)
    ring[5, 5:20] = ring[19, 5:20] = True  # sparse, but spans 15 x 15
    assert check_region(ring, 40, 40) == (5, 5, 20, 20)


def _hole(width: int, height: int, box: tuple[int, int, int, int]) -> np.ndarray:
    hole = np.zeros((height, width), bool)
    hole[box[1] : box[3], box[0] : box[2]] = True
    return hole


def test_crop_window_math():
    # 20 x 20 region centred at (50, 50): side 20 * 1.5 = 30.
    assert crop_window(_hole(200, 100, (40, 40, 60, 60)), 200, 100) == (35, 35, 65, 65)
    # Near the corner: shifted inside the photo.
    assert crop_window(_hole(200, 100, (0, 0, 20, 10)), 200, 100) == (0, 0, 30, 30)
    assert crop_window(_hole(200, 100, (185, 90, 200, 100)), 200, 100) == (177, 77, 200, 100)
    # Margin capped at the short side (80 * 1.5 = 120 > 100).
    assert crop_window(_hole(200, 100, (60, 40, 140, 60)), 200, 100) == (50, 0, 150, 100)
    # Odd slack: the window still contains the region.
    x0, y0, x1, y1 = crop_window(_hole(200, 100, (41, 41, 50, 50)), 200, 100)
    assert x1 - x0 == y1 - y0 == 14 and x0 <= 41 and x1 >= 50 and y0 <= 41 and y1 >= 50


def test_crop_window_region_longer_than_short_side():
    # 200 px long region in a 300 x 100 photo: the window is 200 square and reaches past the
    # photo vertically (centred on it); the whole region is inside it.
    assert crop_window(_hole(300, 100, (50, 10, 250, 90)), 300, 100) == (50, -50, 250, 150)
    window = crop(np.arange(300 * 100, dtype=np.int32).reshape(100, 300), (50, -50, 250, 150))
    assert window.shape == (200, 200)
    assert np.array_equal(window[0], window[50]) and np.array_equal(window[-1], window[149])  # edge-padded


# -- pre/postprocessing --------------------------------------------------------------------------


def test_preprocess_shapes_and_product_compositing():
    context = _noise(120, 160)
    hole = _hole(160, 120, (40, 30, 100, 90))
    product = np.zeros((40, 20, 4), np.uint8)  # 20 wide, 40 high, premultiplied
    product[:20, :, 0] = 255
    product[:20, :, 3] = 255  # top half opaque red, bottom half transparent
    out = preprocess(context, hole, product, resolution=64, product_size=32)
    assert out["crop_box"] == (25, 15, 115, 105)
    assert out["context"].shape == (64, 64, 3) and out["context"].dtype == np.uint8
    assert out["hole"].shape == (64, 64) and out["hole"].dtype == bool and out["hole"].any() and not out["hole"].all()
    assert out["product"].shape == (32, 32, 3) and out["product_alpha"].shape == (32, 32)
    # Opaque part red; transparent part and square padding neutral grey and not opaque.
    assert out["product"][4, 16].tolist() == [255, 0, 0] and out["product_alpha"][4, 16]
    assert out["product"][28, 16].tolist() == [128, 128, 128] and not out["product_alpha"][28, 16]
    assert out["product"][4, 1].tolist() == [128, 128, 128] and not out["product_alpha"][4, 1]


def test_preprocess_keeps_a_thin_region_when_shrinking_a_lot():
    context = np.zeros((1200, 1200, 3), np.uint8)
    hole = _hole(1200, 1200, (100, 300, 108, 1100))  # 8 px wide, 800 high: window 1200 -> 32
    out = preprocess(context, hole, np.full((4, 4, 4), 255, np.uint8), resolution=32, product_size=8)
    assert out["hole"].any()


def test_preprocess_transparent_product():
    with _row_error("product_transparent"):
        preprocess(_noise(40, 40), _hole(40, 40, (5, 5, 30, 30)), np.zeros((10, 10, 4), np.uint8), resolution=32)


@pytest.mark.parametrize("feather_px", [0, 1, 4])
def test_postprocess_outside_is_exact_inside_changes(feather_px):
    context = _noise(90, 130, seed=1)
    hole = np.zeros((90, 130), bool)
    hole[20:70, 30:90] = True
    hole[20:30, 30:45] = False  # not a rectangle
    crop_box = crop_window(hole, 130, 90)
    rendered = np.full((64, 64, 3), (10, 200, 30), np.uint8)
    out = np.asarray(postprocess(context, rendered, hole, crop_box, feather_px=feather_px))
    assert out.dtype == np.uint8 and out.shape == context.shape
    assert np.array_equal(out[~hole], context[~hole])
    deep_inside = (slice(40, 60), slice(50, 80))
    assert (out[deep_inside] == (10, 200, 30)).all()
    if feather_px > 1:
        # The edge is a blend, not the rendered colour: the seam is feathered inside.
        edge = out[45, 30].astype(int)
        assert not np.array_equal(edge, (10, 200, 30))
        expected = np.rint(context[45, 30] + (np.array((10, 200, 30)) - context[45, 30]) / feather_px)
        assert np.abs(edge - expected).max() <= 1


def _reference_postprocess(context, rendered, hole, crop_box, feather_px):
    # The blend written out plainly: 3x3 erosions by nine shifts, weight = round(255 k / n) of
    # the erosion count k, (original * (255 - w) + new * w + 127) // 255 on every pixel.
    count, mask = hole.astype(int), hole.copy()
    for _ in range(feather_px - 1):
        padded = np.pad(mask, 1, mode="edge")
        mask = np.logical_and.reduce(
            [padded[dy : dy + hole.shape[0], dx : dx + hole.shape[1]] for dy in range(3) for dx in range(3)]
        )
        count += mask
    steps = max(feather_px, 1)
    weight = ((count * 510 + steps) // (2 * steps))[..., None]
    x0, y0, x1, y1 = crop_box
    big = resize_uint8(rendered, x1 - x0, y1 - y0, "bicubic").astype(int)
    new = np.zeros(context.shape, int)
    ys, xs = np.mgrid[0 : context.shape[0], 0 : context.shape[1]]
    inside = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
    new[inside] = big[ys[inside] - y0, xs[inside] - x0]
    return ((context.astype(int) * (255 - weight) + new * weight + 127) // 255).astype(np.uint8)


@pytest.mark.parametrize("feather_px", [0, 1, 3, 4, 6])
def test_postprocess_equals_the_plain_blend(feather_px):
    rng = np.random.default_rng(feather_px)
    context = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    ragged = np.zeros((70, 90), bool)
    ragged[10:60, 0:50] = True  # touches the photo's left border
    ragged |= rng.random((70, 90)) < 0.02  # specks outside, holes inside
    ragged[30:40, 20:30] = False
    # rectangles (the direct path): inside, on one border, on two, thinner than the feather
    holes = [ragged] + [
        _hole(90, 70, box) for box in [(20, 15, 61, 50), (0, 30, 40, 70), (50, 0, 90, 70), (30, 20, 33, 60)]
    ]
    for hole in holes:
        crop_box = crop_window(hole, 90, 70)
        rendered = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        out = np.asarray(postprocess(context, rendered, hole, crop_box, feather_px=feather_px))
        assert np.array_equal(out, _reference_postprocess(context, rendered, hole, crop_box, feather_px))


def test_pillow_masked_paste_is_the_integer_blend():
    # postprocess relies on it: every (original, weight) pair, random new values.
    original, weight = (v.astype(np.uint8) for v in np.meshgrid(np.arange(256), np.arange(256)))
    new = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    base = np.repeat(original[..., None], 3, axis=2)
    image = Image.fromarray(base)
    image.paste(Image.fromarray(new), (0, 0), Image.fromarray(weight))
    w = weight.astype(int)[..., None]
    assert np.array_equal(np.asarray(image), (base.astype(int) * (255 - w) + new * w + 127) // 255)


def test_postprocess_region_on_photo_border_and_oversized_window():
    context = _noise(100, 300, seed=2)
    hole = _hole(300, 100, (50, 10, 250, 100))  # touches the bottom border, longer than 100
    crop_box = crop_window(hole, 300, 100)
    assert crop_box == (50, -50, 250, 150)
    rendered = np.full((32, 32, 3), 77, np.uint8)
    out = np.asarray(postprocess(context, rendered, hole, crop_box, feather_px=4))
    assert np.array_equal(out[~hole], context[~hole])
    assert (out[99, 100:200] == 77).all()  # the photo's border is not a seam: fully rendered
    assert not (out[10, 100:200] == 77).all()  # the region's top edge is feathered


def test_preprocess_postprocess_round_trip_with_padding():
    context = _noise(60, 200, seed=3)
    hole = _hole(200, 60, (20, 5, 180, 55))
    product = np.full((16, 16, 4), 255, np.uint8)
    inputs = preprocess(context, hole, product, resolution=32, product_size=16)
    assert inputs["crop_box"][1] < 0  # padded vertically
    out = np.asarray(postprocess(context, inputs["context"], hole, inputs["crop_box"], feather_px=4))
    assert out.shape == context.shape and np.array_equal(out[~hole], context[~hole])


# -- encoding ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp"])
def test_encode_image(fmt):
    pixels = _noise(24, 40)
    data = encode_image(pixels, fmt)
    assert Image.open(io.BytesIO(data)).format == {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    decoded = decode_image(data)
    assert decoded.shape == (24, 40, 3)
    if fmt == "png":
        assert np.array_equal(decoded, pixels)
    assert encode_image(pixels, fmt) == data  # deterministic bytes
    assert encode_image(Image.fromarray(pixels), fmt) == data  # postprocess's Pillow image: the same bytes
    assert EXTENSIONS[fmt] in ("jpg", "png", "webp")


def test_encode_image_rejects_bad_input():
    with pytest.raises(ValueError):
        encode_image(_noise(4, 4), "gif")
    with pytest.raises(ValueError):
        encode_image(np.zeros((4, 4), np.uint8), "png")
    with pytest.raises(ValueError):
        encode_image(Image.new("RGBA", (4, 4)), "png")


@pytest.mark.parametrize(
    "mode, resample", [("bilinear", Image.Resampling.BILINEAR), ("bicubic", Image.Resampling.BICUBIC)]
)
@pytest.mark.parametrize(
    "shape, size",
    [((525, 525, 3), (512, 512)), ((512, 512, 3), (700, 700)), ((300, 1000, 4), (97, 31)), ((64, 64, 3), (64, 64))],
)
def test_resize_uint8_equals_pils_resample(mode, resample, shape, size):
    # torch's uint8 kernels stand in for PIL's Image.resize (4-5x faster): same filters, same
    # pixel-centre mapping, antialiased when shrinking; rounding may differ by a level or two.
    image = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    if shape[2] == 4:  # used for opaque products only: PIL premultiplies RGBA, a no-op at alpha 255
        image[..., 3] = 255
    got = resize_uint8(image, size[0], size[1], mode)
    expected = np.asarray(Image.fromarray(image).resize(size, resample))
    assert got.shape == expected.shape and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - expected)
    assert diff.max() <= 2 and diff.mean() < 0.02, (diff.max(), diff.mean())
    # the kernels' out= form, written into a channels-last array, gives F.interpolate's pixels
    import torch
    import torch.nn.functional as F

    reference = F.interpolate(
        torch.from_numpy(image).permute(2, 0, 1)[None], size=size[::-1], mode=mode, antialias=True
    )
    assert got.flags.c_contiguous and np.array_equal(got, reference[0].permute(1, 2, 0).numpy())
    # a non-contiguous view (a crop of a bigger photo) gives the same pixels as its copy
    photo = np.random.default_rng(1).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    assert np.array_equal(
        resize_uint8(photo[20:150, 40:170], 64, 64, mode), resize_uint8(photo[20:150, 40:170].copy(), 64, 64, mode)
    )


def _brute_coverage(hole, size):
    height, width = hole.shape
    expected = np.zeros((size, size), bool)
    for i in range(size):
        rows = hole[(i * height) // size : -(-(i + 1) * height // size)].any(axis=0)
        for j in range(size):
            expected[i, j] = rows[(j * width) // size : -(-(j + 1) * width // size)].any()
    return expected


def test_model_hole_is_exact_coverage():
    # A model pixel is hole iff a photo pixel overlapping its area is: brute force on random
    # holes (the gathers) and random rectangles (the direct path every bbox region takes).
    from pipeline.compose import _coverage

    rng = np.random.default_rng(2)
    for height, width, size in [(525, 525, 128), (97, 130, 128), (300, 300, 512), (5, 700, 64)]:
        hole = rng.random((height, width)) < 0.003
        assert np.array_equal(_coverage(hole, size), _brute_coverage(hole, size))
        for _ in range(3):
            x0, x1 = sorted(rng.integers(0, width, 2))
            y0, y1 = sorted(rng.integers(0, height, 2))
            rectangle = np.zeros((height, width), bool)
            rectangle[y0 : y1 + 1, x0 : x1 + 1] = True
            assert np.array_equal(_coverage(rectangle, size), _brute_coverage(rectangle, size))
    assert not _coverage(np.zeros((40, 30), bool), 16).any()
