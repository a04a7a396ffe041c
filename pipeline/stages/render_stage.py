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
steady-state throughput runs on this clock), the metric features, and the identity columns:
`identity_score` (the model's own image encoder on the rendered region vs the product,
`model.identity`) and, with `variants` > 1, `variant_seeds`, `variant_scores`, `chosen_variant`
(and with `keep_variants` the other renders in `variant_renders`). A pair's N variants ride in
the block's one model call (N*B pairs, 2*N*B UNet rows with CFG), each with its own seed
(`rows.variant_seeds`); the best by `select` becomes `rendered`. A pair that does not
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
from pipeline.config import RENDER_DEFAULTS
from pipeline.output.layout import Layout
from pipeline.payload import MODEL_INPUTS, PAYLOAD_TYPE, RENDERED, SPECS, VARIANT_RENDERS, Sizes
from pipeline.rows import VariantRows
from pipeline.schema import RENDER, require_columns, set_columns
from pipeline.stages.prepare_stage import PrepareConfig, step_columns
from pipeline.stages.scene_stage import SCENE_REST, unroll

__all__ = ["RenderStageConfig", "SceneSteps", "RenderStage", "CrashLedger", "unrendered"]

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
    steps: int = RENDER_DEFAULTS.steps  # denoising steps
    guidance_scale: float = RENDER_DEFAULTS.guidance_scale  # classifier-free guidance
    scheduler: str = RENDER_DEFAULTS.scheduler  # ddim | dpmpp
    output: str | None = None  # with run_id: the crash ledger's home (None: no ledger)
    run_id: str | None = None
    inception_weights: str | None = None  # FID/KID features (None: none)
    clip_model: str | None = None  # CLIP region score (None: none)
    torch_threads: int | None = None  # CPU rendering: Ray gives a fractional-CPU actor 1 thread
    compile_model: bool = RENDER_DEFAULTS.compile  # torch.compile the UNet and hint encoder
    channels_last: bool = RENDER_DEFAULTS.channels_last  # NHWC convolutions
    fault_injection: dict | None = None  # chaos tests only: see stages.faults
    batch_size: int = RENDER_DEFAULTS.batch_size  # pairs per model call
    num_gpus: float = 0.0  # per actor
    num_cpus: float = RENDER_DEFAULTS.cpus_per_actor  # per actor
    resources: dict | None = None  # custom Ray resources per actor (RenderConfig.actor_resources)
    variants: int = RENDER_DEFAULTS.variants  # renders per pair (seeds: rows.variant_seeds); the best is kept
    select: str = RENDER_DEFAULTS.select  # how the best is chosen: identity (model.identity) | clip (needs clip_model)
    keep_variants: bool = RENDER_DEFAULTS.keep_variants  # pass every render on (variant_renders) for variants/
    scenes: SceneSteps | None = None  # a manifest with scenes: how later steps are cut and pasted

    def map_options(self) -> dict:
        return {
            "batch_size": self.batch_size,
            "num_gpus": self.num_gpus,
            "num_cpus": self.num_cpus,
            "resources": self.resources,
        }


@dataclass(frozen=True)
class SceneSteps:
    """What the actor needs to render a scene's later steps into the earlier ones' pixels."""

    prepare: PrepareConfig  # the cut of a step's model inputs, as the prepare stage makes it
    feather_px: int  # the paste-back between steps, as the finish stage pastes


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


