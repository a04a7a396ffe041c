"""Recompute a run's quality figures from its stored statistics, or merge several runs.

    python -m jobs.metrics --output s3://renders/try-all --run-id 20261126T023000Z-ab12cd
    python -m jobs.metrics --output s3://renders/try-all --run-id RUN_A --run-id RUN_B [--out-id merged-nov]

One run: its shard files, `summary.json` and report are rewritten from
`metrics/<run_id>/shard=*.{real,gen}.npz` and `shard=*.features.parquet` alone. Several runs:
shards of the same name are merged (statistics added, features pooled) into
`metrics/<out-id>/`. Exit 0 done, 2 bad usage or no metrics for a run id, 1 other errors.
"""

from __future__ import annotations

import argparse
import collections
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.metrics", description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="the render output folder or s3:// prefix")
    parser.add_argument("--run-id", action="append", required=True, help="run to recompute (repeat to merge runs)")
    parser.add_argument("--out-id", help="id of the merged figures (default: the run id, or merged-<first>-<n>)")
    args = parser.parse_args(argv)

    from pipeline import storage
    from pipeline.metrics.report import render_report
    from pipeline.metrics.shards import recompute
    from pipeline.output.layout import Layout
    from pipeline.schema import EXIT_ERROR, EXIT_OK, EXIT_REFUSED, name_problem

    for kind, value in [*(("--run-id", r) for r in args.run_id), *([("--out-id", args.out_id)] if args.out_id else [])]:
        if problem := name_problem(kind, value):
            print(f"metrics: {problem}", file=sys.stderr)
            return EXIT_REFUSED
    repeated = sorted({r for r in args.run_id if args.run_id.count(r) > 1})
    if repeated:  # merging a run with itself would count its pairs twice
        print(f"metrics: --run-id {', '.join(repeated)} given more than once; name each run once", file=sys.stderr)
        return EXIT_REFUSED
    out_id = args.out_id or (args.run_id[0] if len(args.run_id) == 1 else f"merged-{args.run_id[0]}-{len(args.run_id)}")
    layout = Layout(args.output)
    try:
        counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        tables = []
        for run_id in args.run_id:
            for rel, _, _ in storage.list_files(layout.manifest_dir(run_id)):
                table = storage.read_parquet(storage.join(layout.manifest_dir(run_id), rel))
                tables.append(table)
                for shard, status in zip(table["shard"].to_pylist(), table["status"].to_pylist()):
                    counts[shard][status] += 1
        summary = recompute(layout, args.run_id, out_id, {s: dict(c) for s, c in counts.items()})
    except FileNotFoundError as e:
        print(f"metrics: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except (storage.StorageError, OSError, ValueError) as e:
        print(f"metrics: failed: {e}", file=sys.stderr)
        return EXIT_ERROR
    import pyarrow as pa

    if tables:
        storage.write_bytes(layout.report(out_id), render_report(out_id, pa.concat_tables(tables, promote_options="permissive"), summary).encode())
    g = summary["global"]
    fid = "n/a" if g["fid"] is None else f"{g['fid']:.3f}"
    warning = "  [RANDOM-WEIGHT EXTRACTORS: meaningless]" if summary["protocol"].get("random_weights") else ""
    print(f"metrics {out_id}: FID {fid} (N={g['n']}), KID {g['kid_mean']}, CLIP {g['clip']['mean']}{warning}; "
          f"{len(summary['shards'])} shard(s) -> {layout.metrics_dir(out_id)}/summary.json")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
