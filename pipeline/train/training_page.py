"""`metrics/<run_id>/training.html`: the training run's page, for a person. No torch.

    uri = write_training_page(output, run_id, max_pixels=cfg.max_pixels)  # the driver, at close

One self-contained file (images as data URIs, curves as inline SVG), like the QA page and built
with its pieces (`metrics.page`): the loss curves (train loss at each logged step, validation
loss at step 0 and each checkpoint, from `train.jsonl`) and the validation grid: a row per
picked val pair (its photo with the region outlined, its product), a column per checkpoint, each
cell the pair rendered by that checkpoint's weights (`val_renders`). Only the checkpoints
`train.jsonl` holds are columns, so renders an attempt made past its last committed checkpoint
are left out, and a resumed run's page (rewritten at its close) shows one path to the weights.
Element ids for headless checks: `run`, `loss-curves`, `val-grid`; once loaded, the body's
`data-images-loaded` (every image decoded) and `data-grid-images` (the grid images' boxes).
"""

from __future__ import annotations

import json

from pipeline import storage
from pipeline.metrics.page import IMAGES_LOADED, STYLE, contact_row, esc, fmt
from pipeline.train.logs import log_uri, tensorboard_uri
from pipeline.train.val_renders import render_uri, val_renders_uri

__all__ = ["page_uri", "render_training_page", "write_training_page"]

_CURVE = {"width": 640, "height": 240, "pad": 44}
_GRID_STYLE = "<style>.grid td{text-align:center;vertical-align:top;font-size:12px}.grid img{display:block}</style>"
# For headless checks: where the grid's images were laid out (left,top,right,bottom;...) once loaded.
_GRID_BOXES = (
    "<script>window.addEventListener('load',()=>{document.body.dataset.gridImages=[...document.querySelectorAll("
    "'#val-grid img')].map(i=>{const b=i.getBoundingClientRect();return [b.left,b.top,b.right,b.bottom]"
    ".map(Math.round).join(',')}).join(';')})</script>"
)


def page_uri(output: str, run_id: str) -> str:
    return storage.join(output, "metrics", run_id, "training.html")


def _read_lines(output: str, run_id: str) -> list[dict]:
    try:
        text = storage.read_bytes(log_uri(output, run_id)).decode()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line]


def _read_pairs(output: str, run_id: str) -> list[dict]:
    try:
        return json.loads(storage.read_bytes(storage.join(val_renders_uri(output, run_id), "pairs.json")))["pairs"]
    except FileNotFoundError:
        return []


def _polyline(points: list[tuple[int, float]], x, y, colour: str, dots: bool) -> str:
    if not points:
        return ""
    path = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points)
    out = f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>'
    if dots:
        out += "".join(
            f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="4" fill="{colour}"><title>step {s}: {v:.5f}</title></circle>'
            for s, v in points
        )
    return out


def loss_curves(lines: list[dict]) -> str:
    """Train loss (blue) and validation loss (orange, a dot per checkpoint) vs step, one SVG."""
    train = [(line["step"], line["loss"]) for line in lines if line.get("loss") is not None]
    val = [(line["step"], line["val_loss"]) for line in lines if line.get("val_loss") is not None]
    if not train and not val:
        return "<h2>Losses</h2><p id='loss-curves'>No loss logged yet.</p>"
    steps = [s for s, _ in train + val]
    values = [v for _, v in train + val]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    y0, y1 = min(values), max(values)
    y1 = y1 if y1 > y0 else y0 + 1e-6
    w, h, pad = _CURVE["width"], _CURVE["height"], _CURVE["pad"]

    def x(step: int) -> float:
        return pad + (step - x0) / (x1 - x0) * (w - 2 * pad)

    def y(value: float) -> float:
        return h - pad + (y0 - value) / (y1 - y0) * (h - 2 * pad) if y1 > y0 else h / 2

    axes = (
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#888"/>'
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#888"/>'
        f'<text x="{pad}" y="{h - pad + 16}" font-size="12">{x0}</text>'
        f'<text x="{w - pad}" y="{h - pad + 16}" font-size="12" text-anchor="end">{x1} steps</text>'
        f'<text x="{pad - 4}" y="{h - pad}" font-size="11" text-anchor="end">{y0:.3g}</text>'
        f'<text x="{pad - 4}" y="{pad + 4}" font-size="11" text-anchor="end">{y1:.3g}</text>'
        f'<text x="{w - pad}" y="{pad - 20}" font-size="12" text-anchor="end" fill="#27c">train loss</text>'
        f'<text x="{w - pad}" y="{pad - 6}" font-size="12" text-anchor="end" fill="#e80">validation loss</text>'
    )
    return (
        "<h2>Losses</h2>"
        f'<svg id="loss-curves" width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg">{axes}'
        f"{_polyline(train, x, y, '#27c', dots=len(train) == 1)}{_polyline(val, x, y, '#e80', dots=True)}</svg>"
    )


