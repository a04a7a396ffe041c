"""The done index under `--output`: which pairs earlier runs finished, and how.

    state/buckets/0000.parquet .. 0255.parquet    the latest row per pair, a pair in bucket_of(pair_id)
    state/done.json                               layout 2, the runs folded in, pairs per bucket

The index is hash-partitioned so that no process ever needs all of it: a render run's resume
stage reads, per bucket of the manifest's pair_ids, that bucket's file only
(`stages.resume_stage`), and `compact_state` folds runs into it on the cluster, rewriting only
the buckets their rows fall in. `STATE_BUCKETS` is fixed for the life of an output (a pair
must stay in its bucket); at 100M pairs a bucket holds ~400k rows (~60 MB of Parquet).

- `compact_state()`: fold every run's manifest that is not folded yet into the buckets (Ray
  Data: a group-by on the bucket, one task per touched bucket; a few part files, a small run's,
  in this process: starting Ray's tasks for them took longer than the fold). A run calls it at its start
  (a killed run's part files count: that is how a re-run finishes the remainder without
  rendering done pairs again) and at its end.
- `load_state()`: the whole index as one table, on one machine: for `--dry-run` and tests.

Layout 1 (before buckets) was one `state/done.parquet`; it is still read: the first compaction
folds it into the buckets like a run's rows, and removes it once done.json says layout 2.
Driver-side (no torch). The columns are `schema.STATE_COLUMNS`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.output.layout import Layout
from pipeline.schema import BUCKET, state_schema

__all__ = ["STATE_BUCKETS", "bucket_of", "read_bucket", "load_state", "compact_state", "uncompacted_runs"]

STATE_BUCKETS = 256
LAYOUT_VERSION = 2
# Folds of up to this many part files run in this process: a run's parts hold up to 1000 rows
# (`--manifest-part-rows`), so at most ~4000 rows, at most every bucket file read and written once.
LOCAL_FOLD_FILES = 4
# Rows that are not state: a pair_id naming several inputs at once has no result, and a
# superseded row's pair has its result from another row.
NOT_STATE = ("duplicate_pair_id", "superseded")


def bucket_of(pair_ids: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Each pair_id's bucket (int32; null ids in bucket 0). A digest, not `hash()`: stable across
    processes, machines and Python versions, as the files it names outlive them."""

    def bucket(pair_id: str | None) -> int:
        if pair_id is None:
            return 0
        return int.from_bytes(hashlib.blake2b(pair_id.encode(), digest_size=8).digest(), "big") % STATE_BUCKETS

    return pa.array([bucket(p) for p in pair_ids.to_pylist()], pa.int32())


def _meta(layout: Layout) -> dict:
    try:
        return json.loads(storage.read_bytes(layout.state_meta))
    except FileNotFoundError:
        return {}


def _legacy(layout: Layout, meta: dict) -> bool:
    """A layout-1 `state/done.parquet` that is not folded into the buckets yet."""
    return meta.get("layout", 1) < LAYOUT_VERSION and storage.exists(layout.state)


def _run_dirs(layout: Layout) -> list[str]:
    listing = storage.list_files(storage.join(layout.output, "manifest"))
    return sorted({rel.split("/")[0] for rel, _, _ in listing if rel.endswith(".parquet")})


def uncompacted_runs(layout: Layout, exclude_run: str | None = None) -> list[str]:
    """Runs with manifest parts that are not folded into the index yet (oldest first)."""
    folded = set(_meta(layout).get("compacted_runs", []))
    return [run for run in _run_dirs(layout) if run not in folded and run != exclude_run]


def _part_files(layout: Layout, runs: list[str]) -> list[str]:
    return [
        storage.join(layout.manifest_dir(run), rel)
        for run in runs
        for rel, _, _ in storage.list_files(layout.manifest_dir(run))
        if rel.endswith(".parquet")
    ]


def _state_rows(uri: str) -> pa.Table:
    """A manifest part's (or layout-1 index's) state columns, without the rows that are not state."""
    table = storage.read_parquet(uri, schema=state_schema())
    return table.filter(pc.invert(pc.is_in(table["error_code"].fill_null(""), value_set=pa.array(NOT_STATE))))


def latest(table: pa.Table) -> pa.Table:
    """The latest row per pair_id (by finished_at). A reused row keeps its earlier row's
    finished_at; of such equals the first in the table (the index's own row) stays, unless only
    the later one records the inputs (an index row written without them is reused once and
    recorded with them: `resume.StateIndex.same_inputs`)."""
    if table.num_rows < 2:
        return table
    order, unrecorded = "_order", "_no_inputs"
    table = table.append_column(order, pa.array(np.arange(table.num_rows)))
    recorded = table["inputs_digest"] if "inputs_digest" in table.column_names else pa.nulls(table.num_rows)
    table = table.append_column(unrecorded, pc.is_null(recorded))
    keys = [("pair_id", "ascending"), ("finished_at", "descending"), (unrecorded, "ascending"), (order, "ascending")]
    table = table.sort_by(keys)
    pair = table.column("pair_id")
    keep = pc.invert(pc.equal(pair.slice(1), pair.slice(0, len(pair) - 1)).fill_null(False))
    return table.filter(pa.concat_arrays([pa.array([True]), keep.combine_chunks()])).drop_columns([order, unrecorded])


