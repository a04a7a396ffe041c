"""`report/<run_id>/index.html`: the human QA page of a run. No torch.

One self-contained file (images embedded as data URIs, the histogram as inline SVG), readable
from object storage or a laptop without a server: counts by status and error code, the
per-shard table (FID@N, KID, CLIP), a CLIP histogram with the floor line, and contact sheets
(context | product | output, region outlined in red) for the lowest-scoring pairs and a random
sample. A run whose metrics used random-weight extractors (the demo) says so in large type.
"""

from __future__ import annotations

import base64
import collections
import html
import io
import random

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw

from pipeline import images, regions, storage
from pipeline.output.layout import Layout
from pipeline.schema import RowError

__all__ = ["render_report", "write_report", "contact_row"]

THUMB_HEIGHT = 160


def _thumb(array: np.ndarray, outline: tuple[int, int, int, int] | None = None) -> str:
    pil = Image.fromarray(array)
    if outline is not None:
        ImageDraw.Draw(pil).rectangle(outline, outline=(255, 0, 0), width=max(2, pil.width // 150))
    scale = THUMB_HEIGHT / pil.height
    pil = pil.resize((max(1, round(pil.width * scale)), THUMB_HEIGHT), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def contact_row(row: dict) -> dict | None:
    """Thumbnails of one ok row (context and output with the region outlined, product), or None
    when an input can no longer be read (the report still renders)."""
    try:
        context = images.decode_image(storage.read_bytes(row["context_uri"]))
        product = images.decode_image(storage.read_bytes(row["product_uri"]), keep_alpha=True)
        output = images.decode_image(storage.read_bytes(row["output_uri"]))
        height, width = context.shape[:2]
        mask = storage.read_bytes(row["mask_uri"]) if row.get("mask_uri") else None
        hole = regions.region_of(mask, row["bbox"], width, height)
    except (RowError, FileNotFoundError, storage.StorageError, OSError, ValueError):
        return None
    x0, y0, x1, y1 = regions.bounding_box(hole)
    box = (x0, y0, x1 - 1, y1 - 1)  # ImageDraw's rectangle includes its end pixels
    alpha = product[..., 3:4].astype(np.float32) / 255
    on_grey = (product[..., :3] * alpha + 128 * (1 - alpha)).astype(np.uint8)
    return {
        "pair_id": row["pair_id"], "clip_score": row.get("clip_score"), "shard": row.get("shard"),
        "context": _thumb(context, box), "product": _thumb(on_grey), "output": _thumb(output, box),
    }


def _histogram_svg(scores: list[float], floor: float | None) -> str:
    if not scores:
        return "<p>No CLIP scores in this run.</p>"
    lo, hi = min(scores + ([floor] if floor is not None else [])), max(scores)
    lo, hi = np.floor(lo), np.ceil(hi) if hi > lo else np.floor(lo) + 1
    counts, edges = np.histogram(scores, bins=20, range=(lo, hi))
    width, height, bar = 600, 160, 600 / 20
    top = max(int(counts.max()), 1)
    bars = "".join(
        f'<rect x="{i * bar:.1f}" y="{height - c / top * (height - 10):.1f}" width="{bar - 2:.1f}" '
        f'height="{c / top * (height - 10):.1f}" fill="#4a7"><title>{edges[i]:.1f}-{edges[i + 1]:.1f}: {c}</title></rect>'
        for i, c in enumerate(counts)
    )
    floor_line = ""
    if floor is not None:
        x = (floor - lo) / (hi - lo) * width
        floor_line = f'<line x1="{x:.1f}" y1="0" x2="{x:.1f}" y2="{height}" stroke="#c33" stroke-dasharray="4"/>'
    return (
        f'<svg id="clip-histogram" width="{width}" height="{height + 20}" xmlns="http://www.w3.org/2000/svg">{bars}{floor_line}'
        f'<text x="0" y="{height + 15}" font-size="12">{lo:.0f}</text>'
        f'<text x="{width - 30}" y="{height + 15}" font-size="12">{hi:.0f}</text></svg>'
    )


def _fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else html.escape(str(value))


def render_report(run_id: str, rows: pa.Table, summary: dict | None, sample_size: int = 8, seed: int = 0) -> str:
    """The page as a string. `rows`: the run's output manifest; `summary`: summary.json's
    content, or None when metrics were skipped."""
    # Counts and scores with pyarrow; only the rows shown become Python objects (a run's
    # manifest can hold millions of rows, and the driver's memory must not grow with them).
    status = collections.Counter(dict(zip(*(c.to_pylist() for c in pc.value_counts(rows["status"]).flatten()))))
    failed_codes = pc.drop_null(rows["error_code"])
    codes = collections.Counter(
        dict(zip(*(c.to_pylist() for c in pc.value_counts(failed_codes).flatten()))) if len(failed_codes) else {}
    )
    ok = rows.filter(pc.equal(rows["status"], "ok"))
    scored = ok.filter(pc.is_valid(ok["clip_score"]))
    scores = scored["clip_score"].to_numpy(zero_copy_only=False).tolist() if scored.num_rows else []
    lowest = scored.take(pc.sort_indices(scored["clip_score"])[:sample_size]).to_pylist() if scored.num_rows else []
    rng = random.Random(seed)
    sample = ok.take(sorted(rng.sample(range(ok.num_rows), min(sample_size, ok.num_rows)))).to_pylist()
    total = rows.num_rows
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>DTC render {esc(run_id)}</title>",
        "<style>body{font-family:sans-serif;margin:24px}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:4px 8px;text-align:right}th{background:#eee}.banner{font-size:40px;font-weight:bold;color:#fff;"
        "background:#c33;padding:16px;margin:12px 0}.sheet img{margin:2px;vertical-align:top}.sheet div{margin:6px 0}</style>",
        "</head><body>",
        f"<h1>DTC render {esc(run_id)}</h1>",
    ]
    if summary is None:
        parts.append("<p class='banner' id='metrics-skipped'>Metrics were skipped: no Inception weights or CLIP model given.</p>")
    elif summary.get("protocol", {}).get("random_weights"):
        parts.append(
            "<p class='banner' id='random-weights'>RANDOM-WEIGHT EXTRACTORS: these FID, KID and CLIP figures "
            "measure nothing. Give --inception-weights and --clip-model for real figures.</p>"
        )
    parts.append("<h2>Rows</h2><table id='counts'><tr><th>status</th><th>rows</th></tr>")
    parts += [f"<tr><td>{esc(k)}</td><td>{v}</td></tr>" for k, v in sorted(status.items())]
    parts.append(f"<tr><td>total</td><td>{total}</td></tr></table>")
    if codes:
        parts.append("<h3>Failures by error code</h3><table id='error-codes'><tr><th>error_code</th><th>rows</th></tr>")
        parts += [f"<tr><td>{esc(k)}</td><td>{v}</td></tr>" for k, v in codes.most_common()]
        parts.append("</table>")
    if summary is not None:
        g = summary["global"]
        parts.append(
            f"<h2>Run figures</h2><p id='global'>FID {_fmt(g.get('fid'))} (N = {g.get('n')}) &nbsp; "
            f"KID {_fmt(g.get('kid_mean'), 5)} ± {_fmt(g.get('kid_std'), 5)} &nbsp; "
            f"CLIP mean {_fmt(g.get('clip', {}).get('mean'))} (floor {_fmt(g.get('clip_floor'))})</p>"
        )
        parts.append(
            "<h2>Shards</h2><table id='shards'><tr><th>shard</th><th>ok</th><th>failed</th><th>FID@N</th><th>N</th>"
            "<th>KID mean</th><th>KID std</th><th>CLIP mean</th><th>p10</th><th>p50</th><th>p90</th></tr>"
        )
        for shard in summary["shards"]:
            clip = shard.get("clip", {})
            parts.append(
                f"<tr class='shard'><td>{esc(shard['shard'])}</td><td>{shard['ok']}</td><td>{shard['failed']}</td>"
                f"<td>{_fmt(shard.get('fid'))}</td><td>{shard.get('n')}</td><td>{_fmt(shard.get('kid_mean'), 5)}</td>"
                f"<td>{_fmt(shard.get('kid_std'), 5)}</td><td>{_fmt(clip.get('mean'))}</td><td>{_fmt(clip.get('p10'))}</td>"
                f"<td>{_fmt(clip.get('p50'))}</td><td>{_fmt(clip.get('p90'))}</td></tr>"
            )
        parts.append("</table>")
        parts.append("<h2>CLIP region score</h2>")
        parts.append("<p>Red dashed line: the floor (product vs an unrelated product of the shard).</p>")
        parts.append(_histogram_svg(scores, g.get("clip_floor")))
    for title, chosen, anchor in (("Lowest CLIP scores", lowest, "lowest"), ("Random sample", sample, "sample")):
        if not chosen:
            continue
        parts.append(f"<h2>{title}</h2><div class='sheet' id='{anchor}'>")
        for row in chosen:
            thumbs = contact_row(row)
            if thumbs is None:
                parts.append(f"<div>{esc(row['pair_id'])}: inputs no longer readable</div>")
                continue
            parts.append(
                f"<div><b>{esc(row['pair_id'])}</b> ({esc(str(row.get('shard')))}) CLIP {_fmt(row.get('clip_score'))}<br>"
                f"<img src='{thumbs['context']}' alt='context'><img src='{thumbs['product']}' alt='product'>"
                f"<img src='{thumbs['output']}' alt='output'></div>"
            )
        parts.append("</div>")
    # For headless checks (and a reader's devtools): true once every image has decoded.
    parts.append(
        "<script>window.addEventListener('load',()=>{document.body.dataset.imagesLoaded="
        "[...document.images].every(i=>i.complete&&i.naturalWidth>0)})</script>"
    )
    parts.append("</body></html>")
    return "\n".join(parts)


REPORT_COLUMNS = ("pair_id", "status", "error_code", "clip_score", "shard", "context_uri", "product_uri", "output_uri", "mask_uri", "bbox")


def write_report(layout: Layout, run_id: str, summary: dict | None, settings: dict | None = None) -> str:
    """Read the run's manifest parts (only the columns the page shows) and write its page; returns its URI."""
    manifest_dir = layout.manifest_dir(run_id)
    parts = [storage.join(manifest_dir, rel) for rel, _, _ in storage.list_files(manifest_dir) if rel.endswith(".parquet")]
    tables = [storage.read_parquet(part) for part in parts]
    rows = pa.concat_tables([t.select([c for c in REPORT_COLUMNS if c in t.column_names]) for t in tables], promote_options="permissive")
    uri = layout.report(run_id)
    storage.write_bytes(uri, render_report(run_id, rows, summary).encode())
    return uri
