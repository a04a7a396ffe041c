"""Fine-detail metrics on the detail catalog's test split (`make_training_catalog(kind="detail")`),
without metric weights. numpy, and torchmetrics for SSIM.

    metrics = evaluate_detail(rows, images, base_dir)   # test.parquet's rows, {pair_id: H x W x 3} renders

On the rows of `test.parquet` (each test product's code is one training never saw, its hue lies in
a 10-degree test band between two train bands); every figure is over the region (the mask):

- **detail accuracy** (own rows; chance 0.5 per cell, the codes being uniform): the share of the
  9 code cells read back right. A cell is read from the inner half of its square in the region's
  box (the grid spans `GRID_FRACTION` of it, centred): dark when its mean HSV value is under
  `DARK_THRESHOLD`, midway between the drawing's light (0.85) and dark (0.35) values.
  **code exact** (chance 1/512): all nine right.
- **hue error** (own rows, degrees; chance ~90, a predictor of the band's centre 2.5): as
  `synthetic_eval.region_hue` (saturation-weighted circular mean of the product pixels).
- **within-band hue slope** (own rows; 1.0: a continuous hue carried, 0: each band painted one
  hue, e.g. its nearest trained hue): the least-squares slope of rendered hue on true hue, both as
  offsets from their band's centre, pooled with one intercept per band.
- **swap** (chance 0.5): per scene, the own render (its own product) and the swap render (another
  test product, same scene and mask); a hit when the own render is closer (masked mean squared
  error) to the true composite than the swap render is; a tie counts 0.5.
- **masked PSNR** (dB) and **masked SSIM** (torchmetrics' Gaussian SSIM map, averaged over the
  region's pixels) of the own render against the true composite.

`REFERENCES` says how the bench gets its reference rows: copy-paste of the hint
(`synthetic_eval.copy_paste_images`) and the empty hole (the test context as the render).
"""

from __future__ import annotations

import os

import numpy as np

from pipeline.toy.catalog import BAND_DEG, GRID, GRID_FRACTION, band_centre, code_bits
from pipeline.toy.synthetic_eval import hue_distance, region_hue

__all__ = [
    "METRICS",
    "CHANCE",
    "REFERENCES",
    "DARK_THRESHOLD",
    "read_code",
    "within_band_slope",
    "masked_psnr",
    "masked_ssim",
    "evaluate_detail",
]

METRICS = ("detail_acc", "code_exact", "hue_error_deg", "hue_slope", "swap", "masked_psnr_db", "masked_ssim")
# What a render that ignores the product scores, from the catalog's construction (uniform codes,
# uniform hues): PSNR and SSIM have no such number; the empty-hole reference row measures them.
CHANCE = {
    "detail_acc": 0.5,
    "code_exact": 1 / 2 ** (GRID * GRID),
    "hue_error_deg": 90.0,
    "hue_slope": 0.0,
    "swap": 0.5,
}
REFERENCES = {
    "copy-paste of the hint": "the hint itself pasted back (synthetic_eval.copy_paste_images): the upper reference",
    "empty hole": "the test context (scene and shadow, no product) as the render: nothing transferred",
    "band centre": f"each test product painted its band's centre hue: hue error {BAND_DEG / 4} deg, slope 0",
}
DARK_THRESHOLD = 0.6  # HSV value; the drawing's cells are 0.85 (light) and 0.35 (dark), x0.85..1.1 in the photo


