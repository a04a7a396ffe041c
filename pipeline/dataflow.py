"""The Ray Data graph of a render run: the one module that knows about `map_batches`.

    manifest files ─▶ read + validate + resume ─▶ fetch/decode/preprocess ─▶ DTC (actor pool)
        ─▶ paste back/encode/write image ─▶ rows to the driver's ManifestWriter

Every input row flows through every stage exactly once, as data: rows that fail early, or
that are carried over from an earlier run, pass the later stages untouched (payloads empty).
Blocks hold raw uint8 bytes, never PIL objects, in pyarrow Tables (see `pipeline.blocks`).

Ray fuses the CPU stage into the model actor when both ask for the same resources (a CPU-only
cluster with `cpus_per_actor == cpu_stage_cpus`); the defaults differ, and a GPU actor never
fuses, so fetch/decode/preprocess overlap with the model instead of running inside it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa

import ray
from pipeline import manifest as manifest_mod
from pipeline.config import RenderConfig
from pipeline.fetch import InputPolicy
from pipeline.postprocess import finish_batch
from pipeline.prepare import prepare_batch
from pipeline.render import DTCRenderer
from pipeline.resume import StateIndex, planned_batches

__all__ = ["RunContext", "build_dataset"]


@dataclass(frozen=True)
class RunContext:
    """What the stages need to know about this run (small, picklable)."""

    run_id: str
    output: str
    model_digest: str
    settings_digest: str
    resolution: int
    product_size: int
    gpus_per_actor: float
    inception_weights: str | None = None  # None: no FID/KID features
    clip_model: str | None = None  # None: no CLIP scores


_STATE_INDEXES: dict[str, StateIndex] = {}


def _read_manifest_file(
    files: dict, *, plan: manifest_mod.ManifestPlan, duplicates_ref, state_ref, batch_rows: int
) -> Iterator[pa.Table]:
    """One manifest file -> validated batches with their resume action (a generator UDF)."""
    duplicates = ray.get(duplicates_ref[0]) if duplicates_ref else set()
    state_index = None
    if state_ref:
        key = state_ref[0].hex()
        if key not in _STATE_INDEXES:  # once per worker process, not per file or batch
            _STATE_INDEXES.clear()
            _STATE_INDEXES[key] = StateIndex(ray.get(state_ref[0]))
        state_index = _STATE_INDEXES[key]
    for i in files["file_index"]:
        yield from planned_batches(plan, int(i), duplicates, state_index, batch_rows)


def build_dataset(
    cfg: RenderConfig, plan: manifest_mod.ManifestPlan, ctx: RunContext, duplicates: set[str], state: pa.Table | None
) -> ray.data.Dataset:
    # Object refs travel inside a list: Ray resolves only top-level ones, and each read task
    # should fetch the (possibly large) state once from the object store, not pickle it.
    state_ref = [ray.put(state)] if state is not None and state.num_rows else []
    duplicates_ref = [ray.put(duplicates)] if duplicates else []
    read_rows = max(64, 4 * cfg.batch_size)

    files = ray.data.from_items([{"file_index": i} for i in range(len(plan.files))], override_num_blocks=len(plan.files))
    rows = files.map_batches(
        _read_manifest_file,
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=cfg.cpu_stage_cpus,
        fn_kwargs=dict(plan=plan, duplicates_ref=duplicates_ref, state_ref=state_ref, batch_rows=read_rows),
    )
    if cfg.limit is not None:
        rows = rows.limit(cfg.limit)
    # One block per model batch: Ray merges a task's outputs into blocks of up to 128 MiB, so a
    # whole manifest file would otherwise reach the model, and the driver, as one block; rows
    # would then be written (and a killed run would keep its work) only at the very end.
    rows = rows.repartition(target_num_rows_per_block=cfg.batch_size)

    policy = InputPolicy(manifest_dir=plan.base_dir, allow_roots=tuple(cfg.allow_root), allow_http=cfg.allow_http)
    prepared = rows.map_batches(
        prepare_batch,
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        num_cpus=cfg.cpu_stage_cpus,
        fn_kwargs=dict(
            policy=policy, resolution=ctx.resolution, product_size=ctx.product_size,
            max_pixels=cfg.max_pixels, crop_margin=cfg.crop_margin,
        ),
    )
    rendered = prepared.map_batches(
        DTCRenderer,
        compute=ray.data.ActorPoolStrategy(min_size=cfg.actors[0], max_size=cfg.actors[1]),
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        num_gpus=ctx.gpus_per_actor,
        num_cpus=cfg.cpus_per_actor,
        fn_constructor_kwargs=dict(
            model_uri=cfg.model, steps=cfg.steps, guidance_scale=cfg.guidance_scale,
            scheduler=cfg.scheduler, torch_threads=cfg.torch_threads,
            compile_model=cfg.compile, channels_last=cfg.channels_last,
            inception_weights=ctx.inception_weights, clip_model=ctx.clip_model,
            output=ctx.output, run_id=ctx.run_id, fault=cfg.fault_injection,
        ),
    )
    return rendered.map_batches(
        finish_batch,
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        num_cpus=cfg.cpu_stage_cpus,
        fn_kwargs=dict(
            output=ctx.output, image_format=cfg.image_format, quality=cfg.jpeg_quality, feather_px=cfg.feather_px,
            resolution=ctx.resolution, run_id=ctx.run_id, model_digest=ctx.model_digest,
            settings_digest=ctx.settings_digest, steps=cfg.steps, guidance_scale=cfg.guidance_scale, scheduler=cfg.scheduler,
        ),
    )
