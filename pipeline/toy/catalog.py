"""A learnable synthetic catalog: products as identities, photos that show them. No torch.

    make_training_catalog("toy", n_pairs=256, n_test=32) -> path of manifest.parquet (+ test.parquet)

Every product is an *identity*: a shape (disc, square, ring, hexagon: the ring's inscribed
rectangle is not its bounding box), a continuous hue (saturated), and a label patch of the
opposite hue in one of four quadrants. Scenes are of low saturation (< ~0.2), so a saturated pixel
is a product pixel and the hue of a render's region says which product it shows.

- `context_uri` (x_s): the product composited into a scene: scaled, turned a little (+-12 deg),
  brightened or darkened (x0.85..1.1), over a soft shadow.
- `mask_uri`: its alpha, every pixel the product touches (> 0, not >= 128: the anti-aliased
  fringe would otherwise stay in the masked photo and tell the model the hue); every fourth row
  gives the alpha's bounding box as `bbox` instead, as catalogs do.
- `product_uri` (x_r): the same product on white from another rotation (>= 10 deg apart), so
  training never sees the target as its own reference.
- `split`: train | val, from **disjoint hue ranges**: the circle in 24 sectors of 15 deg, sectors
  3 mod 8 are val, 7 mod 8 are test, the rest train. Nothing can be memorised by hue.
- `shape`, `hue`, `quadrant`: the product's metadata, pass-through columns.

`test.parquet` (with `n_test` > 0) is a *render* manifest of the test split, two rows per test
product: `role=own` (its own product) and `role=swap` (another test product, >= 60 deg of hue
away, in the same scene and mask: the swap test). Its context is the scene with the shadow but
without the product (nothing of the product is left to copy outside the hole), and `target_uri`
is the true x_s; `hue` is the hue of the product *given*, `scene_hue` that of the one the photo
showed. `jobs.eval_synthetic` scores renders of it.

With `bad_rows`, two training rows are broken on purpose (a missing photo, a bbox outside the
photo): training skips and counts them.

`kind="detail"` (issue 29) makes identity a fine *spatial* detail as well as a continuous hue:
every product is a square in its hue carrying a 3 x 3 grid **code** (9 bits, row-major from the
top-left; a 1 cell is the same hue at value 0.35 instead of 0.85, so the code is a light/dark
pattern and the hue stays one hue). The grid spans `GRID_FRACTION` of the square; the render window
is the region grown by `crop_margin` (0.25) per side, so at train-tiny's 64 px a cell is ~11 px and,
through its factor-4 VAE, ~2.8 latent px (`detail_geometry`, written to `catalog.json`). Splits:
the 512 codes are dealt once (fixed permutation) into 64 test, 64 val and 384 train codes, so test
products carry codes never seen in training; hues come in **10-degree bands** (band index mod 6: 1
test, 4 val, the rest train), so every test band lies between two train bands and a render's hue
can be read *within* its band (`detail_eval`'s slope), not just as a colour family. The turn is
small (+-4 deg photo, the reference 4..10 deg away) so the grid stays readable from the region's box.
"""

from __future__ import annotations

import colorsys
import json
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "make_training_catalog",
    "KINDS",
    "SHAPES",
    "hue_split",
    "split_hue",
    "PRODUCT_SIDE",
    "GRID",
    "GRID_FRACTION",
    "BAND_DEG",
    "detail_hue_split",
    "band_centre",
    "code_split",
    "code_bits",
    "detail_geometry",
    "catalog_kind",
]

KINDS = ("toy", "detail")  # make_training_catalog's kinds: the colour toy (default) and issue 29's detail catalog

SHAPES = ("disc", "square", "ring", "hexagon")
PRODUCT_SIDE = 96  # the canonical product drawing, px (resized into each photo)
SECTOR_DEG = 15.0
_SPLIT_OF_SECTOR = {3: "val", 7: "test"}  # sector index mod 8; the rest are train
SATURATION, VALUE = 0.8, 0.85

