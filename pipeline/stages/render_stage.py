"""The GPU stage: blocks of prepared pairs in, rendered windows out.

`RenderStage` is a callable class for `map_batches` in an actor pool: the `Renderer` loads once
per actor in `__init__`, and `__call__` renders every renderable row of a block in one model
call (one UNet call of 2B per step with CFG). It runs on a hand-built block without Ray
(tests/unit/test_stages.py).

Input columns: `schema.STAGES["render"].requires` (the `model_*` payloads of the prepare
stage: context, hole, product, product alpha, hint and hint mask; `seed`, `error_code`,
`action`). Output: the block without the `model_*` payloads, plus
`rendered` (R*R*3 raw uint8 bytes, empty for rows not rendered), `render_attempts`,
`render_ms`, `render_ended_at` (when the row's model call ended, epoch seconds: the run's
steady-state throughput runs on this clock) and the metric features. A pair that does not
fit in GPU memory even alone gets `error_code="oom"`; one that kills its worker three times,
`worker_crash`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.output.layout import Layout
from pipeline.schema import MODEL_INPUTS, PAYLOAD_TYPE, RENDER, require_columns, set_columns

__all__ = ["RenderStageConfig", "RenderStage", "CrashLedger"]

log = logging.getLogger(__name__)

MAX_RETRIES = 2  # a pair whose rendering kills its worker is retried at most twice, then fails
REASONS = {
    "oom": "the pair does not fit in GPU memory even alone",
    "worker_crash": f"rendering this pair killed its worker {MAX_RETRIES + 1} times (segfault or out-of-memory kill)",
}


@dataclass(frozen=True)
class RenderStageConfig:
    """The model actor: what it loads, how it renders, and what it asks Ray for."""

    model_uri: str  # DTC checkpoint folder or s3:// prefix
    steps: int = 40  # denoising steps
    guidance_scale: float = 5.0  # classifier-free guidance
    scheduler: str = "ddim"  # ddim | dpmpp
    output: str | None = None  # with run_id: the crash ledger's home (None: no ledger)
    run_id: str | None = None
    inception_weights: str | None = None  # FID/KID features (None: none)
    clip_model: str | None = None  # CLIP region score (None: none)
    torch_threads: int | None = None  # CPU rendering: Ray gives a fractional-CPU actor 1 thread
    compile_model: bool = False  # torch.compile the UNet and hint encoder
    channels_last: bool = False  # NHWC convolutions
    fault_injection: dict | None = None  # chaos tests only: see stages.faults
    batch_size: int = 8  # pairs per model call
    num_gpus: float = 0.0  # per actor
    num_cpus: float = 1.0  # per actor
    resources: dict | None = None  # custom Ray resources per actor (RenderConfig.actor_resources)

    def map_options(self) -> dict:
        return {
            "batch_size": self.batch_size,
            "num_gpus": self.num_gpus,
            "num_cpus": self.num_cpus,
            "resources": self.resources,
        }


class CrashLedger:
    """Durable attempt counters for work that may kill its worker (segfault, OOM kill).

    Ray restarts a dead model actor and re-sends its batch without limit; a pair that kills the
    worker every time would loop forever. Before a batch (or, after a death, a single pair) is
    rendered, a counter object under `<output>/state/inflight/<run_id>/` is bumped; it is
    deleted once the work returns. A counter left > 0 means an earlier attempt died: the batch is
    then rendered pair by pair, and a pair already tried MAX_RETRIES times alone is not rendered
    again but fails with `worker_crash`. Kept in the output's storage, so it holds when the
    actor is restarted on another node.
    """

    def __init__(self, output: str, run_id: str):
        self.prefix = Layout(output).inflight_dir(run_id)

    def _uri(self, key: str) -> str:
        return storage.join(self.prefix, hashlib.sha256(key.encode()).hexdigest()[:32])

    def begin(self, key: str) -> int:
        """Record one more attempt at `key`; returns how many earlier attempts died."""
        try:
            earlier = int(storage.read_bytes(self._uri(key)))
        except (FileNotFoundError, ValueError):
            earlier = 0
        storage.write_bytes(self._uri(key), str(earlier + 1).encode())
        return earlier

    def end(self, key: str) -> None:
        storage.delete(self._uri(key))


class RenderStage:
    def __init__(self, config: RenderStageConfig):
        from pipeline.model.renderer import Renderer

        self.config = config
        # 1. the model, once per actor
        self.renderer = Renderer.from_pretrained(
            config.model_uri,
            scheduler=config.scheduler,
            torch_threads=config.torch_threads,
            compile_model=config.compile_model,
            channels_last=config.channels_last,
        )
        # 2. metric extractors beside it, on the same device (METRICS.md: batched, never on the driver)
        self.quality = None
        if config.inception_weights or config.clip_model:
            from pipeline.metrics.extract import QualityExtractor

            self.quality = QualityExtractor(config.inception_weights, config.clip_model, self.renderer.device)
        # 3. worker-death bookkeeping, and the chaos tests' faults when the run asks for them
        self.ledger = CrashLedger(config.output, config.run_id) if config.output and config.run_id else None
        self.inject = None
        if config.fault_injection:
            from pipeline.stages.faults import FaultInjector

            self.inject = FaultInjector(config.fault_injection)

    def __call__(self, batch: pa.Table) -> pa.Table:
        # 1. check columns, pick the rows to render
        require_columns("render", batch)
        n = batch.num_rows
        action, codes = batch["action"].to_pylist(), batch["error_code"].to_pylist()
        todo = [i for i in range(n) if action[i] == RENDER and not codes[i]]
        work = _Work(batch, todo, self.renderer.resolution, self.renderer.product_size)
        # 2. one batched model call (split only on GPU out-of-memory; pair by pair after a death)
        render_ms, ended_at, attempts = [0.0] * n, [None] * n, [1] * n
        if todo:
            start = time.perf_counter()
            self._render_guarded(work, attempts)
            per_pair, ended = (time.perf_counter() - start) * 1000 / len(todo), time.time()
            for i in todo:
                render_ms[i], ended_at[i] = per_pair, ended
        # 3. metric features of the renders, before any lossy encoding
        quality = self._quality(work, n)
        # 4. output: drop the model inputs, add the renders
        messages = batch["error_message"].to_pylist()
        out_bytes: list[bytes] = [b""] * n
        for j, i in enumerate(todo):
            if j in work.errors:
                codes[i], messages[i] = work.errors[j], REASONS[work.errors[j]]
            else:
                out_bytes[i] = work.rendered[j].tobytes()
        columns = {
            "rendered": pa.array(out_bytes, PAYLOAD_TYPE),
            "render_attempts": pa.array(attempts, pa.int64()),
            "render_ms": pa.array(render_ms, pa.float64()),
            "render_ended_at": pa.array(ended_at, pa.float64()),
            "error_code": pa.array(codes, pa.string()),
            "error_message": pa.array(messages, pa.string()),
            "feat_gen": pa.array(quality["feat_gen"], pa.binary()),
            "feat_real": pa.array(quality["feat_real"], pa.binary()),
            "clip_score": pa.array(quality["clip_score"], pa.float64()),
            "clip_floor": pa.array(quality["clip_floor"], pa.float64()),
        }
        return set_columns(batch.drop_columns(list(MODEL_INPUTS)), columns)

    def _render_guarded(self, work: _Work, attempts: list[int]) -> None:
        """The whole batch in one call, under the crash ledger: after a death, pair by pair, and a
        pair whose lone tries already died MAX_RETRIES times fails `worker_crash`."""
        batch_key = "batch:" + "\n".join(work.pair_ids)
        earlier = self.ledger.begin(batch_key) if self.ledger else 0
        if earlier == 0:
            self._render_splitting(work, np.arange(len(work.todo)))
        else:
            log.warning(
                "a worker died on this batch before (%d time(s)): rendering its %d pairs one by one",
                earlier,
                len(work.todo),
            )
            for j, pair_id in enumerate(work.pair_ids):
                tried = self.ledger.begin("pair:" + pair_id)
                # attempts: the batch that died, the lone tries that died, and this one
                if tried >= MAX_RETRIES:
                    work.errors[j], attempts[work.todo[j]] = "worker_crash", 1 + tried
                else:
                    attempts[work.todo[j]] = 2 + tried
                    self._render_splitting(work, np.asarray([j]))
                self.ledger.end("pair:" + pair_id)
        if self.ledger:
            self.ledger.end(batch_key)

    def _render_splitting(self, work: _Work, rows: np.ndarray) -> None:
        """Render `rows`; on GPU out-of-memory split them in halves and retry. A single pair that
        still does not fit is marked `oom`."""
        renderer = self.renderer
        try:
            if self.inject is not None:
                self.inject([work.pair_ids[j] for j in rows])
            context, hole, product, alpha, hint, hint_mask = work.inputs(rows)
            work.rendered[rows] = renderer.render(
                context,
                hole,
                product,
                alpha,
                work.seeds[rows],
                steps=self.config.steps,
                guidance_scale=self.config.guidance_scale,
                hint=hint,
                hint_mask=hint_mask,
            )
        except Exception as e:
            if not renderer.is_out_of_memory(e):
                raise
            renderer.free_memory()
            if len(rows) == 1:
                work.errors[int(rows[0])] = "oom"
                return
            log.warning("GPU out of memory on a batch of %d: splitting", len(rows))
            half = len(rows) // 2
            self._render_splitting(work, rows[:half])
            self._render_splitting(work, rows[half:])

    def _quality(self, work: _Work, n: int) -> dict[str, list]:
        quality = {c: [None] * n for c in ("feat_gen", "feat_real", "clip_score", "clip_floor")}
        done = np.asarray([j for j in range(len(work.todo)) if j not in work.errors], dtype=np.int64)
        if self.quality is None or not len(done):
            return quality
        context, hole, product, *_ = work.inputs(done)
        for column, values in self.quality(work.rendered[done], context, hole, product).items():
            for j, value in zip(done, values):
                quality[column][work.todo[j]] = value
        return quality


class _Work:
    """The rows of one block to render: their payloads, seeds, renders and errors."""

    def __init__(self, batch: pa.Table, todo: list[int], resolution: int, product_size: int):
        self.todo = todo
        self.pair_ids = [batch["pair_id"][i].as_py() for i in todo]
        self.payloads = {c: [batch[c][i].as_py() for i in todo] for c in MODEL_INPUTS}
        self.seeds = np.asarray([batch["seed"][i].as_py() for i in todo], dtype=np.int64)
        r, s = resolution, product_size
        self.shapes = {
            "model_context": (r, r, 3),
            "model_hole": (r, r),
            "model_product": (s, s, 3),
            "model_product_alpha": (s, s),
            "model_hint": (r, r, 3),
            "model_hint_mask": (r, r),
        }
        self.rendered = np.zeros((len(todo), r, r, 3), dtype=np.uint8)
        self.errors: dict[int, str] = {}  # position in todo -> error code

    def inputs(self, rows: np.ndarray) -> list[np.ndarray]:
        """context, hole (bool), product, product alpha (bool), hint, hint mask (bool) of `rows`,
        stacked (MODEL_INPUTS' order)."""
        stacked = []
        for c in MODEL_INPUTS:
            array = np.stack(
                [np.frombuffer(self.payloads[c][j], dtype=np.uint8).reshape(self.shapes[c]) for j in rows]
            )
            stacked.append(
                array.view(bool) if c in ("model_hole", "model_product_alpha", "model_hint_mask") else array
            )
        return stacked
