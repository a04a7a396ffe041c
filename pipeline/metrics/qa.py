"""The QA page's sections for scenes, variants and identity scores (issue #16). No torch.

    sections = qa_sections(rows, max_pixels)   # by report.render_report; [] for a manifest without the columns

Three sections, each omitted when its columns are absent (older manifests) or no row has them:

- `scene-strips`: a scene per line, the photo then each step's image in step order, each with
  its status and identity score (the step's region outlined in red); at most SCENES_SHOWN
  scenes, those with a failed or flagged step first, then the lowest identity score.
- `variant-grids`: every variant of a pair with its seed and score, the chosen one outlined
  (class `chosen`); the pairs whose scores spread the most. Variants not kept
  (`--keep-variants` not given) or no longer readable show a placeholder.
- `lowest-identity`: `identity-distribution` (p10/p50/p90 and the needs_review count as text),
  then a contact sheet of the lowest identity scores, needs_review rows flagged.

Only the rows shown become Python objects and only their images are read (none over
`max_pixels`, the run's --max-pixels); selection stays in pyarrow, so a manifest of millions of
rows costs a few vectorised passes.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import images, regions, storage
from pipeline.metrics.feature_stats import ScoreHistogram
from pipeline.metrics.page import contact_row, esc, fmt, thumb
from pipeline.output.layout import Layout
from pipeline.schema import RowError

__all__ = ["qa_sections", "scene_strips", "variant_grids", "lowest_identity", "SCENE_COLUMNS", "VARIANT_COLUMNS"]

SCENES_SHOWN = 8
STEPS_SHOWN = 16  # an overlong scene (scene_invalid) can have many rows; the strip says how many more
VARIANT_PAIRS_SHOWN = 6
LOWEST_IDENTITY_SHOWN = 12
SCENE_COLUMNS = ("scene_id", "step")
VARIANT_COLUMNS = ("variant_seeds", "variant_scores", "chosen_variant")
_UNREADABLE = (RowError, FileNotFoundError, storage.StorageError, OSError, ValueError)

# In the page's body (the head's style is page.py's STYLE): the outline of the chosen variant, the flag.
_STYLE = (
    "<style>.strip td,.variants td{text-align:center;vertical-align:top;font-size:12px}"
    ".variants td.chosen{border:4px solid #1a7f37}.review{color:#c33;font-weight:bold}"
    ".missing{display:inline-block;width:120px;padding:30px 4px;background:#eee;color:#777}</style>"
)


def qa_sections(rows: pa.Table, max_pixels: int) -> list[str]:
    """The sections this manifest has columns and rows for, in page order (none: [])."""
    sections = [
        s
        for s in (scene_strips(rows, max_pixels), variant_grids(rows, max_pixels), lowest_identity(rows, max_pixels))
        if s
    ]
    return [_STYLE, *sections] if sections else []


# -- images --------------------------------------------------------------------------------------


def _image(uri: str | None, max_pixels: int) -> np.ndarray | None:
    """The displayed RGB pixels of `uri`, or None when there is none or it cannot be read."""
    if not uri:
        return None
    try:
        return images.decode_image(storage.read_bytes(uri), max_pixels=max_pixels)
    except _UNREADABLE:
        return None


def _region_box(row: dict, width: int, height: int, max_pixels: int) -> tuple[int, int, int, int] | None:
    """The row's region as an inclusive box (ImageDraw's rectangle includes its end pixels)."""
    if not row.get("mask_uri") and row.get("bbox") is None:
        return None
    try:
        mask = storage.read_bytes(row["mask_uri"]) if row.get("mask_uri") else None
        box = regions.bounding_box(regions.region_of(mask, row.get("bbox"), width, height, max_pixels=max_pixels))
    except _UNREADABLE:
        return None
    return None if box is None else (box[0], box[1], box[2] - 1, box[3] - 1)


def _cell(
    uri: str | None, row: dict | None, caption: str, max_pixels: int, attrs: str = "", missing: str = "image missing"
) -> str:
    """One table cell: the thumbnail of `uri` (`row`'s region outlined when given), or a
    placeholder saying `missing`, above `caption` (HTML)."""
    pixels = _image(uri, max_pixels)
    if pixels is None:
        picture = f"<span class='missing'>{esc(missing)}</span>"
    else:
        box = _region_box(row, pixels.shape[1], pixels.shape[0], max_pixels) if row else None
        picture = f"<img src='{thumb(pixels, box)}' alt='image'>"
    return f"<td{attrs}>{picture}<br>{caption}</td>"


def _score_line(row: dict) -> str:
    """'identity 71.20', flagged when the row needs review."""
    line = f"identity {fmt(row.get('identity_score'))}"
    return line + " <span class='review'>needs review</span>" if row.get("needs_review") else line


def _column(table: pa.Table, name: str, type_: pa.DataType) -> pa.ChunkedArray:
    """`table[name]`, or nulls when the manifest predates the column."""
    if name in table.column_names:
        return table[name]
    return pa.chunked_array([pa.nulls(table.num_rows, type_)])


# -- scene strips --------------------------------------------------------------------------------


def _worst_scenes(in_scenes: pa.Table, count: int) -> tuple[list[str], int]:
    """The ids of up to `count` scenes, a failed or flagged step first, then the lowest
    identity score, then by id; and how many scenes there are."""
    flagged = pc.or_(
        pc.not_equal(in_scenes["status"], "ok"), pc.fill_null(_column(in_scenes, "needs_review", pa.bool_()), False)
    )
    columns = {
        "scene_id": in_scenes["scene_id"],
        "flagged": pc.cast(flagged, pa.int8()),  # a max over 0/1: any step failed or flagged
        "identity": _column(in_scenes, "identity_score", pa.float64()),
    }
    per_scene = pa.table(columns).group_by("scene_id").aggregate([("flagged", "max"), ("identity", "min")])
    order = per_scene.sort_by(
        [("flagged_max", "descending"), ("identity_min", "ascending"), ("scene_id", "ascending")]
    )
    return order["scene_id"].slice(0, count).to_pylist(), per_scene.num_rows


def _scene_steps(scene_rows: list[dict]) -> list[dict]:
    """A scene's rows in step order (a pair listed twice, as in a merge: its last row)."""
    latest = {row["pair_id"]: row for row in scene_rows}
    return sorted(latest.values(), key=lambda r: (r["step"] is None, r["step"] or 0, r["pair_id"]))


def _strip(scene_id: str, steps: list[dict], max_pixels: int) -> str:
    """One scene's line: its id, the photo step 1 was rendered into, then each step."""
    photos = [r.get("context_uri") for r in steps if r.get("step") == 1] + [r.get("context_uri") for r in steps]
    photo = next((uri for uri in photos if uri), None)
    cells = [f"<td><b>{esc(scene_id)}</b><br>{len(steps)} step(s)</td>", _cell(photo, None, "photo", max_pixels)]
    for row in steps[:STEPS_SHOWN]:
        caption = f"step {fmt(row['step'])}<br>{esc(row['pair_id'])}<br>{esc(str(row['status']))}"
        if row["status"] == "ok":
            cells.append(
                _cell(row.get("output_uri"), row, f"{caption}<br>{_score_line(row)}", max_pixels, " class='step'")
            )
        else:  # a failed step has no image; its code says why (upstream_failed names the step)
            code = esc(str(row.get("error_code")))
            cells.append(f"<td class='step'><span class='missing'>{code}</span><br>{caption}</td>")
    if len(steps) > STEPS_SHOWN:
        cells.append(f"<td>and {len(steps) - STEPS_SHOWN} more</td>")
    return f"<tr class='scene' data-scene='{esc(scene_id)}'>{''.join(cells)}</tr>"


def scene_strips(rows: pa.Table, max_pixels: int, count: int = SCENES_SHOWN) -> str:
    """Scenes as strips (photo, step 1, step 2, ... final); '' without scene rows."""
    if any(c not in rows.column_names for c in SCENE_COLUMNS):
        return ""
    in_scenes = rows.filter(pc.is_valid(rows["scene_id"]))
    if in_scenes.num_rows == 0:
        return ""
    shown, total = _worst_scenes(in_scenes, count)
    chosen = in_scenes.filter(pc.is_in(in_scenes["scene_id"], value_set=pa.array(shown, pa.string())))
    by_scene: dict[str, list[dict]] = {scene_id: [] for scene_id in shown}
    for row in chosen.to_pylist():
        by_scene[row["scene_id"]].append(row)
    lines = [
        f"<h2>Scenes ({total}; {len(shown)} shown, failed or flagged steps first)</h2>",
        "<table class='strip' id='scene-strips'>",
        *(_strip(scene_id, _scene_steps(by_scene[scene_id]), max_pixels) for scene_id in shown),
        "</table>",
    ]
    return "\n".join(lines)


# -- variant grids -------------------------------------------------------------------------------


def variant_image_uri(row: dict, k: int) -> str | None:
    """Where variant `k` of `row` lies: the chosen one is the row's image; the others are under
    the same output as it (the row names its image, not the run's --output: a merged page spans
    runs), with its extension. None when the image's key is not the layout's."""
    output_uri, pair_id = row.get("output_uri"), row["pair_id"]
    if not output_uri or k == row.get("chosen_variant"):
        return output_uri
    ext = output_uri.rsplit(".", 1)[-1]
    root = output_uri[: -len(f"images/{pair_id}.{ext}")].rstrip("/")
    layout = Layout(root)
    return layout.variant_image(pair_id, k, ext) if layout.image(pair_id, ext) == output_uri else None


def _widest_spread(with_variants: pa.Table, count: int) -> list[dict]:
    """The `count` rows whose variant scores spread the most (max - min), then by pair_id."""
    scores = with_variants["variant_scores"].combine_chunks()
    flat = pa.table({"row": pc.list_parent_indices(scores), "score": pc.list_flatten(scores)})
    per_row = flat.group_by("row").aggregate([("score", "min"), ("score", "max")])
    spread = np.full(with_variants.num_rows, -np.inf)  # all-null scores: last
    found = pc.subtract(per_row["score_max"], per_row["score_min"]).to_numpy(zero_copy_only=False)
    spread[per_row["row"].to_numpy()] = np.nan_to_num(found, nan=-np.inf)
    ranked = with_variants.append_column("_spread", pa.array(spread))
    ranked = ranked.sort_by([("_spread", "descending"), ("pair_id", "ascending")])
    return ranked.slice(0, count).to_pylist()


def _grid(row: dict, max_pixels: int) -> str:
    """One pair's line: its id, then each variant with its seed and score, the chosen one outlined."""
    seeds, scores, chosen = row["variant_seeds"] or [], row["variant_scores"], row.get("chosen_variant")
    cells = [f"<td><b>{esc(row['pair_id'])}</b><br>{len(scores)} variants</td>"]
    for k, score in enumerate(scores):
        seed = seeds[k] if k < len(seeds) else None
        caption = f"#{k} · seed {fmt(seed)}<br>score {fmt(score)}"
        is_chosen = k == chosen
        caption += "<br><b>chosen</b>" if is_chosen else ""
        attrs = f" class='variant{' chosen' if is_chosen else ''}' data-variant='{k}'"
        cells.append(_cell(variant_image_uri(row, k), row, caption, max_pixels, attrs, missing="not kept or missing"))
    return f"<tr class='pair' data-pair='{esc(row['pair_id'])}'>{''.join(cells)}</tr>"


def variant_grids(rows: pa.Table, max_pixels: int, count: int = VARIANT_PAIRS_SHOWN) -> str:
    """Variants as grids, the widest score spreads first; '' without rows of several variants."""
    if any(c not in rows.column_names for c in VARIANT_COLUMNS):
        return ""
    ok = rows.filter(pc.equal(rows["status"], "ok"))
    with_variants = ok.filter(pc.greater(pc.list_value_length(ok["variant_scores"]), 1))
    if with_variants.num_rows == 0:
        return ""
    lines = [
        f"<h2>Variants ({with_variants.num_rows} pairs; the {min(count, with_variants.num_rows)} "
        "widest score spreads, the chosen one outlined)</h2>",
        "<table class='variants' id='variant-grids'>",
        *(_grid(row, max_pixels) for row in _widest_spread(with_variants, count)),
        "</table>",
    ]
    return "\n".join(lines)


# -- lowest identity scores ----------------------------------------------------------------------


def _distribution(scores: pa.ChunkedArray, flagged: int) -> str:
    """The figures the console summary and the run record give (one definition: ScoreHistogram)."""
    figures = ScoreHistogram.of(scores.to_pylist()).summary()
    p10, p50, p90, mean = (f"{figures[k]:g}" for k in ("p10", "p50", "p90", "mean"))
    return (
        f"<p id='identity-distribution'>identity_score over {figures['n']} rendered rows: "
        f"mean {mean} · p10 {p10} · p50 {p50} · p90 {p90}; needs_review: {flagged}</p>"
    )


def _rendered_into(shown: list[dict], rows: pa.Table) -> list[dict]:
    """`shown` with a scene step's context_uri made the image it was rendered into (step k-1's
    render; the manifest's context_uri is the scene's photo, or empty)."""
    scene_ids = sorted({r["scene_id"] for r in shown if r.get("scene_id") and (r.get("step") or 0) > 1})
    if not scene_ids:
        return shown
    scenes = rows.filter(pc.is_in(rows["scene_id"], value_set=pa.array(scene_ids, pa.string())))
    outputs = {
        (r["scene_id"], r["step"]): r["output_uri"]
        for r in scenes.select(["scene_id", "step", "output_uri"]).to_pylist()
    }
    into = []
    for row in shown:
        step = row.get("step") or 0
        into.append({**row, "context_uri": outputs.get((row["scene_id"], step - 1))} if step > 1 else row)
    return into


def _identity_row(row: dict, max_pixels: int) -> str:
    scene = f"<br>scene {esc(row['scene_id'])} step {fmt(row.get('step'))}" if row.get("scene_id") else ""
    label = f"<td><b>{esc(row['pair_id'])}</b><br>{esc(str(row.get('shard')))}{scene}<br>{_score_line(row)}</td>"
    thumbs = contact_row(row, max_pixels) if row.get("context_uri") else None  # contact_row needs a context to read
    if thumbs is None:
        return f"<tr class='lowest'>{label}<td colspan='3'>inputs no longer readable</td></tr>"
    cells = "".join(f"<td><img src='{thumbs[k]}' alt='{k}'></td>" for k in ("context", "product", "output"))
    return f"<tr class='lowest'>{label}{cells}</tr>"


def lowest_identity(rows: pa.Table, max_pixels: int, count: int = LOWEST_IDENTITY_SHOWN) -> str:
    """The identity_score distribution and the lowest-scoring renders; '' without the column."""
    if "identity_score" not in rows.column_names:
        return ""
    scored = rows.filter(pc.and_(pc.equal(rows["status"], "ok"), pc.is_valid(rows["identity_score"])))
    if scored.num_rows == 0:
        return "<h2>Lowest identity scores</h2><p id='identity-distribution'>No identity scores in this run.</p>"
    flagged = pc.sum(pc.fill_null(_column(scored, "needs_review", pa.bool_()), False)).as_py() or 0
    shown = scored.take(pc.sort_indices(scored["identity_score"])[:count]).to_pylist()
    if "scene_id" in rows.column_names and "step" in rows.column_names:
        shown = _rendered_into(shown, rows)
    lines = [
        "<h2>Lowest identity scores</h2>",
        _distribution(scored["identity_score"], flagged),
        "<table class='sheet' id='lowest-identity'>",
        "<tr><th>pair</th><th>rendered into</th><th>product</th><th>output</th></tr>",
        *(_identity_row(row, max_pixels) for row in shown),
        "</table>",
    ]
    return "\n".join(lines)
