"""The QA page's shared pieces: escaping, the number format, thumbnails and a pair's contact-sheet
row. `metrics/report.py` builds the page with them, `metrics/qa.py` its scene, variant and identity
sections. No torch.
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np
from PIL import Image, ImageDraw

from pipeline import images, regions, storage
from pipeline.schema import RowError

__all__ = ["THUMB_HEIGHT", "esc", "fmt", "thumb", "contact_row"]

THUMB_HEIGHT = 160
esc = html.escape


def fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else esc(str(value))


def thumb(array: np.ndarray, outline: tuple[int, int, int, int] | None = None) -> str:
    pil = Image.fromarray(array)
    if outline is not None:
        ImageDraw.Draw(pil).rectangle(outline, outline=(255, 0, 0), width=max(2, pil.width // 150))
    scale = THUMB_HEIGHT / pil.height
    pil = pil.resize((max(1, round(pil.width * scale)), THUMB_HEIGHT), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def contact_row(row: dict, max_pixels: int) -> dict | None:
    """Thumbnails of one ok row (context and output with the region outlined, product), or None
    when an input can no longer be read or is over `max_pixels` (the run's --max-pixels): the
    report still renders."""
    try:
        context = images.decode_image(storage.read_bytes(row["context_uri"]), max_pixels=max_pixels)
        product = images.decode_image(storage.read_bytes(row["product_uri"]), max_pixels=max_pixels, keep_alpha=True)
        output = images.decode_image(storage.read_bytes(row["output_uri"]), max_pixels=max_pixels)
        height, width = context.shape[:2]
        mask = storage.read_bytes(row["mask_uri"]) if row.get("mask_uri") else None
        hole = regions.region_of(mask, row.get("bbox"), width, height, max_pixels=max_pixels)
    except (RowError, FileNotFoundError, storage.StorageError, OSError, ValueError):
        return None
    x0, y0, x1, y1 = regions.bounding_box(hole)
    box = (x0, y0, x1 - 1, y1 - 1)  # ImageDraw's rectangle includes its end pixels
    alpha = product[..., 3:4].astype(np.float32) / 255
    on_grey = (product[..., :3] * alpha + 128 * (1 - alpha)).astype(np.uint8)
    return {
        "pair_id": row["pair_id"],
        "clip_score": row.get("clip_score"),
        "shard": row.get("shard"),
        "context": thumb(context, box),
        "product": thumb(on_grey),
        "output": thumb(output, box),
    }
