"""A render run from start to summary: the library call behind `python -m jobs.render`.

    result = run_render(RenderConfig(manifest=..., output=..., model=...))
    sys.exit(result.exit_code)

Steps: check config, manifest and model before anything is written (exit 2) -> take the
output's `_lock` (exit 2 while another run holds it) -> plan resume from the state -> stream
the pairs through the Ray Data graph, writing manifest parts as rows arrive, with progress
lines -> compact the state, write `runs/<run_id>.json`, print the summary. Exit 0, or 3 when
the failed fraction is above `--max-failed-fraction`; 1 for anything unexpected (storage down).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import secrets
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from pipeline import storage
from pipeline.config import ConfigError, RenderConfig
from pipeline.manifest import ManifestError, ManifestPlan, duplicate_pair_ids, plan_manifest
from pipeline.model.checkpoint import CheckpointError, check_checkpoint, model_digest
from pipeline.state import Layout, LockHeld, OutputLock, compact_state, load_state

__all__ = ["RunResult", "run_render", "new_run_id"]

log = logging.getLogger("dtc.render")

EXIT_OK, EXIT_ERROR, EXIT_REFUSED, EXIT_TOO_MANY_FAILED = 0, 1, 2, 3


@dataclass
class RunResult:
    exit_code: int
    run_id: str | None = None
    message: str = ""
    counts: dict = field(default_factory=dict)
    record_uri: str | None = None


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("ray", "torch", "diffusers", "transformers", "pyarrow", "pillow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _model_info(uri: str) -> tuple[int, int, str]:
    """(resolution, product_size, digest) from the checkpoint, without loading it."""
    index = json.loads(storage.read_bytes(storage.join(uri, "model_index.json")))
    if index.get("_class_name") != "DTCPipeline":
        raise CheckpointError(f"{uri} holds a {index.get('_class_name')!r}, not a DTCPipeline")
    return int(index.get("resolution", 512)), int(index.get("product_size", 224)), model_digest(uri)


def _metrics_protocol(cfg: RenderConfig, resolution: int) -> dict | None:
    """What every metrics file records (METRICS.md), or None when metrics are skipped."""
    if cfg.no_metrics or not (cfg.inception_weights or cfg.clip_model):
        return None
    import hashlib

    protocol = {
        "extractor": "FID Inception v3 (pt_inception-2015-12-05), pool3 2048-d" if cfg.inception_weights else None,
        "inception_weights": cfg.inception_weights,
        "inception_sha256": hashlib.sha256(storage.read_bytes(cfg.inception_weights)).hexdigest() if cfg.inception_weights else None,
        "resize": "TF1-compatible bilinear to 299",
        "dtype": "float32, TF32 off; features stored as float16, statistics as float64",
        "features_from": f"decoded output window at {resolution}x{resolution} (uint8, before image encoding)",
        "real_side": "the shard's own context photos, same crop window as the render",
        "image_format": cfg.image_format,
        "clip_backbone": cfg.clip_model,
        "clip_backbone_sha256": model_digest(cfg.clip_model) if cfg.clip_model else None,
        "clip_preprocessing": "output cropped to the region's bbox, padded square (grey); product padded square; "
        "bicubic 224, CLIP mean/std; score = 100 * cosine",
        "clip_floor": "product vs the next pair's product in the model batch",
        "kid": {"kernel": "(x.y/d + 1)^3", "subsets": 100, "max_subset_size": 1000, "estimator": "unbiased MMD^2"},
        "reference": "none (real side = context crops)",
        "random_weights": cfg.metrics_random_weights,
        "versions": _versions(),
    }
    return protocol


@dataclass
class _Prepared:
    cfg: RenderConfig
    plan: ManifestPlan
    resolution: int
    product_size: int
    model_digest: str
    settings_digest: str
    run_id: str
    metrics_protocol: dict | None


def _check_inputs(cfg: RenderConfig) -> _Prepared:
    """Everything that can refuse the run (exit 2) happens here, before any write."""
    cfg.validate()
    if not storage.is_s3(cfg.output):
        cfg.output = os.path.abspath(cfg.output)
        parent = cfg.output
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise ConfigError(f"--output {cfg.output} cannot be created: {parent} is a file")
    partitions = None if cfg.partition_range is None else (cfg.partition_key, *cfg.partition_range)
    plan = plan_manifest(cfg.manifest, partition_range=partitions)
    check_checkpoint(cfg.model, required=("unet", "vae", "hint_encoder", "image_encoder", "image_projection"))
    resolution, product_size, digest = _model_info(cfg.model)
    if cfg.run_id is not None:
        layout = Layout(cfg.output)
        if storage.exists(layout.run_record(cfg.run_id)) or storage.list_files(layout.manifest_dir(cfg.run_id)):
            # A run's manifest must hold each input row once: a second attempt under the same id
            # would add rows beside the first attempt's. Retries take a new id (e.g. a suffix).
            raise ConfigError(f"--run-id {cfg.run_id} was already used under {cfg.output}; choose another")
    try:
        protocol = _metrics_protocol(cfg, resolution)
    except FileNotFoundError as e:
        raise ConfigError(f"metrics weights not found: {e}") from e
    except CheckpointError as e:
        raise ConfigError(f"--clip-model: {e}") from e
    return _Prepared(
        cfg, plan, resolution, product_size, digest, cfg.settings_digest(resolution), cfg.run_id or new_run_id(), protocol
    )


def _init_ray(address: str | None):
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True)
    return ray


def _rss_mb() -> float:
    """Current resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def _progress(writer, total: int, started: float, last: list[float]) -> None:
    now = time.monotonic()
    if now - last[0] < 10 and writer.rows < total:
        return
    last[0] = now
    elapsed = now - started
    ok, failed = writer.status.get("ok", 0), writer.status.get("failed", 0)
    print(
        f"[dtc] {writer.rows}/{total} rows  ok {ok}  failed {failed}  reused {writer.reused}  "
        f"{writer.rows / max(elapsed, 1e-9):.2f} rows/s  {elapsed:.0f}s",
        flush=True,
    )


