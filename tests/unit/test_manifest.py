"""pipeline.manifest on real files: planning, refusal messages, streaming, row validation."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.manifest import ManifestError, PairIdConflicts, iter_batches, pair_id_conflicts, plan_manifest
from pipeline.rows import stable_seed, validate_rows
from pipeline.schema import is_safe_name


def _rows(n: int, prefix: str = "p", **extra) -> dict:
    return {
        "pair_id": [f"{prefix}{i}" for i in range(n)],
        "context_uri": [f"ctx/{i}.jpg" for i in range(n)],
        "product_uri": [f"prod/{i}.png" for i in range(n)],
        "bbox": [[0.0, 0.0, 10.0, 10.0]] * n,
        **extra,
    }


def _parquet(path, table: dict | pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table if isinstance(table, pa.Table) else pa.table(table), path)


def _text(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _all_rows(plan, batch_size=4096) -> pa.Table:
    return pa.Table.from_batches(list(iter_batches(plan, batch_size=batch_size)))


# -- planning ------------------------------------------------------------------------------


def test_single_parquet_plan_and_streaming(tmp_path):
    _parquet(tmp_path / "catalog.parquet", _rows(10, seed=pa.array(range(10), pa.int32())))
    plan = plan_manifest(str(tmp_path / "catalog.parquet"))
    assert plan.format == "parquet" and plan.num_rows == 10 and plan.file_rows == (10,)
    assert plan.files == (str(tmp_path / "catalog.parquet"),) and plan.base_dir == str(tmp_path)
    assert plan.has_bbox and not plan.has_mask
    assert plan.schema.field("seed").type == pa.int64() and plan.schema.field("bbox").type == pa.list_(pa.float64())

    batches = list(iter_batches(plan, batch_size=4))
    assert [b.num_rows for b in batches] == [4, 4, 2]
    table = pa.Table.from_batches(batches)
    assert set(table["shard"].to_pylist()) == {"catalog"}  # the file's stem
    assert table["_source_row"].to_pylist() == list(range(10))
    assert table["seed"].to_pylist() == list(range(10))


def test_hive_partitions_give_the_default_shard(tmp_path):
    root = tmp_path / "manifests"
    _parquet(root / "dt=2026-11-26" / "part-0.parquet", _rows(2, "a", shard=["", "custom"]))
    _parquet(root / "dt=2026-11-27" / "region=eu" / "part-0.parquet", _rows(3, "b", extra=[1, 2, 3]))
    _text(root / "_SUCCESS", "")
    _text(root / "dt=2026-11-26" / ".part-0.parquet.crc", "x")
    _text(root / "images" / "notes.txt", "not a manifest")
    plan = plan_manifest(str(root) + "/")
    assert plan.base_dir == str(root) and plan.num_rows == 5 and len(plan.files) == 2
    assert plan.default_shards == ("dt=2026-11-26", "region=eu")
    table = _all_rows(plan)
    assert table["shard"].to_pylist() == ["dt=2026-11-26", "custom", "region=eu", "region=eu", "region=eu"]
    assert table["extra"].to_pylist() == [None, None, 1, 2, 3]  # a column one file lacks
    # One partition planned alone (a backfill day) keeps its shard, as a folder or a file.
    assert plan_manifest(str(root / "dt=2026-11-26")).default_shards == ("dt=2026-11-26",)
    assert plan_manifest(str(root / "dt=2026-11-26" / "part-0.parquet")).default_shards == ("dt=2026-11-26",)


def test_glob(tmp_path):
    text = 'pair_id,context_uri,product_uri,bbox\n{}, c.jpg, p.png,"[0, 0, 9, 9]"\n'
    for name in ("a.csv", "b.csv", "sub/d.csv", "c.jsonl"):
        _text(tmp_path / name, text.format(name.replace("/", "_").split(".")[0]) if name.endswith(".csv") else "")
    plan = plan_manifest(str(tmp_path / "*.csv"))
    assert [f.rsplit("/", 1)[1] for f in plan.files] == ["a.csv", "b.csv"] and plan.base_dir == str(tmp_path)
    assert plan.default_shards == ("a", "b")
    plan = plan_manifest(str(tmp_path / "**" / "*.csv"))
    assert [f.rsplit("/", 1)[1] for f in plan.files] == ["a.csv", "b.csv", "d.csv"]


def test_csv_columns_are_text_and_bbox_is_parsed(tmp_path):
    _text(
        tmp_path / "m.csv",
        "pair_id,context_uri,product_uri,mask_uri,bbox,seed,price\n"
        '0001,img/a.jpg,s3://b/p.png,,"[1, 2, 30.5, 40]",,12.50\n'
        "0002,img/b.jpg,p.png,masks/b.png,,7,3\n",
    )
    plan = plan_manifest(str(tmp_path / "m.csv"))
    assert plan.format == "csv" and plan.num_rows == 2
    rows = validate_rows(_all_rows(plan), plan.base_dir)
    assert rows["pair_id"].to_pylist() == ["0001", "0002"]  # not the integer 1
    assert rows["price"].to_pylist() == ["12.50", "3"]  # passed through as written
    assert rows["error_code"].to_pylist() == ["", ""]
    assert rows["bbox"].to_pylist() == [[1.0, 2.0, 30.5, 40.0], None]
    assert rows["mask_uri"].to_pylist() == [None, str(tmp_path / "masks" / "b.png")]
    assert rows["context_uri"].to_pylist()[0] == str(tmp_path / "img" / "a.jpg")
    assert rows["product_uri"].to_pylist()[0] == "s3://b/p.png"
    assert rows["seed"].to_pylist() == [stable_seed("0001"), 7]


def test_jsonl_bbox_as_array_or_string(tmp_path):
    lines = [
        {"pair_id": "a", "context_uri": "c.jpg", "product_uri": "p.png", "bbox": [0, 0, 10, 12.5], "seed": 3},
        {"pair_id": "b", "context_uri": "c.jpg", "product_uri": "p.png", "bbox": None},
    ]
    _text(tmp_path / "arrays" / "m.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n")
    plan = plan_manifest(str(tmp_path / "arrays" / "m.jsonl"))
    rows = validate_rows(_all_rows(plan), plan.base_dir)
    assert rows["bbox"].to_pylist() == [[0.0, 0.0, 10.0, 12.5], None]
    assert rows["error_code"].to_pylist() == ["", "region_missing"]
    assert rows["seed"].to_pylist() == [3, stable_seed("b")]

    lines = [{"pair_id": "c", "context_uri": "c.jpg", "product_uri": "p.png", "bbox": "[1, 2, 30, 40]"}]
    _text(tmp_path / "strings" / "m.json", json.dumps(lines[0]) + "\n")
    rows = validate_rows(_all_rows(plan_manifest(str(tmp_path / "strings"))), str(tmp_path))
    assert rows["bbox"].to_pylist() == [[1.0, 2.0, 30.0, 40.0]] and rows["error_code"].to_pylist() == [""]


def _refusal(p, case: str):
    """Write the files of one bad manifest; returns (uri to plan, text the message must hold)."""
    rows = _rows(2)
    if case == "missing-path":
        return p / "nope.parquet", "does not exist"
    if case == "folder-without-manifest":
        _text(p / "x" / "README.md", "hi")
        return p / "x", "no .parquet"
    if case == "glob-without-match":
        return p / "*.parquet", "matches no"
    if case == "unknown-extension":
        _text(p / "m.txt", "a")
        return p / "m.txt", "cannot tell the format"
    if case == "zero-rows-parquet":
        _parquet(p / "m.parquet", pa.table(rows).slice(0, 0))
        return p / "m.parquet", "empty"
    if case == "header-only-csv":
        _text(p / "m.csv", "pair_id,context_uri,product_uri,bbox\n")
        return p / "m.csv", "empty"
    if case == "missing-column":
        _parquet(p / "m.parquet", {k: v for k, v in rows.items() if k != "product_uri"})
        return p / "m.parquet", "product_uri"
    if case == "no-region-column":
        _parquet(p / "m.parquet", {k: v for k, v in rows.items() if k != "bbox"})
        return p / "m.parquet", "neither a mask_uri nor a bbox"
    if case == "int-pair-id":
        _parquet(p / "m.parquet", {**rows, "pair_id": [1, 2]})
        return p / "m.parquet", "pair_id must be a string"
    if case == "bbox-list-of-strings":
        _parquet(p / "m.parquet", {**rows, "bbox": [["a", "b", "c", "d"]] * 2})
        return p / "m.parquet", "bbox must be a list of 4 numbers"
    if case == "bbox-text-in-parquet":
        _parquet(p / "m.parquet", {**rows, "bbox": ["[0, 0, 9, 9]"] * 2})
        return p / "m.parquet", "bbox must be a list of 4 numbers"
    if case == "float-seed":
        _parquet(p / "m.parquet", {**rows, "seed": [1.5, 2.0]})
        return p / "m.parquet", "seed must be an integer"
    if case == "text-seed-csv":
        _text(p / "m.csv", 'pair_id,context_uri,product_uri,bbox,seed\na,c,p,"[0,0,9,9]",abc\n')
        return p / "m.csv", "column seed"
    if case == "text-seed-deep-in-csv":
        # Past CSV's first 1 MB block, the one types are inferred from: still refused now.
        good = "".join(f'id{i},c.jpg,p.png,"[0, 0, 9, 9]",{i}\n' for i in range(40_000))
        _text(p / "m.csv", "pair_id,context_uri,product_uri,bbox,seed\n" + good + "late,c.jpg,p.png,,abc\n")
        return p / "m.csv", "abc"
    if case == "number-pair-id-jsonl":
        _text(p / "m.jsonl", '{"pair_id": 5, "context_uri": "c", "product_uri": "p", "bbox": [0, 0, 9, 9]}\n')
        return p / "m.jsonl", "pair_id must be a string"
    if case == "garbage-parquet":
        _text(p / "m.parquet", "this is not parquet at all")
        return p / "m.parquet", "cannot be read"
    if case == "mixed-formats":
        _parquet(p / "x" / "a.parquet", rows)
        _text(p / "x" / "b.csv", "a")
        return p / "x", "mixes formats"
    if case == "files-disagree":
        _parquet(p / "x" / "a.parquet", {**rows, "note": [1, 2]})
        _parquet(p / "x" / "b.parquet", {**rows, "note": ["one", "two"]})
        return p / "x", "disagree"
    raise AssertionError(case)


REFUSALS = [
    "missing-path",
    "folder-without-manifest",
    "glob-without-match",
    "unknown-extension",
    "zero-rows-parquet",
    "header-only-csv",
    "missing-column",
    "no-region-column",
    "int-pair-id",
    "bbox-list-of-strings",
    "bbox-text-in-parquet",
    "float-seed",
    "text-seed-csv",
    "text-seed-deep-in-csv",
    "number-pair-id-jsonl",
    "garbage-parquet",
    "mixed-formats",
    "files-disagree",
]


@pytest.mark.parametrize("case", REFUSALS)
def test_manifest_refusals(tmp_path, case):
    uri, expected = _refusal(tmp_path, case)
    with pytest.raises(ManifestError) as info:
        plan_manifest(str(uri))
    assert expected in str(info.value)


# -- row validation ------------------------------------------------------------------------


CASES = [
    # pair_id, context, product, mask, bbox, shard, expected error code
    ("ok-1", "c.jpg", "p.png", None, [0, 0, 10, 10], "s", ""),
    ("ok-2", "c.jpg", "p.png", "m.png", None, "s", ""),
    ("", "c.jpg", "p.png", None, [0, 0, 10, 10], "s", "invalid_pair_id"),
    (None, "c.jpg", "p.png", None, [0, 0, 10, 10], "s", "invalid_pair_id"),
    (".hidden", "c.jpg", "p.png", None, [0, 0, 10, 10], "s", "invalid_pair_id"),
    ("a/b", "c.jpg", "p.png", None, [0, 0, 10, 10], "s", "invalid_pair_id"),
    ("x" * 201, "c.jpg", "p.png", None, [0, 0, 10, 10], "s", "invalid_pair_id"),
    ("id\n", "c.jpg", "p.png", None, [0, 0, 10, 10], "s", "invalid_pair_id"),  # `$` would let it through
    ("caf\u00e9", "c.jpg", "p.png", None, [0, 0, 10, 10], "s", "invalid_pair_id"),
    ("twice", "c.jpg", "p.png", None, [0, 0, 10, 10], "s", "duplicate_pair_id"),
    ("no-context", "", "p.png", None, [0, 0, 10, 10], "s", "missing_uri"),
    ("no-product", "c.jpg", None, None, [0, 0, 10, 10], "s", "missing_uri"),
    ("no-region", "c.jpg", "p.png", "", None, "s", "region_missing"),
    ("both", "c.jpg", "p.png", "m.png", [0, 0, 10, 10], "s", "region_ambiguous"),
    ("three", "c.jpg", "p.png", None, [0, 0, 10], "s", "bad_bbox"),
    ("nan", "c.jpg", "p.png", None, [0, float("nan"), 10, 10], "s", "bad_bbox"),
    ("negative", "c.jpg", "p.png", None, [-1, 0, 10, 10], "s", "bad_bbox"),
    ("inverted", "c.jpg", "p.png", None, [10, 0, 5, 10], "s", "bad_bbox"),
    ("flat", "c.jpg", "p.png", None, [0, 10, 5, 10], "s", "bad_bbox"),
    ("text", "c.jpg", "p.png", None, "[0, 0, 10", "s", "bad_bbox"),
    ("words", "c.jpg", "p.png", None, '["a", 0, 10, 10]', "s", "bad_bbox"),
    ("shard", "c.jpg", "p.png", None, [0, 0, 10, 10], "a b", "invalid_shard"),
    ("no-shard", "c.jpg", "p.png", None, [0, 0, 10, 10], None, "invalid_shard"),
    ("newline-shard", "c.jpg", "p.png", None, [0, 0, 10, 10], "s\n", "invalid_shard"),
]


def _case_columns() -> dict[str, list]:
    names = ["pair_id", "context_uri", "product_uri", "mask_uri", "bbox", "shard"]
    return {name: [case[i] for case in CASES] for i, name in enumerate(names)}


def test_validate_rows_error_codes():
    columns = _case_columns()
    expected = [case[-1] for case in CASES]
    bbox = [b if b is None or isinstance(b, str) else json.dumps(b) for b in columns.pop("bbox")]  # CSV/JSONL form
    batch = pa.table(
        {
            **columns,
            "bbox": pa.array(bbox, pa.string()),
            "seed": pa.array([None, 5] + [None] * (len(CASES) - 2), pa.int64()),
        }
    )
    out = validate_rows(batch, "/data/manifests", PairIdConflicts(frozenset({"twice", "unrelated"})))
    codes = out["error_code"].to_pylist()
    assert codes == expected
    for code, message in zip(codes, out["error_message"].to_pylist()):
        assert bool(message) == bool(code)
    assert out["seed"].to_pylist()[:2] == [stable_seed("ok-1"), 5]
    assert (
        out["context_uri"][0].as_py() == "/data/manifests/c.jpg"
        and out["mask_uri"][1].as_py() == "/data/manifests/m.png"
    )
    assert out["bbox"].to_pylist()[:2] == [[0.0, 0.0, 10.0, 10.0], None]
    assert "pair_id" in out.column_names  # input columns kept


def test_validate_rows_resolves_paths():
    table = pa.table(
        {
            "pair_id": ["a", "b", "c", "d"],
            "context_uri": ["img/a.jpg", "../outside/b.jpg", "/abs/c.jpg", "s3://other/d.jpg"],
            "product_uri": ["file:///x/p.png", "https://cdn/p.png", "p.png", "./p.png"],
            "mask_uri": ["m.png", "m.png", "m.png", "m.png"],
            "shard": ["s", "s", "s", "s"],
        }
    )
    out = validate_rows(table, "s3://bucket/manifests")
    assert out["context_uri"].to_pylist() == [
        "s3://bucket/manifests/img/a.jpg",
        "s3://bucket/outside/b.jpg",
        "/abs/c.jpg",
        "s3://other/d.jpg",
    ]
    assert out["product_uri"].to_pylist() == [
        "file:///x/p.png",
        "https://cdn/p.png",
        "s3://bucket/manifests/p.png",
        "s3://bucket/manifests/p.png",
    ]
    assert out.schema.field("seed").type == pa.int64() and out["bbox"].to_pylist() == [None] * 4
    local = validate_rows(table.slice(0, 2), "/data/m")
    assert local["context_uri"].to_pylist() == ["/data/m/img/a.jpg", "/data/outside/b.jpg"]


def test_stable_seed_and_pair_id_charset():
    expected = int.from_bytes(hashlib.sha256(b"pair-1").digest()[:8], "big") & (2**63 - 1)
    assert stable_seed("pair-1") == expected and 0 <= expected < 2**63
    assert stable_seed("pair-1") != stable_seed("pair-2")
    assert is_safe_name("dt=2026-11-26.a_b-c") and not is_safe_name("id\n") and not is_safe_name(".x")


# -- a million rows: streaming and duplicates --------------------------------------------------


def test_million_rows_stream_and_duplicates(tmp_path):
    n = 1_000_000
    ids = np.char.add("p", np.arange(n).astype(str)).astype(object)
    ids[[10, 500_000, 999_999]] = ["p3", "p3", "p77"]  # p3 three times, p77 twice
    table = pa.table(
        {
            "pair_id": ids,
            "context_uri": pa.array(["c.jpg"] * n),
            "product_uri": pa.array(["p.png"] * n),
            "mask_uri": pa.array(["m.png"] * n),
        }
    )
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=100_000)
    plan = plan_manifest(str(tmp_path / "big.parquet"))
    assert plan.num_rows == n

    conflicts = pair_id_conflicts(plan)
    assert conflicts.duplicates == {"p3", "p77"} and conflicts.latest == {}

    sizes = []
    failed = 0
    for batch in iter_batches(plan, batch_size=50_000):
        sizes.append(batch.num_rows)
        if len(sizes) == 1:  # one batch through validation is enough to see the codes
            rows = validate_rows(batch, plan.base_dir, conflicts)
            failed = rows["error_code"].to_pylist().count("duplicate_pair_id")
    assert sum(sizes) == n and max(sizes) <= 50_000 and len(sizes) >= 20
    assert failed == 3  # rows 3 and 10 (p3) and 77 (p77) of the first batch


def test_backfill_latest_partition_wins_and_repeats_within_it_fail(tmp_path):
    """Full daily dumps repeat pairs every day: the latest partition's row is the pair's; rows of
    earlier days are superseded; a pair repeated within its latest day fails all its rows, every day."""
    days = {"2026-11-24": ["a", "b", "c"], "2026-11-25": ["a", "b", "b"], "2026-11-26": ["a"]}
    for day, ids in days.items():
        folder = tmp_path / f"dt={day}"
        folder.mkdir()
        pq.write_table(pa.table(_rows(len(ids), pair_id=ids)), folder / "part-0.parquet")
    plan = plan_manifest(str(tmp_path), partition_range=("dt", "2026-11-24", "2026-11-26"))
    conflicts = pair_id_conflicts(plan)
    assert conflicts.latest == {"a": "2026-11-26", "b": "2026-11-25"}
    assert conflicts.duplicates == {"b"}  # twice on its latest day
    codes = {}
    for i, file in enumerate(plan.files):
        batch = next(iter_batches(dataclasses.replace(plan, files=(file,), file_rows=(plan.file_rows[i],))))
        rows = validate_rows(batch, str(tmp_path), conflicts, plan.partitions[i])
        codes[plan.partitions[i]] = rows["error_code"].to_pylist()
    assert codes == {
        "2026-11-24": ["superseded", "duplicate_pair_id", ""],  # b has no winner: no row of it says "rendered"
        "2026-11-25": ["superseded", "duplicate_pair_id", "duplicate_pair_id"],
        "2026-11-26": [""],
    }
    # without a partition range the same folder is one manifest: every repeat fails
    whole = pair_id_conflicts(plan_manifest(str(tmp_path)))
    assert whole.duplicates == {"a", "b"} and whole.latest == {}
