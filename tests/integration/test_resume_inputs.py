"""A pair is done only for the inputs it was rendered from: edited rows are rendered again,
unchanged ones reused (an index from before inputs were recorded too), `--verify-inputs`
catches a file replaced in place (local and S3), and `--dry-run` counts all of it, writing nothing.
"""

from __future__ import annotations

import glob
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
from helpers import FAST, check_ok_rows, read_manifest, render_args

from jobs.render import main as render
from pipeline import storage
from pipeline.sample_catalog import make_catalog


def _files(folder) -> dict[str, int]:
    return {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True)}


def _dry_run_totals(capsys, args) -> list[int]:
    """render, reuse, carried, invalid, skipped"""
    capsys.readouterr()
    assert render([*args, "--dry-run"]) == 0
    total = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("total"))
    return [int(v) for v in total.split()[1:]]


def test_edited_rows_render_again_unchanged_rows_and_an_old_index_are_reused(
    ray_address, tmp_path, tiny_model_dir, capsys
):
    catalog = tmp_path / "catalog"
    path = make_catalog(str(catalog), n_pairs=8, bad_rows=False, sizes=[(96, 64)])  # even rows bbox, odd rows mask
    output = tmp_path / "out"

    def args(*flags: str) -> list[str]:
        return render_args(path, output, tiny_model_dir, "--address", ray_address, *FAST, *flags)

    assert render(args("--run-id", "first")) == 0
    first = {r["pair_id"]: r for r in read_manifest(str(output), "first").to_pylist()}
    before = {p: storage.read_bytes(r["output_uri"]) for p, r in first.items()}

    # One edit per input column, under the same pair_ids; pair-0006's product replaced in place.
    rows = pq.read_table(path).to_pylist()
    rows[0]["context_uri"] = rows[2]["context_uri"]
    rows[1]["mask_uri"] = rows[3]["mask_uri"]
    x0, y0, x1, y1 = rows[2]["bbox"]
    rows[2]["bbox"] = [x0 + 3, y0 + 2, x1, y1]
    rows[3]["product_uri"] = rows[5]["product_uri"]
    seeds = [None] * len(rows)
    seeds[4] = 12345
    table = pa.Table.from_pylist(rows).append_column("seed", pa.array(seeds, pa.int64()))
    pq.write_table(table, path)
    (catalog / rows[6]["product_uri"]).write_bytes((catalog / rows[7]["product_uri"]).read_bytes())
    edited = {"pair-0000", "pair-0001", "pair-0002", "pair-0003", "pair-0004"}

    listing = _files(tmp_path)
    assert _dry_run_totals(capsys, args()) == [5, 3, 0, 0, 0]  # the in-place change is not seen...
    assert _dry_run_totals(capsys, args("--verify-inputs")) == [6, 2, 0, 0, 0]  # ...unless asked
    assert _files(tmp_path) == listing  # a dry run writes nothing

    assert render(args("--run-id", "edited", "--verify-inputs")) == 0
    out = read_manifest(str(output), "edited")
    latest = {r["pair_id"]: r for r in out.to_pylist()}
    assert {p for p, r in latest.items() if r["attempt"] == 1} == edited | {"pair-0006"}
    for pair_id in ("pair-0005", "pair-0007"):  # unchanged: reused, image untouched
        assert latest[pair_id]["attempt"] == 0 and storage.read_bytes(latest[pair_id]["output_uri"]) == before[pair_id]
    # every row describes its image: the context outside its region, its region rendered
    assert check_ok_rows(out) == 8
    for pair_id, column in (("pair-0000", "context_uri"), ("pair-0001", "mask_uri"), ("pair-0003", "product_uri")):
        assert latest[pair_id][column] == str(catalog / rows[int(pair_id[-1])][column])
    assert latest["pair-0002"]["bbox"] == rows[2]["bbox"] and latest["pair-0004"]["seed"] == 12345
    for pair_id in edited | {"pair-0006"}:
        assert storage.read_bytes(latest[pair_id]["output_uri"]) != before[pair_id], pair_id

    # The index as an earlier version wrote it, without the inputs columns: still resumed, every
    # pair reused (resume.StateIndex.same_inputs) and recorded with its inputs, by a run that
    # starts neither Ray nor a model. With --verify-inputs such rows have no file versions to
    # compare: they are rendered again.
    for bucket in glob.glob(str(output / "state" / "buckets" / "*.parquet")):
        pq.write_table(pq.read_table(bucket).drop_columns(["inputs_digest", "inputs_version"]), bucket)
    assert render(args("--run-id", "old-index")) == 0
    old_index = read_manifest(str(output), "old-index").to_pylist()
    assert {r["attempt"] for r in old_index} == {0} and all(r["inputs_digest"] for r in old_index)
    record = json.loads((output / "runs" / "old-index.json").read_text())
    assert record["stream"] == "driver" and "ray_start" not in record["phase_seconds"]
    assert _dry_run_totals(capsys, args()) == [0, 8, 0, 0, 0]
    assert _dry_run_totals(capsys, args("--verify-inputs")) == [8, 0, 0, 0, 0]


def test_verify_inputs_catches_an_s3_object_replaced_in_place(
    ray_address, s3_bucket, tmp_path, tiny_model_dir, capsys
):
    catalog = tmp_path / "catalog"
    make_catalog(str(catalog), n_pairs=3, bad_rows=False, sizes=[(96, 64)])
    for path in glob.glob(str(catalog / "**" / "*"), recursive=True):
        if os.path.isfile(path):
            storage.write_bytes(f"s3://{s3_bucket}/catalog/{os.path.relpath(path, catalog)}", open(path, "rb").read())
    manifest, output = f"s3://{s3_bucket}/catalog/manifest.parquet", f"s3://{s3_bucket}/renders"

    def args(*flags: str) -> list[str]:
        return render_args(manifest, output, tiny_model_dir, "--address", ray_address, *FAST, *flags)

    assert render(args("--run-id", "first")) == 0
    replaced = f"s3://{s3_bucket}/catalog/images/set-0002-product.png"
    storage.write_bytes(replaced, storage.read_bytes(replaced.replace("0002", "0001")))  # same key, new ETag
    assert _dry_run_totals(capsys, args()) == [0, 3, 0, 0, 0]  # unseen without --verify-inputs
    assert render(args("--run-id", "verified", "--verify-inputs")) == 0
    attempts = {r["pair_id"]: r["attempt"] for r in read_manifest(output, "verified").to_pylist()}
    assert attempts == {"pair-0000": 0, "pair-0001": 0, "pair-0002": 1}


def test_dry_run_counts_with_reasons_and_writes_nothing(tmp_path, tiny_model_dir, capsys):
    path = make_catalog(str(tmp_path / "catalog"), n_pairs=3, bad_rows=False, sizes=[(96, 64)])
    rows = pq.read_table(path).to_pylist()
    rows.append(dict(rows[0], pair_id="no-product", product_uri=None))
    pq.write_table(pa.Table.from_pylist(rows), path)
    output = tmp_path / "out"
    capsys.readouterr()
    assert render([*render_args(path, output, tiny_model_dir), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    total = next(line for line in printed.splitlines() if line.strip().startswith("total"))
    assert [int(v) for v in total.split()[1:]] == [3, 0, 0, 1, 0]
    assert "invalid    missing_uri 1" in printed
    assert not output.exists()