def _summary(p: _Prepared, writer, elapsed: float, exit_code: int, layout: Layout, summary: dict | None) -> str:
    rendered = writer.rows - writer.reused
    ok = writer.status.get("ok", 0)
    failed = writer.status.get("failed", 0)
    lines = [
        "",
        f"DTC render {p.run_id}: {'finished' if exit_code in (0, 3) else 'FAILED'} in {elapsed:.1f}s (exit {exit_code})",
        f"  rows       {writer.rows}  (ok {ok}, failed {failed}; reused from earlier runs {writer.reused})",
        f"  rendered   {rendered} rows this run, {rendered / max(elapsed, 1e-9):.2f} rows/s",
    ]
    if writer.error_codes:
        lines.append("  failures   " + ", ".join(f"{code} {n}" for code, n in writer.error_codes.most_common()))
    lines += [
        f"  images     {storage.join(layout.output, 'images')}",
        f"  manifest   {layout.manifest_dir(p.run_id)}",
        f"  run record {layout.run_record(p.run_id)}",
        f"  report     {layout.report(p.run_id)}",
    ]
    if p.cfg.no_metrics:
        lines.append("  metrics    off (--no-metrics)")
    elif p.metrics_protocol is None:
        lines.append("  metrics    SKIPPED: no --inception-weights / --clip-model given, so no FID, KID or CLIP figures")
    elif summary is not None:
        g = summary["global"]
        fid = "n/a" if g["fid"] is None else f"{g['fid']:.2f}"
        clip = g["clip"]["mean"]
        lines.append(
            f"  metrics    FID {fid} (N={g['n']}), CLIP {'n/a' if clip is None else f'{clip:.2f}'}"
            f"{'  [RANDOM-WEIGHT EXTRACTORS: meaningless]' if p.cfg.metrics_random_weights else ''}  -> {layout.metrics_dir(p.run_id)}"
        )
    return "\n".join(lines)


def _reusable(p: _Prepared, layout: Layout):
    """The state rows this run may reuse (None with --force)."""
    from pipeline.resume import reusable_state

    if p.cfg.force:
        return None
    images_dir = storage.join(layout.output, "images")
    existing = {storage.join(images_dir, rel) for rel, _, _ in storage.list_files(images_dir)}
    return reusable_state(load_state(layout, exclude_run=p.run_id), p.model_digest, p.settings_digest, existing, p.cfg.retry_failed)


