"""The HTML pages' shared pieces: the style, the images-loaded flag, escaping, the number format,
thumbnails and a pair's contact-sheet row. `metrics/report.py` builds the QA page with them,
`metrics/qa.py` its scene, variant and identity sections, `train/training_page.py` the training
page. No torch.
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np
from PIL import Image, ImageDraw

from pipeline import images, regions, storage
from pipeline.schema import RowError

__all__ = ["THUMB_HEIGHT", "STYLE", "IMAGES_LOADED", "esc", "fmt", "thumb", "contact_row"]

THUMB_HEIGHT = 160
esc = html.escape

STYLE = (  # the head's style
    "body{font-family:sans-serif;margin:24px}table{border-collapse:collapse;margin:6px 0}"
    "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#eee}"
    ".banner{font-size:40px;font-weight:bold;color:#fff;background:#c33;padding:16px;margin:12px 0}"
    ".sheet td,.sheet th,.text td,.text th{text-align:left;vertical-align:top}"
    ".sheet img{display:block}"
)
# For headless checks (and a reader's devtools): true once every image has decoded.
IMAGES_LOADED = (
    "<script>window.addEventListener('load',()=>{document.body.dataset.imagesLoaded="
    "[...document.images].every(i=>i.complete&&i.naturalWidth>0)})</script>"
)


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
