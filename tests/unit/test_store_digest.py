"""The store's digest and parts without Ray (`pipeline.train.store`): which inputs make a new
store, how a manifest splits into parts, a part's layout (row groups, zstd), and the job's stage
as a plain function (writes its part, hands back only the small columns, never rewrites).
Ray, S3 and a killed preparation: tests/integration/test_store.py."""

from __future__ import annotations

import dataclasses
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.fetch import InputPolicy
from pipeline.manifest import plan_manifest
from pipeline.stages.prepare_stage import PrepareConfig
from pipeline.train import store
from pipeline.train.dataset import TRAIN_PAYLOADS


@pytest.fixture
def manifest(tmp_path) -> str:
    path = str(tmp_path / "manifest.parquet")
    rows = {"pair_id": [f"p{i}" for i in range(5)], "context_uri": ["c.jpg"] * 5, "product_uri": ["p.png"] * 5}
    pq.write_table(pa.table({**rows, "bbox": [[0.0, 0.0, 4.0, 4.0]] * 5}), path)
    return path


def _config(folder: str, **changes) -> PrepareConfig:
    return dataclasses.replace(PrepareConfig(InputPolicy(folder), resolution=128, product_size=224), **changes)


def test_the_digest_moves_with_each_preparation_input_and_not_with_the_rest(manifest, tmp_path):
    plan, folder = plan_manifest(manifest), str(tmp_path)
    digest = store.prep_digest(store.prep_inputs(plan, _config(folder), part_rows=64))
    assert len(digest) == 16 and digest == store.prep_digest(store.prep_inputs(plan, _config(folder), 64))
    changes = {
        "resolution": _config(folder, resolution=256),
        "product_size": _config(folder, product_size=112),
        "crop_margin": _config(folder, crop_margin=0.3),
        "max_pixels": _config(folder, max_pixels=1000),
        "allow_roots": _config(folder, policy=InputPolicy(folder, allow_roots=("/data",))),
        "allow_http": _config(folder, policy=InputPolicy(folder, allow_http=True)),
    }
    for what, config in changes.items():
        assert store.prep_digest(store.prep_inputs(plan, config, 64)) != digest, what
    assert store.prep_digest(store.prep_inputs(plan, _config(folder), 32)) != digest  # other parts
    # resources do not change the bytes: same store
    assert store.prep_digest(store.prep_inputs(plan, _config(folder, num_cpus=2.0, batch_size=1), 64)) == digest


def test_the_manifest_counts_by_its_bytes_not_its_mtime(manifest, tmp_path):
    folder = str(tmp_path)
    digest = store.prep_digest(store.prep_inputs(plan_manifest(manifest), _config(folder), 64))
    shutil.copyfile(manifest, manifest + ".bak")
    os.replace(manifest + ".bak", manifest)  # the same bytes, rewritten: a new mtime
    assert store.prep_digest(store.prep_inputs(plan_manifest(manifest), _config(folder), 64)) == digest
    table = pq.read_table(manifest)
    pq.write_table(table.slice(0, 4), manifest)  # a row less
    assert store.prep_digest(store.prep_inputs(plan_manifest(manifest), _config(folder), 64)) != digest


def test_parts_cover_each_file_in_row_ranges(manifest, tmp_path):
    plan = plan_manifest(manifest)
    parts = store.plan_parts(plan, part_rows=2)
    assert [(p.name, p.start, p.end) for p in parts] == [
        ("00000-0000000000", 0, 2),
        ("00000-0000000002", 2, 4),
        ("00000-0000000004", 4, 5),
    ]


def test_a_part_has_the_contract_columns_in_row_groups_and_compressed_payloads():
    n = 5
    table = pa.table(
        {
            "pair_id": [f"p{i}" for i in range(n)],
            "split": ["train"] * n,
            "error_code": [None] * n,
            "error_message": [None] * n,
            **{c: pa.array([bytes(4096)] * n, pa.large_binary()) for c in TRAIN_PAYLOADS},
        }
    )
    part = pq.ParquetFile(pa.BufferReader(store.encode_part(table, row_group_rows=2)))
    assert part.schema_arrow.names == list(store.PART_COLUMNS)
    assert [part.metadata.row_group(g).num_rows for g in range(part.num_row_groups)] == [2, 2, 1]
    column = part.metadata.row_group(0).column(part.schema_arrow.get_field_index("model_context"))
    assert column.compression == store.COMPRESSION.upper()
    assert column.total_compressed_size < 4096  # zeros: zstd
    assert part.read_row_group(2)["model_hole"].to_pylist() == [bytes(4096)]


def test_a_part_task_writes_its_part_and_hands_back_only_the_small_columns(tmp_path):
    """The job's stage without Ray: the payloads stay in the part; a written part is read back
    (the same rows and positions), never rewritten."""
    from pipeline.toy.catalog import make_training_catalog

    manifest = make_training_catalog(str(tmp_path / "catalog"), n_pairs=3, val_fraction=0, bad_rows=True)
    plan = plan_manifest(manifest)
    config = _config(plan.base_dir)
    (part,) = store.plan_parts(plan, part_rows=8)
    item = {"name": part.name, "file_index": 0, "start": part.start, "end": part.end, "written": False}
    kwargs = dict(uri=str(tmp_path / "store"), plan=plan, conflicts_ref=[], config=config, row_group_rows=2)
    rows = store.prepare_parts(pa.Table.from_pylist([item]), compression=store.COMPRESSION, **kwargs)
    assert rows.schema.equals(store.ROWS_SCHEMA)  # no payload reaches the driver
    codes = sorted(c for c in rows["error_code"].to_pylist() if c)
    assert rows.num_rows == 5 and codes == ["bad_bbox", "image_missing"]
    assert rows["row_group"].to_pylist() == [0, 0, 1, 1, 2] and rows["row"].to_pylist() == [0, 1, 0, 1, 0]
    path = tmp_path / "store" / "parts" / f"{part.name}.parquet"
    written = path.stat().st_mtime_ns
    again = store.prepare_parts(pa.Table.from_pylist([item | {"written": True}]), compression="none", **kwargs)
    assert again.equals(rows) and path.stat().st_mtime_ns == written
