"""Render a date range of a hive-partitioned manifest (`.../dt=YYYY-MM-DD/`) as one run.

    python -m jobs.backfill --manifest-root s3://catalog/manifests --start 2026-11-01 --end 2026-11-26 \
        --output s3://renders/try-all --model s3://models/dtc/v3 [--dry-run] [render options]

Idempotent: pairs already done with the same model and settings are not rendered again, so
re-running a range renders only what is missing (images deleted by hand: with --verify-images). `--dry-run`
prints render/reuse/carried/invalid/skipped counts per partition and renders nothing. Shards are
the partitions (`dt=2026-11-26`), so metrics and the run record's per-shard counts are per day.
A pair_id on several days is rendered from its latest day; its earlier rows are `skipped`
(`superseded`); repeated within its latest day, every row of it fails `duplicate_pair_id`.
Takes every option of `jobs.render`; exit codes are the same.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime

from jobs.render import build_parser, run_job
from pipeline.config import RenderConfig
from pipeline.options import add_flags

BACKFILL_KEYS = ("manifest_root", "start", "end", "dry_run")


def parse_args(argv: list[str] | None) -> tuple[dict, dict]:
    parser = build_parser()
    parser.prog, parser.description, parser.epilog = (
        "python -m jobs.backfill",
        __doc__.split("\n")[0],
        __doc__.split("\n", 2)[2],
    )
    parser.add_argument("--manifest-root", required=True, help="folder holding <key>=YYYY-MM-DD/ partitions")
    parser.add_argument("--start", required=True, help="first date, YYYY-MM-DD (inclusive)")
    parser.add_argument("--end", required=True, help="last date, YYYY-MM-DD (inclusive)")
    add_flags(parser, RenderConfig, which="backfill")  # --partition-key; --dry-run is jobs.render's
    flags = vars(parser.parse_args(argv))
    if "manifest" in flags:
        parser.error("use --manifest-root (and --start/--end) instead of --manifest")
    backfill = {k: flags.pop(k) for k in BACKFILL_KEYS if k in flags}
    backfill.setdefault("dry_run", False)  # jobs.render's flag, given or not
    return backfill, flags


def main(argv: list[str] | None = None) -> int:
    backfill, flags = parse_args(argv)
    flags["manifest"] = backfill["manifest_root"]
    flags["partition_range"] = (backfill["start"], backfill["end"])
    if "run_id" not in flags and not backfill["dry_run"]:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        flags["run_id"] = f"backfill-{backfill['start']}_{backfill['end']}-{stamp}"
    return run_job(flags, "backfill", dry_run=backfill["dry_run"])


if __name__ == "__main__":
    sys.exit(main())
