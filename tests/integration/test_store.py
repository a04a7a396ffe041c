"""The prepared-sample store (`pipeline.train.store`) through `python -m jobs.train --prepare-only`:
real local Ray, the tiny model, the moto S3 endpoint, a 10-row catalog (8 pairs, 2 bad rows).

- a store is complete (store.json, index, parts in the contract's layout), counts its bad rows as
  training always did, and a second run with the same digest prepares nothing;
- a changed input (the manifest's bytes, a PrepareConfig setting) makes a new digest folder;
- a preparation killed after some parts exist, re-run, writes only the missing parts: every pair
  is in exactly one part and no part written before the kill is rewritten;
- the same on S3.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from helpers import ROOT

from jobs.train import main as train
from pipeline import storage
from pipeline.toy.catalog import make_training_catalog
from pipeline.train.dataset import TRAIN_PAYLOADS
from pipeline.train.store import INDEX_SCHEMA, PART_COLUMNS, StoreInfo

USABLE = {"train": 6, "val": 2}
SKIPPED = {"train": {"image_missing": 1, "bad_bbox": 1}, "val": {}}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("store")
    return make_training_catalog(str(folder / "catalog"), n_pairs=8, val_fraction=0.25, bad_rows=True)


def _prepare(manifest: str, model: str, output: str, *extra: str) -> tuple[int, StoreInfo | None]:
    args = ["--prepare-only", "--manifest", manifest, "--init-model", model, "--output", output]
    code = train([*args, "--data-cpus", "0.25", "--perceptual-weight", "0", *extra])
    return code, _only_store(output)


def _only_store(output: str) -> StoreInfo | None:
    stores = {rel.split("/")[0] for rel, _, _ in storage.list_files(storage.join(output, "prepared"))}
    assert len(stores) <= 1, stores
    return StoreInfo.load(storage.join(output, "prepared", stores.pop())) if stores else None


def _versions(info: StoreInfo) -> dict[str, str]:
    return {name: storage.version(info.part_uri(name)) for name in _written(info)}


def _written(info: StoreInfo) -> list[str]:
    files = storage.list_files(storage.join(info.uri, "parts"))
    return [rel.removesuffix(".parquet") for rel, _, _ in files if rel.endswith(".parquet")]


def _check_store(info: StoreInfo, manifest_rows: int) -> None:
    """The contract's layout: every manifest row in exactly one part, the index = its good rows."""
    assert info.counts.usable == USABLE
    assert {s: dict(c) for s, c in info.counts.skipped.items()} == SKIPPED
    assert sorted(_written(info)) == info.record["parts"]
    seen, good = [], []
    for name in info.record["parts"]:
        part = pq.ParquetFile(storage.filesystem(info.part_uri(name))[1], filesystem=storage.filesystem(info.uri)[0])
        assert part.schema_arrow.names == list(PART_COLUMNS)
        for g in range(part.num_row_groups):
            table = part.read_row_group(g)
            assert table.num_rows <= info.record["row_group_rows"]
            for r, row in enumerate(table.to_pylist()):
                seen.append(row["pair_id"])
                if row["error_code"]:
                    assert all(row[c] == b"" for c in TRAIN_PAYLOADS)
                else:
                    assert row["model_context"] and row["model_product"]
                    good.append((row["split"], row["pair_id"], name, g, r))
    assert len(seen) == manifest_rows and len(set(seen)) == manifest_rows  # each pair once
    index = storage.read_parquet(storage.join(info.uri, "index.parquet"))
    assert index.schema.equals(INDEX_SCHEMA)
    assert [tuple(r.values()) for r in index.to_pylist()] == sorted(good)  # split, then pair_id


def test_prepare_only_writes_a_store_that_the_same_inputs_reuse(
    ray_address, catalog, tiny_model_dir, tmp_path, capsys
):
    output = str(tmp_path / "out")
    code, info = _prepare(catalog, tiny_model_dir, output, "--store-part-rows", "3", "--store-row-group-rows", "2")
    assert code == 0 and info is not None
    _check_store(info, manifest_rows=10)
    assert len(info.record["parts"]) == 4  # 10 rows, 3 a part
    before = _versions(info)

    capsys.readouterr()
    code, again = _prepare(catalog, tiny_model_dir, output, "--store-part-rows", "3", "--store-row-group-rows", "2")
    assert code == 0 and again.digest == info.digest
    assert "reused, nothing prepared" in capsys.readouterr().out
    assert _versions(again) == before  # nothing prepared, nothing rewritten
    assert again.record["created_at"] == info.record["created_at"]

    # a training run on the same output: its record says the store was reused; no part rewritten
    args = ["--manifest", catalog, "--init-model", tiny_model_dir, "--output", output, "--steps", "1",
            "--batch-size", "2", "--perceptual-weight", "0", "--store-part-rows", "3", "--store-row-group-rows", "2",
            "--cpus-per-worker", "0.5", "--torch-threads", "1", "--export", "final"]  # fmt: skip
    assert train(args) == 0
    record = json.loads(storage.read_bytes(storage.join(output, "runs", "train.json")))
    assert record["store"]["reused"] is True and record["store"]["digest"] == info.digest
    assert record["store"]["parts_written"] == 0 and record["rows"]["usable"] == USABLE
    assert _versions(info) == before

    # another crop margin: other payload bytes, another store beside the first
    assert train(["--prepare-only", "--manifest", catalog, "--init-model", tiny_model_dir, "--output", output,
                  "--perceptual-weight", "0", "--store-part-rows", "3", "--crop-margin", "0.3"]) == 0  # fmt: skip
    digests = {rel.split("/")[0] for rel, _, _ in storage.list_files(storage.join(output, "prepared"))}
    assert len(digests) == 2 and info.digest in digests


