"""Fine-tune DTC on a training manifest with Ray Train; export the result as a DTC model folder.

    python -m jobs.train --manifest s3://catalog/train/manifest.parquet --init-model s3://models/dtc/untrained \
        --output s3://models/dtc/train-v1 --vgg-weights s3://models/vgg/vgg19-dcbb9e9d.pth [--config train.yaml]

    ray job submit --working-dir . -- python -m jobs.train --manifest ... --init-model ... --output ...

Re-running the same command resumes from the latest checkpoint. `--config FILE` is YAML with the
flags' names as keys (`-` or `_`); flags given on the command line win. Outputs under --output:
checkpoints/<run_id>/ (Ray Train), best/<run_id>/, model/ (load it with `jobs.render --model`),
runs/<run_id>.json, metrics/<run_id>/train.jsonl. Exit codes: 0 done, 2 refused before any work
(bad usage/config/manifest/model, no usable training row, output locked; nothing written), 1 other.
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs.cli import Parser, merge_options
from pipeline.config import ConfigError
from pipeline.schema import EXIT_REFUSED
from pipeline.train.config import EXPORTS, TrainConfig


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m jobs.train",
        description=__doc__.split("\n")[0],
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    add = parser.add_argument
    add("--config", help="YAML file with any of these options; flags win")
    add("--manifest", help="training manifest (render columns + split train|val); local or s3://")
    add("--init-model", help="DTC folder to start from (jobs.make_model --from-parts), local or s3://")
    add("--output", help="output folder or s3://bucket/prefix")
    add("--run-id", help="the run's name (default train): the same id resumes")
    add("--steps", type=int, help="optimiser steps (default 1000)")
    add("--epochs", type=float, help="train for this many passes over the train rows instead of --steps")
    add("--batch-size", type=int, help="global batch per step, split over the workers (default 8)")
    add("--learning-rate", type=float, help="AdamW learning rate, constant (default 1e-5)")
    add("--weight-decay", type=float, help="AdamW weight decay (default 0.01)")
    add("--grad-clip", type=float, help="max gradient norm (default 1)")
    add("--cfg-drop", type=float, help="P(context -> null embedding) (default 0.2)")
    add("--seed", type=int, help="data order and per-sample randomness (default 0)")
    add("--perceptual-weight", type=float, help="VGG term weight (default 1e-3; 0 trains without VGG weights)")
    add("--pixel-weight", type=float, help="decoded-x0 MSE weight (default 0.1)")
    add("--perceptual-every", type=int, help="decode x0 for the pixel/VGG terms every N steps (default 1)")
    add("--vgg-weights", help="torchvision's vgg19-dcbb9e9d.pth (path or s3://)")
    add("--checkpoint-every", type=int, help="steps between checkpoints, each with a validation loss (default 500)")
    add("--keep-checkpoints", type=int, help="checkpoints kept besides the best (default 2)")
    add("--log-every", type=int, help="steps between progress lines (default 10)")
    add("--export", choices=EXPORTS, help="weights exported to model/ (default best; final without val rows)")
    add("--workers", type=int, help="Ray Train workers, one GPU each on GPU clusters (default 1)")
    add("--gpus-per-worker", type=float, help="GPUs per worker (default: 1 if the cluster has GPUs, else 0)")
    add("--cpus-per-worker", type=float, help="CPUs reserved per worker (default 1)")
    add("--torch-threads", type=int, help="torch threads per worker")
    add(
        "--no-gradient-checkpointing",
        dest="gradient_checkpointing",
        action="store_false",
        help="keep activations instead of recomputing them (more memory, faster)",
    )
    add("--no-bf16", dest="bf16", action="store_false", help="fp32 on GPU too")
    add("--max-failures", type=int, help="worker-group restarts from the latest checkpoint (default 2)")
    add("--allow-root", action="append", help="extra local folder (or s3:// prefix) inputs may come from (repeatable)")
    add("--allow-http", action="store_true", help="allow http(s):// inputs")
    add("--address", help="Ray cluster to join (default RAY_ADDRESS, else a local Ray of its own)")
    return parser


def config_from_flags(flags: dict) -> TrainConfig:
    """TrainConfig from parsed flags (only those given) and the `--config` YAML they name."""
    values = merge_options(flags, TrainConfig.keys())
    return TrainConfig(**values)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    flags = vars(build_parser().parse_args(argv))
    try:
        cfg = config_from_flags(flags).validate()
    except ConfigError as e:
        print(f"train: {e}", file=sys.stderr)
        return EXIT_REFUSED
    from jobs.render import finish
    from pipeline.train.recipe import run_train

    return finish(run_train(cfg), "train")


if __name__ == "__main__":
    sys.exit(main())
