"""What a training run tells its user: `runs/<run_id>.json` and the one-screen summary. No torch.

The run record is written twice: as `"status": "running"` when training starts (so a re-run
after a driver crash can tell whether its recipe matches) and complete at the end. Each
attempt of the same run id appends itself to `attempts`, so the record shows every restart.
"""

from __future__ import annotations

import json
import platform
import sys
from datetime import UTC, datetime
from typing import Protocol

from pipeline import storage
from pipeline.output.layout import Layout
from pipeline.record import versions
from pipeline.schema import EXIT_OK
from pipeline.train.config import PUBLISHED_VGG19_SHA256_PREFIX, TrainConfig
from pipeline.train.dataset import RowCounts
from pipeline.train.logs import log_uri, tensorboard_uri
from pipeline.train.store import StoreInfo

__all__ = [
    "TrainedRun",
    "read_record",
    "write_record",
    "run_record",
    "summary_text",
    "store_text",
    "checkpoint_storage",
]


class CheckedFacts(Protocol):
    """What the record reads of the run's checks (`run.TrainSpec` is one)."""

    init_model_digest: str
    recipe_digest: str
    previous_record: dict | None  # runs/<run_id>.json of an earlier attempt, if any


class TrainedRun(Protocol):
    """What the record and the summary read of a run (`run.TrainRecipe` is one)."""

    cfg: TrainConfig
    spec: CheckedFacts | None  # None: stopped before its checks passed
    counts: RowCounts | None
    store: StoreInfo | None  # the prepared-sample store (None: stopped before it)
    started_at: datetime
    exit_code: int
    message: str
    timings: dict[str, float]
    total_steps: int
    result_metrics: dict  # the last `ray.train.report` of the workers
    model_digest: str | None
    export_source: str | None
    page_uri: str | None  # metrics/<run_id>/training.html once written


def read_record(output: str, run_id: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(Layout(output).run_record(run_id)))
    except FileNotFoundError:
        return None
    except ValueError:
        return None  # unreadable: treated as absent (the checkpoint's own recipe digest still guards)


def write_record(layout: Layout, run_id: str, record: dict) -> None:
    storage.write_bytes(layout.run_record(run_id), json.dumps(record, indent=1, default=str).encode())


