"""Two or more render runs side by side, on the pairs they share.

    python -m jobs.compare --run s3://renders/nov:RUN_A --run s3://renders/dec:RUN_B --out s3://renders/compare/nov-dec

Each `--run` is OUTPUT:RUN_ID (a run's --output and its id; the outputs may differ); the first
is the baseline. Writes `OUT/index.html` (the page: figures, deltas with paired bootstrap
intervals, strips of the largest differences both ways and a random sample, each run's settings)
and `OUT/summary.json` (the figures), nothing else. Refused with one line and exit 2 before any
work: a bad or repeated --run, one run only, a missing run or one without metrics, runs measured
with different extractors, runs sharing no pair. Exit 0 done, 1 other errors (storage).
"""

from __future__ import annotations

import json
import sys

from jobs.cli import Parser


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m jobs.compare", description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="append", default=[], help="OUTPUT:RUN_ID (two or more; first: the baseline)")
    parser.add_argument("--out", required=True, help="folder or s3:// prefix for index.html and summary.json")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples of the pairs (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and the random sample (default 0)")
    args = parser.parse_args(argv)

    from pipeline import storage
    from pipeline.config import RENDER_DEFAULTS
    from pipeline.metrics import compare as cmp
    from pipeline.metrics.compare_page import render_page
    from pipeline.schema import EXIT_ERROR, EXIT_OK, EXIT_REFUSED

    try:
        if args.resamples < 100:
            raise cmp.CompareRefused(f"--resamples {args.resamples} is too few for a 95% interval; give 100 or more")
        runs = cmp.load_runs([cmp.parse_run_spec(spec) for spec in args.run])
        cmp.check_comparable(runs)
    except cmp.CompareRefused as e:
        print(f"compare: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except (storage.StorageError, OSError, ValueError) as e:
        print(f"compare: failed: {e}", file=sys.stderr)
        return EXIT_ERROR
    out = args.out.rstrip("/")
    page_uri, summary_uri = storage.join(out, "index.html"), storage.join(out, "summary.json")
    try:
        summary, _ = cmp.compare(runs, resamples=args.resamples, seed=args.seed)
        summary["page"] = page_uri
        page = render_page(summary, runs, max_pixels=cmp.max_pixels(runs, RENDER_DEFAULTS.max_pixels))
        storage.write_bytes(page_uri, page.encode())
        storage.write_bytes(summary_uri, json.dumps(summary, indent=1).encode())
    except (storage.StorageError, OSError, ValueError) as e:
        print(f"compare: failed: {e}", file=sys.stderr)
        return EXIT_ERROR
    warning = "  [RANDOM-WEIGHT EXTRACTORS: meaningless]" if summary["protocol"]["random_weights"] else ""
    for delta in summary["global"]["deltas"]:
        clip, win = delta["clip"], delta["win_rate"]
        if clip["value"] is None:  # the runs were measured without --clip-model
            figures = "no CLIP scores"
        else:
            interval = "" if clip["low"] is None else f" [{clip['low']:+.2f}, {clip['high']:+.2f}]"
            figures = f"CLIP delta {clip['value']:+.2f}{interval}, win rate {win['value']:.3f}"
        print(f"compare {delta['label']} vs {delta['vs']}: {summary['shared_pairs']} shared pairs, {figures}{warning}")
    print(f"compare: {page_uri}, {summary_uri}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
