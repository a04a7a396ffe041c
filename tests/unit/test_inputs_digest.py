"""Reuse keys on a row's inputs (`resume.inputs_digest`): every input column counts, scene
fields included; an index row from before inputs were recorded (no digest) is reused."""

from __future__ import annotations

import pyarrow as pa

from pipeline.resume import StateIndex, inputs_digest, resume_batch
from pipeline.schema import state_schema

ROW = {
    "pair_id": "p",
    "context_uri": "/in/room.jpg",
    "product_uri": "/in/chair.png",
    "mask_uri": None,
    "bbox": [1.0, 2.0, 30.0, 40.0],
    "seed": 7,
    "scene_id": "s",
    "step": 1,
    "error_code": "",
}
EDITS = {
    "context_uri": "/in/hall.jpg",
    "product_uri": "/in/lamp.png",
    "mask_uri": "/in/mask.png",
    "bbox": [1.0, 2.0, 30.0, 41.0],
    "seed": 8,
    "scene_id": "t",
    "step": 2,
}


def _table(row: dict) -> pa.Table:
    return pa.Table.from_pylist([row])


def _index(digest: str | None) -> StateIndex:
    values = {"pair_id": ["p"], "seed": [7], "status": ["ok"], "output_uri": ["/out/p.jpg"], "inputs_digest": [digest]}
    return StateIndex(pa.table({f.name: values.get(f.name, pa.nulls(1, f.type)) for f in state_schema()}))


def test_every_input_column_changes_the_digest():
    digest = inputs_digest(_table(ROW))[0].as_py()
    assert inputs_digest(_table(dict(ROW)))[0].as_py() == digest
    for column, value in EDITS.items():
        assert inputs_digest(_table(ROW | {column: value}))[0].as_py() != digest, column
    assert inputs_digest(_table(ROW | {"category": "chairs"}))[0].as_py() == digest  # not an input


def test_a_row_is_reused_for_its_own_inputs_only_and_an_old_index_row_is_trusted():
    digest = inputs_digest(_table(ROW))[0].as_py()
    assert resume_batch(_table(ROW), _index(digest))["action"].to_pylist() == ["reuse"]
    for column, value in EDITS.items():
        if column == "seed":  # a new seed is a new render without the digest too
            continue
        assert resume_batch(_table(ROW | {column: value}), _index(digest))["action"].to_pylist() == ["render"], column
    reused = resume_batch(_table(ROW | {"scene_id": "t"}), _index(None))  # written before inputs_digest
    assert reused["action"].to_pylist() == ["reuse"]
    assert reused["inputs_digest"].to_pylist() == [inputs_digest(_table(ROW | {"scene_id": "t"}))[0].as_py()]
