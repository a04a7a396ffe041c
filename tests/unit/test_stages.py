"""Each stage of the Ray Data graph on hand-built pyarrow tables, without Ray: read, prepare,
render (the tiny DTC), finish; and the one error a stage raises when a block lacks a column."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import png
from PIL import Image

from pipeline.fetch import InputPolicy
from pipeline.manifest import PairIdConflicts, plan_manifest
from pipeline.resume import StateIndex
from pipeline.sample_catalog import product, scene
from pipeline.schema import CARRIED_COLUMNS, MODEL_INPUTS, PREV, STAGES, MissingColumns, output_schema
from pipeline.stages.finish_stage import FinishConfig, finish_batch
from pipeline.stages.prepare_stage import PrepareConfig, prepare_batch
from pipeline.stages.read_stage import ReadConfig, planned_batches, read_files
from pipeline.stages.render_stage import RenderStage, RenderStageConfig

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


@pytest.fixture(scope="module")
def read_block(catalog) -> pa.Table:
    plan = plan_manifest(catalog)
    (block,) = planned_batches(plan, 0, PairIdConflicts(), None, batch_rows=16)
    return block


@pytest.fixture(scope="module")
def prepared(catalog, read_block) -> pa.Table:
    config = PrepareConfig(InputPolicy(os.path.dirname(catalog)), RESOLUTION, PRODUCT_SIZE)
    return prepare_batch(read_block, config=config)


@pytest.fixture(scope="module")
def rendered(tiny_model_dir, prepared) -> pa.Table:
    stage = RenderStage(RenderStageConfig(tiny_model_dir, steps=2, guidance_scale=3.0, torch_threads=2))
    return stage(prepared)


def test_read_stage_validates_and_marks_actions(read_block):
    assert set(STAGES["read"].adds) <= set(read_block.column_names)
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


def test_read_files_is_the_stage_over_file_indexes(catalog):
    # Without state or conflicts no object ref is read, so Ray need not run.
    blocks = list(
        read_files(
            {"file_index": np.array([0])}, config=ReadConfig(plan_manifest(catalog)), conflicts_ref=[], state_ref=[]
        )
    )
    assert sum(b.num_rows for b in blocks) == 4


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
