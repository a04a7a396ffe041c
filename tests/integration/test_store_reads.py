"""The prepared-sample store read from S3 (moto behind the fault proxy): the same samples as from
the local disk while every 3rd request fails with 503 SlowDown / 500, and a part that is gone
fails with one clear error instead of a skipped sample."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from prepared_store import write_test_store

from pipeline import storage
from pipeline.fetch import InputPolicy
from pipeline.manifest import plan_manifest
from pipeline.stages.prepare_stage import PrepareConfig
from pipeline.toy.catalog import make_training_catalog
from pipeline.train.dataset import prepare_training_batch, read_training_files
from pipeline.train.reader import StoreReader

R, S = 64, 224


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> pa.Table:
    catalog = make_training_catalog(str(tmp_path_factory.mktemp("s3-reader")), n_pairs=6, val_fraction=0)
    plan = plan_manifest(catalog)
    config = PrepareConfig(InputPolicy(plan.base_dir), resolution=R, product_size=S)
    rows = read_training_files({"file_index": [0]}, plan=plan, conflicts_ref=[])
    return pa.concat_tables([prepare_training_batch(batch, config=config) for batch in rows])


def test_store_reads_on_s3_survive_throttling_and_fail_clearly(prepared, s3_bucket, s3_proxy, tmp_path):
    local = StoreReader.open(write_test_store(prepared, str(tmp_path / "store"), R, S), "train")
    uri = write_test_store(prepared, f"s3://{s3_bucket}/prepared/abc", R, S)
    s3_proxy.fail_every, injected = 3, s3_proxy.injected
    try:
        remote = StoreReader.open(uri, "train")
        fetched = remote.fetch(range(len(remote)))
    finally:
        s3_proxy.fail_every = 0
    assert s3_proxy.injected > injected  # the reads really met 503s and 500s
    assert remote.digest == local.digest and len(fetched) == len(local) > 0
    for ours, theirs in zip(fetched, local.fetch(range(len(local)))):
        assert ours.pair_id == theirs.pair_id
        for name in ("context", "hole", "hint", "hint_mask", "box_hole", "box_hint", "box_hint_mask", "product"):
            assert np.array_equal(getattr(ours, name), getattr(theirs, name)), (ours.pair_id, name)
    part = remote.parts[int(remote.part_of[0])]
    storage.delete(storage.join(uri, "parts", f"{part}.parquet"))
    fresh = StoreReader.open(uri, "train")
    with pytest.raises(storage.StorageError, match=f"cannot read row group 0 of {uri}/parts/{part}.parquet"):
        fresh.fetch([int(i) for i in np.flatnonzero(fresh.part_of == fresh.part_of[0])])
