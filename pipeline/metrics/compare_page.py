"""The comparison's HTML page (`jobs.compare`): one self-contained file, as the QA page is. No torch.

    html = render_page(summary, runs, max_pixels=limit)   # summary, runs: metrics/compare.py's

Sections and their element ids (for headless checks): `random-weights` (when any run's
extractors had random weights), `model-warnings`, `runs` (each run's model, digests and row
counts), `global` and `deltas` (the figures on the shared pairs), `shards`, the strips (photo,
product, then each run's render, the region outlined in red): `better-<k>` and `worse-<k>` per
challenger k (the largest CLIP differences each way), `sample`; then `settings` side by side.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.metrics.page import IMAGES_LOADED, STYLE, contact_row, esc, fmt

__all__ = ["render_page"]

_STYLE = (
    ".strip td{text-align:center;vertical-align:top;font-size:12px}.strip img{display:block}"
    ".differs td{background:#fff4d6}.note{color:#555;font-size:13px}#runs td{overflow-wrap:anywhere}"
)


def _interval(figure: dict | None, digits: int = 2) -> str:
    """'+1.23 [0.40, 2.10]' (n pairs); – without a figure."""
    if not figure or figure.get("value") is None:
        return "–"
    value = f"{figure['value']:+.{digits}f}"
    if figure.get("low") is None:
        return f"{value} (n = {figure['n']}, no interval)"
    return f"{value} [{figure['low']:+.{digits}f}, {figure['high']:+.{digits}f}] (n = {figure['n']})"


def _rate(figure: dict) -> str:
    if figure.get("value") is None:
        return "–"
    if figure.get("low") is None:
        return f"{figure['value']:.3f}"
    return f"{figure['value']:.3f} [{figure['low']:.3f}, {figure['high']:.3f}]"


def _banners(summary: dict) -> str:
    lines = []
    if summary["protocol"].get("random_weights"):
        lines.append(
            "<p class='banner' id='random-weights'>RANDOM-WEIGHT EXTRACTORS: these FID, KID and CLIP figures "
            "measure nothing. Render with --inception-weights and --clip-model for real figures.</p>"
        )
    warnings = [(r["label"], (r.get("model") or {}).get("warning")) for r in summary["runs"]]
    items = "".join(f"<li>{esc(label)}: {esc(w)}</li>" for label, w in warnings if w)
    if items:
        lines.append(f"<ul id='model-warnings'>{items}</ul>")
    return "\n".join(lines)


def _runs(summary: dict) -> str:
    lines = [
        "<h2>Runs</h2><table class='text' id='runs'><tr><th>run</th><th>output</th><th>model</th>"
        "<th>model digest</th><th>settings digest</th><th>rows</th><th>ok</th><th>failed</th><th>skipped</th>"
        "<th>shared</th><th>ok, not shared</th></tr>"
    ]
    for k, run in enumerate(summary["runs"]):
        model, counts = run.get("model") or {}, run["counts"]
        role = " (baseline)" if k == 0 else ""
        cells = [
            f"<b>{esc(run['label'])}</b>{role}", esc(run["output"]), esc(str(model.get("uri"))),
            esc(str(model.get("digest"))[:16]), esc(str(run.get("settings_digest"))[:16]),
            *(counts.get(key, 0) for key in ("rows", "ok", "failed", "skipped", "shared", "ok_not_shared")),
        ]  # fmt: skip
        lines.append("<tr class='run'>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _figures(summary: dict) -> str:
    figures = summary["global"]
    boot = summary["bootstrap"]
    lines = [
        f"<h2>On the {summary['shared_pairs']} pairs every run rendered ok</h2>",
        "<table id='global'><tr><th>run</th><th>FID</th><th>N</th><th>KID mean</th><th>KID std</th>"
        "<th>CLIP mean</th><th>identity mean (its own encoder)</th></tr>",
    ]
    for run in figures["runs"]:
        cells = [
            esc(run["label"]), fmt(run["fid"]), run["fid_n"], fmt(run["kid_mean"], 5), fmt(run["kid_std"], 5),
            fmt(run["clip_mean"]), fmt(run["identity_mean"]),
        ]  # fmt: skip
        lines.append("<tr class='figures'>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    lines += [
        "</table>",
        f"<p class='note'>Deltas are challenger minus baseline ({esc(summary['baseline'])}), per pair, with "
        f"{int(boot['confidence_level'] * 100)}% paired bootstrap intervals ({boot['resamples']} resamples of the "
        "pairs, percentile method, seed "
        f"{boot['seed']}). An interval that excludes 0 (a win rate's that excludes 0.5) is a difference these "
        "pairs support; one that spans it is not.</p>",
        "<table class='text' id='deltas'><tr><th>run</th><th>vs</th><th>CLIP delta [interval]</th>"
        "<th>win rate on CLIP [interval]</th><th>identity delta</th></tr>",
    ]
    for delta in figures["deltas"]:
        identity = _interval(delta["identity"]) if delta["identity"] is not None else esc(delta["identity_note"])
        cells = [esc(delta["label"]), esc(delta["vs"]), _interval(delta["clip"]), _rate(delta["win_rate"]), identity]
        lines.append("<tr class='delta'>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _shards(summary: dict) -> str:
    labels = [r["label"] for r in summary["runs"]]
    head = "".join(f"<th>FID {esc(label)}</th><th>KID {esc(label)}</th><th>CLIP {esc(label)}</th>" for label in labels)
    head += "".join(f"<th>CLIP delta {esc(label)}</th><th>win rate {esc(label)}</th>" for label in labels[1:])
    lines = [f"<h2>Shards</h2><table id='shards'><tr><th>shard</th><th>pairs</th>{head}</tr>"]
    for shard in summary["shards"]:
        cells = [esc(str(shard["shard"])), shard["pairs"]]
        for run in shard["runs"]:
            kid = f"{fmt(run['kid_mean'], 5)} ± {fmt(run['kid_std'], 5)}" if run["kid_mean"] is not None else "n/a"
            cells += [f"{fmt(run['fid'])} (N = {run['fid_n']})", kid, fmt(run["clip_mean"])]
        for delta in shard["deltas"]:
            cells += [_interval(delta["clip"]), _rate(delta["win_rate"])]
        lines.append("<tr class='shard'>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _strips(title: str, anchor: str, pair_ids: list[str], rows: list[dict[str, dict]], labels: list[str], px: int):
    """One table: a pair per line, its photo and product, then each run's render."""
    if not pair_ids:
        return f"<h2>{esc(title)}</h2><p id='{anchor}'>No such pair.</p>"
    head = "".join(f"<th>{esc(label)}</th>" for label in labels)
    lines = [
        f"<h2>{esc(title)}</h2><table class='strip' id='{anchor}'>",
        f"<tr><th>pair</th><th>photo</th><th>product</th>{head}</tr>",
    ]
    for pair_id in pair_ids:
        per_run = [run_rows[pair_id] for run_rows in rows]
        scores = "<br>".join(f"{esc(label)}: CLIP {fmt(r.get('clip_score'))}" for label, r in zip(labels, per_run))
        label = f"<td><b>{esc(pair_id)}</b><br>{esc(str(per_run[0].get('shard')))}<br>{scores}</td>"
        thumbs = [contact_row(r, px) for r in per_run]
        if thumbs[0] is None:
            lines.append(
                f"<tr class='pair'>{label}<td colspan='{2 + len(labels)}'>inputs no longer readable</td></tr>"
            )
            continue
        cells = [thumbs[0]["context"], thumbs[0]["product"], *(t["output"] if t else None for t in thumbs)]
        html = "".join(f"<td><img src='{c}' alt='image'></td>" if c else "<td>not readable</td>" for c in cells)
        lines.append(f"<tr class='pair' data-pair='{esc(pair_id)}'>{label}{html}</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _settings(summary: dict) -> str:
    runs = summary["runs"]
    keys = list(dict.fromkeys(k for run in runs for k in (run.get("settings") or {})))
    head = "".join(f"<th>{esc(r['label'])}</th>" for r in runs)
    lines = [f"<h2>Settings</h2><table class='text' id='settings'><tr><th>setting</th>{head}</tr>"]
    for key in keys:
        values = [(r.get("settings") or {}).get(key) for r in runs]
        differs = " class='differs'" if len({repr(v) for v in values}) > 1 else ""
        cells = "".join(f"<td>{'–' if v is None else esc(str(v))}</td>" for v in values)
        lines.append(f"<tr{differs}><td>{esc(str(key))}</td>{cells}</tr>")
    lines.append("</table><p class='note'>Highlighted: the settings that differ.</p>")
    return "\n".join(lines)


def render_page(summary: dict, runs: list, *, max_pixels: int) -> str:
    """The page as a string: `summary` from `compare.compare`, `runs` its `compare.Run`s (their
    manifest rows give the strips' images), `max_pixels` the limit over which an image is not decoded."""
    labels = [r.label for r in runs]
    shown = summary["shown"]
    wanted = sorted({p for ids in (*shown["better"].values(), *shown["worse"].values(), shown["sample"]) for p in ids})
    rows = []
    for run in runs:
        ok = run.rows.filter(pc.equal(run.rows["status"], "ok"))
        chosen = ok.filter(pc.is_in(ok["pair_id"], value_set=pa.array(wanted, pa.string())))
        rows.append({r["pair_id"]: r for r in chosen.to_pylist()})
    title = " vs ".join(labels)
    sections = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>Compare {esc(title)}</title>",
        f"<style>{STYLE}{_STYLE}</style></head><body><h1>Compare {esc(title)}</h1>",
        _banners(summary),
        _runs(summary),
        _figures(summary),
        _shards(summary),
    ]
    for k, label in enumerate(labels[1:], start=1):
        sections.append(
            _strips(f"Where {label} beats {labels[0]} most (CLIP)", f"better-{k}", shown["better"][label], rows,
                    labels, max_pixels)
        )  # fmt: skip
        sections.append(
            _strips(f"Where {labels[0]} beats {label} most (CLIP)", f"worse-{k}", shown["worse"][label], rows,
                    labels, max_pixels)
        )  # fmt: skip
    sections += [
        _strips("Random sample of the shared pairs", "sample", shown["sample"], rows, labels, max_pixels),
        _settings(summary),
        IMAGES_LOADED,
        "</body></html>",
    ]
    return "\n".join(s for s in sections if s)