def read_bucket(layout: Layout, bucket: int) -> pa.Table:
    """One bucket of the index (empty when it has no file yet)."""
    try:
        return storage.read_parquet(layout.state_bucket(bucket), schema=state_schema())
    except FileNotFoundError:
        return state_schema().empty_table()


def load_state(layout: Layout, exclude_run: str | None = None) -> pa.Table:
    """The latest row per pair across the buckets, a layout-1 index and every run not folded
    in yet: the whole index in this process's memory (dry runs and tests, not render runs)."""
    meta = _meta(layout)
    parts = [read_bucket(layout, int(rel.split(".")[0])) for rel in _bucket_files(layout)]
    if _legacy(layout, meta):
        parts.append(_state_rows(layout.state))
    parts += [_state_rows(uri) for uri in _part_files(layout, uncompacted_runs(layout, exclude_run))]
    return latest(pa.concat_tables(parts)) if parts else state_schema().empty_table()


def _bucket_files(layout: Layout) -> list[str]:
    return [rel for rel, _, _ in storage.list_files(layout.state_buckets_dir) if rel.endswith(".parquet")]


def _read_sources(batch: pa.Table) -> pa.Table:
    """Ray stage: the state rows of a few source files, with their bucket."""
    tables = [_state_rows(uri) for uri in batch["uri"].to_pylist()]
    table = pa.concat_tables(tables) if tables else state_schema().empty_table()
    return table.append_column(BUCKET, bucket_of(table["pair_id"]))


def _merge_bucket(rows: pa.Table, output: str) -> pa.Table:
    """Ray stage (one group = one bucket's new rows): the bucket file rewritten with them."""
    layout, bucket = Layout(output), int(rows[BUCKET][0].as_py())
    merged = latest(pa.concat_tables([read_bucket(layout, bucket), rows.drop_columns([BUCKET]).cast(state_schema())]))
    storage.write_parquet(layout.state_bucket(bucket), merged)
    return pa.table({"bucket": [bucket], "pairs": [merged.num_rows]})


def compact_state(
    layout: Layout, num_cpus: float, exclude_run: str | None = None, connect: Callable | None = None
) -> int:
    """Fold every run not folded yet (but `exclude_run`) and a layout-1 index into the buckets,
    on the Ray cluster (`connect()` joins it when the fold needs it; None: this process is
    connected) or, a few part files, in this process; returns the pairs in the index.

    Idempotent: done.json is written after the buckets, so a kill in between only means those
    runs are folded again next time (the latest row per pair is the same row), never that one
    is skipped."""
    meta = _meta(layout)
    runs = uncompacted_runs(layout, exclude_run)
    legacy = _legacy(layout, meta)
    sources = ([layout.state] if legacy else []) + _part_files(layout, runs)
    pairs = dict(meta.get("bucket_pairs", {}))
    if sources and not legacy and len(sources) <= LOCAL_FOLD_FILES:
        rows = _read_sources(pa.table({"uri": sources}))
        for bucket in pc.unique(rows[BUCKET]).to_pylist():
            merged = _merge_bucket(rows.filter(pc.equal(rows[BUCKET], bucket)), layout.output)
            pairs[f"{bucket:04d}"] = merged["pairs"][0].as_py()
    elif sources:
        if connect is not None:
            connect()
        import ray

        files = ray.data.from_items([{"uri": uri} for uri in sources], override_num_blocks=min(len(sources), 200))
        rows = files.map_batches(_read_sources, batch_format="pyarrow", batch_size=8, num_cpus=num_cpus)
        merged = rows.groupby(BUCKET, num_partitions=_partitions(len(sources))).map_groups(
            _merge_bucket, batch_format="pyarrow", fn_kwargs=dict(output=layout.output), num_cpus=num_cpus
        )
        for batch in merged.iter_batches(batch_format="pyarrow", batch_size=None):
            pairs.update({f"{b:04d}": n for b, n in zip(batch["bucket"].to_pylist(), batch["pairs"].to_pylist())})
    folded = sorted(set(meta.get("compacted_runs", [])) | set(runs))
    if sources or meta.get("layout") != LAYOUT_VERSION:
        new_meta = {
            "layout": LAYOUT_VERSION,
            "buckets": STATE_BUCKETS,
            "compacted_runs": folded,
            "pairs": sum(pairs.values()),
            "bucket_pairs": pairs,
            "updated_at": time.time(),
        }
        storage.write_bytes(layout.state_meta, json.dumps(new_meta, indent=1).encode())
    if storage.exists(layout.state):  # layout 1, folded in above (or by an earlier run)
        storage.delete(layout.state)
    return sum(pairs.values())


def _partitions(files: int) -> int:
    """Shuffle partitions of a fold: a run's parts hold up to 1000 rows each (`--manifest-part-rows`)."""
    return max(1, min(64, files // 50 + 1))
