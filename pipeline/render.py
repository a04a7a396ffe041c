"""The GPU stage: batches of preprocessed pairs in, rendered crops out.

`DTCRenderer` is a callable class for `map_batches` in an actor pool: the model loads once
per actor in `__init__`, and `__call__` renders every renderable row of a batch in one
pipeline call (one UNet call of 2B per step with CFG). It runs on a hand-built batch without
Ray, which is how the tests use it too.

Input columns (from `pipeline.prepare`): raw uint8 bytes `model_context` (R*R*3),
`model_hole` (R*R), `model_product` (S*S*3), `model_product_alpha` (S*S), plus `seed`,
`error_code` and `action` ("render" rows without an error are rendered; the rest pass
through untouched). Output: the same batch without the `model_*` inputs, plus `rendered`
(R*R*3 raw uint8 bytes, empty for rows not rendered), `render_ms`, and `render_ended_at` (when
the row's model call ended, epoch seconds: the sink's steady-state throughput runs on this
clock); a pair that does not fit in GPU memory even alone gets `error_code="oom"`.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import pyarrow as pa

from pipeline.blocks import PAYLOAD_TYPE, set_columns

__all__ = ["DTCRenderer", "REQUIRED_COLUMNS"]

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("model_context", "model_hole", "model_product", "model_product_alpha", "seed", "error_code", "error_message", "action")
MODEL_INPUTS = ("model_context", "model_hole", "model_product", "model_product_alpha")
MAX_RETRIES = 2  # a pair whose rendering kills its worker is retried at most twice, then fails


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
        from pipeline import storage

        self.storage = storage
        self.prefix = storage.join(output, "state", "inflight", run_id)

    def _uri(self, key: str) -> str:
        import hashlib

        return self.storage.join(self.prefix, hashlib.sha256(key.encode()).hexdigest()[:32])

    def begin(self, key: str) -> int:
        """Record one more attempt at `key`; returns how many earlier attempts died."""
        try:
            earlier = int(self.storage.read_bytes(self._uri(key)))
        except (FileNotFoundError, ValueError):
            earlier = 0
        self.storage.write_bytes(self._uri(key), str(earlier + 1).encode())
        return earlier

    def end(self, key: str) -> None:
        self.storage.delete(self._uri(key))


class DTCRenderer:
    def __init__(
        self,
        model_uri: str,
        steps: int = 40,
        guidance_scale: float = 5.0,
        scheduler: str = "ddim",
        device: str | None = None,
        torch_threads: int | None = None,
        inception_weights: str | None = None,
        clip_model: str | None = None,
        output: str | None = None,
        run_id: str | None = None,
        fault: dict | None = None,
        compile_model: bool = False,
        channels_last: bool = False,
    ):
        """`output`/`run_id` enable the crash ledger (the render job); `fault` injects faults
        for chaos tests only: {"crash_on_pair": id, "crash_once_marker": path, "oom_over": n,
        "oom_pair": id} (see `_inject`). `compile_model` / `channels_last`: the GPU speed
        options of `pipeline.model.loading.optimize_pipeline`."""
        import torch

        from pipeline.model.loading import load_pipeline

        # 1. device and threads: Ray gives a fractional-CPU actor OMP_NUM_THREADS=1
        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if torch_threads:
            torch.set_num_threads(torch_threads)
        # 2. the model, once per actor
        self.pipe = load_pipeline(model_uri, device=self.device, scheduler=scheduler)
        if compile_model or channels_last:
            from pipeline.model.loading import optimize_pipeline

            optimize_pipeline(self.pipe, compile_model=compile_model, channels_last=channels_last)
        # 3. metric extractors beside the model, on the same device (METRICS.md: batched, never per row on the driver)
        self.quality = None
        if inception_weights or clip_model:
            from pipeline.quality import QualityExtractor

            self.quality = QualityExtractor(inception_weights, clip_model, self.device)
        self.steps, self.guidance_scale = steps, guidance_scale
        self.resolution = self.pipe.config.resolution
        self.model_calls = 0  # for tests and logs: how many pipeline calls this actor made
        self.ledger = CrashLedger(output, run_id) if output and run_id else None
        self.fault = fault or {}
        log.info("DTC renderer ready on %s (pid %d, %d torch threads)", self.device, os.getpid(), torch.get_num_threads())

    def render(self, context: np.ndarray, hole: np.ndarray, product: np.ndarray, alpha: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """One pipeline call on a batch of model-size uint8 inputs -> uint8 (B, R, R, 3)."""
        torch = self.torch
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.model_calls += 1
        return self.pipe(
            image=torch.from_numpy(np.ascontiguousarray(context)),
            mask_image=torch.from_numpy(np.ascontiguousarray(hole)).bool(),
            product_image=torch.from_numpy(np.ascontiguousarray(product)),
            product_alpha=torch.from_numpy(np.ascontiguousarray(alpha)).bool(),
            num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale,
            generator=generators,
            output_type="uint8",
        ).images

    def _inputs(self, payloads: dict[str, list[bytes]], rows: np.ndarray) -> list[np.ndarray]:
        r, s = self.resolution, self.pipe.config.product_size
        shapes = {"model_context": (r, r, 3), "model_hole": (r, r), "model_product": (s, s, 3), "model_product_alpha": (s, s)}
        return [
            np.stack([np.frombuffer(payloads[c][i], dtype=np.uint8).reshape(shapes[c]) for i in rows]) for c in MODEL_INPUTS
        ]

    def _inject(self, pair_ids: list[str]) -> None:
        """Chaos-test faults (never set in production): a worker death or a GPU OOM."""
        if self.fault.get("crash_on_pair") in pair_ids:
            marker = self.fault.get("crash_once_marker")
            if marker is None or not os.path.exists(marker):
                if marker:
                    open(marker, "w").close()
                os._exit(1)  # as a segfault would: no exception, no cleanup
        too_many = self.fault.get("oom_over") is not None and len(pair_ids) > self.fault["oom_over"]
        if too_many or self.fault.get("oom_pair") in pair_ids:
            raise self.torch.OutOfMemoryError("injected: CUDA out of memory")

    def _render_splitting(self, rows: np.ndarray, payloads: dict, seeds: np.ndarray, out: np.ndarray, errors: dict[int, str]) -> None:
        """Render `rows`; on GPU out-of-memory split the batch in halves and retry.
        A single pair that still does not fit is marked `oom`."""
        try:
            if self.fault:
                self._inject([payloads["pair_id"][i] for i in rows])
            out[rows] = self.render(*self._inputs(payloads, rows), seeds[rows])
        except self.torch.OutOfMemoryError:
            if self.device.startswith("cuda"):
                self.torch.cuda.empty_cache()
            if len(rows) == 1:
                errors[int(rows[0])] = "oom"
                return
            log.warning("GPU out of memory on a batch of %d: splitting", len(rows))
            half = len(rows) // 2
            self._render_splitting(rows[:half], payloads, seeds, out, errors)
            self._render_splitting(rows[half:], payloads, seeds, out, errors)

    def __call__(self, batch: pa.Table) -> pa.Table:
        # 1. check columns
        missing = [c for c in REQUIRED_COLUMNS if c not in batch.column_names]
        if missing:
            raise KeyError(f"DTCRenderer: batch lacks columns {missing}")
        n = batch.num_rows
        # 2. pick the rows to render
        action, codes = batch["action"].to_pylist(), batch["error_code"].to_pylist()
        todo = [i for i in range(n) if action[i] == "render" and not codes[i]]
        payloads = {c: [batch[c][i].as_py() for i in todo] for c in (*MODEL_INPUTS, "pair_id")}
        seeds = np.asarray([batch["seed"][i].as_py() for i in todo], dtype=np.int64)
        rendered = np.zeros((len(todo), self.resolution, self.resolution, 3), dtype=np.uint8)
        errors: dict[int, str] = {}
        render_ms = [0.0] * n
        ended_at: list[float | None] = [None] * n
        attempts = [1] * n
        # 3. one batched model call (split only on GPU out-of-memory; pair by pair after a death)
        if todo:
            start = time.perf_counter()
            batch_key = "batch:" + "\n".join(payloads["pair_id"])
            earlier = self.ledger.begin(batch_key) if self.ledger else 0
            if earlier == 0:
                self._render_splitting(np.arange(len(todo)), payloads, seeds, rendered, errors)
            else:
                log.warning("a worker died on this batch before (%d time(s)): rendering its %d pairs one by one", earlier, len(todo))
                for j, pair_id in enumerate(payloads["pair_id"]):
                    tried = self.ledger.begin("pair:" + pair_id)
                    # attempts: the batch that died, the lone tries that died, and this one
                    if tried >= MAX_RETRIES:
                        errors[j], attempts[todo[j]] = "worker_crash", 1 + tried
                    else:
                        attempts[todo[j]] = 2 + tried
                        self._render_splitting(np.asarray([j]), payloads, seeds, rendered, errors)
                    self.ledger.end("pair:" + pair_id)
            if self.ledger:
                self.ledger.end(batch_key)
            per_pair, ended = (time.perf_counter() - start) * 1000 / len(todo), time.time()
            for i in todo:
                render_ms[i], ended_at[i] = per_pair, ended
        # 4. metric features of the renders, before any lossy encoding
        done = [j for j in range(len(todo)) if j not in errors]
        quality = {c: [None] * n for c in ("feat_gen", "feat_real", "clip_score", "clip_floor")}
        if self.quality is not None and done:
            context, hole, product, _ = self._inputs(payloads, np.asarray(done))
            for column, values in self.quality(rendered[done], context, hole, product).items():
                for j, value in zip(done, values):
                    quality[column][todo[j]] = value
        # 5. output: drop the model inputs, add the renders
        out_bytes: list[bytes] = [b""] * n
        messages = batch["error_message"].to_pylist()
        reasons = {
            "oom": "the pair does not fit in GPU memory even alone",
            "worker_crash": f"rendering this pair killed its worker {MAX_RETRIES + 1} times (segfault or out-of-memory kill)",
        }
        for j, i in enumerate(todo):
            if j in errors:
                codes[i], messages[i] = errors[j], reasons[errors[j]]
            else:
                out_bytes[i] = rendered[j].tobytes()
        batch = batch.drop_columns(list(MODEL_INPUTS))
        return set_columns(
            batch,
            {
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
            },
        )
