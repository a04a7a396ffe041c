"""Render a catalog manifest with DTC on Ray.

    python -m jobs.render --manifest s3://catalog/manifests/dt=2026-11-26/ \
        --output s3://renders/try-all --model s3://models/dtc/v3 [--config render.yaml] [options]

    ray job submit --working-dir . -- python -m jobs.render --manifest ... --output ... --model ...

`--config FILE` is YAML with the flags' names as keys (`-` or `_`); flags given on the
command line win. Exit codes: 0 done (every row accounted for), 3 done but too many rows
failed, 2 refused before any work (bad usage/config/manifest/model, output locked), 1 other.
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs.cli import Parser, merge_options
from pipeline.config import ConfigError, RenderConfig
from pipeline.options import add_flags
from pipeline.schema import EXIT_ERROR, EXIT_REFUSED


def build_parser() -> argparse.ArgumentParser:
    """`--config` and one flag per option of `RenderConfig` (its declaration gives type, help and default)."""
    parser = Parser(
        prog="python -m jobs.render",
        description=__doc__.split("\n")[0],
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    parser.add_argument("--config", help="YAML file with any of these options; flags win")
    add_flags(parser, RenderConfig)
    # a way to run the job, not an option of the run: never in a --config YAML or a run record
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the rows to render, reuse and carry, and the invalid ones with reasons; write nothing",
    )
    return parser


def config_from_flags(flags: dict) -> RenderConfig:
    """RenderConfig from parsed flags (only those given) and the `--config` YAML they name."""
    return RenderConfig(**merge_options(flags, RenderConfig.keys()))


def main(argv: list[str] | None = None) -> int:
    flags = vars(build_parser().parse_args(argv))
    return run_job(flags, "render", dry_run=flags.pop("dry_run", False))


def run_job(flags: dict, prog: str, dry_run: bool = False) -> int:
    """Flags -> RenderConfig -> `run_render` -> exit code (jobs.render and jobs.backfill)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_flags(flags)
        cfg.check()
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return EXIT_REFUSED
    from pipeline.run import run_render

    return finish(run_render(cfg, dry_run=dry_run), prog)


def finish(result, prog: str) -> int:
    """The job's exit code; a refusal or a failure also gets its one line on stderr."""
    if result.exit_code == EXIT_REFUSED:
        print(f"{prog}: {result.message}", file=sys.stderr)
    elif result.exit_code == EXIT_ERROR:
        print(f"{prog}: failed: {result.message}", file=sys.stderr)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