def unrendered(batch: pa.Table) -> pa.Table:
    """A block none of whose rows is to render (reused, carried, failed before the model), as
    `RenderStage` returns it, without a model: a run with nothing to render (`pipeline.run`)."""
    n, none = batch.num_rows, [None] * batch.num_rows
    return set_columns(
        batch.drop_columns([c for c in MODEL_INPUTS if c in batch.column_names]),
        {
            RENDERED.name: pa.array([b""] * n, PAYLOAD_TYPE),
            VARIANT_RENDERS.name: pa.array(none, PAYLOAD_TYPE),
            "render_attempts": pa.array([1] * n, pa.int64()),
            "render_ms": pa.array([0.0] * n, pa.float64()),
            "render_ended_at": pa.array(none, pa.float64()),
            "identity_score": pa.array(none, pa.float64()),
            "variant_seeds": pa.array(none, pa.list_(pa.int64())),
            "variant_scores": pa.array(none, pa.list_(pa.float64())),
            "chosen_variant": pa.array(none, pa.int64()),
            "feat_gen": pa.array(none, pa.binary()),
            "feat_real": pa.array(none, pa.binary()),
            "clip_score": pa.array(none, pa.float64()),
            "clip_floor": pa.array(none, pa.float64()),
        },
    )


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
        require_columns("render", batch)
        out = self._render_block(batch)
        if self.config.scenes is not None and SCENE_REST in batch.column_names:
            # scenes' later steps, a model call per step for every scene of the block
            scenes = self.config.scenes
            out = unroll(out, self._render_block, self._cut, scenes.feather_px, scenes.prepare.resolution)
        return out

    def _cut(self, photo: np.ndarray, product: bytes, mask: bytes | None, bbox) -> dict:
        return step_columns(photo, product, mask, bbox, self.config.scenes.prepare)

    def _render_block(self, batch: pa.Table) -> pa.Table:
        # 1. pick the rows to render
        n = batch.num_rows
        action, codes = batch["action"].to_pylist(), batch["error_code"].to_pylist()
        todo = [i for i in range(n) if action[i] == RENDER and not codes[i]]
        work = _Work(batch, todo, self.renderer.resolution, self.renderer.product_size, self.config.variants)
        # 2. one batched model call, every variant of every pair in it (split only on GPU
        # out-of-memory; pair by pair after a death)
        render_ms, ended_at, attempts = [0.0] * n, [None] * n, [1] * n
        if todo:
            start = time.perf_counter()
            self._render_guarded(work, attempts)
            per_pair, ended = (time.perf_counter() - start) * 1000 / len(todo), time.time()
            for i in todo:
                render_ms[i], ended_at[i] = per_pair, ended
        # 3. score the variants, keep the best
        done = np.asarray([j for j in range(len(todo)) if j not in work.errors], dtype=np.int64)
        identity = self._choose(work, done)
        # 4. metric features of the chosen renders, before any lossy encoding
        quality = self._quality(work, done, n)
        # 5. output: drop the model inputs, add the renders
        return set_columns(
            batch.drop_columns(list(MODEL_INPUTS)),
            self._columns(batch, work, identity, quality, (render_ms, ended_at, attempts, codes)),
        )

    def _columns(self, batch: pa.Table, work: _Work, identity: dict, quality: dict, stats: tuple) -> dict:
        render_ms, ended_at, attempts, codes = stats
        n, many = batch.num_rows, self.config.variants > 1
        messages = batch["error_message"].to_pylist()
        out_bytes: list[memoryview | bytes] = [b""] * n
        kept: list[memoryview | None] = [None] * n
        seeds, scores, chosen = [None] * n, [None] * n, [None] * n
        for j, i in enumerate(work.todo):
            if j in work.errors:
                codes[i], messages[i] = work.errors[j], REASONS[work.errors[j]]
                continue
            out_bytes[i] = RENDERED.pack(work.chosen_render(j))
            if many:
                seeds[i], scores[i], chosen[i] = work.variant_seeds(j), identity["variant_scores"][j], work.chosen[j]
                if self.config.keep_variants:
                    kept[i] = VARIANT_RENDERS.pack(work.rendered[work.layout.rows(j)])
        identity_score = [None] * n
        for j, i in enumerate(work.todo):
            identity_score[i] = identity["identity_score"].get(j)
        return {
            RENDERED.name: pa.array(out_bytes, PAYLOAD_TYPE),
            VARIANT_RENDERS.name: pa.array(kept, PAYLOAD_TYPE),
            "render_attempts": pa.array(attempts, pa.int64()),
            "render_ms": pa.array(render_ms, pa.float64()),
            "render_ended_at": pa.array(ended_at, pa.float64()),
            "error_code": pa.array(codes, pa.string()),
            "error_message": pa.array(messages, pa.string()),
            "identity_score": pa.array(identity_score, pa.float64()),
            "variant_seeds": pa.array(seeds, pa.list_(pa.int64())),
            "variant_scores": pa.array(scores, pa.list_(pa.float64())),
            "chosen_variant": pa.array(chosen, pa.int64()),
            "feat_gen": pa.array(quality["feat_gen"], pa.binary()),
            "feat_real": pa.array(quality["feat_real"], pa.binary()),
            "clip_score": pa.array(quality["clip_score"], pa.float64()),
            "clip_floor": pa.array(quality["clip_floor"], pa.float64()),
        }

    def _choose(self, work: _Work, done: np.ndarray) -> dict:
        """Identity scores of every variant of the rendered pairs (one encoder forward per
        render), the CLIP region score instead with select=clip; the best variant of each pair
        (the first of equals) becomes its render. -> {"identity_score": {j: chosen's score},
        "variant_scores": {j: [the selection's score of each variant]}}."""
        from pipeline.model.identity import best_variants, choose_best  # torch: in the actor only

        out: dict = {"identity_score": {}, "variant_scores": {}}
        if not len(done):
            return out
        n_var = work.variants
        every = work.layout.rows(done)  # render rows of the done pairs
        hole, product = work.inputs(every, ("model_hole", "model_product"))
        chosen, identity = best_variants(self.renderer.identity, work.rendered[every], hole, product[::n_var], n_var)
        selection = identity
        if self.config.select == "clip" and n_var > 1:
            from pipeline.regions import bounding_box

            boxes = [bounding_box(h) for h in hole]
            clip = self.quality.clip.score(list(work.rendered[every]), boxes, list(product))
            selection = clip.reshape(-1, n_var)
            chosen = choose_best(selection)
        for row, j in enumerate(done):
            best = int(chosen[row])
            work.chosen[int(j)] = best
            out["identity_score"][int(j)] = float(identity[row, best])
            out["variant_scores"][int(j)] = [float(v) for v in selection[row]]
        return out

    def _render_guarded(self, work: _Work, attempts: list[int]) -> None:
        """The whole batch in one call, under the crash ledger: after a death, pair by pair, and a
        pair whose lone tries already died MAX_RETRIES times fails `worker_crash`."""
        batch_key = "batch:" + "\n".join(work.pair_ids)
        earlier = self.ledger.begin(batch_key) if self.ledger else 0
        if earlier == 0:
            self._render_splitting(work, np.arange(len(work.layout)))
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
                    self._render_splitting(work, work.layout.rows(j))
                self.ledger.end("pair:" + pair_id)
        if self.ledger:
            self.ledger.end(batch_key)

    def _render_splitting(self, work: _Work, rows: np.ndarray) -> None:
        """Render `rows` (render rows: pair j's variant k is row j*N+k); on GPU out-of-memory
        split them in halves and retry. A single render that still does not fit marks its pair `oom`."""
        renderer = self.renderer
        try:
            if self.inject is not None:
                self.inject(list(dict.fromkeys(work.pair_ids[j] for j in work.layout.pair[rows])))
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
            return
        except Exception as e:
            if not renderer.is_out_of_memory(e):
                raise
        # Out of memory. Freed and retried here, after the except block: while it runs, the
        # error's traceback holds the failed call's frames and their GPU tensors, which neither
        # the cache release nor the halves could then use (PyTorch FAQ, "My out of memory
        # exception handler can't allocate memory").
        renderer.free_memory()
        if len(rows) == 1:
            work.errors[int(work.layout.pair[rows[0]])] = "oom"
            return
        log.warning("GPU out of memory on a batch of %d: splitting", len(rows))
        half = len(rows) // 2
        self._render_splitting(work, rows[:half])
        self._render_splitting(work, rows[half:])

    def _quality(self, work: _Work, done: np.ndarray, n: int) -> dict[str, list]:
        quality = {c: [None] * n for c in ("feat_gen", "feat_real", "clip_score", "clip_floor")}
        if self.quality is None or not len(done):
            return quality
        chosen = np.asarray([work.layout.first[j] + work.chosen[j] for j in done.tolist()], dtype=np.int64)
        context, hole, product, *_ = work.inputs(chosen)
        for column, values in self.quality(work.rendered[chosen], context, hole, product).items():
            for j, value in zip(done, values):
                quality[column][work.todo[j]] = value
        return quality


