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
from pipeline.schema import EXIT_ERROR, EXIT_REFUSED, IMAGE_FORMATS, SCHEDULERS, SELECTIONS


def _actors(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--actors takes MIN,MAX or N, got {text!r}") from None
    if len(parts) == 1:
        return parts[0], parts[0]
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"--actors takes MIN,MAX or N, got {text!r}")
    return parts[0], parts[1]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m jobs.render",
        description=__doc__.split("\n")[0],
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    add = parser.add_argument
    add("--config", help="YAML file with any of these options; flags win")
    add("--manifest", help="manifest file, folder or glob (Parquet, CSV, JSONL); local or s3://")
    add("--output", help="output folder or s3://bucket/prefix")
    add("--model", help="DTC checkpoint folder or s3:// prefix")
    add("--steps", type=int, help="denoising steps (default 40)")
    add("--guidance-scale", type=float, help="classifier-free guidance scale (default 5)")
    add("--scheduler", choices=SCHEDULERS, help="sampler (default ddim)")
    add("--batch-size", type=int, help="pairs per model call (default 8)")
    add("--actors", type=_actors, help="model actor pool MIN,MAX (default 1,1)")
    add("--gpus-per-actor", type=float, help="GPUs per model actor (default: 1 if the cluster has GPUs, else 0)")
    add("--cpus-per-actor", type=float, help="CPUs reserved per model actor (default 1)")
    add("--torch-threads", type=int, help="torch threads in a CPU model actor")
    add("--compile", action="store_true", help="torch.compile the UNet and hint encoder (GPU; slow first batches)")
    add("--channels-last", action="store_true", help="channels_last memory format for the convolutions (GPU)")
    add("--image-format", choices=IMAGE_FORMATS, help="output image format (default jpeg)")
    add("--jpeg-quality", type=int, help="JPEG/WebP quality (default 92)")
    add("--variants", type=int, help="renders per pair, each its own seed, in the same batches; the best is kept")
    add(
        "--select",
        choices=SELECTIONS,
        help="how the best variant is chosen (default identity; clip needs --clip-model)",
    )
    add("--keep-variants", action="store_true", help="also write the variants not chosen, to variants/<pair_id>/")
    add("--min-identity-score", type=float, help="rows whose identity_score is below it get needs_review = true")
    add("--max-scene-steps", type=int, help="a scene with more steps fails scene_invalid (default 8)")
    add("--limit", type=int, help="render at most N manifest rows")
    add("--force", action="store_true", help="re-render pairs that are already done")
    add("--retry-failed", action="store_true", help="re-try pairs whose latest row failed")
    add("--verify-images", action="store_true", help="re-render done pairs whose image is gone (one HEAD each)")
    add("--run-id", help="run id (default: UTC time + random suffix)")
    add("--max-failed-fraction", type=float, help="exit 3 above this failed fraction (default 0.05)")
    add(
        "--stall-timeout-s",
        type=float,
        help="exit 1, naming the stuck stage, when no batch arrives for this long (default 300; 0: never)",
    )
    add("--no-metrics", action="store_true", help="skip FID/KID/CLIP")
    add("--inception-weights", help="pt_inception-2015-12-05 weights file (path or s3://)")
    add("--clip-model", help="CLIP ViT-B/32 folder (path or s3://)")
    add("--fid-reference", help="reference statistics for FID (path or s3://)")
    add(
        "--allow-root",
        action="append",
        help="extra local folder inputs may come from; an s3://bucket/prefix limits S3 inputs "
        "to such prefixes (repeatable)",
    )
    add("--allow-http", action="store_true", help="allow http(s):// inputs")
    add("--max-pixels", type=int, help="refuse images above this many pixels (default 50M)")
    add(
        "--address",
        help="Ray cluster to join, or auto for the one `ray start` runs here "
        "(default RAY_ADDRESS, else a local Ray of its own)",
    )
    return parser


def config_from_flags(flags: dict) -> RenderConfig:
    """RenderConfig from parsed flags (only those given) and the `--config` YAML they name."""
    values = merge_options(flags, RenderConfig.keys())
    if "actors" in values and not isinstance(values["actors"], tuple):
        try:
            values["actors"] = _actors(str(values["actors"]).strip("[]() ").replace(" ", ""))
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise ConfigError(f"actors must be MIN,MAX or N, got {values['actors']!r}") from e
    try:
        return RenderConfig(**values)
    except TypeError as e:
        raise ConfigError(str(e)) from e


def main(argv: list[str] | None = None) -> int:
    return run_job(vars(build_parser().parse_args(argv)), "render")


def run_job(flags: dict, prog: str, dry_run: bool = False) -> int:
    """Flags -> RenderConfig -> `run_render` -> exit code (jobs.render and jobs.backfill)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_flags(flags)
        cfg.validate()
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
