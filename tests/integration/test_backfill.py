"""Date-range backfills over hive partitions: dry run, idempotent re-runs, repair of a day."""

from __future__ import annotations

import glob
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
from helpers import FAST

from jobs.backfill import main as backfill
from pipeline.sample_catalog import make_catalog

DAYS = ["2026-11-01", "2026-11-02", "2026-11-03"]


def _rows(output, run_id: str) -> list[dict]:
    return pa.concat_tables(
        pq.read_table(p) for p in sorted(glob.glob(f"{output}/manifest/{run_id}/part-*.parquet"))
    ).to_pylist()


def _dry_run_counts(capsys, args) -> dict[str, list[int]]:
    assert backfill([*args, "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    return {
        line.split()[0]: [int(v) for v in line.split()[1:]]
        for line in lines
        if line.strip().startswith(("dt=", "total"))
    }


def test_backfill_dry_run_idempotence_and_repair(ray_address, tmp_path, capsys, tiny_model_dir):
    root = tmp_path / "manifests"
    for k, day in enumerate(["2026-10-31", *DAYS]):  # 10-31 lies outside the range
        make_catalog(
            str(root / f"dt={day}"),
            n_pairs=3,
            bad_rows=False,
            seed=k,
            manifest_name="part-0.parquet",
            sizes=[(96, 80)],
            pair_prefix=f"d{day}",
        )
    output = tmp_path / "out"
    args = [
        "--manifest-root",
        str(root),
        "--start",
        DAYS[0],
        "--end",
        DAYS[-1],
        "--output",
        str(output),
        "--model",
        tiny_model_dir,
        *FAST,
        *"--batch-size 3".split(),  # a day's 3 pairs in one model call
    ]

    # columns: render, reuse, carried, invalid, skipped
    assert _dry_run_counts(capsys, args) == {f"dt={d}": [3, 0, 0, 0, 0] for d in DAYS} | {"total": [9, 0, 0, 0, 0]}
    assert not output.exists()  # a dry run writes nothing

    assert backfill([*args, "--run-id", "b1"]) == 0
    first = _rows(output, "b1")
    assert len(first) == 9 and {r["status"] for r in first} == {"ok"} and {r["attempt"] for r in first} == {1}
    assert {r["shard"] for r in first} == {f"dt={d}" for d in DAYS}
    record = json.loads((output / "runs" / "b1.json").read_text())
    assert {s: c["ok"] for s, c in record["counts"]["shards"].items()} == {f"dt={d}": 3 for d in DAYS}

    assert backfill([*args, "--run-id", "b2"]) == 0  # nothing left to render
    assert {r["attempt"] for r in _rows(output, "b2")} == {0}
    assert _dry_run_counts(capsys, args)["total"] == [0, 9, 0, 0, 0]

    for row in first:  # lose the images of one day
        if row["shard"] == f"dt={DAYS[1]}":
            os.remove(row["output_uri"])
    assert _dry_run_counts(capsys, args)[f"dt={DAYS[1]}"] == [0, 3, 0, 0, 0]  # the done index is trusted
    args.append("--verify-images")  # the repair: done pairs whose image is gone are rendered again
    assert _dry_run_counts(capsys, args)[f"dt={DAYS[1]}"] == [3, 0, 0, 0, 0]
    assert backfill([*args, "--run-id", "b3"]) == 0
    third = _rows(output, "b3")
    rendered = {r["pair_id"] for r in third if r["attempt"] == 1}
    assert rendered == {r["pair_id"] for r in first if r["shard"] == f"dt={DAYS[1]}"}
    assert all(os.path.exists(r["output_uri"]) for r in third)


def test_backfill_refuses_bad_ranges(tmp_path, capsys, tiny_model_dir):
    root = tmp_path / "manifests"
    make_catalog(
        str(root / "dt=2026-11-01"), n_pairs=1, bad_rows=False, manifest_name="part-0.parquet", sizes=[(64, 64)]
    )
    common = ["--manifest-root", str(root), "--output", str(tmp_path / "out"), "--model", tiny_model_dir]
    assert backfill([*common, "--start", "2026-11-05", "--end", "2026-11-01"]) == 2
    assert "after --end" in capsys.readouterr().err
    assert backfill([*common, "--start", "2026-12-01", "--end", "2026-12-31"]) == 2
    assert "no dt= partition between 2026-12-01 and 2026-12-31" in capsys.readouterr().err
    assert backfill([*common, "--start", "2026-11-31", "--end", "2026-12-01"]) == 2
    assert "not a date" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
