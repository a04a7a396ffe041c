"""Each stage of the Ray Data graph on hand-built pyarrow tables, without Ray: read, resume,
prepare, render (the tiny DTC), finish; and the one error a stage raises when a block lacks a
column. (Ray's group-by between read and resume is stood in for by `resumed`: a filter per bucket.)"""

from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import png
from PIL import Image

from pipeline import storage
from pipeline.fetch import InputPolicy
from pipeline.manifest import PairIdConflicts, plan_manifest
from pipeline.output.layout import Layout
from pipeline.output.state import bucket_of, load_state
from pipeline.payload import MODEL_INPUTS
from pipeline.resume import StateIndex
from pipeline.sample_catalog import product, scene
from pipeline.schema import (
    BUCKET,
    CARRIED_COLUMNS,
    FILE_INDEX,
    PREV,
    STAGES,
    MissingColumns,
    output_schema,
    state_schema,
)
from pipeline.stages.finish_stage import FinishConfig, finish_batch
from pipeline.stages.prepare_stage import PrepareConfig, prepare_batch
from pipeline.stages.read_stage import ReadConfig, planned_batches, read_files
from pipeline.stages.render_stage import RenderStage, RenderStageConfig
from pipeline.stages.resume_stage import ResumeConfig, resume_bucket

RESOLUTION, PRODUCT_SIZE = 128, 224  # the tiny preset's sizes (tests/unit/test_model.py checks them)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> str:
    """Three pairs: a bbox row, a mask row, and one whose photo is missing; plus a bad pair_id."""
    folder = tmp_path_factory.mktemp("stage-catalog")
    rng = np.random.default_rng(3)
    (folder / "context.png").write_bytes(png(scene(120, 90, rng)))
    (folder / "product.png").write_bytes(png(product(64, rng)))
    mask = np.zeros((90, 120), np.uint8)
    mask[20:70, 30:90] = 255
    (folder / "mask.png").write_bytes(png(mask))
    table = pa.table(
        {
            "pair_id": ["box", "mask", "gone", "bad/id"],
            "context_uri": ["context.png", "context.png", "missing.png", "context.png"],
            "product_uri": ["product.png"] * 4,
            "mask_uri": [None, "mask.png", None, None],
            "bbox": [[10.0, 10.0, 70.0, 60.0], None, [10.0, 10.0, 70.0, 60.0], [10.0, 10.0, 70.0, 60.0]],
            "sku": ["s1", "s2", "s3", "s4"],  # a pass-through column
        }
    )
    pq.write_table(table, folder / "manifest.parquet")
    return str(folder / "manifest.parquet")


def resumed(plan, config: ResumeConfig) -> pa.Table:
    """read_stage over every file, then resume_stage once per bucket (as Ray's group-by calls
    it), rows back in manifest order."""
    files = pa.table({"file_index": list(range(len(plan.files)))})
    rows = pa.concat_tables(read_files(files, config=ReadConfig(plan)))
    buckets = sorted(set(rows[BUCKET].to_pylist()))
    out = pa.concat_tables(
        [resume_bucket(rows.filter(pa.compute.equal(rows[BUCKET], b)), config=config) for b in buckets]
    )
    return out.sort_by([("_source_file", "ascending"), ("_source_row", "ascending")])


def resume_config(plan, output: str = "/nonexistent-output", **options) -> ResumeConfig:
    return ResumeConfig(plan, output, "model-digest", "settings-digest", **options)


@pytest.fixture(scope="module")
def read_block(catalog) -> pa.Table:
    plan = plan_manifest(catalog)
    return resumed(plan, resume_config(plan))


@pytest.fixture(scope="module")
def prepared(catalog, read_block) -> pa.Table:
    config = PrepareConfig(InputPolicy(os.path.dirname(catalog)), RESOLUTION, PRODUCT_SIZE)
    return prepare_batch(read_block, config=config)


@pytest.fixture(scope="module")
def rendered(tiny_model_dir, prepared) -> pa.Table:
    stage = RenderStage(RenderStageConfig(tiny_model_dir, steps=2, guidance_scale=3.0, torch_threads=2))
    return stage(prepared)