class _Work:
    """The rows of one block to render: their payloads, seeds, renders and errors. With N
    variants a pair j has N render rows (`rows.VariantRows`), sharing its payloads."""

    def __init__(self, batch: pa.Table, todo: list[int], resolution: int, product_size: int, variants: int = 1):
        self.todo = todo
        self.variants = variants
        self.pair_ids = [batch["pair_id"][i].as_py() for i in todo]
        self.payloads = {c: [batch[c][i].as_py() for i in todo] for c in MODEL_INPUTS}
        self.layout = VariantRows([batch["seed"][i].as_py() for i in todo], [variants] * len(todo))
        self.seeds = self.layout.seeds
        self.sizes = Sizes(resolution, product_size)
        self.rendered = np.zeros((len(self.layout), *RENDERED.shape(self.sizes)), dtype=np.uint8)
        self.errors: dict[int, str] = {}  # pair position in todo -> error code
        self.chosen = [0] * len(todo)  # pair position in todo -> its best variant

    def variant_seeds(self, j: int) -> list[int]:
        return [int(s) for s in self.seeds[self.layout.rows(j)]]

    def chosen_render(self, j: int) -> np.ndarray:
        return self.rendered[self.layout.first[j] + self.chosen[j]]

    def inputs(self, rows: np.ndarray, columns: tuple[str, ...] = MODEL_INPUTS) -> list[np.ndarray]:
        """context, hole (bool), product, product alpha (bool), hint, hint mask (bool) of render
        `rows`, stacked (MODEL_INPUTS' order; or just `columns`). Render rows of one pair share
        its payload: each pair is decoded once and repeated."""
        pairs, index = np.unique(self.layout.pair[np.asarray(rows)], return_inverse=True)
        return [np.stack([SPECS[c].unpack(self.payloads[c][j], self.sizes) for j in pairs])[index] for c in columns]
