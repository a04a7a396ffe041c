"""The Ray Data graph of a render run (the done index's own fold is `output/state.compact_state`).

    manifest files ─▶ read_stage ─▶ (group by state bucket) resume_stage ─▶ prepare_stage
                  ─▶ render_stage (actor pool) ─▶ finish_stage ─▶ driver

`read_stage` reads rows and tags them with their pair's state bucket, `resume_stage` validates
them and decides render | reuse one bucket at a time (all rows of a pair_id meet there, with
the one state file that can hold it), a manifest with scenes is grouped once more by scene
(`scene_stage.plan_scene`: a scene's steps checked, chained and packed into one row),
`prepare_stage` fetches, decodes and cuts the model
inputs, `render_stage` runs DTC (and the metric extractors), `finish_stage`
pastes back, encodes and writes the image. Every input row flows through every stage exactly
once, as data: rows that fail early, or that are carried over from an earlier run, pass the
later stages untouched (payloads empty). Each stage's config gives its own resources.

Ray fuses the prepare stage into the model actor when both ask for the same resources (a
CPU-only cluster with `cpus_per_actor == cpu_stage_cpus`); the defaults differ, and a GPU
actor never fuses, so fetch/decode/preprocess overlap with the model instead of running
inside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.config import RunSpec
from pipeline.fetch import InputPolicy
from pipeline.schema import BUCKET, RENDER
from pipeline.stages.finish_stage import FinishConfig, finish_batch
from pipeline.stages.prepare_stage import PrepareConfig, prepare_batch
from pipeline.stages.read_stage import ReadConfig, read_files
from pipeline.stages.render_stage import RenderStage, RenderStageConfig, SceneSteps
from pipeline.stages.resume_stage import ResumeConfig, resume_bucket
from pipeline.stages.scene_stage import GROUP, SceneConfig, plan_scene

__all__ = [
    "RAY_STEP_CPUS",
    "ResourcePlan",
    "has_scenes",
    "stage_configs",
    "resource_plan",
    "resumed_rows",
    "planned_rows",
    "needs_model",
    "build_dataset",
]

# The steps Ray Data adds between the stages take no resource arguments: the group-by's hash
# shuffle (map and reduce tasks) and `repartition` run tasks of Ray's default for a map task, 1 CPU
# each. With less than that free beside the model actors, the stream waits forever at the shuffle.
RAY_STEP_CPUS = 1.0


@dataclass(frozen=True)
class ResourcePlan:
    """What the graph asks of Ray (`pipeline.capacity` checks it against the cluster's nodes)."""

    actor: dict[str, float]  # one model actor: CPU, GPU and custom resources (amounts > 0 only)
    min_actors: int  # the pool's minimum: Ray Data starts them all before the first block
    tasks: dict[str, dict[str, float]]  # one task of each task step, by step name (graph order)


def has_scenes(spec: RunSpec) -> bool:
    """A manifest with a scene_id column gets the scene group-by (`stages.scene_stage`)."""
    return "scene_id" in spec.plan.schema.names


def stage_configs(
    spec: RunSpec, gpus_per_actor: float
) -> tuple[ReadConfig, ResumeConfig, PrepareConfig, RenderStageConfig, FinishConfig]:
    """Each stage's config, from the run's spec (the one place settings are handed to stages)."""
    cfg, cpus, scenes = spec.cfg, spec.cfg.cpu_stage_cpus, has_scenes(spec)
    read = ReadConfig(spec.plan, num_cpus=cpus)
    resume = ResumeConfig(
        spec.plan,
        spec.output,
        spec.model_digest,
        spec.settings_digest,
        force=cfg.force,
        retry_failed=cfg.retry_failed,
        verify_images=cfg.verify_images,
        verify_inputs=cfg.verify_inputs,
        scenes=scenes,
        num_cpus=cpus,
    )
    prepare = PrepareConfig(
        InputPolicy(manifest_dir=spec.plan.base_dir, allow_roots=tuple(cfg.allow_root), allow_http=cfg.allow_http),
        resolution=spec.resolution,
        product_size=spec.product_size,
        max_pixels=cfg.max_pixels,
        crop_margin=cfg.crop_margin,
        num_cpus=cpus,
        batch_size=cfg.batch_size,
    )
    render = RenderStageConfig(
        cfg.model,
        steps=cfg.steps,
        guidance_scale=cfg.guidance_scale,
        scheduler=cfg.scheduler,
        output=spec.output,
        run_id=spec.run_id,
        inception_weights=cfg.inception_weights if spec.with_metrics else None,
        # the CLIP region score also chooses variants with --select clip
        clip_model=cfg.clip_model if spec.with_metrics or (cfg.select == "clip" and cfg.variants > 1) else None,
        torch_threads=cfg.torch_threads,
        compile_model=cfg.compile,
        channels_last=cfg.channels_last,
        fault_injection=cfg.fault_injection,
        batch_size=cfg.batch_size,
        num_gpus=gpus_per_actor,
        num_cpus=cfg.cpus_per_actor,
        resources=cfg.actor_resources,
        variants=cfg.variants,
        select=cfg.select,
        keep_variants=cfg.keep_variants,
        scenes=SceneSteps(prepare, cfg.feather_px) if scenes else None,
    )
    finish = FinishConfig(
        spec.output,
        spec.run_id,
        spec.model_digest,
        spec.settings_digest,
        spec.resolution,
        steps=cfg.steps,
        guidance_scale=cfg.guidance_scale,
        scheduler=cfg.scheduler,
        image_format=cfg.image_format,
        quality=cfg.jpeg_quality,
        feather_px=cfg.feather_px,
        min_identity_score=cfg.min_identity_score,
        num_cpus=cpus,
        batch_size=cfg.batch_size,
    )
    return read, resume, prepare, render, finish


def resource_plan(spec: RunSpec, gpus_per_actor: float) -> ResourcePlan:
    """The resources of the graph `build_dataset` builds, from each stage's own `map_options`."""
    read, resume, prepare, render, finish = stage_configs(spec, gpus_per_actor)
    tasks = {"read": _bundle(read.map_options()), "resume": _bundle(resume.map_options())}
    tasks["hash shuffle"] = tasks["repartition"] = {"CPU": RAY_STEP_CPUS}
    if has_scenes(spec):
        tasks["scenes"] = _bundle(_scene_config(spec).map_options())
    tasks |= {"prepare": _bundle(prepare.map_options()), "finish": _bundle(finish.map_options())}
    return ResourcePlan(_bundle(render.map_options()), spec.cfg.actors[0], tasks)


def _bundle(options: dict) -> dict[str, float]:
    """A stage's `map_options` as Ray resource names; a task that names no CPUs gets Ray's 1."""
    cpus = options.get("num_cpus")
    bundle = {"CPU": RAY_STEP_CPUS if cpus is None else cpus, "GPU": options.get("num_gpus") or 0}
    bundle |= options.get("resources") or {}
    return {name: float(amount) for name, amount in bundle.items() if amount}


def resumed_rows(spec: RunSpec, read: ReadConfig, resume: ResumeConfig) -> ray.data.Dataset:
    """Every row of the run (`--limit` applied), validated, with its action: the dataset up to
    the resume stage (bench/scale.py measures it alone)."""
    files = ray.data.from_items(
        [{"file_index": i} for i in range(len(spec.plan.files))], override_num_blocks=len(spec.plan.files)
    )
    rows = files.map_batches(read_files, batch_format="pyarrow", fn_kwargs=dict(config=read), **read.map_options())
    total = spec.plan.num_rows
    if spec.cfg.limit is not None:
        rows, total = rows.limit(spec.cfg.limit), min(total, spec.cfg.limit)
    return rows.groupby(BUCKET, num_partitions=resume.partitions(total)).map_groups(
        resume_bucket, batch_format="pyarrow", fn_kwargs=dict(config=resume), **resume.map_options()
    )


def planned_rows(spec: RunSpec) -> pa.Table:
    """What `resumed_rows` and the scene plan make of the run's rows, computed in this process
    with the same stage functions (a small manifest: `RenderConfig.driver_plan_rows`), so that
    a run learns whether any row needs the model before it starts Ray or one."""
    read, resume, *_ = stage_configs(spec, 0.0)
    files = pa.table({"file_index": list(range(len(spec.plan.files)))})
    rows = pa.concat_tables(list(read_files(files, config=read)))
    if spec.cfg.limit is not None:
        rows = rows.slice(0, spec.cfg.limit)
    if rows.num_rows == 0:
        return rows
    rows = _each_group(rows, BUCKET, lambda group: resume_bucket(group, config=resume))
    if has_scenes(spec):
        scenes = _scene_config(spec)
        rows = _each_group(rows, GROUP, lambda group: plan_scene(group, config=scenes))
    return rows


def _each_group(rows: pa.Table, key: str, fn) -> pa.Table:
    """`groupby(key).map_groups(fn)` in this process."""
    return pa.concat_tables([fn(rows.filter(pc.equal(rows[key], value))) for value in pc.unique(rows[key])])


def needs_model(rows: pa.Table) -> bool:
    """Any row to render (not reused or carried, not failed before the model)."""
    if rows.num_rows == 0:  # --limit 0
        return False
    to_render = pc.and_(pc.equal(rows["action"], RENDER), pc.equal(rows["error_code"].fill_null(""), ""))
    return pc.any(to_render).as_py()


def _scene_config(spec: RunSpec) -> SceneConfig:
    return SceneConfig(spec.output, max_scene_steps=spec.cfg.max_scene_steps, num_cpus=spec.cfg.cpu_stage_cpus)


def build_dataset(spec: RunSpec, gpus_per_actor: float, planned: pa.Table | None = None) -> ray.data.Dataset:
    """The graph; `planned` (`planned_rows`, a small manifest's rows already resumed in the
    driver) replaces the read, the resume group-by and the scene group-by: their hash shuffles
    cost a small run more than its rendering (bench/noop.py, `cluster resume alone`)."""
    read, resume, prepare, render, finish = stage_configs(spec, gpus_per_actor)
    if planned is not None:
        # from_blocks computes the block's metadata here; from_arrow asks a remote task for it,
        # which waits forever for a CPU on a full cluster, before the stall watchdog starts
        rows = ray.data.from_blocks([planned])
    else:
        rows = resumed_rows(spec, read, resume)
    if planned is None and has_scenes(spec):  # all rows of a scene meet, whatever files they sit in, and travel as one
        scenes = _scene_config(spec)
        total = spec.plan.num_rows if spec.cfg.limit is None else min(spec.plan.num_rows, spec.cfg.limit)
        rows = rows.groupby(GROUP, num_partitions=resume.partitions(total)).map_groups(
            plan_scene, batch_format="pyarrow", fn_kwargs=dict(config=scenes), **scenes.map_options()
        )
    # One block per model batch: Ray merges a task's outputs into blocks of up to 128 MiB, so a
    # whole manifest file would otherwise reach the model, and the driver, as one block; rows
    # would then be written (and a killed run would keep its work) only at the very end.
    rows = rows.repartition(target_num_rows_per_block=spec.cfg.batch_size)
    prepared = rows.map_batches(
        prepare_batch, batch_format="pyarrow", fn_kwargs=dict(config=prepare), **prepare.map_options()
    )
    lo, hi = spec.cfg.actors
    rendered = prepared.map_batches(
        RenderStage,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
        fn_constructor_kwargs=dict(config=render),
        **render.map_options(),
    )
    return rendered.map_batches(
        finish_batch, batch_format="pyarrow", fn_kwargs=dict(config=finish), **finish.map_options()
    )
