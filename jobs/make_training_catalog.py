"""Write the learnable synthetic training catalog: photos that show the product, a different shot of it.

    python -m jobs.make_training_catalog --out train_catalog [--pairs 16] [--val-fraction 0.25] [--bad-rows]

Then `python -m jobs.train --manifest train_catalog/manifest.parquet ...`. No downloads, no torch.
Exit codes: 0 written, 2 bad usage.
"""

from __future__ import annotations

import sys

from jobs.cli import Parser


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m jobs.make_training_catalog", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for the images and manifest.parquet")
    parser.add_argument("--pairs", type=int, default=16, help="good pairs (default 16)")
    parser.add_argument("--val-fraction", type=float, default=0.25, help="share of pairs with split=val")
    parser.add_argument("--bad-rows", action="store_true", help="add two broken rows (skipped and counted)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.pairs < 1 or not 0 <= args.val_fraction < 1:
        parser.error("--pairs must be >= 1 and --val-fraction in [0, 1)")
    from pipeline.train.catalog import make_training_catalog

    path = make_training_catalog(args.out, args.pairs, args.val_fraction, args.bad_rows, args.seed)
    print(f"wrote {path}: {args.pairs} pairs" + (" + 2 broken on purpose" if args.bad_rows else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
