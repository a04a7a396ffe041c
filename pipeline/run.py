"""A render run from start to summary: the library call behind `python -m jobs.render`.

    result = run_render(RenderConfig(manifest=..., output=..., model=...))
    sys.exit(result.exit_code)

`RenderRun` is the driver as steps: `check` (config, output, manifest and model, before
anything is written: exit 2) -> `lock` (exit 2 while another run holds the output) -> `resume`
(what earlier runs already did; a small manifest's rows planned here, `dataflow.planned_rows`)
-> `stream` (the pairs through the Ray Data graph, manifest parts written as rows arrive,
progress lines; exit 2 first when the plan does not fit the cluster, `pipeline.capacity`, and exit 1
when no batch arrives for `--stall-timeout-s`, `pipeline.watchdog`; a planned run with no row
to render writes its rows from here, starting neither Ray nor a model) -> `finalize` (state,
metrics, report) ->
`close` (run record, lock, summary). Exit 0, or 3 when the failed fraction is above
`--max-failed-fraction`; 1 for anything unexpected (storage down).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pipeline import record, storage
from pipeline.capacity import OverCapacity
from pipeline.config import ConfigError, RenderConfig, RunSpec
from pipeline.driver import (
    Terminated,
    absolute_uri,
    check_writable,
    init_ray,
    raise_if_stopped,
    raise_in_main_thread,
    terminate_as_exception,
)
from pipeline.dry_run import dry_run_counts
from pipeline.manifest import ManifestError, plan_manifest
from pipeline.model.checkpoint import CheckpointError, check_model_checkpoint, model_digest, weights_warning
from pipeline.nodes import NodeWatch
from pipeline.output.layout import Layout
from pipeline.output.lock import LockHeld, LockLost, OutputLock
from pipeline.output.sink import ManifestWriter
from pipeline.output.state import compact_state
from pipeline.output.stats import RunStats
from pipeline.rows import sample_problem
from pipeline.schema import EXIT_ERROR, EXIT_OK, EXIT_REFUSED, EXIT_TOO_MANY_FAILED, output_schema
from pipeline.watchdog import Stalled, StallWatchdog

__all__ = ["RunResult", "RenderRun", "run_render", "check", "new_run_id"]

log = logging.getLogger("dtc.render")


@dataclass
class RunResult:
    exit_code: int
    run_id: str | None = None
    message: str = ""
    counts: dict = field(default_factory=dict)
    record_uri: str | None = None


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def run_render(cfg: RenderConfig, dry_run: bool = False) -> RunResult:
    """Render the manifest (see the module docstring). `dry_run`: print per-shard counts of
    render/reuse/carried/invalid/skipped rows and return, without Ray, lock or writes."""
    import pyarrow as pa

    # The driver handles thousands of small tables; Arrow's default arena allocator keeps what
    # they freed, and its RSS grew with the rows (bench/pipeline.py measures this). Driver only.
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        spec = check(cfg, probe_output=not dry_run)
        if dry_run:
            return RunResult(EXIT_OK, run_id=None, counts=dry_run_counts(spec))
    except (ConfigError, ManifestError, CheckpointError) as e:
        return RunResult(EXIT_REFUSED, message=str(e))
    except storage.StorageError as e:
        return RunResult(EXIT_ERROR, message=str(e))
    return RenderRun(spec).run()


def check(cfg: RenderConfig, probe_output: bool = True) -> RunSpec:
    """Everything that can refuse the run (exit 2) happens here, before any write.
    `probe_output`: refuse a local output that cannot be written (a dry run only reads it)."""
    cfg = _absolute_paths(cfg.check())
    if not storage.is_s3(cfg.output):
        check_writable(cfg.output, probe=probe_output)
    partitions = None if cfg.partition_range is None else (cfg.partition_key, *cfg.partition_range)
    plan = plan_manifest(cfg.manifest, partition_range=partitions)
    if problem := sample_problem(plan):  # every row would fail: say so before Ray's start-up
        raise ManifestError(problem)
    index = check_model_checkpoint(cfg.model)
    resolution, product_size = int(index.get("resolution", 512)), int(index.get("product_size", 224))
    if cfg.run_id is not None:
        layout = Layout(cfg.output)
        if storage.exists(layout.run_record(cfg.run_id)) or storage.list_files(layout.manifest_dir(cfg.run_id)):
            # A run's manifest must hold each input row once: a second attempt under the same id
            # would add rows beside the first attempt's. Retries take a new id (e.g. a suffix).
            raise ConfigError(f"--run-id {cfg.run_id} was already used under {cfg.output}; choose another")
    from pipeline.metrics.shards import metrics_protocol

    try:
        protocol = metrics_protocol(cfg, resolution)
    except FileNotFoundError as e:
        raise ConfigError(f"metrics weights not found: {e}") from e
    except CheckpointError as e:
        raise ConfigError(f"--clip-model: {e}") from e
    digest = model_digest(cfg.model)
    return RunSpec(
        cfg,
        plan,
        cfg.run_id or new_run_id(),
        digest,
        cfg.settings_digest(resolution),
        resolution,
        product_size,
        protocol,
        weights_warning(index),
    )


def _absolute_paths(cfg: RenderConfig) -> RenderConfig:
    """Local paths made absolute on the driver: Ray workers run in other folders (a cluster's
    workers in the job's working dir, or none), so `models/dtc-tiny` must mean what it meant
    where the user typed it."""
    return cfg.model_copy(
        update=dict(
            output=absolute_uri(cfg.output),
            model=absolute_uri(cfg.model),
            inception_weights=absolute_uri(cfg.inception_weights),
            clip_model=absolute_uri(cfg.clip_model),
            allow_root=[absolute_uri(root) for root in cfg.allow_root],
        )
    )


class RenderRun:
    """The driver of one run (see the module docstring); `run()` takes every step."""

    def __init__(self, spec: RunSpec):
        self.spec = spec
        self.layout = Layout(spec.output)
        self.stats = RunStats()
        self.writer = ManifestWriter(
            self.layout, spec.run_id, output_schema(spec.plan.schema), part_rows=spec.cfg.manifest_part_rows
        )
        self.lock: OutputLock | None = None  # once held: its check() fences every shared write
        self.metrics = None
        self.metrics_summary: dict | None = None
        self.report_written = False
        self.progress: record.Progress | None = None
        self.nodes = NodeWatch()  # Ray nodes lost while streaming: the run record's nodes_lost
        self.exit_code, self.message = EXIT_ERROR, ""
        self.started_at = datetime.now(UTC)
        self.start = self.stats.started  # one clock for the progress line, the summary and the record
        self.planned = None  # the run's rows with their actions, when planned in the driver (resume)
        self.stream_where = "cluster"  # or "driver": no row to render, no Ray, no model (the run record's)
        self.phases: dict[str, float] = {}  # seconds per step of the run (the run record's phase_seconds)

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.monotonic()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.monotonic() - start

    def connect(self):
        """Ray, started (or joined) the first time a step needs it."""
        import ray

        if ray.is_initialized():
            return init_ray(self.spec.cfg.address)
        with self.phase("ray_start"):
            return init_ray(self.spec.cfg.address)

    def run(self) -> RunResult:
        restore = terminate_as_exception()
        try:
            return self._run(OutputLock(self.layout, self.spec.run_id, stale_after_s=self.spec.cfg.lock_stale_s))
        finally:
            restore()

    def _run(self, lock: OutputLock) -> RunResult:
        try:
            lock.acquire()
        except LockHeld as e:
            return RunResult(EXIT_REFUSED, run_id=self.spec.run_id, message=str(e))
        except storage.StorageError as e:
            return RunResult(EXIT_ERROR, run_id=self.spec.run_id, message=str(e))
        except Terminated as e:  # stopped while taking the lock: a started run, recorded as such
            self.message = str(e)
            self.close(lock)
            return self.result()
        # The fence: a run whose lock was taken over (it froze past lock_stale_s) stops before
        # its next manifest part or state write, so two runs never both write them.
        self.lock, self.writer.fence = lock, lock.check
        try:
            self.resume()
            raise_if_stopped()
            self.stream()
            raise_if_stopped()
            self.finalize()
        except Terminated as e:  # SIGTERM / Ctrl-C: record it, release the lock, stop Ray cleanly
            self.message = f"{e}; the next run of the same command resumes from the rows written"
            log.error(self.message)
        except LockLost as e:  # exit 1; the run that took the output over renders what is left
            self.message = str(e)
            log.error(self.message)
        except OverCapacity as e:  # refused (exit 2) before any work: nothing written but the run record
            self.exit_code, self.message = EXIT_REFUSED, str(e)
        except Stalled as e:  # exit 1: the watchdog's message names the stage that waits
            self.message = str(e)
            log.error(self.message)
        except (storage.StorageError, OSError) as e:
            self.message = record.failure_message(e)
            log.error(self.message)
        except Exception as e:  # noqa: BLE001 - the run record and summary must still be written
            self.message = record.failure_message(e)
            log.exception("render run failed")
        finally:
            self.close(lock)
        return self.result()

    def result(self) -> RunResult:
        return RunResult(
            self.exit_code,
            run_id=self.spec.run_id,
            message=self.message,
            counts={**self.stats.counts(), "manifest_parts": self.writer.parts},
            record_uri=self.layout.run_record(self.spec.run_id),
        )

    def resume(self) -> None:
        """The done index brought up to date: runs that were killed before their end (their
        part files) folded into it (on the cluster, but a few parts). Which rows are done is
        decided bucket by bucket (`stages.resume_stage`): on the cluster in the stream, or here
        first for a manifest of up to `driver_plan_rows` rows (never the whole index)."""
        spec = self.spec
        if self.lock is not None:
            self.lock.check("the done index")
        with self.phase("fold"):
            pairs = compact_state(
                self.layout, exclude_run=spec.run_id, num_cpus=spec.cfg.cpu_stage_cpus, connect=self.connect
            )
        if not spec.cfg.force and spec.plan.num_rows <= spec.cfg.driver_plan_rows:
            from pipeline.dataflow import planned_rows

            with self.phase("plan"):
                self.planned = planned_rows(spec)
        total = spec.plan.num_rows if spec.cfg.limit is None else min(spec.cfg.limit, spec.plan.num_rows)
        self.progress = record.Progress(total)
        print(
            f"[dtc] run {spec.run_id}: {total} rows from {len(spec.plan.files)} manifest file(s); "
            f"{pairs} pairs in the done index{' (ignored: --force)' if spec.cfg.force else ''}; "
            f"model sha256:{spec.model_digest[:12]}; output {self.layout.output}",
            flush=True,
        )
        if spec.model_warning:
            print(f"[dtc] {spec.model_warning.upper()}", flush=True)

    def stream(self) -> None:
        """The Ray Data graph, its blocks into the sink, the stats and the metrics."""
        import pyarrow as pa

        from pipeline.dataflow import build_dataset, needs_model

        if self.planned is not None and not needs_model(self.planned):
            with self.phase("stream"):
                self._write_planned()
            return
        ray = self.connect()
        self.nodes.start(ray)

        gpus = self.spec.cfg.gpus_per_actor
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        from pipeline.capacity import check_capacity

        check_capacity(ray, self.spec, gpus)  # OverCapacity: before the first block, nothing written yet
        watchdog = self._watchdog(gpus)
        if self.spec.with_metrics:
            from pipeline.metrics.shards import MetricsAccumulator

            self.metrics = MetricsAccumulator(self.layout, self.spec.run_id)
        # Images are written by Ray workers, beyond the manifest-part fence: a run frozen past
        # lock_stale_s while it planned must not start rendering into an output taken over.
        if self.lock is not None:
            self.lock.check("its images")
        dataset = build_dataset(self.spec, gpus, self.planned)
        self.planned = None  # in the object store now
        batch = None
        with self.phase("stream"):
            for batch in watchdog.watch(dataset.iter_batches(batch_format="pyarrow", batch_size=None)):
                raise_if_stopped()
                self._add(batch)
                self.nodes.poll()
            self.writer.flush()
        # The stream's buffers go before compaction allocates on top of them: the system pool's
        # release_unused() is glibc's malloc_trim, which also returns what Ray and Python freed
        # (without it the driver's peak RSS grew with the manifest: bench/pipeline.py 1k -> 5k).
        dataset = batch = None  # (no batch at all with --limit 0)
        pa.default_memory_pool().release_unused()

    def _add(self, batch) -> None:
        if self.lock is not None and self.lock.lost is not None:  # the heartbeat found it taken over
            self.lock.check("the rest of its images")
        if self.metrics is not None:
            self.metrics.add(batch)
        self.writer.add(batch)
        self.stats.add(batch)
        self.progress.update(self.stats)

    def _write_planned(self) -> None:
        """Every row reused, carried or failed before the model: the planned rows through the
        prepare stage (which fetches nothing for them), `render_stage.unrendered` and the finish
        stage, here: no Ray, no model."""
        from pipeline.dataflow import stage_configs
        from pipeline.stages.finish_stage import finish_batch
        from pipeline.stages.prepare_stage import prepare_batch
        from pipeline.stages.render_stage import unrendered

        self.stream_where = "driver"
        if self.spec.with_metrics:
            from pipeline.metrics.shards import MetricsAccumulator

            self.metrics = MetricsAccumulator(self.layout, self.spec.run_id)
        _, _, prepare, _, finish = stage_configs(self.spec, 0.0)
        rows, step = self.planned, self.spec.cfg.manifest_part_rows
        for start in range(0, rows.num_rows, step):
            block = prepare_batch(rows.slice(start, step), config=prepare)
            self._add(finish_batch(unrendered(block), config=finish))
        self.writer.flush()

    def _watchdog(self, gpus: float) -> StallWatchdog:
        from pipeline.dataflow import resource_plan
        from pipeline.watchdog import stage_report

        actor = resource_plan(self.spec, gpus).actor
        return StallWatchdog(
            self.spec.cfg.stall_timeout_s, lambda executors: stage_report(executors, actor), raise_in_main_thread
        )

    def finalize(self) -> None:
        """State, metrics and report; the exit code from the failed fraction."""
        import pyarrow as pa

        cfg = self.spec.cfg
        if self.lock is not None:
            self.lock.check("the done index")
        with self.phase("fold"):
            compact_state(self.layout, num_cpus=cfg.cpu_stage_cpus, connect=self.connect)
        pa.default_memory_pool().release_unused()  # give compaction's buffers back before the report
        with self.phase("metrics_report"):
            self._metrics_and_report()
        fraction = self.stats.failed_fraction
        self.exit_code = EXIT_TOO_MANY_FAILED if fraction > cfg.max_failed_fraction else EXIT_OK
        if self.exit_code == EXIT_TOO_MANY_FAILED:
            self.message = f"{fraction:.1%} of rows failed (limit --max-failed-fraction {cfg.max_failed_fraction:.1%})"

    def _metrics_and_report(self) -> None:
        cfg = self.spec.cfg
        if self.metrics is not None:
            shard_counts = {shard: dict(c) for shard, c in self.stats.shards.items()}
            self.metrics_summary = self.metrics.finalize(shard_counts, self.spec.metrics_protocol)
        from pipeline.metrics.report import write_report

        facts = {
            "model": cfg.model,
            "model_digest": self.spec.model_digest,
            "manifest": cfg.manifest,
            "started_at": self.started_at.isoformat(timespec="seconds"),
            "batch_size": cfg.batch_size,
            "rows reused from earlier runs": self.stats.reused,
        }
        write_report(
            self.layout,
            self.spec.run_id,
            self.metrics_summary,
            settings={**facts, **cfg.settings(self.spec.resolution)},
            model_warning=self.spec.model_warning,
            max_pixels=cfg.max_pixels,
        )
        self.report_written = True

    def close(self, lock: OutputLock) -> None:
        """Last part, run record, lock, summary: whatever happened before."""
        try:
            self.writer.flush()
        except LockLost as e:  # its rows stay unwritten (the run holding the lock renders them)
            self.message = self.message or str(e)
        except Exception as e:  # noqa: BLE001
            log.error("could not flush the last manifest part: %s", e)
        elapsed = time.monotonic() - self.start
        run = record.run_record(
            self.spec,
            self.stats,
            exit_code=self.exit_code,
            message=self.message,
            started_at=self.started_at,
            elapsed=elapsed,
            manifest_parts=self.writer.parts,
            rss_samples=self.progress.rss_samples if self.progress else [],
        )
        run["nodes_lost"] = self.nodes.finish()
        run["stream"] = self.stream_where
        run["phase_seconds"] = {name: round(seconds, 3) for name, seconds in self.phases.items()}
        try:
            record.write_run_record(self.spec, run)
        except Exception as e:  # noqa: BLE001
            log.error("could not write the run record: %s", e)
        lock.release()
        print(
            record.summary_text(
                self.spec, self.stats, elapsed, self.exit_code, self.metrics_summary, self.report_written
            ),
            flush=True,
        )
        if self.nodes.lost:
            print(self.nodes.summary_line(), flush=True)
        if self.message:
            print(f"  note       {self.message}", flush=True)
