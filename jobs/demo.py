"""The embedded default: a sample catalog rendered with the tiny DTC on a local Ray.

    python -m jobs.demo [--out demo_out] [--pairs 40]

Generates a catalog (photos of varied sizes, RGBA products, bbox and mask rows, two rows
broken on purpose), makes the tiny model, renders on a local Ray, prints the summary and
where to look. No downloads; a few minutes at most on 2 cores. Re-running it resumes: every
pair is already done, so nothing is rendered again (use --force to re-render).
"""

from __future__ import annotations

import os
import sys

from jobs.cli import Parser
from pipeline.schema import EXIT_ERROR


def _random_weights_config(out: str) -> str:
    path = os.path.join(out, "render.yaml")
    with open(path, "w") as f:
        f.write("# written by jobs.demo: its metric extractors have random weights\nmetrics_random_weights: true\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m jobs.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="demo_out", help="folder for catalog, model and output")
    parser.add_argument("--pairs", type=int, default=40, help="good pairs in the catalog (2 bad ones are added)")
    parser.add_argument("--force", action="store_true", help="re-render even if done")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    from pipeline.sample_catalog import make_catalog

    catalog = os.path.join(args.out, "catalog")
    manifest = os.path.join(catalog, "manifest.parquet")
    if not os.path.exists(manifest):
        make_catalog(catalog, n_pairs=args.pairs, bad_rows=True)
        print(f"[demo] sample catalog: {manifest} ({args.pairs} pairs + 2 broken on purpose)")
    model = os.path.join(args.out, "model", "dtc-tiny")
    if not os.path.exists(os.path.join(model, "model_index.json")):
        from jobs.make_model import main as make_model

        if make_model(["--preset", "tiny", "--out", model]) != 0:
            return EXIT_ERROR

    from pipeline.metrics.extract import save_random_extractors

    # Random-weight extractors: the demo shows the metrics machinery, and its report says in
    # large type that the figures mean nothing. Real runs pass the standard Inception weights
    # file and a CLIP ViT-B/32 folder.
    inception, clip = save_random_extractors(os.path.join(args.out, "model", "metrics"))

    from jobs.render import main as render

    flags = [
        "--manifest",
        manifest,
        "--output",
        os.path.join(args.out, "output"),
        "--model",
        model,
        *"--steps 20 --batch-size 4 --image-format png --cpus-per-actor 0.5 --torch-threads 2".split(),
        *"--max-failed-fraction 0.1".split(),
        "--inception-weights",
        inception,
        "--clip-model",
        clip,
        "--config",
        _random_weights_config(args.out),
    ]
    code = render(flags + (["--force"] if args.force else []))
    print(
        f"\n[demo] look at {os.path.join(args.out, 'output', 'images')} and the QA page "
        f"{os.path.join(args.out, 'output', 'report')}/*/index.html"
    )
    print(
        "[demo] the 2 failed rows are deliberate: a missing photo (image_missing) "
        "and a bbox outside the photo (bad_bbox)"
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