def _dry_run(p: _Prepared, layout: Layout) -> RunResult:
    """Count per shard what a run would do, on the driver, without Ray and without writing."""
    import collections

    from pipeline.resume import StateIndex, planned_batches

    state = _reusable(p, layout)
    index = StateIndex(state) if state is not None and state.num_rows else None
    duplicates = duplicate_pair_ids(p.plan)
    shards: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for i in range(len(p.plan.files)):
        for batch in planned_batches(p.plan, i, duplicates, index, 65536):
            for shard, action, code, prev in zip(
                batch["shard"].to_pylist(), batch["action"].to_pylist(), batch["error_code"].to_pylist(), batch["prev_status"].to_pylist()
            ):
                kind = "invalid" if code else "pending" if action == "render" else "done" if prev == "ok" else "failed"
                shards[shard][kind] += 1
    kinds = ("pending", "done", "failed", "invalid")
    print(f"[dtc] dry run: {p.plan.num_rows} rows in {len(p.plan.files)} file(s) under {p.cfg.manifest}; nothing is rendered")
    print(f"  {'shard':<28}" + "".join(f"{k:>10}" for k in kinds))
    for shard in sorted(shards):
        print(f"  {shard:<28}" + "".join(f"{shards[shard][k]:>10}" for k in kinds))
    totals = {k: sum(c[k] for c in shards.values()) for k in kinds}
    print(f"  {'total':<28}" + "".join(f"{totals[k]:>10}" for k in kinds), flush=True)
    return RunResult(EXIT_OK, run_id=None, counts={"shards": {s: dict(c) for s, c in shards.items()}, **totals})


def _write_report(layout: Layout, run_id: str, summary: dict | None) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.report import render_report

    parts = [storage.join(layout.manifest_dir(run_id), rel) for rel, _, _ in storage.list_files(layout.manifest_dir(run_id))]
    columns = ["pair_id", "status", "error_code", "clip_score", "shard", "context_uri", "product_uri", "output_uri", "mask_uri", "bbox"]
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(p)), use_threads=False) for p in parts if p.endswith(".parquet")]
    rows = pa.concat_tables([t.select([c for c in columns if c in t.column_names]) for t in tables], promote_options="permissive")
    storage.write_bytes(layout.report(run_id), render_report(run_id, rows, summary).encode())


