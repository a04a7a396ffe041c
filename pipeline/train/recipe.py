"""A training run from start to summary: the library call behind `python -m jobs.train`.

    result = run_train(TrainConfig(manifest=..., init_model=..., output=..., vgg_weights=...))
    sys.exit(result.exit_code)

`TrainRecipe` is the driver as steps:

    check    config, output, manifest (+ split values), init model, VGG weights, an earlier attempt's
             recipe: anything wrong refuses the run (exit 2) before a byte is written
    prepare  the prepared-sample store (`train.store`): reused when a complete one has the same
             digest, else its missing parts prepared by a Ray Data job (the render job's read,
             validation and prepare code); bad rows are skipped and counted by error code; no
             usable train row refuses the run (exit 2). `--prepare-only` stops here (exit 0)
    train    `_lock`, the run record as "running", Ray Train's TorchTrainer (resumes from the
             latest checkpoint of `checkpoints/<run_id>/` when there is one)
    export   a Ray task: the best (or final) weights -> `model/`, a DTC folder with its digest
    close    `metrics/<run_id>/training.html` (`training_page`), `runs/<run_id>.json`, the lock,
             the one-screen summary

The driver imports torch only at `train` (Ray Train's TorchTrainer imports it); checking,
preparing and refusing do not, and the export runs in a task.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.driver import Terminated, absolute_uri, check_writable, init_ray, terminate_as_exception
from pipeline.fetch import InputPolicy
from pipeline.manifest import ManifestError, ManifestPlan, plan_manifest
from pipeline.model.checkpoint import CheckpointError, check_dtc_checkpoint, model_digest
from pipeline.output.layout import Layout
from pipeline.output.lock import LockHeld, OutputLock
from pipeline.record import failure_message
from pipeline.schema import EXIT_ERROR, EXIT_OK, EXIT_REFUSED
from pipeline.stages.prepare_stage import PrepareConfig
from pipeline.train import record
from pipeline.train.config import TrainConfig
from pipeline.train.dataset import RowCounts, check_splits
from pipeline.train.store import StoreInfo, prepare_store
from pipeline.train.training_page import write_training_page

__all__ = ["TrainSpec", "TrainResult", "TrainRecipe", "run_train", "check"]

log = logging.getLogger("dtc.train")


@dataclass
class TrainResult:
    exit_code: int
    run_id: str | None = None
    message: str = ""
    record_uri: str | None = None
    model_digest: str | None = None


@dataclass(frozen=True)
class TrainSpec:
    """What `check` fixed: the config (local output made absolute), manifest plan, model facts."""

    cfg: TrainConfig
    plan: ManifestPlan
    resolution: int
    product_size: int
    init_model_digest: str
    recipe_digest: str
    previous_record: dict | None  # runs/<run_id>.json of an earlier attempt, if any


def run_train(cfg: TrainConfig) -> TrainResult:
    """Train (see the module docstring); the exit code is the result's."""
    recipe = TrainRecipe(cfg)
    try:
        recipe.check()
        recipe.prepare()
    except (ConfigError, ManifestError, CheckpointError) as e:
        return TrainResult(EXIT_REFUSED, run_id=cfg.run_id, message=str(e))
    except storage.StorageError as e:
        return TrainResult(EXIT_ERROR, run_id=cfg.run_id, message=str(e))
    if recipe.cfg.prepare_only:
        print(record.store_text(recipe.store, recipe.counts), flush=True)
        return TrainResult(EXIT_OK, run_id=cfg.run_id)
    return recipe.run()


def check(cfg: TrainConfig) -> TrainSpec:
    """Everything that can refuse the run before any work, in order; nothing is written."""
    cfg.check()
    cfg = _absolute_paths(cfg)
    if not storage.is_s3(cfg.output):
        check_writable(cfg.output)
    plan = plan_manifest(cfg.manifest)
    check_splits(plan)
    index = check_dtc_checkpoint(cfg.init_model)
    if cfg.vgg_weights and cfg.perceptual_weight > 0 and not storage.exists(cfg.vgg_weights):
        raise ConfigError(
            f"--vgg-weights {cfg.vgg_weights} does not exist (torchvision's vgg19-dcbb9e9d.pth expected)"
        )
    init_digest = model_digest(cfg.init_model)
    digest = cfg.recipe_digest(init_digest)
    previous = record.read_record(cfg.output, cfg.run_id)
    if previous is not None and previous.get("recipe_digest") != digest and not cfg.prepare_only:
        changed = sorted(k for k, v in cfg.recipe().items() if previous.get("recipe", {}).get(k) != v)
        if previous.get("init_model", {}).get("digest") != init_digest:
            changed.append("init model")
        raise ConfigError(
            f"run {cfg.run_id} under {cfg.output} was trained with other recipe settings ({', '.join(changed) or '?'} "
            "differ): resuming would not continue it. Use the same settings, or a new --run-id"
        )
    resolution, product_size = int(index.get("resolution", 512)), int(index.get("product_size", 224))
    return TrainSpec(cfg, plan, resolution, product_size, init_digest, digest, previous_record=previous)


