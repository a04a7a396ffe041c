"""The prepared-sample store's reader without Ray: the same batches as the in-memory samples,
a bounded row-group cache, prefetch that changes nothing, and storage errors that fail loudly."""

from __future__ import annotations

import os
import random
import threading

import pyarrow as pa
import pytest
import torch
from prepared_store import write_test_store

from pipeline import storage
from pipeline.fetch import InputPolicy
from pipeline.manifest import plan_manifest
from pipeline.stages.prepare_stage import PrepareConfig
from pipeline.toy.catalog import make_training_catalog
from pipeline.train.dataset import prepare_training_batch, read_training_files
from pipeline.train.reader import Prefetcher, StoreReader
from pipeline.train.samples import Augment, SampleSet, build_batch, build_validation_batch, positions, sample_at

R, S = 128, 224
AUGMENT = Augment(bbox_mask_prob=0.5, flip_prob=0.5, rotate_degrees=15, cfg_drop=0.5)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> pa.Table:
    """The catalog's rows through the training prepare stage, bad rows kept (the store skips them)."""
    catalog = make_training_catalog(str(tmp_path_factory.mktemp("reader-catalog")), n_pairs=8, val_fraction=0.25)
    plan = plan_manifest(catalog)
    config = PrepareConfig(InputPolicy(plan.base_dir), resolution=R, product_size=S)
    rows = read_training_files({"file_index": [0]}, plan=plan, conflicts_ref=[])
    table = pa.concat_tables([prepare_training_batch(batch, config=config) for batch in rows])
    order = list(range(table.num_rows))
    random.Random(1).shuffle(order)  # parts in another order than the pair_ids': the index decides
    return table.take(order)


@pytest.fixture(scope="module")
def store(prepared, tmp_path_factory) -> str:
    return write_test_store(prepared, str(tmp_path_factory.mktemp("store") / "prepared" / "abc"), R, S)


def _in_memory(prepared: pa.Table, split: str) -> SampleSet:
    rows = [r for r in prepared.to_pylist() if not r["error_code"] and r["split"] == split]
    return SampleSet.from_rows(rows, R, S)


def _assert_same_batch(a, b) -> None:
    for name, value in a.__dict__.items():
        assert torch.equal(value, getattr(b, name)), name


def test_the_store_path_builds_the_in_memory_paths_batches(prepared, store):
    for split in ("train", "val"):
        memory, reader = _in_memory(prepared, split), StoreReader.open(store, split)
        assert len(reader) == len(memory) > 0 and reader.pair_ids.to_pylist() == memory.pair_ids
        assert reader.digest == memory.digest
    memory, reader = _in_memory(prepared, "train"), StoreReader.open(store, "train")
    for step in range(6):  # three epochs of 2 x 3 samples: every sample, both hole variants, flips, epochs
        picks = [sample_at(p, 7, len(memory)) for p in positions(step, 3, 0, 1)]
        _assert_same_batch(
            build_batch(reader, picks, 7, AUGMENT, (4, 16, 16)), build_batch(memory, picks, 7, AUGMENT, (4, 16, 16))
        )
    val_memory, val_reader = _in_memory(prepared, "val"), StoreReader.open(store, "val")
    items = [(i, k) for i in range(len(val_memory)) for k in range(2)]
    _assert_same_batch(
        build_validation_batch(val_reader, items, 7, [100, 900], (4, 16, 16)),
        build_validation_batch(val_memory, items, 7, [100, 900], (4, 16, 16)),
    )


def test_the_row_group_cache_is_bounded_and_reads_each_group_once_while_cached(store):
    reader = StoreReader.open(store, "train", cache_row_groups=2)
    groups = {(int(p), int(g)) for p, g in zip(reader.part_of, reader.row_group)}
    assert len(groups) > 2
    reader.fetch(range(len(reader)))
    assert len(reader._cache) == 2 and len(reader._footers) <= 2 and reader.reads >= len(groups)
    reads = reader.reads
    reader.fetch([len(reader) - 1] * 5)  # the last sample's row group is cached: no read
    assert reader.reads == reads
    big = StoreReader.open(store, "train", cache_row_groups=100)
    threads = [threading.Thread(target=big.fetch, args=(range(len(big)),)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert big.reads == len(groups)  # four threads at once: each row group read once


def test_prefetch_builds_the_same_batches_and_raises_a_builds_error():
    built = []

    def build(step: int) -> int:
        built.append(step)
        if step == 5:
            raise storage.StorageError("cannot read row group 0 of part-00000")
        return step * step

    feed = Prefetcher(build, depth=2, end=6)
    assert [feed.get(step)[0] for step in range(5)] == [0, 1, 4, 9, 16]
    with pytest.raises(storage.StorageError, match="row group 0 of part-00000"):
        feed.get(5)  # the error of a prefetched step fails the step that needs it
    feed.close()
    assert sorted(built) == list(range(6))  # nothing at or past `end`, each step built once
    assert [Prefetcher(build, depth=0).get(k)[0] for k in (3, 1)] == [9, 1]


def test_a_store_that_cannot_be_read_fails_with_one_clear_error(prepared, tmp_path):
    with pytest.raises(storage.StorageError, match="store.json is missing"):
        StoreReader.open(str(tmp_path / "nothing"), "train")
    uri = write_test_store(prepared, str(tmp_path / "store"), R, S)
    reader = StoreReader.open(uri, "train")
    first_part = reader.parts[int(reader.part_of[0])]
    os.remove(os.path.join(uri, "parts", f"{first_part}.parquet"))
    with pytest.raises(storage.StorageError, match=f"cannot read row group .* of {uri}/parts/{first_part}.parquet"):
        reader.fetch([0])