def test_read_and_resume_stages_validate_and_mark_actions(read_block):
    assert set(STAGES["resume"].adds) <= set(read_block.column_names)
    assert not set(STAGES["resume"].drops) & set(read_block.column_names)
    assert read_block["pair_id"].to_pylist() == ["box", "mask", "gone", "bad/id"]
    assert read_block["error_code"].to_pylist() == ["", "", "", "invalid_pair_id"]
    assert read_block["action"].to_pylist() == ["render"] * 4  # nothing done before
    assert read_block["sku"].to_pylist() == ["s1", "s2", "s3", "s4"]


def test_read_stage_reuses_a_done_pair_with_the_same_seed(catalog, read_block):
    done = read_block.slice(0, 1)
    state = pa.table(
        {
            "pair_id": ["box"],
            "seed": done["seed"],
            **{c: pa.nulls(1, read_block.schema.field(PREV + c).type) for c in CARRIED_COLUMNS},
        }
    ).set_column(2, "status", pa.array(["ok"]))
    (block,) = planned_batches(plan_manifest(catalog), 0, PairIdConflicts(), StateIndex(state), batch_rows=16)
    assert block["action"].to_pylist() == ["reuse", "render", "render", "render"]
    assert block[PREV + "status"].to_pylist() == ["ok", None, None, None]


def test_read_files_tags_rows_with_their_bucket_and_file(catalog):
    blocks = list(read_files(pa.table({"file_index": [0]}), config=ReadConfig(plan_manifest(catalog))))
    rows = pa.concat_tables(blocks)
    assert rows.num_rows == 4 and set(STAGES["read"].adds) <= set(rows.column_names)
    assert rows[BUCKET].to_pylist() == bucket_of(rows["pair_id"]).to_pylist()
    assert rows[FILE_INDEX].to_pylist() == [0] * 4


def test_bucket_of_is_a_stable_digest():
    # The bucket names a file that outlives processes and releases: it must never change.
    assert bucket_of(pa.array(["box", "p0000001", None])).to_pylist() == BUCKETS_OF_BOX_P1_NONE


BUCKETS_OF_BOX_P1_NONE = [81, 23, 0]


