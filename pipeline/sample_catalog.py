"""A synthetic catalog for the demo, tests and benchmarks: no downloads. No torch.

    make_catalog("demo/catalog", n_pairs=36, bad_rows=True) -> path of manifest.parquet

Scenes are procedural photos (gradients, a floor, a few shapes) of varied sizes and aspect
ratios, saved as JPEG; products are RGBA PNG cut-outs (a coloured shape on transparency).
Rows alternate between a bbox region and a mask PNG. With `bad_rows`, two rows are broken on
purpose: a missing context photo and a bbox outside the photo; both must come out `failed`.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from pipeline import storage

__all__ = ["make_catalog", "make_scene_catalog", "scene", "product"]

SIZES = [(320, 240), (256, 256), (400, 300), (240, 360), (512, 384), (300, 200)]


def scene(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    top, bottom = rng.integers(40, 220, 3), rng.integers(40, 220, 3)
    t = (y / max(height - 1, 1))[..., None]
    img = (top * (1 - t) + bottom * t + 12 * np.sin(x / 17.0)[..., None]).clip(0, 255).astype(np.uint8)
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    floor = int(height * rng.uniform(0.55, 0.75))
    draw.rectangle([0, floor, width, height], fill=tuple(int(v) for v in rng.integers(60, 200, 3)))
    for _ in range(3):
        x0, y0 = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
        w, h = int(rng.integers(10, max(11, width // 4))), int(rng.integers(10, max(11, height // 4)))
        draw.ellipse([x0, y0, x0 + w, y0 + h], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return np.asarray(pil)


def product(size: int, rng: np.random.Generator) -> np.ndarray:
    """RGBA cut-out: a shape in colour, transparent around it."""
    pil = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(pil)
    color = tuple(int(v) for v in rng.integers(0, 255, 3)) + (255,)
    m = size // 8
    if rng.random() < 0.5:
        draw.rounded_rectangle([m, m, size - m, size - m], radius=size // 6, fill=color)
    else:
        draw.ellipse([m, m, size - m, size - m], fill=color)
    draw.rectangle([size // 3, size // 3, 2 * size // 3, size // 2], fill=(255, 255, 255, 255))
    return np.asarray(pil)


def _save(array: np.ndarray, path: str, fmt: str) -> None:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, quality=92) if fmt == "JPEG" else Image.fromarray(array).save(
        buffer, format=fmt
    )
    with open(path, "wb") as f:
        f.write(buffer.getvalue())


def make_catalog(
    folder: str,
    n_pairs: int = 36,
    bad_rows: bool = True,
    seed: int = 0,
    manifest_name: str = "manifest.parquet",
    sizes: list[tuple[int, int]] | None = None,
    unique_images: int | None = None,
    pair_prefix: str = "pair",
) -> str:
    """Write images under `folder` and a Parquet manifest with relative paths; returns its path.

    `sizes` cycles the context sizes (default: a varied set up to 512 px); `unique_images`
    caps how many distinct image sets are drawn (rows then cycle over them, each its own pair):
    benchmarks use it to make large manifests quickly.
    """
    rng = np.random.default_rng(seed)
    sizes = sizes or SIZES
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    sets = []
    for i in range(min(n_pairs, unique_images or n_pairs)):
        width, height = sizes[i % len(sizes)]
        context_rel, product_rel = f"images/set-{i:04d}-context.jpg", f"images/set-{i:04d}-product.png"
        _save(scene(width, height, rng), os.path.join(folder, context_rel), "JPEG")
        _save(product(int(rng.integers(96, 200)), rng), os.path.join(folder, product_rel), "PNG")
        bw, bh = int(width * rng.uniform(0.2, 0.45)), int(height * rng.uniform(0.2, 0.45))
        x0, y0 = int(rng.integers(0, width - bw)), int(rng.integers(0, height - bh))
        region = {"mask_uri": None, "bbox": [float(x0), float(y0), float(x0 + bw), float(y0 + bh)]}
        if i % 2:
            mask = Image.new("L", (width, height), 0)
            ImageDraw.Draw(mask).ellipse([x0, y0, x0 + bw, y0 + bh], fill=255)
            mask_rel = f"images/set-{i:04d}-mask.png"
            mask.save(os.path.join(folder, mask_rel))
            region = {"mask_uri": mask_rel, "bbox": None}
        sets.append({"context_uri": context_rel, "product_uri": product_rel, **region})
    rows = [
        {
            "pair_id": f"{pair_prefix}-{i:04d}",
            **sets[i % len(sets)],
            "category": ["chair", "lamp", "rug", "vase"][i % 4],
        }
        for i in range(n_pairs)
    ]
    if bad_rows:
        rows.append(
            {
                "pair_id": "bad-missing-context",
                "context_uri": "images/does-not-exist.jpg",
                "product_uri": rows[0]["product_uri"],
                "mask_uri": None,
                "bbox": [10.0, 10.0, 60.0, 60.0],
                "category": "chair",
            }
        )
        rows.append(
            {
                "pair_id": "bad-bbox-outside",
                "context_uri": rows[0]["context_uri"],
                "product_uri": rows[0]["product_uri"],
                "mask_uri": None,
                "bbox": [5000.0, 5000.0, 5100.0, 5100.0],
                "category": "lamp",
            }
        )
    table = pa.table(
        {
            "pair_id": pa.array([r["pair_id"] for r in rows], pa.string()),
            "context_uri": pa.array([r["context_uri"] for r in rows], pa.string()),
            "product_uri": pa.array([r["product_uri"] for r in rows], pa.string()),
            "mask_uri": pa.array([r["mask_uri"] for r in rows], pa.string()),
            "bbox": pa.array([r["bbox"] for r in rows], pa.list_(pa.float64())),
            "category": pa.array([r["category"] for r in rows], pa.string()),
        }
    )
    path = os.path.join(folder, manifest_name)
    storage.write_parquet(path, table)
    return path


def make_scene_catalog(folder: str, n_scenes: int = 4, steps: int = 3, seed: int = 0) -> str:
    """Scenes to decorate step by step: each a photo and `steps` products, step k's region a
    bbox in the k-th of `steps` side-by-side cells of the floor (regions never overlap). Only
    step 1 names the photo; later steps leave context_uri empty. -> the manifest's path."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_scenes):
        width, height = SIZES[s % len(SIZES)]
        photo_rel = f"images/scene-{s:03d}.jpg"
        _save(scene(width, height, rng), os.path.join(folder, photo_rel), "jpeg")
        cell = width // steps
        for k in range(1, steps + 1):
            product_rel = f"images/scene-{s:03d}-item-{k}.png"
            _save(product(int(rng.integers(64, 128)), rng), os.path.join(folder, product_rel), "png")
            x0 = (k - 1) * cell + cell // 8
            box = [float(x0), height * 0.45, float(x0 + cell * 3 // 4), height * 0.9]
            rows.append(
                {
                    "pair_id": f"scene-{s:03d}-step-{k}",
                    "scene_id": f"scene-{s:03d}",
                    "step": k,
                    "context_uri": photo_rel if k == 1 else None,
                    "product_uri": product_rel,
                    "bbox": box,
                }
            )
    table = pa.table(
        {
            "pair_id": pa.array([r["pair_id"] for r in rows], pa.string()),
            "scene_id": pa.array([r["scene_id"] for r in rows], pa.string()),
            "step": pa.array([r["step"] for r in rows], pa.int64()),
            "context_uri": pa.array([r["context_uri"] for r in rows], pa.string()),
            "product_uri": pa.array([r["product_uri"] for r in rows], pa.string()),
            "bbox": pa.array([r["bbox"] for r in rows], pa.list_(pa.float64())),
        }
    )
    path = os.path.join(folder, "manifest.parquet")
    storage.write_parquet(path, table)
    return path
