"""A learnable synthetic training catalog: photos that show the product. No torch.

    make_training_catalog("train_catalog", n_pairs=16) -> path of manifest.parquet

Each pair is a procedural scene (`sample_catalog.scene`) with a product cut-out pasted into it
at a random place and size (`context_uri`: the training target), the region where it is
(`mask_uri`: the product's own silhouette in the photo, on every other row; `bbox` on the
others), and a *different shot* of the same product (`product_uri`: the cut-out rotated and
rescaled on its own transparent canvas), as DESIGN.md "Training (contract)" asks. The last
`val_fraction` of the pairs get `split=val`. With `bad_rows`, two rows are broken on purpose (a
missing photo and a bbox outside the photo): training skips and counts them.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.sample_catalog import product, scene

__all__ = ["make_training_catalog"]


def _paste(photo: np.ndarray, cutout: np.ndarray, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The photo with the RGBA cut-out resized into `box` (alpha-composited), and its silhouette."""
    x0, y0, x1, y1 = box
    small = np.asarray(Image.fromarray(cutout).resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR))
    alpha = small[..., 3:4].astype(np.float32) / 255
    out = photo.copy()
    region = out[y0:y1, x0:x1].astype(np.float32)
    out[y0:y1, x0:x1] = (small[..., :3] * alpha + region * (1 - alpha)).round().astype(np.uint8)
    silhouette = np.zeros(photo.shape[:2], dtype=np.uint8)
    silhouette[y0:y1, x0:x1] = np.where(small[..., 3] >= 128, 255, 0)
    return out, silhouette


def _other_shot(cutout: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The same product as another photo would show it: turned and rescaled, own margins."""
    image = Image.fromarray(cutout).rotate(float(rng.uniform(-30, 30)), resample=Image.Resampling.BICUBIC, expand=True)
    side = int(rng.integers(120, 220))
    image = image.resize((side, side), Image.Resampling.BICUBIC)
    canvas = Image.new("RGBA", (side + 40, side + 24), (0, 0, 0, 0))
    canvas.paste(image, (int(rng.integers(0, 40)), int(rng.integers(0, 24))))
    return np.asarray(canvas)


def _row(folder: str, i: int, rng: np.random.Generator, size: tuple[int, int]) -> dict:
    width, height = size
    photo = scene(width, height, rng)
    cutout = product(int(rng.integers(96, 160)), rng)
    bw, bh = int(width * rng.uniform(0.3, 0.5)), int(height * rng.uniform(0.3, 0.5))
    x0, y0 = int(rng.integers(0, width - bw)), int(rng.integers(0, height - bh))
    shown, silhouette = _paste(photo, cutout, (x0, y0, x0 + bw, y0 + bh))
    names = {
        k: f"images/pair-{i:04d}-{k}.{ext}" for k, ext in (("context", "jpg"), ("product", "png"), ("mask", "png"))
    }
    Image.fromarray(shown).save(os.path.join(folder, names["context"]), quality=95)
    Image.fromarray(_other_shot(cutout, rng)).save(os.path.join(folder, names["product"]))
    row = {"pair_id": f"pair-{i:04d}", "context_uri": names["context"], "product_uri": names["product"]}
    if i % 2:
        Image.fromarray(silhouette).save(os.path.join(folder, names["mask"]))
        return {**row, "mask_uri": names["mask"], "bbox": None}
    return {**row, "mask_uri": None, "bbox": [float(x0), float(y0), float(x0 + bw), float(y0 + bh)]}


def make_training_catalog(
    folder: str,
    n_pairs: int = 16,
    val_fraction: float = 0.25,
    bad_rows: bool = False,
    seed: int = 0,
    sizes: list[tuple[int, int]] | None = None,
    manifest_name: str = "manifest.parquet",
) -> str:
    """Write images under `folder` and a Parquet manifest with relative paths; returns its path."""
    rng = np.random.default_rng(seed)
    sizes = sizes or [(192, 160), (160, 160), (224, 168), (160, 208)]
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    rows = [_row(folder, i, rng, sizes[i % len(sizes)]) for i in range(n_pairs)]
    n_val = int(round(n_pairs * val_fraction))
    for i, row in enumerate(rows):
        row["split"] = "val" if i >= n_pairs - n_val else "train"
    if bad_rows:
        first = rows[0]
        rows.append(
            {
                **first,
                "pair_id": "bad-missing-context",
                "context_uri": "images/does-not-exist.jpg",
                "mask_uri": None,
                "bbox": [4.0, 4.0, 60.0, 60.0],
                "split": "train",
            }
        )
        rows.append(
            {
                **first,
                "pair_id": "bad-bbox-outside",
                "mask_uri": None,
                "bbox": [5000.0, 5000.0, 5100.0, 5100.0],
                "split": "train",
            }
        )
    columns = ("pair_id", "context_uri", "product_uri", "mask_uri", "split")
    table = pa.table(
        {c: pa.array([r[c] for r in rows], pa.string()) for c in columns}
        | {"bbox": pa.array([r["bbox"] for r in rows], pa.list_(pa.float64()))}
    )
    path = os.path.join(folder, manifest_name)
    pq.write_table(table, path)
    return path
