"""Identity metrics on the synthetic test split, without any metric weights. numpy only.

    metrics = evaluate_run("toy/test.parquet", "renders/", "trained")   # a jobs.render run of test.parquet
    metrics = evaluate_images(rows, images, base_dir)                    # any {pair_id: H x W x 3} renders

The catalog (`pipeline.toy.catalog`) makes identity measurable: scenes are of low saturation,
so the saturated pixels of the region are product pixels, and a product is its hue and the
quadrant of its opposite-hue label. On the rows of `test.parquet`:

- **hue error** (own rows, degrees, chance ~90): the circular mean of the region's hue, weighted
  by saturation (pixels of saturation >= 0.35 only, i.e. product pixels; none: 90), against the
  true hue. The label is exactly opposite, so it shrinks that mean's length without turning it.
- **swap test** (swap rows, chance 0.5): same scene and mask, another product given: the share of
  renders whose hue is closer to the product given than to the one the photo showed (no product
  pixel at all: 0.5).
- **retrieval top-1 among 16** (own rows, chance 1/16): a descriptor per region (per quadrant of
  the region's box, the saturation-weighted mean of (cos h, sin h): hue and label place); the
  render's nearest among its own and 15 other test products' true photos (x_s).
- **label-quadrant accuracy** (own rows, chance 0.25): the quadrant of the region's box with the
  most saturation at the label's hue (opposite the product's, +-45 deg).
- **masked PSNR** (own rows, dB): render vs the true x_s over the region's pixels.

`copy_paste_images` is the identity upper reference: the hint itself (the product resized into
the largest rectangle inside the hole, as the model receives it) pasted back by the render job's
own `compose.postprocess`, no model.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import RENDER_DEFAULTS

__all__ = [
    "METRICS",
    "hue_distance",
    "region_hue",
    "evaluate_images",
    "evaluate_run",
    "copy_paste_images",
    "read_run_images",
]

METRICS = ("hue_error_deg", "swap", "retrieval_top1", "quadrant_acc", "masked_psnr_db")
GALLERY = 16
LABEL_TOLERANCE_DEG = 45.0
MIN_SATURATION = 0.35  # the catalog's products are drawn at 0.8, its scenes stay under ~0.2


def hue_distance(a: float, b: float) -> float:
    """Angle between two hues in degrees, 0..180."""
    return float(abs((a - b + 180) % 360 - 180))


def _hue_saturation(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV hue (degrees) and saturation of uint8 RGB pixels (N x 3)."""
    x = rgb.astype(np.float32) / 255
    high, low = x.max(axis=-1), x.min(axis=-1)
    chroma = high - low
    safe = np.where(chroma > 0, chroma, 1)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    hue = np.where(high == r, (g - b) / safe % 6, np.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60
    return np.where(chroma > 0, hue, 0.0), np.where(high > 0, chroma / np.where(high > 0, high, 1), 0.0)


def _vectors(rgb: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel (cos h, sin h) x saturation, product pixels only: the scenes stay below
    `MIN_SATURATION`, and a wide low-saturation area would otherwise outweigh a small product."""
    hue, sat = _hue_saturation(rgb[mask])
    sat = np.where(sat >= MIN_SATURATION, sat, 0.0)
    radians = np.deg2rad(hue)
    return np.stack([np.cos(radians) * sat, np.sin(radians) * sat], -1), hue


def region_hue(rgb: np.ndarray, mask: np.ndarray) -> float | None:
    """Saturation-weighted circular mean hue of the masked pixels; None when nothing is saturated."""
    vectors, _ = _vectors(rgb, mask)
    total = vectors.sum(axis=0)
    if not np.any(total):
        return None
    return float(np.rad2deg(np.arctan2(total[1], total[0])) % 360)


def _quadrants(mask: np.ndarray) -> list[np.ndarray]:
    """The mask split at its box's centre: top-left, top-right, bottom-left, bottom-right."""
    ys, xs = np.nonzero(mask)
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    yy, xx = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]]
    top, left = yy < cy, xx < cx
    return [mask & top & left, mask & top & ~left, mask & ~top & left, mask & ~top & ~left]