def read_code(rgb: np.ndarray, mask: np.ndarray) -> list[int]:
    """The 9 cells (row-major, 1 dark) read from the region `mask` of the image `rgb`."""
    ys, xs = np.nonzero(mask)
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    side = min(ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min()) * GRID_FRACTION
    cell = side / GRID
    value = rgb.astype(np.float32).max(axis=-1) / 255
    bits = []
    for k in range(GRID * GRID):
        y0 = cy - side / 2 + (k // GRID + 0.25) * cell
        x0 = cx - side / 2 + (k % GRID + 0.25) * cell
        patch = value[int(round(y0)) : int(round(y0 + cell / 2)) + 1, int(round(x0)) : int(round(x0 + cell / 2)) + 1]
        bits.append(int(float(patch.mean()) < DARK_THRESHOLD))
    return bits


def within_band_slope(true_hues: list[float], rendered_hues: list[float]) -> float | None:
    """Pooled within-band least-squares slope of rendered on true hue (offsets from the true hue's
    band centre, the rendered one wrapped to +-180); None with no spread to fit."""
    centres = [band_centre(h) for h in true_hues]
    x = np.array([(t - c + 180) % 360 - 180 for t, c in zip(true_hues, centres)])
    y = np.array([(r - c + 180) % 360 - 180 for r, c in zip(rendered_hues, centres)])
    bands = np.array(centres)
    sxy = sxx = 0.0
    for band in np.unique(bands):
        at = bands == band
        dx, dy = x[at] - x[at].mean(), y[at] - y[at].mean()
        sxy, sxx = sxy + float(dx @ dy), sxx + float(dx @ dx)
    return sxy / sxx if sxx > 0 else None


def masked_psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    mse = float(np.mean((a[mask].astype(np.float64) - b[mask].astype(np.float64)) ** 2))
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def masked_ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """torchmetrics' SSIM map (Gaussian 11 x 11, sigma 1.5, data range 255) averaged over `mask`."""
    import torch
    from torchmetrics.functional.image import structural_similarity_index_measure

    as_tensor = lambda image: torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]  # noqa: E731
    _, full = structural_similarity_index_measure(
        as_tensor(a), as_tensor(b), data_range=255.0, return_full_image=True, reduction="none"
    )
    return float(full[0].mean(dim=0).numpy()[mask].mean())


def _load(base_dir: str, uri: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(os.path.join(base_dir, uri)).convert("RGB"))


def _mse(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.mean((a[mask].astype(np.float64) - b[mask].astype(np.float64)) ** 2))


def evaluate_detail(rows: list[dict], images: dict[str, np.ndarray], base_dir: str) -> dict:
    """The metrics over `rows` (a detail test.parquet's, as dicts) rendered as `images` (pair_id ->
    H x W x 3 uint8 at the photo's size). A row without an image counts as missing, not as scored."""
    own = [r for r in rows if r["role"] == "own" and r["pair_id"] in images]
    swaps = {r["scene_pair"]: r for r in rows if r["role"] == "swap" and r["pair_id"] in images}
    cells, exact, hue_errors, psnrs, ssims, swap_hits = [], [], [], [], [], []
    true_hues, rendered_hues = [], []
    for row in own:
        image, mask = images[row["pair_id"]], _load(base_dir, row["mask_uri"])[..., 0] >= 128
        target = _load(base_dir, row["target_uri"])
        hits = [a == b for a, b in zip(read_code(image, mask), code_bits(row["code"]))]
        cells += hits
        exact.append(all(hits))
        hue = region_hue(image, mask)
        hue_errors.append(90.0 if hue is None else hue_distance(hue, row["hue"]))
        if hue is not None:
            true_hues.append(row["hue"])
            rendered_hues.append(hue)
        psnrs.append(masked_psnr(image, target, mask))
        ssims.append(masked_ssim(image, target, mask))
        if (swap := swaps.get(row["scene_pair"])) is not None:
            mine, other = _mse(image, target, mask), _mse(images[swap["pair_id"]], target, mask)
            swap_hits.append(0.5 if mine == other else float(mine < other))
    mean = lambda values: round(float(np.mean(values)), 4) if values else None  # noqa: E731
    slope = within_band_slope(true_hues, rendered_hues) if true_hues else None
    return {
        "detail_acc": mean(cells),
        "code_exact": mean(exact),
        "hue_error_deg": mean(hue_errors),
        "hue_slope": None if slope is None else round(slope, 4),
        "swap": mean(swap_hits),
        "masked_psnr_db": mean(psnrs),
        "masked_ssim": mean(ssims),
        "own_rows": len(own),
        "swap_rows": len(swap_hits),
        "missing_rows": len(rows) - len(own) - len(swaps),
    }
