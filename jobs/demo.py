"""The embedded default: the render job on a sample catalog, then a model that learned.

    python -m jobs.demo [--out demo_out] [--pairs 40] [--toy-pairs 16]

1. The job: a sample catalog (photos of varied sizes, RGBA products, bbox and mask rows, two rows
   broken on purpose) rendered with the random-weight `tiny` DTC on a local Ray -> output/.
2. A model that learned: the detail catalog's test split (`jobs.make_training_catalog --kind
   detail`: 3 x 3 codes and hues no training row had) rendered with the committed `train-tiny`
   model (models/train-tiny.safetensors, made by the training job here: docs/training.md "The
   committed weights" has the commands) -> learned/, scored by `jobs.eval_synthetic`; its QA page
   shows the detail accuracy beside the hue error and the random-weight FID warning, and contact
   sheets with the coded product in the photo.

No downloads; a few minutes at most on 2 cores. Re-running it resumes: every pair is already
done, so nothing is rendered again (use --force to re-render); part 2's re-run is a run of its
own (learned-2, learned-3, ...) that reuses every image, scored and reported like the first.
"""

from __future__ import annotations

import hashlib
import os
import sys

from jobs.cli import Parser
from pipeline.schema import EXIT_ERROR

# the train-tiny weights the training job made here (docs/training.md "The committed weights": the commands)
TRAIN_TINY_WEIGHTS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "train-tiny.safetensors"
)
# the fast profile: on the toy it matches DDIM 40 on every identity metric at half the UNet work (docs/running.md)
LEARNED_RENDER = (
    "--scheduler dpmpp --steps 20 --batch-size 8 --image-format png --cpus-per-actor 0.5 --torch-threads 2".split()
)


def _random_weights_config(out: str) -> str:
    path = os.path.join(out, "render.yaml")
    with open(path, "w") as f:
        f.write("# written by jobs.demo: its metric extractors have random weights\nmetrics_random_weights: true\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m jobs.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="demo_out", help="folder for catalog, model and output")
    parser.add_argument("--pairs", type=int, default=40, help="good pairs in the catalog (2 bad ones are added)")
    parser.add_argument("--toy-pairs", type=int, default=16, help="test products of part 2 (two rows each); 0: skip")
    parser.add_argument("--force", action="store_true", help="re-render even if done")
    parser.add_argument(
        "--pack-weights",
        metavar="MODEL_DIR",
        help="write a trained train-tiny folder into models/train-tiny.safetensors",
    )
    args = parser.parse_args(argv)
    if args.pack_weights:
        from pipeline.toy.runs import pack

        pack(args.pack_weights, TRAIN_TINY_WEIGHTS)
        print(f"[demo] packed {args.pack_weights} into {TRAIN_TINY_WEIGHTS}")
        return 0
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
    if code == 0 and args.toy_pairs:
        code = _learned(args.out, args.toy_pairs, flags[flags.index("--inception-weights") :], args.force)
    print(
        f"\n[demo] look at {os.path.join(args.out, 'output', 'images')} and the QA page "
        f"{os.path.join(args.out, 'output', 'report')}/*/index.html"
    )
    print(
        "[demo] the 2 failed rows are deliberate: a missing photo (image_missing) "
        "and a bbox outside the photo (bad_bbox)"
    )
    return code


def _learned(out: str, toy_pairs: int, metric_flags: list[str], force: bool) -> int:
    """Part 2: the toy test split rendered with the committed train-tiny model, then scored."""
    from jobs.eval_synthetic import main as eval_synthetic
    from jobs.render import main as render
    from pipeline.toy.catalog import make_training_catalog
    from pipeline.toy.runs import unpack

    toy = os.path.join(out, "detail")  # not "toy": a demo_out of the colour toy keeps its own split
    test = os.path.join(toy, "test.parquet")
    if not os.path.exists(test):
        make_training_catalog(toy, n_pairs=4, n_test=toy_pairs, seed=1, kind="detail")
        print(f"[demo] detail test split: {test} ({toy_pairs} coded products, own and swapped, 2 rows each)")
    # cached per weights file: new committed weights (a pull) unpack to a new folder, never the stale one
    with open(TRAIN_TINY_WEIGHTS, "rb") as f:
        weights = hashlib.sha256(f.read()).hexdigest()[:12]
    model = os.path.join(out, "model", f"train-tiny-{weights}")
    if not os.path.exists(os.path.join(model, "model_index.json")):
        unpack(TRAIN_TINY_WEIGHTS, model)  # the folder jobs.render loads
    learned = os.path.join(out, "learned")
    run_id = _next_run_id(learned, "learned")
    flags = ["--manifest", test, "--output", learned, "--model", model, "--run-id", run_id, *LEARNED_RENDER]
    code = render(flags + metric_flags + (["--force"] if force else []))
    if code != 0:
        return code
    code = eval_synthetic(["--test-manifest", test, "--output", learned, "--run-id", run_id])
    print(f"[demo] a model that learned: {learned}/report/{run_id}/index.html (detail and hue metrics at the top)")
    return code


def _next_run_id(output: str, name: str) -> str:
    """`name` the first time, then name-2, name-3, ...: a run id is used once per output (a
    re-run of the demo is a new run, which reuses every pair the first one rendered)."""
    from pipeline.output.layout import Layout

    layout, n = Layout(output), 1
    while True:
        run_id = name if n == 1 else f"{name}-{n}"
        if not os.path.exists(layout.run_record(run_id)) and not os.path.exists(layout.manifest_dir(run_id)):
            return run_id
        n += 1


if __name__ == "__main__":
    sys.exit(main())