def _descriptor(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.concatenate([_vectors(rgb, q)[0].mean(axis=0) if q.any() else np.zeros(2) for q in _quadrants(mask)])


def _label_quadrant(rgb: np.ndarray, mask: np.ndarray, label_hue: float) -> int:
    scores = []
    for quadrant in _quadrants(mask):
        hue, sat = _hue_saturation(rgb[quadrant])
        sat = np.where(sat >= MIN_SATURATION, sat, 0.0)
        near = np.abs((hue - label_hue + 180) % 360 - 180) < LABEL_TOLERANCE_DEG
        scores.append(float((sat * near).sum()))
    return int(np.argmax(scores))


def _psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    mse = float(np.mean((a[mask].astype(np.float64) - b[mask].astype(np.float64)) ** 2))
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def _load(base_dir: str, uri: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(os.path.join(base_dir, uri)).convert("RGB"))


def evaluate_images(rows: list[dict], images: dict[str, np.ndarray], base_dir: str) -> dict:
    """The five metrics over `rows` (test.parquet's, as dicts) rendered as `images` (pair_id ->
    H x W x 3 uint8 at the photo's size). A row without an image counts as missing, not as scored."""
    own = [r for r in rows if r["role"] == "own" and r["pair_id"] in images]
    swap = [r for r in rows if r["role"] == "swap" and r["pair_id"] in images]
    masks = {r["scene_pair"]: _load(base_dir, r["mask_uri"])[..., 0] >= 128 for r in own + swap}
    targets = {r["scene_pair"]: _load(base_dir, r["target_uri"]) for r in rows if r["role"] == "own"}
    hue_errors, psnrs, quadrant_hits, retrieval_hits, swap_hits = [], [], [], [], []
    names = [r["scene_pair"] for r in rows if r["role"] == "own"]
    gallery = {n: _descriptor(targets[n], _load(base_dir, _mask_of(rows, n))[..., 0] >= 128) for n in names}
    for row in own:
        image, mask = images[row["pair_id"]], masks[row["scene_pair"]]
        hue = region_hue(image, mask)
        hue_errors.append(90.0 if hue is None else hue_distance(hue, row["hue"]))
        psnrs.append(_psnr(image, targets[row["scene_pair"]], mask))
        quadrant_hits.append(_label_quadrant(image, mask, (row["hue"] + 180) % 360) == row["quadrant"])
        at = names.index(row["scene_pair"])
        candidates = [names[(at + k) % len(names)] for k in range(min(GALLERY, len(names)))]
        query = _descriptor(image, mask)
        distances = [float(np.linalg.norm(query - gallery[c])) for c in candidates]
        retrieval_hits.append(int(np.argmin(distances)) == 0)
    for row in swap:
        hue = region_hue(images[row["pair_id"]], masks[row["scene_pair"]])
        # no product pixel at all: neither hue is closer, a coin toss (0.5), not a miss
        swap_hits.append(
            0.5 if hue is None else float(hue_distance(hue, row["hue"]) < hue_distance(hue, row["scene_hue"]))
        )
    mean = lambda values: round(float(np.mean(values)), 4) if values else None  # noqa: E731
    return {
        "hue_error_deg": mean(hue_errors),
        "swap": mean(swap_hits),
        "retrieval_top1": mean(retrieval_hits),
        "quadrant_acc": mean(quadrant_hits),
        "masked_psnr_db": mean(psnrs),
        "own_rows": len(own),
        "swap_rows": len(swap),
        "missing_rows": len(rows) - len(own) - len(swap),
        "gallery": min(GALLERY, len(names)),
    }


def _mask_of(rows: list[dict], scene_pair: str) -> str:
    return next(r["mask_uri"] for r in rows if r["scene_pair"] == scene_pair)


def read_run_images(output: str, run_id: str) -> dict[str, np.ndarray]:
    """pair_id -> rendered image of the `ok` rows of a local jobs.render run. Every run writes
    `images/<pair_id>.*`, so a later run of the same pairs into the same output overwrites them:
    an image written after its row finished (by > 5 s) is another run's and is left out (missing)."""
    from datetime import datetime

    from PIL import Image

    folder = os.path.join(output, "manifest", run_id)
    table = pq.read_table(folder, columns=["pair_id", "status", "output_uri", "finished_at"])
    table = table.filter(pc.equal(table["status"], "ok"))
    images = {}
    for pair_id, uri, finished in zip(*(table[c].to_pylist() for c in ("pair_id", "output_uri", "finished_at"))):
        finished_s = (
            finished.timestamp() if isinstance(finished, datetime) else datetime.fromisoformat(finished).timestamp()
        )
        if os.path.getmtime(uri) <= finished_s + 5:
            images[pair_id] = np.asarray(Image.open(uri).convert("RGB"))
    return images


def evaluate_run(test_manifest: str, output: str, run_id: str, write: bool = True, evaluate=None) -> dict:
    """Score a jobs.render run of `test_manifest` with `evaluate` (`evaluate_images`, or the detail
    catalog's `detail_eval.evaluate_detail`: same arguments); with `write`, also
    `<output>/metrics/<run_id>/synthetic.json` (the run's QA page shows it)."""
    rows = pq.read_table(test_manifest).to_pylist()
    evaluate = evaluate or evaluate_images
    metrics = {
        "run_id": run_id,
        "test_manifest": os.path.abspath(test_manifest),
        **evaluate(rows, read_run_images(output, run_id), os.path.dirname(os.path.abspath(test_manifest))),
    }
    if write:
        path = os.path.join(output, "metrics", run_id, "synthetic.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(metrics, f, indent=1)
        os.replace(path + ".tmp", path)
    return metrics


def copy_paste_images(test_manifest: str, resolution: int, product_size: int) -> dict[str, np.ndarray]:
    """The identity upper reference: each row's hint pasted back as if the model had copied it."""
    from pipeline.compose import postprocess
    from pipeline.fetch import InputPolicy
    from pipeline.stages.prepare_stage import PrepareConfig, prepare_pair

    base_dir = os.path.dirname(os.path.abspath(test_manifest))
    config = PrepareConfig(InputPolicy(base_dir), resolution=resolution, product_size=product_size)
    images = {}
    for row in pq.read_table(test_manifest).to_pylist():
        uris = [os.path.join(base_dir, row[k]) for k in ("context_uri", "product_uri", "mask_uri")]
        pair = prepare_pair(*uris, None, config)
        model = pair.model
        window = np.where(model["hint_mask"][..., None], model["hint"], model["context"])
        images[row["pair_id"]] = np.asarray(
            postprocess(pair.context, window, pair.hole, model["crop_box"], RENDER_DEFAULTS.feather_px)
        )
    return images


def render_in_process(pipe, test_manifest: str, *, steps: int, guidance_scale: float, batch_size: int = 8) -> dict:
    """pair_id -> render, without Ray: the render job's `prepare_pair`, `Renderer.render` and
    `compose.postprocess` in this process (the CI test's path; the bench renders with jobs.render)."""
    from pipeline.compose import postprocess
    from pipeline.fetch import InputPolicy
    from pipeline.model.renderer import Renderer
    from pipeline.rows import stable_seed
    from pipeline.stages.prepare_stage import PrepareConfig, prepare_pair

    base_dir = os.path.dirname(os.path.abspath(test_manifest))
    config = PrepareConfig(
        InputPolicy(base_dir), resolution=pipe.config.resolution, product_size=pipe.config.product_size
    )
    renderer = Renderer(pipe, "cpu")
    rows = pq.read_table(test_manifest).to_pylist()
    images = {}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        pairs = [
            prepare_pair(
                *(os.path.join(base_dir, r[k]) for k in ("context_uri", "product_uri", "mask_uri")), None, config
            )
            for r in chunk
        ]
        stack = lambda key: np.stack([p.model[key] for p in pairs])  # noqa: E731
        out = renderer.render(
            stack("context"),
            stack("hole"),
            stack("product"),
            stack("product_alpha"),
            np.array([stable_seed(r["pair_id"]) for r in chunk], dtype=np.int64),
            steps=steps,
            guidance_scale=guidance_scale,
            hint=stack("hint"),
            hint_mask=stack("hint_mask"),
        )
        for row, pair, window in zip(chunk, pairs, out):
            images[row["pair_id"]] = np.asarray(
                postprocess(pair.context, window, pair.hole, pair.model["crop_box"], RENDER_DEFAULTS.feather_px)
            )
    return images
