"""`train_loop_per_worker`: what each Ray Train worker runs (TorchTrainer, DDP).

    1. setup: the init model on this worker's device, frozen parts frozen, gradient checkpointing,
       the VGG; restore from Ray Train's latest checkpoint (weights, optimizer, step) if there is
       one; wrap in DDP (gloo on CPU, nccl on GPU); the train and val index of the prepared-sample
       store (`reader.StoreReader`: the samples are read by the steps that need them)
    2. loop: step k takes this worker's share of the global batch from the deterministic order
       (`samples.positions`), read from the store (the next `prefetch_steps` steps' batches read
       and built in background threads), one AdamW step; every `log_every` steps a progress line
       and a `metrics/<run_id>/train.jsonl` line (`data_s`, the wait for data prefetch did not
       hide, beside `compute_s`); every `checkpoint_every` steps (and at the end) the validation
       loss and a checkpoint
    3. checkpoint: `ray.train.report` is a barrier every worker reaches at the same steps; rank 0
       passes the checkpoint (trainable weights, optimizer state, `state.json`), the others None;
       training goes on once Ray Train has committed it (`get_all_reported_checkpoints`).
       A new best validation loss is also copied to `best/<run_id>/` (weights and state only):
       Ray Train keeps the last `keep_checkpoints`, the best is kept apart from them.

Only rank 0 writes (the checkpoint, best/, train.jsonl and TensorBoard events: `logs.TrainLog`;
the validation renders of the training page at step 0 and each checkpoint: `val_renders`). A
restarted worker group (FailureConfig) or a re-run of the same command starts at the latest
checkpoint's step; train.jsonl is cut back to that step and TensorBoard's readers drop the points
past it, so the logs describe the path to the current weights.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from pipeline import storage
from pipeline.fetch import InputPolicy
from pipeline.train.config import TrainConfig
from pipeline.train.logs import TrainLog, log_uri
from pipeline.train.reader import StoreReader
from pipeline.train.step import Learner, StepStats

__all__ = ["LoopSpec", "train_loop_per_worker"]

log = logging.getLogger("dtc.train")


@dataclass(frozen=True)
class LoopSpec:
    """What the driver fixed before training: small and picklable."""

    cfg: TrainConfig
    run_id: str
    output: str  # absolute for local folders
    store: str  # the prepared-sample store (`<output>/prepared/<prep_digest>`) the workers read
    total_steps: int
    resolution: int
    product_size: int
    recipe_digest: str
    init_model_digest: str
    val_pairs: tuple[dict, ...] = ()  # val_renders.pick_val_pairs: rendered at each checkpoint
    input_policy: InputPolicy | None = None  # the run's allowlist, for those renders' inputs

    @property
    def log_uri(self) -> str:
        return log_uri(self.output, self.run_id)

    @property
    def best_uri(self) -> str:
        return storage.join(self.output, "best", self.run_id)


def train_loop_per_worker(config: dict) -> None:
    Worker(config["spec"]).run()


class Window:
    """Per-step stats since the last log line, reduced over the workers when logged."""

    FIELDS = ("loss", "mse", "pixel", "perceptual", "grad_norm", "data_s", "compute_s", "decode_s", "load_s")

    def __init__(self):
        self.sums = torch.zeros(len(self.FIELDS) + 3, dtype=torch.float64)  # + steps, pixel steps, perceptual steps
        self.started = time.perf_counter()

    def add(self, stats: StepStats) -> None:
        values = [getattr(stats, f) or 0.0 for f in self.FIELDS]
        counts = [1.0, float(stats.pixel is not None), float(stats.perceptual is not None)]
        self.sums += torch.tensor(values + counts, dtype=torch.float64)

    def reduce(self, learner: Learner) -> dict:
        from pipeline.train.step import _all_reduce

        sums = _all_reduce(self.sums, learner.device) / learner.world if learner.world > 1 else self.sums
        steps, pixel_steps, perceptual_steps = (float(v) for v in sums[-3:])
        out = {f: float(sums[i]) / max(steps, 1e-12) for i, f in enumerate(self.FIELDS)}
        out["pixel"] = float(sums[2]) / pixel_steps if pixel_steps else None
        out["perceptual"] = float(sums[3]) / perceptual_steps if perceptual_steps else None
        out["steps"] = steps
        out["wall_s"] = time.perf_counter() - self.started
        return out


class Worker:
    def __init__(self, spec: LoopSpec):
        import ray.train
        import ray.train.torch

        self.spec, self.cfg = spec, spec.cfg
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        if self.cfg.torch_threads:
            torch.set_num_threads(self.cfg.torch_threads)
        self.faults = None
        if self.cfg.fault_injection:
            from pipeline.train.faults import TrainFaults

            self.faults = TrainFaults(self.cfg.fault_injection)

    # -- 1. setup ---------------------------------------------------------------------------------

    def setup(self) -> dict:
        """Model, learner, restored state (or a fresh one), DDP, samples."""
        import ray.train
        import ray.train.torch

        from pipeline.model.loading import load_pipeline
        from pipeline.train.loss import TrainableDTC
        from pipeline.train.vgg import load_vgg19

        pipe = load_pipeline(self.cfg.init_model, device=self.device, dtype=torch.float32)
        if self.device.type == "cuda" and self.cfg.bf16:  # frozen parts run under bf16 autocast anyway
            pipe.vae.to(torch.bfloat16)
            pipe.image_encoder.to(torch.bfloat16)
        if self.cfg.gradient_checkpointing:
            for module in (pipe.unet, pipe.hint_encoder, pipe.vae):
                module.enable_gradient_checkpointing()
        vgg, self.vgg_sha256 = (
            load_vgg19(self.cfg.vgg_weights, self.device) if self.cfg.perceptual_weight > 0 else (None, None)
        )
        model = TrainableDTC(pipe, vgg)
        self.learner = Learner(model, self.cfg, self.device, self.rank, self.world)
        state = self.restore(ray.train.get_checkpoint())
        self.learner.forward_model = ray.train.torch.prepare_model(
            model, move_to_device=False, parallel_strategy_kwargs={"broadcast_buffers": False}
        )
        self.train, self.val = self.load_samples()
        if state.get("sample_digest") not in (None, self.train.digest):
            self.say(f"the train rows changed since step {state['step']}: the data order is that of the new set")
        return state

    def restore(self, checkpoint) -> dict:
        if checkpoint is None:
            return {"step": 0, "best_val_loss": None, "best_step": None, "initial_val_loss": None}
        with checkpoint.as_directory() as folder:
            state = self.learner.load(folder)
        if state["recipe_digest"] != self.spec.recipe_digest:
            raise ValueError(
                f"the checkpoint at step {state['step']} was trained with recipe {state['recipe_digest']}, "
                f"this run's is {self.spec.recipe_digest}: use a new --run-id"
            )
        self.say(f"resumed from the checkpoint of step {state['step']}")
        return state

    def load_samples(self) -> tuple[StoreReader, StoreReader]:
        """The store's train and val splits (their index; samples are read by the steps). The row
        groups cached: those of the batches in flight (this step's and the prefetched ones)."""
        per_worker = self.cfg.batch_size // self.world
        cache = per_worker * (self.cfg.prefetch_steps + 2)
        train, val = (StoreReader.open(self.spec.store, split, cache_row_groups=cache) for split in ("train", "val"))
        wanted = (self.spec.resolution, self.spec.product_size)
        if (train.sizes.resolution, train.sizes.product_size) != wanted:
            raise ValueError(
                f"the store at {self.spec.store} holds samples at {train.sizes.resolution}^2 (product "
                f"{train.sizes.product_size}^2), the model takes {wanted[0]}^2 (product {wanted[1]}^2)"
            )
        return train, val

    # -- 2. loop ------------------------------------------------------------------------------

    def run(self) -> None:
        began = time.perf_counter()
        state = self.setup()
        self.say(f"setup {time.perf_counter() - began:.1f}s")
        start, total = state["step"], self.spec.total_steps
        self.log = TrainLog(self.spec.output, self.spec.run_id, start, enabled=self.rank == 0)
        self.val_renders = None
        if self.rank == 0 and self.spec.val_pairs:
            from pipeline.train.val_renders import ValRenders

            self.val_renders = ValRenders(self.spec, self.learner.model.pipe, self.device)
        self.started, self.window = time.perf_counter(), Window()
        if start == 0 and len(self.val):
            state["initial_val_loss"] = self.learner.validation_loss(self.val)
            self.log.add({"step": 0, "val_loss": state["initial_val_loss"], "time": time.time()})
        if start == 0 and self.val_renders and (problem := self.val_renders.render(0, self.learner.autocast)):
            self.say(problem)
        self.say(
            f"training steps {start}..{total} on {len(self.train)} train / {len(self.val)} val samples, "
            f"{self.world} worker(s) x batch {self.cfg.batch_size // self.world} on {self.device}"
        )
        for step in range(start, total):
            if self.faults is not None:
                self.faults(step, self.rank)
            self.window.add(self.learner.train_step(step, self.train, end=total))
            done = step + 1
            if done % self.cfg.log_every == 0 or done == total:
                state["last_train"] = self.log_window(done)
            if done % self.cfg.checkpoint_every == 0 or done == total:
                paused = time.perf_counter()
                self.checkpoint(done, state, steps_run=done - start)
                self.window.started += time.perf_counter() - paused  # samples/s counts training, not saving
        self.learner.close()
        self.log.close()
        if start >= total:  # a finished run, run again: nothing to train, the same summary
            import ray.train

            ray.train.report(self.metrics(state, steps_run=0))

    def log_window(self, done: int) -> dict:
        stats = self.window.reduce(self.learner)
        self.window = Window()
        samples_per_s = stats["steps"] * self.cfg.batch_size / max(stats["wall_s"], 1e-9)
        epoch = done * self.cfg.batch_size / max(len(self.train), 1)
        record = {
            "step": done,
            "epoch": round(epoch, 4),
            **{k: stats[k] for k in Window.FIELDS},
            "samples_per_s": samples_per_s,
            "lr": self.cfg.learning_rate,
            "time": time.time(),
        }
        self.log.add(record)
        step_s = stats["data_s"] + stats["compute_s"]
        extra = "".join(f" {k} {stats[k]:.4f}" for k in ("pixel", "perceptual") if stats[k] is not None)
        self.say(
            f"step {done}/{self.spec.total_steps} epoch {epoch:.2f} loss {stats['loss']:.4f} (mse {stats['mse']:.4f}"
            f"{extra}) grad {stats['grad_norm']:.3f} {samples_per_s:.2f} samples/s; step {step_s:.2f}s = data wait "
            f"{stats['data_s'] / max(step_s, 1e-9):.0%}, fwd/bwd {stats['compute_s'] / max(step_s, 1e-9):.0%} "
            f"(decode fwd {stats['decode_s']:.2f}s; batch built in {stats['load_s']:.2f}s)"
        )
        return {k: record[k] for k in ("step", "loss", "mse", "samples_per_s")}

    # -- 3. checkpoint ----------------------------------------------------------------------------

    def checkpoint(self, done: int, state: dict, steps_run: int) -> None:
        import ray.train

        val_loss = self.learner.validation_loss(self.val) if len(self.val) else None
        improved = val_loss is not None and (state["best_val_loss"] is None or val_loss < state["best_val_loss"])
        if improved:
            state["best_val_loss"], state["best_step"] = val_loss, done
        state.update(
            step=done,
            val_loss=val_loss,
            recipe_digest=self.spec.recipe_digest,
            sample_digest=self.train.digest,
            num_train=len(self.train),
            num_val=len(self.val),
            vgg_sha256=self.vgg_sha256,
        )
        checkpoint, folder = None, None
        if self.val_renders and (problem := self.val_renders.render(done, self.learner.autocast)):
            self.say(problem)
        if self.rank == 0:
            from ray.train import Checkpoint

            from pipeline.train.export import publish_folder

            folder = tempfile.mkdtemp(prefix=f"dtc-train-ckpt-{done}-")
            self.learner.save(folder, state)
            if improved:  # the best, apart from Ray Train's last N: weights and state only
                best = tempfile.mkdtemp(prefix="dtc-train-best-")
                for name in ("trainable.safetensors", "state.json"):
                    shutil.copy(os.path.join(folder, name), best)
                publish_folder(best, self.spec.best_uri, last=("state.json",))
                shutil.rmtree(best, ignore_errors=True)
            self.log.add({"step": done, "val_loss": val_loss, "best": improved, "time": time.time()})
            self.log.flush()
            checkpoint = Checkpoint.from_directory(folder)
        ray.train.report(
            self.metrics(state, steps_run), checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{done:08d}"
        )
        # The controller registers a reported checkpoint when it next polls the workers; until then a
        # crash would restart from the one before. Wait for the commit: from here on, a worker or
        # driver that dies restarts from this checkpoint.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
        self.say(
            f"checkpoint at step {done}"
            + (f", validation loss {val_loss:.5f}" if val_loss is not None else "")
            + (" (best so far)" if improved else "")
        )

    def metrics(self, state: dict, steps_run: int) -> dict:
        """What `ray.train.report` carries: the driver's run record reads the last one."""
        elapsed = time.perf_counter() - self.started
        return {
            "step": state["step"],
            "val_loss": state.get("val_loss"),
            "best_val_loss": state["best_val_loss"],
            "best_step": state["best_step"],
            "initial_val_loss": state["initial_val_loss"],
            "last_train": state.get("last_train"),
            "steps_run": steps_run,
            "train_s": elapsed,
            "samples_per_s": steps_run * self.cfg.batch_size / max(elapsed, 1e-9),
            "num_train": len(self.train),
            "num_val": len(self.val),
            "vgg_sha256": self.vgg_sha256,
        }

    def say(self, message: str) -> None:
        """A progress line from rank 0. Written to stdout directly: Ray Train's patched `print`
        would emit it twice (to stdout and through its logger)."""
        if self.rank == 0:
            sys.stdout.write(f"[dtc-train] {message}\n")
            sys.stdout.flush()