def two_file_catalog(folder, first: list[str], second: list[str]) -> str:
    """Two manifest files in `folder` with these pair_ids, every row valid (bbox regions)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    (folder / "context.png").write_bytes(png(scene(64, 48, rng)))
    (folder / "product.png").write_bytes(png(product(32, rng)))
    for name, ids in (("a.parquet", first), ("b.parquet", second)):
        n = len(ids)
        table = {"pair_id": ids, "context_uri": ["context.png"] * n, "product_uri": ["product.png"] * n}
        pq.write_table(pa.table({**table, "bbox": [[4.0, 4.0, 40.0, 30.0]] * n}), folder / name)
    return str(folder)


def test_resume_stage_fails_every_row_of_a_pair_id_repeated_across_files(tmp_path):
    plan = plan_manifest(two_file_catalog(tmp_path, ["a", "dup", "b"], ["dup", "c"]))
    rows = resumed(plan, resume_config(plan))
    failed = [(r["pair_id"], os.path.basename(r["_source_file"])) for r in rows.to_pylist() if r["error_code"]]
    assert sorted(failed) == [("dup", "a.parquet"), ("dup", "b.parquet")]
    assert rows.filter(pa.compute.equal(rows["pair_id"], "dup"))["error_code"].to_pylist() == ["duplicate_pair_id"] * 2


def test_resume_stage_reuses_done_pairs_from_their_bucket_and_verifies_images_when_asked(tmp_path):
    plan = plan_manifest(two_file_catalog(tmp_path / "catalog", ["a", "b"], ["c"]))
    layout = Layout(str(tmp_path / "out"))
    first = resumed(plan, resume_config(plan))
    done = first.filter(pa.compute.is_in(first["pair_id"], value_set=pa.array(["a", "b"])))
    state = pa.table(
        {
            "pair_id": done["pair_id"],
            "status": ["ok", "ok"],
            "output_uri": [layout.image(p, "jpg") for p in done["pair_id"].to_pylist()],
            "seed": done["seed"],
            "model_digest": ["model-digest"] * 2,
            "settings_digest": ["settings-digest"] * 2,
            "finished_at": ["2026-12-01T00:00:00+00:00"] * 2,
        }
    )
    state = pa.table(
        {f.name: state[f.name] if f.name in state.column_names else pa.nulls(2, f.type) for f in state_schema()},
        schema=state_schema(),
    )
    for b in set(bucket_of(state["pair_id"]).to_pylist()):
        storage.write_parquet(layout.state_bucket(b), state.filter(pa.compute.equal(bucket_of(state["pair_id"]), b)))
    storage.write_bytes(layout.image("a", "jpg"), b"jpeg")  # b's image is gone
    trusted = resumed(plan, resume_config(plan, layout.output))
    assert dict(zip(trusted["pair_id"].to_pylist(), trusted["action"].to_pylist())) == {
        "a": "reuse",
        "b": "reuse",
        "c": "render",
    }
    verified = resumed(plan, resume_config(plan, layout.output, verify_images=True))
    assert dict(zip(verified["pair_id"].to_pylist(), verified["action"].to_pylist())) == {
        "a": "reuse",
        "b": "render",
        "c": "render",
    }
    forced = resumed(plan, resume_config(plan, layout.output, force=True))
    assert forced["action"].to_pylist() == ["render"] * 3
    assert sorted(load_state(layout)["pair_id"].to_pylist()) == ["a", "b"]  # the buckets, read whole


def test_prepare_stage_cuts_model_inputs_or_fails_the_row(prepared):
    assert prepared["error_code"].to_pylist() == ["", "", "image_missing", "invalid_pair_id"]
    assert prepared["width"].to_pylist()[:2] == [120, 120] and prepared["height"].to_pylist()[:2] == [90, 90]
    sizes = {c: len(prepared[c][0].as_py()) for c in MODEL_INPUTS}
    assert (
        sizes["model_context"] == RESOLUTION * RESOLUTION * 3
        and sizes["model_product"] == PRODUCT_SIZE * PRODUCT_SIZE * 3
    )
    assert len(prepared["context_raw"][0].as_py()) == 120 * 90 * 3
    assert [len(v) for v in prepared["model_context"].to_pylist()[2:]] == [0, 0]  # failed rows carry no payload
    assert all(ms > 0 for ms in prepared["prepare_ms"].to_pylist()[:2])


def test_render_stage_renders_the_good_rows_in_one_call(rendered, prepared):
    assert not set(MODEL_INPUTS) & set(rendered.column_names)  # the model inputs are dropped
    assert [len(v) for v in rendered["rendered"].to_pylist()] == [RESOLUTION * RESOLUTION * 3] * 2 + [0, 0]
    ended = rendered["render_ended_at"].to_pylist()
    assert ended[0] == ended[1] is not None and ended[2:] == [None, None]  # one model call for both
    assert rendered["error_code"].to_pylist() == prepared["error_code"].to_pylist()


def test_render_stage_is_deterministic_per_seed(tiny_model_dir, prepared, rendered):
    again = RenderStage(RenderStageConfig(tiny_model_dir, steps=2, guidance_scale=3.0, torch_threads=2))(prepared)
    assert again["rendered"].to_pylist() == rendered["rendered"].to_pylist()


def test_finish_stage_writes_images_and_stamps_rows(tmp_path, rendered, catalog):
    config = FinishConfig(
        str(tmp_path),
        "r1",
        "m" * 64,
        "s" * 16,
        RESOLUTION,
        steps=2,
        guidance_scale=3.0,
        scheduler="ddim",
        image_format="png",
    )
    rows = finish_batch(rendered, config=config)
    assert rows["status"].to_pylist() == ["ok", "ok", "failed", "failed"]
    assert rows["output_uri"].to_pylist()[:2] == [str(tmp_path / "images" / f"{p}.png") for p in ("box", "mask")]
    assert not set(STAGES["finish"].drops) & set(rows.column_names)
    assert set(output_schema(pa.schema([])).names) - {"shard"} <= set(rows.column_names) | {"seed"}
    photo = np.asarray(Image.open(os.path.join(os.path.dirname(catalog), "context.png")).convert("RGB"))
    out = np.asarray(Image.open(io.BytesIO(open(rows["output_uri"][0].as_py(), "rb").read())).convert("RGB"))
    outside = np.ones(photo.shape[:2], bool)
    outside[10:60, 10:70] = False
    assert out.shape == photo.shape and np.array_equal(out[outside], photo[outside])  # only the region changed
    assert rows["run_id"].to_pylist() == ["r1"] * 4 and rows["attempt"].to_pylist() == [1] * 4


@pytest.mark.parametrize("stage", ["prepare", "render", "finish"])
def test_a_block_without_a_required_column_names_the_stage_and_columns(stage, tiny_model_dir, prepared, rendered):
    block = {"prepare": prepared, "render": prepared, "finish": rendered}[stage]
    gone = [c for c in STAGES[stage].requires if c in ("action", "error_code")]
    broken = block.drop_columns(gone)
    run = {
        "prepare": lambda b: prepare_batch(b, config=PrepareConfig(InputPolicy("/"), RESOLUTION, PRODUCT_SIZE)),
        "render": lambda b: RenderStage.__call__(object.__new__(RenderStage), b),  # the column check comes first
        "finish": lambda b: finish_batch(b, config=FinishConfig("/tmp", "r", "m", "s", RESOLUTION, 2, 3.0, "ddim")),
    }[stage]
    with pytest.raises(MissingColumns) as caught:
        run(broken)
    assert f"{stage} stage" in str(caught.value) and all(c in str(caught.value) for c in gone)


def test_render_stage_scores_every_render_with_the_models_own_encoder(rendered):
    scores = rendered["identity_score"].to_pylist()
    assert all(isinstance(s, float) and -100 <= s <= 100 for s in scores[:2]) and scores[2:] == [None, None]
    assert rendered["variant_seeds"].to_pylist() == [None] * 4  # one render: no variant columns


def test_render_stage_renders_every_variant_in_the_one_call_and_keeps_the_best(tiny_model_dir, prepared, rendered):
    config = RenderStageConfig(tiny_model_dir, steps=2, guidance_scale=3.0, torch_threads=2, variants=3)
    stage = RenderStage(dataclasses.replace(config, keep_variants=True))
    out = stage(prepared)
    assert stage.renderer.model_calls == 1  # 2 pairs x 3 variants in one pipeline call
    seeds, scores = out["variant_seeds"].to_pylist(), out["variant_scores"].to_pylist()
    chosen, identity = out["chosen_variant"].to_pylist(), out["identity_score"].to_pylist()
    side = (RESOLUTION, RESOLUTION, 3)
    for i in (0, 1):
        assert seeds[i][0] == prepared["seed"][i].as_py() and len(set(seeds[i])) == 3
        assert chosen[i] == int(np.argmax(scores[i])) and identity[i] == scores[i][chosen[i]]
        kept = np.frombuffer(out["variant_renders"][i].as_py(), np.uint8).reshape(3, *side)
        assert kept[chosen[i]].tobytes() == out["rendered"][i].as_py()
        # variant 0 is the pair's own seed: the one-render stage's image, up to batch composition
        plain = np.frombuffer(rendered["rendered"][i].as_py(), np.uint8).reshape(side)
        assert np.abs(kept[0].astype(int) - plain).max() <= 1
    # the chosen image is what one render with the chosen seed gives
    chosen_seeds = pa.array([seeds[0][chosen[0]], seeds[1][chosen[1]], 0, 0], pa.int64())
    single = RenderStage(dataclasses.replace(config, variants=1))(
        prepared.set_column(prepared.schema.get_field_index("seed"), "seed", chosen_seeds)
    )
    for i in (0, 1):
        a = np.frombuffer(single["rendered"][i].as_py(), np.uint8).astype(int)
        assert np.abs(a - np.frombuffer(out["rendered"][i].as_py(), np.uint8)).max() <= 1
    assert out["variant_renders"].to_pylist()[2:] == [None, None]