def val_grid(output: str, run_id: str, pairs: list[dict], steps: list[int], max_pixels: int) -> str:
    """A row per pair: photo (region outlined), product, then its render at each of `steps`."""
    if not pairs:
        return "<h2>Validation renders</h2><p id='val-grid'>None: no val pair was picked (--val-renders 0?).</p>"
    head = "".join(f"<th>step {s}</th>" for s in steps)
    rows = [f"<table class='sheet grid' id='val-grid'><tr><th>pair</th><th>photo</th><th>product</th>{head}</tr>"]
    for pair in pairs:
        label = f"<td>{esc(pair['pair_id'])}</td>"
        if pair.get("error"):
            rows.append(f"<tr>{label}<td colspan='{len(steps) + 2}'>not prepared: {esc(pair['error'])}</td></tr>")
            continue
        inputs, cells = None, []
        for step in steps:
            shown = contact_row({**pair, "output_uri": render_uri(output, run_id, step, pair["pair_id"])}, max_pixels)
            inputs = inputs or shown
            cells.append(f"<td><img src='{shown['output']}' alt='step {step}'></td>" if shown else "<td>–</td>")
        if inputs is None:
            rows.append(f"<tr>{label}<td colspan='{len(steps) + 2}'>no render readable</td></tr>")
            continue
        photo, product = (f"<td><img src='{inputs[k]}' alt='{k}'></td>" for k in ("context", "product"))
        rows.append(f"<tr>{label}{photo}{product}{''.join(cells)}</tr>")
    rows.append("</table>")
    return (
        f"<h2>Validation renders</h2>{_GRID_STYLE}<p>Each column: the pairs rendered by that checkpoint's weights "
        "(the render job's path, fixed seeds), pasted back into the photo; the region outlined in red.</p>"
        + "\n".join(rows)
    )


def _tensorboard_line(uri: str) -> str:
    if storage.is_s3(uri):
        return f"{uri} (copy it to a local folder, then tensorboard --logdir FOLDER)"
    return f"tensorboard --logdir {uri}"


def render_training_page(output: str, run_id: str, *, max_pixels: int) -> str:
    """The page as a string, from what rank 0 wrote under `metrics/<run_id>/`."""
    lines = _read_lines(output, run_id)
    pairs = _read_pairs(output, run_id)
    steps = sorted({line["step"] for line in lines if "val_loss" in line})
    train = [line for line in lines if line.get("loss") is not None]
    val = [line for line in lines if line.get("val_loss") is not None]
    facts = {
        "steps logged": max((line["step"] for line in lines), default=None),
        "last train loss": train[-1]["loss"] if train else None,
        "validation loss": " -> ".join(f"{line['val_loss']:.5f}" for line in (val[:1] + val[-1:])) or None,
        "best validation loss": min((line["val_loss"] for line in val), default=None),
        "TensorBoard": _tensorboard_line(tensorboard_uri(output, run_id)),
        "train log": log_uri(output, run_id),
    }
    table = "".join(f"<tr><th>{esc(k)}</th><td>{fmt(v, 5)}</td></tr>" for k, v in facts.items())
    return "\n".join(
        [
            f"<!doctype html><html><head><meta charset='utf-8'><title>DTC training {esc(run_id)}</title>",
            f"<style>{STYLE}</style></head><body><h1>DTC training {esc(run_id)}</h1>",
            f"<table class='text' id='run'>{table}</table>",
            loss_curves(lines),
            val_grid(output, run_id, pairs, steps, max_pixels),
            IMAGES_LOADED,
            _GRID_BOXES,
            "</body></html>",
        ]
    )


def write_training_page(output: str, run_id: str, *, max_pixels: int) -> str:
    """Write `metrics/<run_id>/training.html`; returns its URI."""
    uri = page_uri(output, run_id)
    storage.write_bytes(uri, render_training_page(output, run_id, max_pixels=max_pixels).encode())
    return uri
