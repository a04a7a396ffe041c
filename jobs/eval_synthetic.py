"""Identity metrics of a render of the synthetic test split (no metric weights needed).

    python -m jobs.render --manifest toy/test.parquet --output renders/ --model models/train-tiny --run-id trained
    python -m jobs.eval_synthetic --test-manifest toy/test.parquet --output renders/ --run-id trained

Prints one JSON line (hue error, swap test, retrieval top-1 among 16, label-quadrant accuracy,
masked PSNR: pipeline/toy/synthetic_eval.py says how each is measured; on a detail catalog
(`--kind detail`), detail accuracy, code exact, hue error and within-band slope, swap, masked
PSNR and SSIM: pipeline/toy/detail_eval.py), writes it to
`renders/metrics/<run_id>/synthetic.json` and writes the run's QA page again so it shows them.
`--copy-paste` scores the identity upper reference instead (the hint pasted, no model, no run).
Local folders only. Exit codes: 0 scored, 2 bad usage or no such run.
"""

from __future__ import annotations

import json
import os
import sys

from jobs.cli import Parser


def _rewrite_report(output: str, run_id: str) -> str:
    """The run's QA page again, now that synthetic.json is beside its figures."""
    from pipeline.config import RENDER_DEFAULTS
    from pipeline.metrics.report import write_report
    from pipeline.output.layout import Layout

    layout = Layout(output)
    summary_path = os.path.join(layout.metrics_dir(run_id), "summary.json")
    summary = json.load(open(summary_path)) if os.path.exists(summary_path) else None
    record_path = layout.run_record(run_id)
    record = json.load(open(record_path)) if os.path.exists(record_path) else {}
    max_pixels = (record.get("config") or {}).get("max_pixels") or RENDER_DEFAULTS.max_pixels
    return write_report(layout, run_id, summary, record.get("settings"), max_pixels=max_pixels)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m jobs.eval_synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--test-manifest", required=True, help="test.parquet of jobs.make_training_catalog")
    parser.add_argument("--output", help="the render's --output folder")
    parser.add_argument("--run-id", help="the render's --run-id")
    parser.add_argument("--copy-paste", action="store_true", help="score the hint pasted as is (no model, no run)")
    parser.add_argument("--resolution", type=int, default=64, help="with --copy-paste: the model's working size")
    parser.add_argument("--product-size", type=int, default=56, help="with --copy-paste: the image encoder's size")
    args = parser.parse_args(argv)
    if not os.path.exists(args.test_manifest):
        parser.error(f"--test-manifest {args.test_manifest} does not exist")
    from pipeline.toy import catalog, detail_eval, synthetic_eval

    base_dir = os.path.dirname(os.path.abspath(args.test_manifest))
    # the catalog's kind picks the metrics: a detail catalog's identity is its code and a continuous hue
    evaluate = detail_eval.evaluate_detail if catalog.catalog_kind(base_dir) == "detail" else None
    if args.copy_paste:
        import pyarrow.parquet as pq

        images = synthetic_eval.copy_paste_images(args.test_manifest, args.resolution, args.product_size)
        rows = pq.read_table(args.test_manifest).to_pylist()
        evaluate = evaluate or synthetic_eval.evaluate_images
        print(json.dumps({"run_id": "copy-paste", **evaluate(rows, images, base_dir)}))
        return 0
    if not (args.output and args.run_id):
        parser.error("--output and --run-id are required (or --copy-paste)")
    if not os.path.isdir(os.path.join(args.output, "manifest", args.run_id)):
        parser.error(f"no run {args.run_id!r} under {args.output}/manifest/")
    metrics = synthetic_eval.evaluate_run(args.test_manifest, args.output, args.run_id, evaluate=evaluate)
    print(json.dumps(metrics))
    print(f"[eval_synthetic] report: {_rewrite_report(args.output, args.run_id)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
