"""The done index's layout without Ray (`output/state.py`): buckets, a layout-1 file and runs
not folded in yet, read together; the bucket hash spreads pairs evenly. (Folding runs into the
buckets is a Ray group-by: tests/integration/test_render_job.py and test_resume_scale.py.)"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.output.layout import Layout
from pipeline.output.state import STATE_BUCKETS, bucket_of, load_state, read_bucket, uncompacted_runs
from pipeline.schema import state_schema


def rows(pairs: list[tuple[str, str, str]], run_id: str) -> pa.Table:
    """State rows (pair_id, status, finished_at), the other columns null."""
    n = len(pairs)
    values = {
        "pair_id": [p for p, _, _ in pairs],
        "status": [s for _, s, _ in pairs],
        "finished_at": [t for _, _, t in pairs],
        "run_id": [run_id] * n,
        "error_code": ["duplicate_pair_id" if s == "dup" else None for _, s, _ in pairs],
    }
    return pa.table({f.name: values.get(f.name, pa.nulls(n, f.type)) for f in state_schema()}, schema=state_schema())


def test_load_state_reads_buckets_a_layout_one_file_and_unfolded_runs_latest_row_wins(tmp_path):
    layout = Layout(str(tmp_path))
    storage.write_parquet(layout.state, rows([("a", "failed", "2026-11-01T00:00:00")], "old"))  # layout 1
    b = rows([("b", "ok", "2026-11-02T00:00:00")], "folded")
    storage.write_parquet(layout.state_bucket(bucket_of(b["pair_id"])[0].as_py()), b)
    storage.write_bytes(layout.state_meta, json.dumps({"layout": 1, "compacted_runs": ["folded"]}).encode())
    killed = rows(
        [("a", "ok", "2026-11-03T00:00:00"), ("c", "ok", "2026-11-03T00:00:01"), ("d", "dup", "2026-11-03T00:00:02")],
        "killed",
    )
    storage.write_parquet(layout.manifest_part("killed", 0), killed)
    storage.write_parquet(layout.manifest_part("folded", 0), b)  # listed in done.json: not read again

    assert uncompacted_runs(layout) == ["killed"] and uncompacted_runs(layout, exclude_run="killed") == []
    state = load_state(layout).sort_by("pair_id")
    assert state["pair_id"].to_pylist() == ["a", "b", "c"]  # d: a duplicate_pair_id row is no result
    assert state["run_id"].to_pylist() == ["killed", "folded", "killed"]  # a: the later row wins
    home = bucket_of(pa.array(["b"]))[0].as_py()
    assert read_bucket(layout, home)["pair_id"].to_pylist() == ["b"]
    empty = read_bucket(layout, (home + 1) % STATE_BUCKETS)  # no file yet
    assert empty.num_rows == 0 and empty.schema == state_schema()


def test_bucket_of_spreads_pair_ids_evenly():
    buckets = bucket_of(pa.array([f"sku-{i}" for i in range(25_600)])).to_numpy()
    counts = np.bincount(buckets, minlength=STATE_BUCKETS)
    assert buckets.min() >= 0 and buckets.max() < STATE_BUCKETS
    assert counts.max() < 2 * counts.mean()  # no hot bucket (a bucket file is rewritten whole)