def test_an_edited_manifest_makes_a_new_store(ray_address, catalog, tiny_model_dir, tmp_path):
    edited, output = tmp_path / "catalog", str(tmp_path / "out")
    edited.mkdir()
    folder = os.path.dirname(catalog)
    for name in os.listdir(folder):  # the images beside it, linked
        if name != os.path.basename(catalog):
            os.symlink(os.path.join(folder, name), edited / name)
    table = pq.read_table(catalog)
    pq.write_table(table, edited / "manifest.parquet")
    code, first = _prepare(str(edited / "manifest.parquet"), tiny_model_dir, output)
    assert code == 0 and first.counts.total == 10
    pq.write_table(table.slice(0, 9), edited / "manifest.parquet")  # one row less
    args = ["--prepare-only", "--manifest", str(edited / "manifest.parquet"), "--init-model", tiny_model_dir,
            "--output", output, "--perceptual-weight", "0", "--data-cpus", "0.25"]  # fmt: skip
    assert train(args) == 0
    digests = {rel.split("/")[0] for rel, _, _ in storage.list_files(storage.join(output, "prepared"))}
    assert first.digest in digests and len(digests) == 2
    (second,) = digests - {first.digest}
    assert StoreInfo.load(storage.join(output, "prepared", second)).counts.total == 9


def test_a_killed_preparation_writes_only_its_missing_parts(ray_address, catalog, tiny_model_dir, tmp_path, capsys):
    output = str(tmp_path / "out")
    stalled = "00000-0000000006"  # the 7th row's part: its task sleeps until the driver is killed
    config = tmp_path / "chaos.yaml"
    config.write_text(f"fault_injection:\n  prepare_stall_part: '{stalled}'\n")
    args = ["--prepare-only", "--manifest", catalog, "--init-model", tiny_model_dir, "--output", output,
            "--perceptual-weight", "0", "--data-cpus", "0.25", "--store-part-rows", "1"]  # fmt: skip
    driver = subprocess.Popen(
        [sys.executable, "-m", "jobs.train", *args, "--config", str(config), "--address", ray_address],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while len(_parts_on_disk(output)) < 9:  # every part but the stalled one
            assert driver.poll() is None, "the preparation ended before it was killed"
            assert time.monotonic() < deadline, _parts_on_disk(output)
            time.sleep(0.5)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    (digest,) = os.listdir(os.path.join(output, "prepared"))
    uri = os.path.join(output, "prepared", digest)
    assert not os.path.exists(os.path.join(uri, "store.json"))  # not complete
    parts = os.path.join(uri, "parts")
    before = {name: os.stat(os.path.join(parts, name)).st_mtime_ns for name in os.listdir(parts)}
    assert f"{stalled}.parquet" not in before and len(before) == 9

    capsys.readouterr()
    code, info = _prepare(catalog, tiny_model_dir, output, "--store-part-rows", "1")
    assert code == 0 and info.digest == digest
    assert "prepared 1 part(s)" in capsys.readouterr().out  # the stalled part only
    after = {name: os.stat(os.path.join(parts, name)).st_mtime_ns for name in os.listdir(parts)}
    assert {k: after[k] for k in before} == before  # no part written before the kill was rewritten
    _check_store(info, manifest_rows=10)


def _parts_on_disk(output: str) -> list[str]:
    prepared = os.path.join(output, "prepared")
    if not os.path.isdir(prepared):
        return []
    return [
        name
        for digest in os.listdir(prepared)
        if os.path.isdir(parts := os.path.join(prepared, digest, "parts"))
        for name in os.listdir(parts)
        if name.endswith(".parquet")
    ]


def test_a_store_on_s3_is_written_and_reused(ray_address, s3_bucket, catalog, tiny_model_dir):
    output = f"s3://{s3_bucket}/train"
    code, info = _prepare(catalog, tiny_model_dir, output, "--store-part-rows", "4")
    assert code == 0 and info is not None and info.uri.startswith("s3://")
    _check_store(info, manifest_rows=10)
    before = _versions(info)
    record = json.loads(storage.read_bytes(storage.join(info.uri, "store.json")))
    assert record["compression"]["model_context"] == info.record["compression"]["model_context"]
    code, again = _prepare(catalog, tiny_model_dir, output, "--store-part-rows", "4")
    assert code == 0 and again.digest == info.digest and _versions(again) == before
