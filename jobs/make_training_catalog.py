"""Write the learnable synthetic catalog: products as identities (shape, hue, label quadrant), photos
that show them, another shot of each as the reference; train / val / test from disjoint hue ranges.

    python -m jobs.make_training_catalog --out toy [--pairs 16] [--val-fraction 0.25] [--test-pairs 32] [--bad-rows]
    python -m jobs.make_training_catalog --out detail --kind detail --pairs 512 --test-pairs 32

`--kind detail`: products carry a 3 x 3 code and hues in fine bands (pipeline/toy/catalog.py; the
geometry in `detail/catalog.json`), scored by `pipeline.toy.detail_eval`.

Writes `toy/manifest.parquet` (train + val: `python -m jobs.train --manifest toy/manifest.parquet ...`)
and, with `--test-pairs`, `toy/test.parquet` (a render manifest of the test split, own and swapped
products: `python -m jobs.render --manifest toy/test.parquet ...`, scored by `python -m jobs.eval_synthetic`).
Seconds for a few hundred pairs. No downloads, no torch. Exit codes: 0 written, 2 bad usage.
"""

from __future__ import annotations

import sys

from jobs.cli import Parser
from pipeline.toy.catalog import KINDS


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m jobs.make_training_catalog", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for the images, manifest.parquet and test.parquet")
    parser.add_argument("--pairs", type=int, default=16, help="good train + val pairs (default 16)")
    parser.add_argument("--val-fraction", type=float, default=0.25, help="share of pairs with split=val")
    parser.add_argument("--test-pairs", type=int, default=0, help="test products in test.parquet (two rows each)")
    parser.add_argument("--bad-rows", action="store_true", help="add two broken rows (skipped and counted)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kind", choices=KINDS, default="toy", help="toy: colour identities; detail: + a 3x3 code")
    args = parser.parse_args(argv)
    if args.pairs < 1 or not 0 <= args.val_fraction < 1 or args.test_pairs < 0 or args.test_pairs == 1:
        parser.error("--pairs must be >= 1, --val-fraction in [0, 1), --test-pairs 0 or >= 2")
    from pipeline.toy.catalog import make_training_catalog

    path = make_training_catalog(
        args.out, args.pairs, args.val_fraction, args.bad_rows, args.seed, n_test=args.test_pairs, kind=args.kind
    )
    extra = " + 2 broken on purpose" if args.bad_rows else ""
    tests = f"; {args.test_pairs} test products (own + swap rows) in test.parquet" if args.test_pairs else ""
    print(f"wrote {path}: {args.pairs} pairs{extra}{tests}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