def _absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Local paths made absolute: Ray workers (and a resumed run) must not depend on the cwd."""
    return cfg.model_copy(
        update=dict(
            manifest=absolute_uri(cfg.manifest),
            init_model=absolute_uri(cfg.init_model),
            output=absolute_uri(cfg.output),
            vgg_weights=absolute_uri(cfg.vgg_weights),
            allow_root=[absolute_uri(root) for root in cfg.allow_root],
        )
    )


class TrainRecipe:
    """The driver of one run (see the module docstring)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.spec: TrainSpec | None = None
        self.counts: RowCounts | None = None
        self.store: StoreInfo | None = None
        self.total_steps = 0
        self.timings: dict[str, float] = {}
        self.result_metrics: dict = {}
        self.model_digest: str | None = None
        self.export_source: str | None = None
        self.page_uri: str | None = None
        self.exit_code, self.message = EXIT_ERROR, ""
        self.started_at = datetime.now(UTC)
        self.start = time.monotonic()

    def check(self) -> None:
        begin = time.monotonic()
        self.spec = check(self.cfg)
        self.cfg = self.spec.cfg
        self.layout = Layout(self.cfg.output)
        self.timings["check_s"] = time.monotonic() - begin

    def prepare(self) -> None:
        """The prepared-sample store: reused, or its missing parts prepared; bad rows counted."""
        begin = time.monotonic()
        init_ray(self.cfg.address)  # rank 0's progress lines reach this driver (log_to_driver)
        spec, cfg = self.spec, self.cfg
        config = self.prepare_config()
        print(f"[dtc-train] run {cfg.run_id}: the store of {spec.plan.num_rows} manifest rows", flush=True)
        self.store = prepare_store(
            spec.plan,
            config,
            cfg.output,
            part_rows=cfg.store_part_rows,
            row_group_rows=cfg.store_row_group_rows,
            stall_part=(cfg.fault_injection or {}).get("prepare_stall_part"),
        )
        self.counts = self.store.counts
        self.timings["prepare_s"] = time.monotonic() - begin
        if cfg.prepare_only:
            return
        usable = self.counts.usable["train"]
        if usable == 0:
            skipped = ", ".join(f"{c} {n}" for c, n in self.counts.skipped_by_code().items()) or "none"
            raise ConfigError(
                f"manifest {cfg.manifest} has no usable training row ({self.counts.total} rows; "
                f"{self.counts.usable['val']} usable val; skipped: {skipped})"
            )
        steps = cfg.steps if cfg.epochs is None else math.ceil(cfg.epochs * usable / cfg.batch_size)
        self.total_steps = steps

    def prepare_config(self) -> PrepareConfig:
        """How this run's rows are prepared: every field but `num_cpus`/`batch_size` enters the
        store's digest (`store.prep_inputs`)."""
        spec, cfg = self.spec, self.cfg
        return PrepareConfig(
            self.input_policy(),
            resolution=spec.resolution,
            product_size=spec.product_size,
            max_pixels=cfg.max_pixels,
            crop_margin=cfg.crop_margin,
            num_cpus=cfg.data_cpus,
            batch_size=8,
        )

    def input_policy(self) -> InputPolicy:
        """Where the run's inputs may come from (the render job's allowlist)."""
        cfg = self.cfg
        return InputPolicy(
            manifest_dir=self.spec.plan.base_dir, allow_roots=tuple(cfg.allow_root), allow_http=cfg.allow_http
        )

    def run(self) -> TrainResult:
        lock = OutputLock(self.layout, self.cfg.run_id, stale_after_s=self.cfg.lock_stale_s)
        try:
            lock.acquire()
        except LockHeld as e:
            return TrainResult(EXIT_REFUSED, run_id=self.cfg.run_id, message=str(e))
        except storage.StorageError as e:
            return TrainResult(EXIT_ERROR, run_id=self.cfg.run_id, message=str(e))
        restore_signals = terminate_as_exception()  # SIGTERM/Ctrl-C: a failure like any other (exit 1, record)
        try:
            record.write_record(self.layout, self.cfg.run_id, self.record(running=True))
            self.train()
            self.export()
            self.exit_code = EXIT_OK
        except (storage.StorageError, OSError, Terminated) as e:  # said in one line: no traceback
            self.message = failure_message(e)
            log.error(self.message)
        except Exception as e:  # noqa: BLE001 - the run record and summary must still be written
            self.message = failure_message(e)
            log.exception("training run failed")
        finally:
            restore_signals()
            self.close(lock)
        return TrainResult(
            self.exit_code, self.cfg.run_id, self.message, self.layout.run_record(self.cfg.run_id), self.model_digest
        )

    def train(self) -> None:
        """Ray Train: TorchTrainer, its workers reading the prepared-sample store, resuming from the
        latest checkpoint."""
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from pipeline.train.loop import LoopSpec, train_loop_per_worker
        from pipeline.train.val_renders import pick_val_pairs

        begin, cfg = time.monotonic(), self.cfg
        import ray

        gpus = cfg.gpus_per_worker
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        spec = LoopSpec(
            cfg,
            cfg.run_id,
            cfg.output,
            self.store.uri,
            self.total_steps,
            self.spec.resolution,
            self.spec.product_size,
            self.spec.recipe_digest,
            self.spec.init_model_digest,
            val_pairs=pick_val_pairs(self.spec.plan, cfg.val_renders),
            input_policy=self.input_policy(),
        )
        storage_path, filesystem = record.checkpoint_storage(cfg.output)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"spec": spec},
            torch_config=TorchConfig(backend="nccl" if gpus > 0 else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=cfg.workers,
                use_gpu=gpus > 0,
                resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": gpus} if gpus > 0 else {})},
            ),
            run_config=RunConfig(
                name=cfg.run_id,
                storage_path=storage_path,
                storage_filesystem=filesystem,
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                failure_config=FailureConfig(max_failures=cfg.max_failures),
            ),
        )
        result = fit_interruptibly(trainer)
        self.timings["train_s"] = time.monotonic() - begin
        self.result_metrics = dict(result.metrics or {})
        self.final_checkpoint = result.checkpoint

    def export(self) -> None:
        """The best (lowest validation loss) or final weights -> model/, in a Ray task."""
        import ray

        from pipeline.train.export import export_model

        begin, cfg, metrics = time.monotonic(), self.cfg, self.result_metrics
        best_uri = storage.join(cfg.output, "best", cfg.run_id)
        use_best = cfg.export == "best" and metrics.get("best_step") is not None and storage.exists(best_uri)
        source = best_uri if use_best else self.final_checkpoint
        if source is None:
            raise RuntimeError("training reported no checkpoint to export")
        self.export_source = "best" if use_best else "final"
        provenance = {
            "run_id": cfg.run_id,
            "source": self.export_source,
            "step": metrics.get("best_step") if use_best else metrics.get("step"),
            "val_loss": metrics.get("best_val_loss") if use_best else metrics.get("val_loss"),
            "init_model": {"uri": cfg.init_model, "digest": self.spec.init_model_digest},
            "recipe_digest": self.spec.recipe_digest,
            "exported_at": datetime.now(UTC).isoformat(),
        }
        task = ray.remote(num_cpus=min(1.0, cfg.cpus_per_worker))(export_model)
        self.model_digest = ray.get(task.remote(cfg.init_model, source, self.layout_model(), provenance))
        self.timings["export_s"] = time.monotonic() - begin

    def layout_model(self) -> str:
        return storage.join(self.cfg.output, "model")

    def record(self, running: bool = False) -> dict:
        return record.run_record(self, running=running)

    def close(self, lock: OutputLock) -> None:
        elapsed = time.monotonic() - self.start
        self.timings["total_s"] = elapsed
        try:  # rewritten by every attempt: its curves and grid are the path to the current weights
            self.page_uri = write_training_page(self.cfg.output, self.cfg.run_id, max_pixels=self.cfg.max_pixels)
        except Exception as e:  # noqa: BLE001 - the record and summary still come
            log.error("could not write the training page: %s", e)
        try:
            record.write_record(self.layout, self.cfg.run_id, self.record())
        except Exception as e:  # noqa: BLE001
            log.error("could not write the run record: %s", e)
        lock.release()
        print(record.summary_text(self), flush=True)
        if self.message:
            print(f"  note       {self.message}", flush=True)


def fit_interruptibly(trainer):
    """`trainer.fit()` in a thread while the main thread waits in short joins.

    Why: the Train V2 driver waits in one blocking `ray.get` for the whole run, and a blocking
    `ray.get` lets nothing but KeyboardInterrupt out of a signal handler: the Terminated that
    `terminate_as_exception` raises on SIGTERM stayed pending until training ended (a SIGTERM
    3 s into a 30 s `ray.get` surfaced at 30 s, as a SystemError). In a join loop it is raised at
    once, and the run fails like any other (record, lock released); the controller and workers are
    this driver's actors and end with it. Off the main thread Train does not install its own
    SIGINT handler (as under Tune), so Ctrl-C takes the same path as SIGTERM.
    """
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread below
            outcome["error"] = e

    thread = threading.Thread(target=fit, name="dtc-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