def checkpoint_storage(output: str) -> tuple[str, object | None]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig: `<output>/checkpoints`, on S3
    through `storage.filesystem` (the project's endpoint and retry settings)."""
    uri = storage.join(output, "checkpoints")
    if not storage.is_s3(uri):
        return uri, None
    filesystem, path = storage.filesystem(uri)
    return path, filesystem


def _attempts(run: TrainedRun) -> list[dict]:
    previous = run.spec.previous_record if run.spec else None
    attempts = list(previous.get("attempts", [])) if previous else []
    if previous and previous.get("attempt_id") != run.started_at.isoformat():
        attempts.append({k: previous.get(k) for k in ("attempt_id", "status", "exit_code", "steps", "message")})
    return attempts


def run_record(run: TrainedRun, running: bool = False) -> dict:
    """`runs/<run_id>.json`: config, versions, digests, step counts, losses, timings, exit status."""
    cfg, spec, metrics = run.cfg, run.spec, run.result_metrics
    vgg_sha = metrics.get("vgg_sha256")
    return {
        "run_id": cfg.run_id,
        "attempt_id": run.started_at.isoformat(),
        "status": "running" if running else ("finished" if run.exit_code == EXIT_OK else "failed"),
        "exit_code": None if running else run.exit_code,
        "message": run.message,
        "started_at": run.started_at.isoformat(),
        "finished_at": None if running else _now(),
        "timings_s": {k: round(v, 3) for k, v in run.timings.items()},
        "rows": run.counts.to_record() if run.counts else None,
        "store": run.store.to_record() if run.store else None,
        "steps": {
            "total": run.total_steps,
            "end": metrics.get("step"),
            "run_this_attempt": metrics.get("steps_run"),
            "batch_size": cfg.batch_size,
            "workers": cfg.workers,
        },
        "samples_per_s": metrics.get("samples_per_s"),
        "losses": {
            k: metrics.get(k) for k in ("initial_val_loss", "val_loss", "best_val_loss", "best_step", "last_train")
        },
        "init_model": {"uri": cfg.init_model, "digest": spec.init_model_digest if spec else None},
        "model": {"uri": storage.join(cfg.output, "model"), "digest": run.model_digest, "source": run.export_source},
        "vgg": {"uri": cfg.vgg_weights, "sha256": vgg_sha, "note": _vgg_note(cfg, vgg_sha)},
        "checkpoints": storage.join(cfg.output, "checkpoints", cfg.run_id),
        "train_log": log_uri(cfg.output, cfg.run_id),
        "tensorboard": tensorboard_uri(cfg.output, cfg.run_id),
        "training_page": run.page_uri,
        "recipe": cfg.recipe(),
        "recipe_digest": spec.recipe_digest if spec else None,
        "config": cfg.to_record(),
        "attempts": _attempts(run),
        "versions": versions(),
        "host": platform.node(),
        "argv": sys.argv,
    }


def _vgg_note(cfg, sha256: str | None) -> str:
    """What the perceptual term measured: torchvision's weights, or plumbing only."""
    if cfg.perceptual_weight == 0:
        return "off (--perceptual-weight 0)"
    if sha256 is None:
        return "not loaded (the run stopped first)"
    if sha256.startswith(PUBLISHED_VGG19_SHA256_PREFIX):
        return f"torchvision's published vgg19 weights (sha256 {sha256[:12]})"
    return (
        f"NOT torchvision's published vgg19 weights (sha256 {sha256[:12]}): random or other weights, "
        "the perceptual term is plumbing only"
    )


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _loss(value) -> str:
    return "n/a" if value is None else f"{value:.5f}"


def _rows_line(counts: RowCounts) -> str:
    skipped = ", ".join(f"{c} {n}" for c, n in counts.skipped_by_code().items())
    return f"  rows       train {counts.usable['train']}, val {counts.usable['val']} usable" + (
        f"; skipped {skipped}" if skipped else "; none skipped"
    )


def _store_line(store: StoreInfo) -> str:
    how = f"prepared {store.parts_written} part(s) in {store.prepare_s:.1f}s"
    if store.reused:
        how = "reused, nothing prepared"
    return f"  store      {store.uri} (digest {store.digest}; {how})"


def store_text(store: StoreInfo, counts: RowCounts) -> str:
    """What `--prepare-only` prints: the store and its rows."""
    return "\n".join(["", f"DTC train store {store.digest}: complete", _store_line(store), _rows_line(counts)])


def summary_text(run: TrainedRun) -> str:
    """The one-screen summary printed at the end of a run."""
    cfg, metrics, counts = run.cfg, run.result_metrics, run.counts
    finished = run.exit_code == EXIT_OK
    total = run.timings.get("total_s", 0.0)
    end, run_now = metrics.get("step"), metrics.get("steps_run") or 0
    lines = [
        "",
        f"DTC train {cfg.run_id}: {'finished' if finished else 'FAILED'} in {total:.1f}s (exit {run.exit_code})",
    ]
    if counts:
        lines.append(_rows_line(counts))
    if run.store:
        lines.append(_store_line(run.store))
    if end is not None:
        start = end - run_now
        lines.append(
            f"  steps      {end}/{run.total_steps} (this run: {start} -> {end}, {run_now} steps"
            f"{', resumed' if start else ''}), batch {cfg.batch_size} on {cfg.workers} worker(s), "
            f"{metrics.get('samples_per_s') or 0:.2f} samples/s"
        )
        last = metrics.get("last_train") or {}
        lines.append(
            f"  losses     train {_loss(last.get('loss'))} at step {last.get('step')}; validation "
            f"{_loss(metrics.get('initial_val_loss'))} -> {_loss(metrics.get('val_loss'))}, best "
            f"{_loss(metrics.get('best_val_loss'))} at step {metrics.get('best_step')}"
        )
    lines.append(f"  vgg        {_vgg_note(cfg, metrics.get('vgg_sha256'))}")
    model = storage.join(cfg.output, "model")
    if run.model_digest:
        lines.append(f"  model      {model} ({run.export_source} weights), sha256:{run.model_digest[:12]}")
    else:
        lines.append("  model      not exported (see the note below)")
    lines += [
        f"  checkpoints {storage.join(cfg.output, 'checkpoints', cfg.run_id)} (re-run the same command to resume)",
        f"  train log  {log_uri(cfg.output, cfg.run_id)}",
        f"  tensorboard {tensorboard_uri(cfg.output, cfg.run_id)}",
        f"  page       {run.page_uri or 'not written (see the log)'}",
        f"  run record {Layout(cfg.output).run_record(cfg.run_id)}",
    ]
    return "\n".join(lines)
