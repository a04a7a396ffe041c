"""Recompute a run's quality figures from its stored statistics, or merge several runs.

    python -m jobs.metrics --output s3://renders/try-all --run-id 20261126T023000Z-ab12cd
    python -m jobs.metrics --output s3://renders/try-all --run-id RUN_A --run-id RUN_B [--out-id merged-nov]

One run: its shard files, `summary.json` and report are rewritten from
`metrics/<run_id>/shard=*.{real,gen}.npz` and `shard=*.features.parquet` alone. Several runs:
shards of the same name are merged (statistics added, features pooled) into
`metrics/<out-id>/` and `report/<out-id>/`. Figures made with random-weight extractors keep
their warning (summary.json's `protocol.random_weights`, the report's banner, the printed line).
Exit 0 done, 2 bad usage (a run id given twice included) or no metrics for a run id, 1 other errors.
"""

from __future__ import annotations

import json
import sys

from jobs.cli import Parser


def _usage_problem(run_ids: list[str], out_id: str | None) -> str | None:
    from pipeline.schema import name_problem

    for kind, value in [*(("--run-id", r) for r in run_ids), *([("--out-id", out_id)] if out_id else [])]:
        if problem := name_problem(kind, value):
            return problem
    repeated = sorted({r for r in run_ids if run_ids.count(r) > 1})
    if repeated:  # merging a run with itself would count its pairs twice
        return f"--run-id {', '.join(repeated)} given more than once; name each run once"
    return None


def _shard_counts(layout, run_ids: list[str]) -> dict[str, dict[str, int]]:
    """{shard: {status: rows}} over the runs' output manifests."""
    from pipeline.metrics.report import read_manifest_rows

    rows = read_manifest_rows(layout, run_ids, columns=("shard", "status"))
    counts: dict[str, dict[str, int]] = {}
    for row in rows.group_by(["shard", "status"]).aggregate([("status", "count")]).to_pylist():
        counts.setdefault(row["shard"], {})[row["status"]] = row["status_count"]
    return counts


def _settings(layout, run_ids: list[str]) -> dict | None:
    """The settings the runs' records hold (`runs/<run_id>.json`); where merged runs differ, each
    run's value. None when no record is there."""
    from pipeline import storage

    per_run = {}
    for run_id in run_ids:
        if storage.exists(layout.run_record(run_id)):
            per_run[run_id] = json.loads(storage.read_bytes(layout.run_record(run_id))).get("settings") or {}
    if not per_run:
        return None
    keys = list(dict.fromkeys(k for settings in per_run.values() for k in settings))
    merged = {}
    for key in keys:
        values = {run_id: settings.get(key) for run_id, settings in per_run.items()}
        same = len({json.dumps(v) for v in values.values()}) == 1
        merged[key] = next(iter(values.values())) if same else "; ".join(f"{r}: {v}" for r, v in values.items())
    return merged


def _model_warning(layout, run_ids: list[str]) -> str | None:
    """The runs' records' model warning (`model.warning`; a merge keeps any run's), or None."""
    from pipeline import storage

    for run_id in run_ids:
        if storage.exists(layout.run_record(run_id)):
            warning = (json.loads(storage.read_bytes(layout.run_record(run_id))).get("model") or {}).get("warning")
            if warning:
                return warning
    return None


def _max_pixels(layout, run_ids: list[str]) -> int:
    """The runs' --max-pixels (their records' config; a merge: the largest), else the default:
    the page decodes what the runs decoded."""
    from pipeline import storage
    from pipeline.config import RENDER_DEFAULTS

    found = [
        (json.loads(storage.read_bytes(layout.run_record(run_id))).get("config") or {}).get("max_pixels")
        for run_id in run_ids
        if storage.exists(layout.run_record(run_id))
    ]
    return max((n for n in found if n), default=RENDER_DEFAULTS.max_pixels)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m jobs.metrics", description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="the render output folder or s3:// prefix")
    parser.add_argument("--run-id", action="append", required=True, help="run to recompute (repeat to merge runs)")
    parser.add_argument("--out-id", help="id of the merged figures (default: the run id, or merged-<first>-<n>)")
    args = parser.parse_args(argv)

    from pipeline import storage
    from pipeline.metrics.report import write_report
    from pipeline.metrics.shards import recompute
    from pipeline.output.layout import Layout
    from pipeline.schema import EXIT_ERROR, EXIT_OK, EXIT_REFUSED

    run_ids = args.run_id
    if problem := _usage_problem(run_ids, args.out_id):
        print(f"metrics: {problem}", file=sys.stderr)
        return EXIT_REFUSED
    out_id = args.out_id or (run_ids[0] if len(run_ids) == 1 else f"merged-{run_ids[0]}-{len(run_ids)}")
    layout = Layout(args.output)
    try:
        summary = recompute(layout, run_ids, out_id, _shard_counts(layout, run_ids))
        report = write_report(
            layout,
            out_id,
            summary,
            settings=_settings(layout, run_ids),
            run_ids=run_ids,
            model_warning=_model_warning(layout, run_ids),
            max_pixels=_max_pixels(layout, run_ids),
        )
    except FileNotFoundError as e:
        print(f"metrics: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except (storage.StorageError, OSError, ValueError) as e:
        print(f"metrics: failed: {e}", file=sys.stderr)
        return EXIT_ERROR
    g = summary["global"]
    fid = "n/a" if g["fid"] is None else f"{g['fid']:.3f}"
    warning = "  [RANDOM-WEIGHT EXTRACTORS: meaningless]" if summary["protocol"].get("random_weights") else ""
    print(
        f"metrics {out_id}: FID {fid} (N={g['n']}), KID {g['kid_mean']}, CLIP {g['clip']['mean']}{warning}; "
        f"{len(summary['shards'])} shard(s) -> {layout.metrics_dir(out_id)}/summary.json, {report}"
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
