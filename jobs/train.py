"""Fine-tune DTC on a training manifest with Ray Train; export the result as a DTC model folder.

    python -m jobs.train --manifest s3://catalog/train/manifest.parquet --init-model s3://models/dtc/untrained \
        --output s3://models/dtc/train-v1 --vgg-weights s3://models/vgg/vgg19-dcbb9e9d.pth [--config train.yaml]

    ray job submit --working-dir . -- python -m jobs.train --manifest ... --init-model ... --output ...

    python -m jobs.train --prepare-only --manifest ... --init-model ... --output ...   # the store only, no training

Re-running the same command resumes from the latest checkpoint. `--config FILE` is YAML with the
flags' names as keys (`-` or `_`); flags given on the command line win. Outputs under --output:
prepared/<digest>/ (the prepared-sample store, reused while the inputs are the same),
checkpoints/<run_id>/ (Ray Train), best/<run_id>/, model/ (load it with `jobs.render --model`),
runs/<run_id>.json, metrics/<run_id>/train.jsonl. Exit codes: 0 done, 2 refused (bad
usage/config/manifest/model or output locked: nothing written; no usable training row: only the
store written), 1 other.
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs.cli import Parser, merge_options
from pipeline.config import ConfigError
from pipeline.options import add_flags
from pipeline.schema import EXIT_REFUSED
from pipeline.train.config import TrainConfig


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m jobs.train",
        description=__doc__.split("\n")[0],
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    parser.add_argument("--config", help="YAML file with any of these options; flags win")
    add_flags(parser, TrainConfig)
    return parser


def config_from_flags(flags: dict) -> TrainConfig:
    """TrainConfig from parsed flags (only those given) and the `--config` YAML they name."""
    return TrainConfig(**merge_options(flags, TrainConfig.keys()))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    flags = vars(build_parser().parse_args(argv))
    try:
        cfg = config_from_flags(flags).check()
    except ConfigError as e:
        print(f"train: {e}", file=sys.stderr)
        return EXIT_REFUSED
    from jobs.render import finish
    from pipeline.train.recipe import run_train

    return finish(run_train(cfg), "train")


if __name__ == "__main__":
    sys.exit(main())
