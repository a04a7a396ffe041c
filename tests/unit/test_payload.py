"""The payload specs (`pipeline.payload`): every column packs and unpacks to the same array, its
shape from the run's sizes; the variant row layout (`rows.VariantRows`) the render stage and
Serve share."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.payload import (
    CONTEXT_RAW,
    HOLE_BITS,
    MODEL_INPUT_SPECS,
    MODEL_INPUTS,
    PAYLOAD_COLUMNS,
    PAYLOAD_TYPE,
    SPECS,
    VARIANT_RENDERS,
    Sizes,
    pack_pair,
    unpack_photo,
)
from pipeline.rows import VariantRows, variant_seeds
from pipeline.schema import STAGES

SIZES = Sizes(resolution=8, product_size=4, height=5, width=7)


def _array(spec, rng: np.random.Generator) -> np.ndarray:
    shape = spec.shape(SIZES)
    if spec.kind == "image":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    return rng.random(shape) > 0.5


def test_every_column_round_trips_with_its_shape_and_dtype():
    rng = np.random.default_rng(0)
    assert CONTEXT_RAW.shape(SIZES) == (5, 7, 3) and HOLE_BITS.shape(SIZES) == (5, 7)
    assert {c.name: c.shape(SIZES) for c in MODEL_INPUT_SPECS} == {
        "model_context": (8, 8, 3),
        "model_hole": (8, 8),
        "model_product": (4, 4, 3),
        "model_product_alpha": (4, 4),
        "model_hint": (8, 8, 3),
        "model_hint_mask": (8, 8),
    }
    for spec in SPECS.values():  # the render job's and the training job's columns
        array = _array(spec, rng)
        data = bytes(spec.pack(array))
        back = spec.unpack(data, SIZES)
        assert back.dtype == array.dtype == spec.dtype and np.array_equal(back, array), spec.name
    # a mask is a byte per pixel, 0 or 1; bits are 8 pixels a byte
    hole = _array(MODEL_INPUT_SPECS[1], rng)
    assert bytes(MODEL_INPUT_SPECS[1].pack(hole)) == hole.astype(np.uint8).tobytes()
    region = _array(HOLE_BITS, rng)
    assert bytes(HOLE_BITS.pack(region)) == np.packbits(region).tobytes()  # ceil(35 / 8) = 5 bytes
    renders = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    assert np.array_equal(VARIANT_RENDERS.unpack(bytes(VARIANT_RENDERS.pack(renders)), SIZES, stacked=True), renders)


def test_a_pair_packed_and_its_photo_read_back_from_a_block():
    rng = np.random.default_rng(1)
    context, hole = _array(CONTEXT_RAW, rng), _array(HOLE_BITS, rng)
    model = {c.key: _array(c, rng) for c in MODEL_INPUT_SPECS}
    columns = pack_pair(context, hole, model)
    assert tuple(columns) == PAYLOAD_COLUMNS
    assert STAGES["prepare"].adds[: len(PAYLOAD_COLUMNS)] == PAYLOAD_COLUMNS
    assert STAGES["render"].drops == MODEL_INPUTS
    block = pa.table({**{c: pa.array([v], PAYLOAD_TYPE) for c, v in columns.items()}, "height": [5], "width": [7]})
    photo, region = unpack_photo(block, 0)
    assert np.array_equal(photo, context) and np.array_equal(region, hole) and region.dtype == bool


def test_variant_rows_lay_each_pairs_variants_one_after_the_other():
    uniform = VariantRows([11, 12, 13], [2, 2, 2])  # the render stage: every pair N rows, pair j at j*N
    assert len(uniform) == 6
    assert uniform.pair.tolist() == [0, 0, 1, 1, 2, 2]
    assert uniform.rows([2, 0]).tolist() == [4, 5, 0, 1]
    assert uniform.seeds.tolist() == [*variant_seeds(11, 2), *variant_seeds(12, 2), *variant_seeds(13, 2)]
    mixed = VariantRows([5, 6, 7], [1, 3, 2])  # a Serve batch: each request its own count
    assert mixed.first.tolist() == [0, 1, 4, 6]
    assert mixed.rows(1).tolist() == [1, 2, 3]
    assert mixed.repeat(np.asarray([10, 20, 30])).tolist() == [10, 20, 20, 20, 30, 30]
    assert mixed.rows([]).tolist() == []
