"""Stage 0 of the train-tiny recipe: fit the toy VAE on a training catalog, freeze it, write an
untrained train-tiny DTC around it (the `--init-model` of `jobs.train`).

    python -m jobs.fit_vae --manifest toy/manifest.parquet --out models/train-tiny-init [--steps 800]

Writes a DTC folder (`jobs.render --model` loads it too: it renders noise, the UNet is random)
plus `vae_fit.json` (settings, loss curve, PSNR on the train and val windows). Local paths only;
in-process, no Ray (a couple of CPU-minutes). Exit codes: 0 written, 2 bad usage.
"""

from __future__ import annotations

import os
import sys

from jobs.cli import Parser
from pipeline.schema import FUSION_FORMS


def main(argv: list[str] | None = None) -> int:
    from pipeline.toy.vae_fit import VaeFitConfig

    default = VaeFitConfig()
    parser = Parser(prog="python -m jobs.fit_vae", description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", required=True, help="local training manifest (train + val rows)")
    parser.add_argument("--out", required=True, help="folder for the untrained train-tiny DTC")
    parser.add_argument("--steps", type=int, default=default.steps)
    parser.add_argument("--batch-size", type=int, default=default.batch_size)
    parser.add_argument("--learning-rate", type=float, default=default.learning_rate)
    parser.add_argument("--seed", type=int, default=default.seed)
    parser.add_argument("--film-mode", choices=FUSION_FORMS, default=default.film_mode)
    parser.add_argument("--torch-threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.learning_rate <= 0:
        parser.error("--steps and --batch-size must be >= 1, --learning-rate > 0")
    if not os.path.exists(args.manifest):
        parser.error(f"--manifest {args.manifest} does not exist")
    import torch

    from pipeline.toy.vae_fit import make_train_tiny

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    cfg = VaeFitConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        film_mode=args.film_mode,
    )
    record = make_train_tiny(args.manifest, args.out, cfg)
    print(f"wrote {args.out}: VAE PSNR {record['psnr_val_db']} dB (val), scaling_factor {record['scaling_factor']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