GRID = 3  # the detail code: GRID x GRID cells, one bit each
GRID_FRACTION = 0.78  # the grid's side over the product square's (a border of the product hue around it)
DARK_VALUE = 0.35  # a 1 cell: the product's hue at this HSV value (a 0 cell: VALUE)
BAND_DEG = 10.0  # the detail catalog's hue bands
_SPLIT_OF_BAND = {1: "test", 4: "val"}  # band index mod 6; the rest are train (each test band between two)
_CODES = np.random.default_rng(29).permutation(2 ** (GRID * GRID))  # dealt once: the first 64 test, then 64 val
# The render window (crop_margin 0.25 per side) and the train-tiny preset (64 px, VAE factor 4)
# the detail catalog is drawn for; tests/unit/test_detail.py checks them against the preset.
DETAIL_CROP_MARGIN, DETAIL_RESOLUTION, DETAIL_VAE_FACTOR = 0.25, 64, 4


def hue_split(hue: float) -> str:
    """train | val | test for a hue in degrees: the split's hue ranges are disjoint."""
    return _SPLIT_OF_SECTOR.get(int(hue % 360 // SECTOR_DEG) % 8, "train")


def split_hue(split: str, rng: np.random.Generator) -> float:
    """A hue drawn uniformly from `split`'s sectors."""
    sectors = [s for s in range(24) if hue_split(s * SECTOR_DEG) == split]
    return float(sectors[int(rng.integers(len(sectors)))] * SECTOR_DEG + rng.uniform(0, SECTOR_DEG))


def detail_hue_split(hue: float) -> str:
    """train | val | test of a detail-catalog hue: 10-degree bands, test and val each between two train bands."""
    return _SPLIT_OF_BAND.get(int(hue % 360 // BAND_DEG) % 6, "train")


def band_centre(hue: float) -> float:
    """The centre of the 10-degree band `hue` lies in."""
    return (hue % 360 // BAND_DEG + 0.5) * BAND_DEG


def code_split(code: int) -> str:
    """train | val | test of a 9-bit code: the splits' codes are disjoint."""
    rank = int(np.flatnonzero(_CODES == code)[0])
    return "test" if rank < 64 else "val" if rank < 128 else "train"


def code_bits(code: int) -> list[int]:
    """The code's cells, row-major from the top-left: 1 dark, 0 light."""
    return [(code >> k) & 1 for k in range(GRID * GRID)]


def catalog_kind(folder: str) -> str:
    """The kind of the catalog written into `folder`: "detail" where its catalog.json says so
    (only the detail kind writes one), else "toy"."""
    path = os.path.join(folder, "catalog.json")
    if not os.path.exists(path):
        return "toy"
    with open(path) as f:
        return json.load(f).get("kind", "toy")


def detail_geometry(resolution: int = DETAIL_RESOLUTION, vae_factor: int = DETAIL_VAE_FACTOR) -> dict:
    """Pixels per code cell in the render window (the region grown by the crop margin per side,
    resized to `resolution`) and in the latents of a factor-`vae_factor` VAE."""
    cell = resolution / (1 + 2 * DETAIL_CROP_MARGIN) * GRID_FRACTION / GRID
    return {
        "grid": GRID,
        "grid_fraction": GRID_FRACTION,
        "crop_margin": DETAIL_CROP_MARGIN,
        "resolution": resolution,
        "vae_factor": vae_factor,
        "cell_px": round(cell, 2),
        "latent_px_per_cell": round(cell / vae_factor, 2),
    }


def _detail_hue(split: str, rng: np.random.Generator) -> float:
    bands = [b for b in range(36) if detail_hue_split(b * BAND_DEG) == split]
    return float(bands[int(rng.integers(len(bands)))] * BAND_DEG + rng.uniform(0, BAND_DEG))


def _detail_code(split: str, rng: np.random.Generator) -> int:
    codes = {"test": _CODES[:64], "val": _CODES[64:128], "train": _CODES[128:]}[split]
    return int(codes[int(rng.integers(len(codes)))])


def _rgb(hue: float, value: float = VALUE) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(hue % 360 / 360, SATURATION, value)
    return round(r * 255), round(g * 255), round(b * 255)


def detail_image(hue: float, code: int) -> np.ndarray:
    """The detail catalog's RGBA drawing: a square in `hue` with the 3 x 3 `code` on it."""
    p = PRODUCT_SIDE
    alpha = Image.new("L", (p, p), 0)
    ImageDraw.Draw(alpha).rounded_rectangle([0, 0, p - 1, p - 1], radius=p // 16, fill=255)
    colour = Image.new("RGB", (p, p), _rgb(hue))
    draw = ImageDraw.Draw(colour)
    side = GRID_FRACTION * p / GRID
    start = (p - GRID * side) / 2
    for k, bit in enumerate(code_bits(code)):
        if bit:
            x, y = start + (k % GRID) * side, start + (k // GRID) * side
            draw.rectangle([x, y, x + side - 1, y + side - 1], fill=_rgb(hue, DARK_VALUE))
    return np.dstack([np.asarray(colour), np.asarray(alpha)])


def product_image(shape: str, hue: float, quadrant: int) -> np.ndarray:
    """The canonical RGBA drawing: the shape in `hue`, a label of the opposite hue in `quadrant`
    (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right), clipped to the shape."""
    p = PRODUCT_SIDE
    alpha = Image.new("L", (p, p), 0)
    draw = ImageDraw.Draw(alpha)
    c, r = p / 2, 0.46 * p
    if shape == "disc":
        draw.ellipse([c - r, c - r, c + r, c + r], fill=255)
    elif shape == "square":
        draw.rounded_rectangle([c - 0.42 * p, c - 0.42 * p, c + 0.42 * p, c + 0.42 * p], radius=p // 10, fill=255)
    elif shape == "ring":
        draw.ellipse([c - r, c - r, c + r, c + r], fill=255)
        inner = 0.22 * p
        draw.ellipse([c - inner, c - inner, c + inner, c + inner], fill=0)
    elif shape == "hexagon":
        draw.polygon([(c + r * math.cos(math.pi / 3 * k), c + r * math.sin(math.pi / 3 * k)) for k in range(6)], 255)
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    colour = Image.new("RGB", (p, p), _rgb(hue))
    # The label sits at the quadrant's centre (+-0.25 p), inside every shape's band (the ring's too).
    lx, ly = c + (0.25 if quadrant % 2 else -0.25) * p, c + (0.25 if quadrant >= 2 else -0.25) * p
    half = 0.12 * p
    ImageDraw.Draw(colour).rectangle([lx - half, ly - half, lx + half, ly + half], fill=_rgb(hue + 180))
    return np.dstack([np.asarray(colour), np.asarray(alpha)])


def scene(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A low-saturation photo: a tinted grey gradient, a floor band, a few soft blobs, grain."""
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    base, tint = rng.uniform(70, 200), rng.uniform(-10, 10, 3)
    top, bottom = base + tint + rng.uniform(-30, 30), base + tint + rng.uniform(-30, 30)
    img = np.broadcast_to(top * (1 - y) + bottom * y, (height, width, 3)).copy()
    floor = int(height * rng.uniform(0.55, 0.8))
    img[floor:] = img[floor:] * rng.uniform(0.7, 0.95) + rng.uniform(-6, 6, 3)
    pil = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, width - 16)), int(rng.integers(0, height - 16))
        w, h = int(rng.integers(8, width // 3)), int(rng.integers(8, height // 3))
        grey = rng.uniform(50, 220)
        draw.ellipse([x0, y0, x0 + w, y0 + h], fill=tuple(int(grey + t) for t in rng.uniform(-8, 8, 3)))
    out = np.asarray(pil.filter(ImageFilter.GaussianBlur(1.0))).astype(np.float32)
    return (out + rng.normal(0, 3, out.shape)).clip(0, 255).astype(np.uint8)


def _turned(rgba: np.ndarray, degrees: float, side: int) -> Image.Image:
    image = Image.fromarray(rgba, "RGBA").rotate(degrees, resample=Image.Resampling.BICUBIC, expand=True)
    return image.resize((side, side), Image.Resampling.BILINEAR)


def composite(photo: np.ndarray, rgba: np.ndarray, x: int, y: int, brightness: float) -> dict[str, np.ndarray]:
    """The product (RGBA, already turned and sized) placed at (x, y) over a soft shadow.

    Returns `shown` (x_s), `shadowed` (the scene with the shadow alone: the test rows' context)
    and `alpha` (float, photo-sized)."""
    height, width = photo.shape[:2]
    side = rgba.shape[0]
    alpha = np.zeros((height, width), np.float32)
    alpha[y : y + side, x : x + side] = rgba[..., 3] / 255.0
    shadow = np.asarray(
        Image.fromarray((np.roll(alpha, (3, 4), (0, 1)) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(3))
    )
    shadowed = photo.astype(np.float32) * (1 - 0.4 * shadow[..., None] / 255.0)
    colour = np.zeros_like(shadowed)
    colour[y : y + side, x : x + side] = rgba[..., :3].astype(np.float32) * brightness
    shown = colour * alpha[..., None] + shadowed * (1 - alpha[..., None])
    as_uint8 = lambda a: a.round().clip(0, 255).astype(np.uint8)  # noqa: E731
    return {"shown": as_uint8(shown), "shadowed": as_uint8(shadowed), "alpha": alpha}


def _reference(rgba: np.ndarray, degrees: float) -> np.ndarray:
    """x_r: the product on white, turned by `degrees`, on a canvas with its own margins."""
    turned = Image.fromarray(rgba, "RGBA").rotate(degrees, resample=Image.Resampling.BICUBIC, expand=True)
    canvas = Image.new("RGB", (turned.width + 16, turned.height + 16), (255, 255, 255))
    canvas.paste(turned, (8, 8), turned)
    return np.asarray(canvas)


def _identity(split: str, rng: np.random.Generator) -> dict:
    return {
        "shape": SHAPES[int(rng.integers(len(SHAPES)))],
        "hue": split_hue(split, rng),
        "quadrant": int(rng.integers(4)),
    }


def _detail_identity(split: str, rng: np.random.Generator) -> dict:
    return {"shape": "square", "hue": _detail_hue(split, rng), "code": _detail_code(split, rng)}


def _pair(folder: str, name: str, identity: dict, size: tuple[int, int], rng: np.random.Generator) -> dict:
    """Write one pair's images; returns its paths (relative), region and the product's drawing."""
    width, height = size
    if "code" in identity:  # the detail catalog: a small turn keeps the grid readable
        drawing, turn, apart = detail_image(identity["hue"], identity["code"]), 4, (4, 10)
    else:
        drawing, turn, apart = product_image(identity["shape"], identity["hue"], identity["quadrant"]), 12, (10, 30)
    angle = float(rng.uniform(-turn, turn))
    other = angle + float(rng.choice([-1, 1]) * rng.uniform(*apart))  # another view, never the same one
    side = int(min(width, height) * rng.uniform(0.38, 0.55))
    x, y = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
    layers = composite(
        scene(width, height, rng), np.asarray(_turned(drawing, angle, side)), x, y, rng.uniform(0.85, 1.1)
    )
    mask = layers["alpha"] > 0
    paths = {k: f"images/{name}-{k}.png" for k in ("context", "scene", "product", "mask")}
    Image.fromarray(layers["shown"]).save(os.path.join(folder, paths["context"]))
    Image.fromarray(layers["shadowed"]).save(os.path.join(folder, paths["scene"]))
    Image.fromarray(_reference(drawing, other)).save(os.path.join(folder, paths["product"]))
    Image.fromarray((mask * 255).astype(np.uint8)).save(os.path.join(folder, paths["mask"]))
    ys, xs = np.nonzero(mask)
    return {**paths, "bbox": [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]}


def _hue_distance(a: float, b: float) -> float:
    return abs((a - b + 180) % 360 - 180)


def _training_rows(folder: str, n_pairs: int, val_fraction: float, rng, sizes, identify) -> list[dict]:
    n_val = int(round(n_pairs * val_fraction))
    rows = []
    for i in range(n_pairs):
        split = "val" if i >= n_pairs - n_val else "train"
        identity = identify(split, rng)
        pair = _pair(folder, f"pair-{i:04d}", identity, sizes[i % len(sizes)], rng)
        row = {"pair_id": f"pair-{i:04d}", "context_uri": pair["context"], "product_uri": pair["product"]}
        region = {"mask_uri": None, "bbox": pair["bbox"]} if i % 4 == 0 else {"mask_uri": pair["mask"], "bbox": None}
        rows.append({**row, **region, "split": split, **identity})
    return rows


def _test_rows(folder: str, n_test: int, rng, sizes, identify) -> list[dict]:
    """Two render rows per test product: its own product, and another one (the swap test)."""
    identities = [identify("test", rng) for _ in range(n_test)]
    pairs = [_pair(folder, f"test-{i:04d}", identities[i], sizes[i % len(sizes)], rng) for i in range(n_test)]
    rows = []
    for i, (identity, pair) in enumerate(zip(identities, pairs)):
        # the next test product at least 60 deg of hue away (the test sectors are 120 deg apart)
        j = next(
            (
                k % n_test
                for k in range(i + 1, i + n_test)
                if _hue_distance(identities[k % n_test]["hue"], identity["hue"]) >= 60
            ),
            i,
        )
        common = {
            "context_uri": pair["scene"],
            "mask_uri": pair["mask"],
            "scene_pair": f"test-{i:04d}",
            "scene_hue": identity["hue"],
            **({"scene_code": identity["code"]} if "code" in identity else {}),
        }
        rows.append(
            {
                "pair_id": f"test-{i:04d}-own",
                **common,
                "product_uri": pair["product"],
                "role": "own",
                "target_uri": pair["context"],
                **identity,
            }
        )
        rows.append(
            {
                "pair_id": f"test-{i:04d}-swap",
                **common,
                "product_uri": pairs[j]["product"],
                "role": "swap",
                "target_uri": None,
                **identities[j],
            }
        )
    return rows


def _bad_rows(first: dict) -> list[dict]:
    missing = {"context_uri": "images/does-not-exist.png", "mask_uri": None, "bbox": [4.0, 4.0, 60.0, 60.0]}
    outside = {"mask_uri": None, "bbox": [5000.0, 5000.0, 5100.0, 5100.0]}
    return [
        {**first, **missing, "pair_id": "bad-missing-context", "split": "train"},
        {**first, **outside, "pair_id": "bad-bbox-outside", "split": "train"},
    ]


def _write(rows: list[dict], path: str) -> None:
    types = {
        "bbox": pa.list_(pa.float64()),
        "hue": pa.float64(),
        "scene_hue": pa.float64(),
        "quadrant": pa.int64(),
        "code": pa.int64(),
        "scene_code": pa.int64(),
    }
    names = list(dict.fromkeys(k for r in rows for k in r))
    pq.write_table(pa.table({c: pa.array([r.get(c) for r in rows], types.get(c, pa.string())) for c in names}), path)


def make_training_catalog(
    folder: str,
    n_pairs: int = 16,
    val_fraction: float = 0.25,
    bad_rows: bool = False,
    seed: int = 0,
    sizes: list[tuple[int, int]] | None = None,
    manifest_name: str = "manifest.parquet",
    n_test: int = 0,
    kind: str = "toy",
) -> str:
    """Write images under `folder`, the training manifest (train + val) and, with `n_test`,
    `test.parquet` beside it; relative paths. Returns the training manifest's path. `kind`
    "detail" also writes `catalog.json` (the code geometry and splits)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    rng = np.random.default_rng(seed)
    sizes = sizes or [(128, 112), (112, 112), (144, 120), (112, 128)]
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    identify = _detail_identity if kind == "detail" else _identity
    if kind == "detail":
        with open(os.path.join(folder, "catalog.json"), "w") as f:
            metadata = {
                "kind": kind,
                **detail_geometry(),
                "dark_value": DARK_VALUE,
                "light_value": VALUE,
                "band_deg": BAND_DEG,
                "bands": "band index (hue // band_deg) mod 6: 1 test, 4 val, else train",
                "test_codes": sorted(int(c) for c in _CODES[:64]),
                "val_codes": sorted(int(c) for c in _CODES[64:128]),
            }
            json.dump(metadata, f, indent=1)
    rows = _training_rows(folder, n_pairs, val_fraction, rng, sizes, identify)
    if bad_rows:
        rows += _bad_rows(rows[0])
    path = os.path.join(folder, manifest_name)
    _write(rows, path)
    if n_test:
        _write(_test_rows(folder, n_test, rng, sizes, identify), os.path.join(folder, "test.parquet"))
    return path