def run_render(cfg: RenderConfig, dry_run: bool = False) -> RunResult:
    """Render the manifest (see the module docstring). `dry_run`: print per-shard counts of
    pending/done/failed/invalid rows and return, without Ray, lock or writes."""
    import pyarrow as pa

    # The driver handles thousands of small tables; Arrow's default arena allocator keeps what
    # they freed, so its RSS grew ~8% from 400 to 2,000 rows, against ~2% with the system
    # allocator (bench/pipeline.py measures this). Driver only: workers keep the default.
    pa.set_memory_pool(pa.system_memory_pool())
    started_wall = datetime.now(timezone.utc)
    # 1. refuse bad input before any work (exit 2, nothing written)
    try:
        p = _check_inputs(cfg)
    except (ConfigError, ManifestError, CheckpointError) as e:
        return RunResult(EXIT_REFUSED, message=str(e))
    except storage.StorageError as e:
        return RunResult(EXIT_ERROR, message=str(e))
    layout = Layout(cfg.output)
    if dry_run:
        try:
            return _dry_run(p, layout)
        except storage.StorageError as e:
            return RunResult(EXIT_ERROR, message=str(e))

    # 2. one run per output
    lock = OutputLock(layout, p.run_id, stale_after_s=cfg.lock_stale_s)
    try:
        lock.acquire()
    except LockHeld as e:
        return RunResult(EXIT_REFUSED, run_id=p.run_id, message=str(e))
    except storage.StorageError as e:
        return RunResult(EXIT_ERROR, run_id=p.run_id, message=str(e))

    from pipeline.sink import ManifestWriter, output_schema

    writer = ManifestWriter(layout, p.run_id, output_schema(p.plan.schema), part_rows=cfg.manifest_part_rows)
    metrics = None
    if p.metrics_protocol is not None:
        from pipeline.shard_metrics import MetricsAccumulator

        metrics = MetricsAccumulator(layout, p.run_id)
    metrics_summary = None
    rss_samples: list[list] = []  # [rows written, driver RSS MB] at 25/50/75/100% of the rows
    start = time.monotonic()
    exit_code, message = EXIT_ERROR, ""
    try:
        # 3. resume: what earlier runs already did with this model and these settings
        state = _reusable(p, layout)
        duplicates = duplicate_pair_ids(p.plan)
        total = p.plan.num_rows if cfg.limit is None else min(cfg.limit, p.plan.num_rows)
        print(
            f"[dtc] run {p.run_id}: {total} rows from {len(p.plan.files)} manifest file(s); "
            f"{0 if state is None else state.num_rows} pairs reusable; model sha256:{p.model_digest[:12]}; "
            f"output {layout.output}",
            flush=True,
        )

        # 4. the Ray Data graph, rows streamed back to the sink
        ray = _init_ray(cfg.address)
        from pipeline.dataflow import RunContext, build_dataset

        gpus = cfg.gpus_per_actor
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        ctx = RunContext(
            p.run_id, layout.output, p.model_digest, p.settings_digest, p.resolution, p.product_size, gpus,
            inception_weights=None if metrics is None else cfg.inception_weights,
            clip_model=None if metrics is None else cfg.clip_model,
        )
        dataset = build_dataset(cfg, p.plan, ctx, duplicates, state)
        last = [0.0]
        marks = iter(sorted({max(1, total * k // 4) for k in (1, 2, 3, 4)}))
        mark = next(marks, None)
        for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            if metrics is not None:
                metrics.add(batch)
            writer.add(batch)
            _progress(writer, total, start, last)
            while mark is not None and writer.rows >= mark:  # driver memory over the run (a leak shows here)
                rss_samples.append([writer.rows, round(_rss_mb(), 1)])
                mark = next(marks, None)
        writer.flush()
        # The stream's buffers go before compaction allocates on top of them: the system pool's
        # release_unused() is glibc's malloc_trim, which also returns what Ray and Python freed
        # (without it the driver's peak RSS grew with the manifest: bench/pipeline.py 1k -> 5k).
        dataset = state = batch = None
        pa.default_memory_pool().release_unused()

        # 5. bookkeeping: state, metrics, report
        compact_state(layout)
        pa.default_memory_pool().release_unused()  # give compaction's buffers back before the report
        shard_counts = {shard: dict(c) for shard, c in writer.shards.items()}
        if metrics is not None:
            metrics_summary = metrics.finalize(shard_counts, p.metrics_protocol)
        _write_report(layout, p.run_id, metrics_summary)
        failed_fraction = writer.status.get("failed", 0) / max(writer.rows, 1)
        exit_code = EXIT_TOO_MANY_FAILED if failed_fraction > cfg.max_failed_fraction else EXIT_OK
        if exit_code == EXIT_TOO_MANY_FAILED:
            message = f"{failed_fraction:.1%} of rows failed (limit --max-failed-fraction {cfg.max_failed_fraction:.1%})"
    except (storage.StorageError, OSError) as e:
        message = f"storage error: {e}"
        log.error(message)
    except Exception as e:  # noqa: BLE001 - the run record and summary must still be written
        message = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:500]
        log.exception("render run failed")
    finally:
        try:
            writer.flush()
        except Exception as e:  # noqa: BLE001
            log.error("could not flush the last manifest part: %s", e)
        elapsed = time.monotonic() - start
        counts = {
            "rows": writer.rows, "ok": writer.status.get("ok", 0), "failed": writer.status.get("failed", 0),
            "reused": writer.reused, "error_codes": dict(writer.error_codes), "manifest_parts": writer.parts,
            "shards": {shard: dict(c) for shard, c in sorted(writer.shards.items())},
        }
        record = {
            "run_id": p.run_id, "exit_code": exit_code, "message": message, "started_at": started_wall.isoformat(),
            "finished_at": datetime.now(timezone.utc).isoformat(), "elapsed_s": round(elapsed, 3),
            "rows_per_s": round(writer.rows / max(elapsed, 1e-9), 3), "counts": counts,
            "stage_seconds": {k: round(v, 3) for k, v in writer.stage_seconds.items()},
            "steady_rows_per_s": writer.steady_rows_per_s(), "arrival_rows_per_s": writer.arrival_rows_per_s(),
            "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "driver_rss_mb_by_rows": rss_samples, "driver_rss_mb_at_end": round(_rss_mb(), 1),
            "model": {"uri": cfg.model, "digest": p.model_digest, "resolution": p.resolution},
            "settings": cfg.settings(p.resolution), "settings_digest": p.settings_digest,
            "manifest": {"uri": cfg.manifest, "files": len(p.plan.files), "rows": p.plan.num_rows},
            "config": cfg.to_record(), "versions": _versions(), "host": platform.node(), "argv": sys.argv,
        }
        try:
            storage.write_bytes(layout.run_record(p.run_id), json.dumps(record, indent=1, default=str).encode())
        except Exception as e:  # noqa: BLE001
            log.error("could not write the run record: %s", e)
        lock.release()
        print(_summary(p, writer, elapsed, exit_code, layout, metrics_summary), flush=True)
        if message:
            print(f"  note       {message}", flush=True)
    return RunResult(exit_code, run_id=p.run_id, message=message, counts=counts, record_uri=layout.run_record(p.run_id))
