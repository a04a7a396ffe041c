"""What a run tells its user: the progress line, the one-screen summary, `runs/<run_id>.json`.

Driver-side (no torch). The numbers come from `output.stats.RunStats`; the run's fixed facts
from `config.RunSpec`.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import time
from datetime import UTC, datetime

from pipeline import storage
from pipeline.config import RunSpec
from pipeline.output.layout import Layout
from pipeline.output.stats import RunStats
from pipeline.schema import EXIT_OK, EXIT_TOO_MANY_FAILED

__all__ = ["Progress", "versions", "rss_mb", "summary_text", "run_record"]

PROGRESS_EVERY_S = 10.0


def versions() -> dict:
    """The library versions a run record and a metrics file carry."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("ray", "torch", "diffusers", "transformers", "pyarrow", "pillow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def rss_mb() -> float:
    """Current resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


class Progress:
    """A line every PROGRESS_EVERY_S seconds (and at the end), plus driver RSS samples at 25/50/75/100%
    of the rows: a driver leak shows in the run record."""

    def __init__(self, total: int):
        self.total = total
        self.last = 0.0
        self.rss_samples: list[list] = []  # [rows written, driver RSS MB]
        self._marks = iter(sorted({max(1, total * k // 4) for k in (1, 2, 3, 4)}))
        self._mark = next(self._marks, None)

    def update(self, stats: RunStats) -> None:
        while self._mark is not None and stats.rows >= self._mark:
            self.rss_samples.append([stats.rows, round(rss_mb(), 1)])
            self._mark = next(self._marks, None)
        now = time.monotonic()
        if now - self.last < PROGRESS_EVERY_S and stats.rows < self.total:
            return
        self.last = now
        elapsed = now - stats.started
        print(
            f"[dtc] {stats.rows}/{self.total} rows  ok {stats.ok}  failed {stats.failed}  reused {stats.reused}  "
            f"{stats.rows_per_s():g} rows/s  {elapsed:.0f}s",
            flush=True,
        )


def summary_text(
    spec: RunSpec, stats: RunStats, elapsed: float, exit_code: int, metrics_summary: dict | None, report_written: bool
) -> str:
    """The one-screen summary printed at the end of a run."""
    layout = Layout(spec.output)
    finished = exit_code in (EXIT_OK, EXIT_TOO_MANY_FAILED)
    lines = [
        "",
        f"DTC render {spec.run_id}: {'finished' if finished else 'FAILED'} in {elapsed:.1f}s (exit {exit_code})",
        f"  rows       {stats.rows}  (ok {stats.ok}, failed {stats.failed}"
        + (f", skipped {stats.skipped} (pair in a later partition)" if stats.skipped else "")
        + f"; reused from earlier runs {stats.reused})",
        f"  this run   {stats.tried} rows rendered or failed ({stats.rendered} rendered), "
        f"{stats.rows_per_s():g} rows/s",
    ]
    if stats.error_codes:
        lines.append("  failures   " + ", ".join(f"{code} {n}" for code, n in stats.error_codes.most_common()))
    identity = stats.identity_all.summary()
    if identity["n"]:
        review = spec.cfg.min_identity_score
        lines.append(
            f"  identity   mean {identity['mean']:g}, p10 {identity['p10']:g}, p50 {identity['p50']:g}, "
            f"p90 {identity['p90']:g} over {identity['n']} ok rows"
            + (f"; needs_review {stats.needs_review} (below {review:g})" if review is not None else "")
        )
    if stats.reused_failed:
        lines.append(
            f"  carried    {stats.reused_failed} failed rows are earlier runs' results, not tried again: "
            "--retry-failed renders them"
        )
    lines += [
        f"  images     {layout.images_dir}",
        f"  manifest   {layout.manifest_dir(spec.run_id)}",
        f"  run record {layout.run_record(spec.run_id)}",
        f"  report     {layout.report(spec.run_id) if report_written else 'not written (see the note below)'}",
    ]
    lines.append(_metrics_line(spec, metrics_summary, layout))
    if spec.model_warning:  # beside the random-extractor warning: what the figures above are worth
        lines.append(f"  model      {spec.model_warning.upper()}")
    return "\n".join(lines)


def _metrics_line(spec: RunSpec, metrics_summary: dict | None, layout: Layout) -> str:
    if spec.cfg.no_metrics:
        return "  metrics    off (--no-metrics)"
    if not spec.with_metrics:
        return "  metrics    SKIPPED: no --inception-weights / --clip-model given, so no FID, KID or CLIP figures"
    if metrics_summary is None:
        return "  metrics    not computed (the run stopped first)"
    g = metrics_summary["global"]
    fid = "n/a" if g["fid"] is None else f"{g['fid']:.2f}"
    clip = "n/a" if g["clip"]["mean"] is None else f"{g['clip']['mean']:.2f}"
    warning = "  [RANDOM-WEIGHT EXTRACTORS: meaningless]" if spec.cfg.metrics_random_weights else ""
    return f"  metrics    FID {fid} (N={g['n']}), CLIP {clip}{warning}  -> {layout.metrics_dir(spec.run_id)}"


def failure_message(error: Exception) -> str:
    """The run record's message for the error that stopped a run (render and training alike)."""
    if isinstance(error, (storage.StorageError, OSError)):
        return f"storage error: {error}"
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[-1] if text else ''}"[:500]


def run_record(
    spec: RunSpec,
    stats: RunStats,
    *,
    exit_code: int,
    message: str,
    started_at: datetime,
    elapsed: float,
    manifest_parts: int,
    rss_samples: list[list],
) -> dict:
    """`runs/<run_id>.json`: config, versions, model digest, counts, timings, exit status."""
    cfg = spec.cfg
    return {
        "run_id": spec.run_id,
        "exit_code": exit_code,
        "message": message,
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "elapsed_s": round(elapsed, 3),
        "rows_per_s": stats.rows_per_s(),
        "counts": {**stats.counts(), "manifest_parts": manifest_parts},
        "stage_seconds": {k: round(v, 3) for k, v in stats.stage_seconds.items()},
        "steady_rows_per_s": stats.steady_rows_per_s(),
        "arrival_rows_per_s": stats.arrival_rows_per_s(),
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "driver_rss_mb_by_rows": rss_samples,
        "driver_rss_mb_at_end": round(rss_mb(), 1),
        "model": {
            "uri": cfg.model,
            "digest": spec.model_digest,
            "resolution": spec.resolution,
            "warning": spec.model_warning,
        },
        "settings": cfg.settings(spec.resolution),
        "settings_digest": spec.settings_digest,
        "manifest": {"uri": cfg.manifest, "files": len(spec.plan.files), "rows": spec.plan.num_rows},
        "config": cfg.to_record(),
        "versions": versions(),
        "host": platform.node(),
        "argv": sys.argv,
    }


def write_run_record(spec: RunSpec, record: dict) -> None:
    import json

    storage.write_bytes(
        Layout(spec.output).run_record(spec.run_id), json.dumps(record, indent=1, default=str).encode()
    )
