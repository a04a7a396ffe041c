"""`report/<run_id>/index.html`: the human QA page of a run (or of runs merged). No torch.

    write_report(layout, run_id, summary, settings=cfg.settings(resolution), max_pixels=cfg.max_pixels)  # a run
    write_report(layout, "merged-nov", summary, settings, run_ids=["a", "b"], max_pixels=limit)  # jobs.metrics

One self-contained file (images embedded as data URIs, the histogram as inline SVG), readable
from object storage or a laptop without a server: the run settings, counts by status and error
code, the per-shard table (FID@N, KID, CLIP), a CLIP histogram with the floor line, contact
sheets (context | product | output, region outlined in red) for the lowest-scoring pairs and a
random sample, and the failed pairs with their error code and message. A run whose metrics used
random-weight extractors (the demo) says so in large type. Element ids for headless checks:
`random-weights` / `metrics-skipped`, `settings`, `counts`, `error-codes`, `global`, `shards`,
`clip-histogram`, `lowest`, `sample`, `failed-pairs`; and, when the manifest has their columns,
metrics/qa.py's `scene-strips`, `variant-grids`, `identity-distribution`, `lowest-identity`.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.metrics.page import IMAGES_LOADED, STYLE, contact_row, esc, fmt
from pipeline.metrics.qa import qa_sections
from pipeline.output.layout import Layout
from pipeline.schema import OUTPUT_FIELDS

__all__ = ["render_report", "write_report", "read_manifest_rows", "REPORT_COLUMNS"]

FAILED_PAIRS_SHOWN = 200  # the page lists this many failed pairs, then says how many more
MESSAGE_CHARS = 400  # an error message is cut here: a traceback-sized message would swamp the table

# The manifest columns the page reads; every output manifest has the first six (the others are
# input columns a manifest may lack: mask_uri or bbox).
REQUIRED_COLUMNS = ("pair_id", "status", "error_code", "error_message", "clip_score", "shard")
# Scenes, variants, identity (metrics/qa.py's sections): read where a part has them; an older
# manifest has none and qa.py leaves its sections out.
QA_COLUMNS = (
    "scene_id",
    "step",
    "identity_score",
    "needs_review",
    "variant_seeds",
    "variant_scores",
    "chosen_variant",
)
REPORT_COLUMNS = (*REQUIRED_COLUMNS, "context_uri", "product_uri", "output_uri", "mask_uri", "bbox", *QA_COLUMNS)
_TYPES = {f.name: f.type for f in OUTPUT_FIELDS} | {"pair_id": pa.string(), "shard": pa.string()}
_NO_ROWS = pa.schema([(name, _TYPES[name]) for name in REQUIRED_COLUMNS]).empty_table()

# -- contact sheets ------------------------------------------------------------------------------


def _sheet(title: str, anchor: str, chosen: list[dict], max_pixels: int) -> str:
    """One contact sheet: a header row naming the columns, then a row per pair."""
    if not chosen:
        return ""
    lines = [
        f"<h2>{title}</h2><table class='sheet' id='{anchor}'>",
        "<tr><th>pair</th><th>context</th><th>product</th><th>output</th></tr>",
    ]
    for row in chosen:
        shard, score = esc(str(row.get("shard"))), fmt(row.get("clip_score"))
        label = f"<td><b>{esc(row['pair_id'])}</b><br>{shard}<br>CLIP {score}</td>"
        thumbs = contact_row(row, max_pixels)
        if thumbs is None:
            lines.append(f"<tr>{label}<td colspan='3'>inputs no longer readable</td></tr>")
            continue
        cells = "".join(f"<td><img src='{thumbs[k]}' alt='{k}'></td>" for k in ("context", "product", "output"))
        lines.append(f"<tr>{label}{cells}</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _lowest(scored: pa.Table, count: int) -> list[dict]:
    if scored.num_rows == 0:
        return []
    return scored.take(pc.sort_indices(scored["clip_score"])[:count]).to_pylist()


def _sample(ok: pa.Table, count: int, seed: int) -> list[dict]:
    chosen = sorted(random.Random(seed).sample(range(ok.num_rows), min(count, ok.num_rows)))
    return ok.take(pa.array(chosen, pa.int64())).to_pylist()  # typed: an empty list would be null-typed


# -- sections ------------------------------------------------------------------------------------


def _plain(value) -> str:
    """A value as given (a setting's 7.5 stays 7.5), escaped; – for None."""
    return "–" if value is None else esc(str(value))


def _banner(summary: dict | None, model_warning: str | None = None) -> str:
    lines = []
    if model_warning:  # checkpoint.weights_warning: the model's own figures, beside the extractors'
        lines.append(f"<p class='banner' id='model-warning'>{esc(model_warning.upper())}</p>")
    if summary is None:
        lines.append(
            "<p class='banner' id='metrics-skipped'>"
            "Metrics were skipped: no Inception weights or CLIP model given.</p>"
        )
        return "\n".join(lines)
    protocol = summary.get("protocol") or {}
    if protocol.get("random_weights"):
        lines.append(
            "<p class='banner' id='random-weights'>RANDOM-WEIGHT EXTRACTORS: these FID, KID and CLIP figures "
            "measure nothing. Give --inception-weights and --clip-model for real figures.</p>"
        )
    if protocol.get("merged_runs"):
        lines.append(f"<p id='merged-runs'>Merged from runs: {esc(', '.join(protocol['merged_runs']))}</p>")
    return "\n".join(lines)


def _settings(settings: dict | None) -> str:
    if not settings:
        return "<h2>Settings</h2><p id='settings'>Not recorded for this page.</p>"
    rows = "".join(f"<tr><td>{esc(str(k))}</td><td>{_plain(v)}</td></tr>" for k, v in settings.items())
    return f"<h2>Settings</h2><table class='text' id='settings'><tr><th>setting</th><th>value</th></tr>{rows}</table>"


def _value_counts(column: pa.ChunkedArray) -> list[tuple[str, int]]:
    """(value, rows) for the non-null values, most frequent first; counted by pyarrow (a run's
    manifest can hold millions of rows, and the driver's memory must not grow with them)."""
    values, counts = (c.to_pylist() for c in pc.value_counts(pc.drop_null(column)).flatten())
    return sorted(zip(values, counts), key=lambda vc: (-vc[1], vc[0]))


def _counts(rows: pa.Table) -> str:
    lines = ["<h2>Rows</h2><table id='counts'><tr><th>status</th><th>rows</th></tr>"]
    lines += [f"<tr><td>{esc(k)}</td><td>{v}</td></tr>" for k, v in sorted(_value_counts(rows["status"]))]
    lines.append(f"<tr><td>total</td><td>{rows.num_rows}</td></tr></table>")
    codes = _value_counts(rows.filter(pc.equal(rows["status"], "failed"))["error_code"])
    if codes:
        lines.append("<h3>Failures by error code</h3>")
        lines.append("<table id='error-codes'><tr><th>error_code</th><th>rows</th></tr>")
        lines += [f"<tr><td>{esc(k)}</td><td>{v}</td></tr>" for k, v in codes]
        lines.append("</table><p><a href='#failed-pairs'>The failed pairs, with their messages</a></p>")
    return "\n".join(lines)


def _figures(summary: dict) -> str:
    g = summary["global"]
    return (
        f"<h2>Run figures</h2><p id='global'>FID {fmt(g.get('fid'))} (N = {g.get('n')}) &nbsp; "
        f"KID {fmt(g.get('kid_mean'), 5)} ± {fmt(g.get('kid_std'), 5)} &nbsp; "
        f"CLIP mean {fmt((g.get('clip') or {}).get('mean'))} (floor {fmt(g.get('clip_floor'))})</p>"
    )


def _shards(summary: dict) -> str:
    lines = [
        "<h2>Shards</h2><table id='shards'><tr><th>shard</th><th>ok</th><th>failed</th><th>FID@N</th><th>N</th>"
        "<th>KID mean</th><th>KID std</th><th>CLIP mean</th><th>p10</th><th>p50</th><th>p90</th></tr>"
    ]
    for shard in summary["shards"]:
        clip = shard.get("clip") or {}
        cells = [
            esc(shard["shard"]), shard["ok"], shard["failed"], fmt(shard.get("fid")), shard.get("n"),
            fmt(shard.get("kid_mean"), 5), fmt(shard.get("kid_std"), 5),
            *(fmt(clip.get(k)) for k in ("mean", "p10", "p50", "p90")),
        ]  # fmt: skip
        lines.append("<tr class='shard'>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _histogram_svg(scores: list[float], floor: float | None) -> str:
    if not scores:
        return "<p>No CLIP scores in this run.</p>"
    ends = scores + ([floor] if floor is not None else [])
    lo, hi = float(np.floor(min(ends))), float(np.ceil(max(ends)))
    hi = hi if hi > lo else lo + 1
    counts, edges = np.histogram(scores, bins=20, range=(lo, hi))
    width, height, bar = 600, 160, 600 / 20
    top = max(int(counts.max()), 1)
    bars = "".join(
        f'<rect x="{i * bar:.1f}" y="{height - c / top * (height - 10):.1f}" width="{bar - 2:.1f}" '
        f'height="{c / top * (height - 10):.1f}" fill="#4a7">'
        f"<title>{edges[i]:.1f}-{edges[i + 1]:.1f}: {c}</title></rect>"
        for i, c in enumerate(counts)
    )
    floor_line = ""
    if floor is not None:
        x = (floor - lo) / (hi - lo) * width
        floor_line = f'<line x1="{x:.1f}" y1="0" x2="{x:.1f}" y2="{height}" stroke="#c33" stroke-dasharray="4"/>'
    return (
        f'<svg id="clip-histogram" width="{width}" height="{height + 20}" xmlns="http://www.w3.org/2000/svg">'
        f'{bars}{floor_line}<text x="0" y="{height + 15}" font-size="12">{lo:.0f}</text>'
        f'<text x="{width - 30}" y="{height + 15}" font-size="12">{hi:.0f}</text></svg>'
    )


def _clip(scored: pa.Table, summary: dict) -> str:
    scores = scored["clip_score"].to_numpy(zero_copy_only=False).tolist()
    return (
        "<h2>CLIP region score</h2><p>Red dashed line: the floor (product vs an unrelated product of the shard).</p>\n"
        + _histogram_svg(scores, summary["global"].get("clip_floor"))
    )


def _failed_pairs(rows: pa.Table, cap: int) -> str:
    """The failed pairs in manifest order, up to `cap`, then how many more."""
    failed = rows.filter(pc.equal(rows["status"], "failed"))
    if failed.num_rows == 0:
        return ""
    lines = [
        f"<h2>Failed pairs ({failed.num_rows})</h2><table class='text' id='failed-pairs'>"
        "<tr><th>pair_id</th><th>shard</th><th>error_code</th><th>error_message</th></tr>"
    ]
    for row in failed.slice(0, cap).select(["pair_id", "shard", "error_code", "error_message"]).to_pylist():
        message = row["error_message"] or ""
        message = message if len(message) <= MESSAGE_CHARS else message[:MESSAGE_CHARS] + "…"
        lines.append(
            f"<tr><td>{esc(str(row['pair_id']))}</td><td>{fmt(row['shard'])}</td>"
            f"<td>{fmt(row['error_code'])}</td><td>{esc(message)}</td></tr>"
        )
    lines.append("</table>")
    if failed.num_rows > cap:
        lines.append(f"<p id='failed-pairs-more'>and {failed.num_rows - cap} more</p>")
    return "\n".join(lines)


# -- the page ------------------------------------------------------------------------------------


def render_report(
    run_id: str,
    rows: pa.Table,
    summary: dict | None,
    settings: dict | None = None,
    sample_size: int = 8,
    seed: int = 0,
    failed_shown: int = FAILED_PAIRS_SHOWN,
    identity: dict | None = None,
    model_warning: str | None = None,
    *,
    max_pixels: int,
) -> str:
    """The page as a string. `rows`: output-manifest rows (REQUIRED_COLUMNS at least; any
    number, none included); `summary`: summary.json's content, or None when metrics were
    skipped; `settings`: the run's settings (`RenderConfig.settings`), shown as a table;
    `model_warning`: what the model's weights make meaningless (`checkpoint.weights_warning`);
    `max_pixels`: the run's --max-pixels, over which an image is not decoded (shown as unreadable)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in rows.column_names]
    if missing:
        raise ValueError(f"report rows lack column(s) {missing}; an output manifest has {list(REQUIRED_COLUMNS)}")
    # Only the rows shown become Python objects; counts and scores stay in pyarrow.
    ok = rows.filter(pc.equal(rows["status"], "ok"))
    scored = ok.filter(pc.is_valid(ok["clip_score"]))
    sections = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>DTC render {esc(run_id)}</title>",
        f"<style>{STYLE}</style></head><body><h1>DTC render {esc(run_id)}</h1>",
        _banner(summary, model_warning),
        _identity(identity),
        _settings(settings),
        _counts(rows),
    ]
    if summary is not None:
        sections += [_figures(summary), _shards(summary), _clip(scored, summary)]
    sections += [
        _sheet("Lowest CLIP scores", "lowest", _lowest(scored, sample_size), max_pixels),
        _sheet("Random sample", "sample", _sample(ok, sample_size, seed), max_pixels),
        *qa_sections(rows, max_pixels),  # scene strips, variant grids, lowest identity
        _failed_pairs(rows, failed_shown),
        IMAGES_LOADED,
        "</body></html>",
    ]
    return "\n".join(s for s in sections if s)


def _identity(metrics: dict | None) -> str:
    """The synthetic split's identity metrics (jobs.eval_synthetic's synthetic.json), when scored:
    figures that need no metric weights, so they stand beside a random-weight FID warning."""
    if not metrics:
        return ""
    names = {  # the colour toy's metrics (synthetic_eval) and the detail catalog's (detail_eval)
        "detail_acc": "detail accuracy: code cells read back (chance 0.5)",
        "code_exact": "code exact: all 9 cells (chance 0.002)",
        "hue_error_deg": "hue error (deg, chance ~90)",
        "hue_slope": "within-band hue slope (1: hue carried, 0: snapped to a band)",
        "swap": "swap test (chance 0.5)",
        "retrieval_top1": "retrieval top-1 of 16 (chance 0.06)",
        "quadrant_acc": "label quadrant (chance 0.25)",
        "masked_psnr_db": "masked PSNR (dB)",
        "masked_ssim": "masked SSIM",
    }
    cells = "".join(
        f"<tr><td>{esc(label)}</td><td>{fmt(metrics[key])}</td></tr>" for key, label in names.items() if key in metrics
    )
    return f"<h2 id='identity'>Identity on the synthetic test split</h2><table>{cells}</table>"


def read_manifest_rows(layout: Layout, run_ids: list[str], columns: tuple[str, ...] = REPORT_COLUMNS) -> pa.Table:
    """The output-manifest rows of `run_ids`, in run then part order, holding `columns` (those
    a part lacks are null, or absent when no part has them). No parts: an empty table."""
    tables = [_NO_ROWS.select([c for c in columns if c in _NO_ROWS.column_names])]
    for run_id in run_ids:
        manifest_dir = layout.manifest_dir(run_id)
        for rel, _, _ in storage.list_files(manifest_dir):
            if rel.endswith(".parquet"):
                part = storage.read_parquet(storage.join(manifest_dir, rel))
                tables.append(part.select([c for c in columns if c in part.column_names]))
    return pa.concat_tables(tables, promote_options="permissive")


def write_report(
    layout: Layout,
    run_id: str,
    summary: dict | None,
    settings: dict | None = None,
    *,
    run_ids: list[str] | None = None,
    model_warning: str | None = None,
    max_pixels: int,
) -> str:
    """Write `report/<run_id>/index.html` from the manifest rows of `run_ids` (default: `run_id`
    alone; a merge names its runs and its own id); returns the page's URI."""
    rows = read_manifest_rows(layout, run_ids or [run_id])
    uri = layout.report(run_id)
    identity_uri = storage.join(layout.metrics_dir(run_id), "synthetic.json")  # jobs.eval_synthetic's, if run
    identity = json.loads(storage.read_bytes(identity_uri)) if storage.exists(identity_uri) else None
    page = render_report(
        run_id, rows, summary, settings, identity=identity, model_warning=model_warning, max_pixels=max_pixels
    )
    storage.write_bytes(uri, page.encode())
    return uri
