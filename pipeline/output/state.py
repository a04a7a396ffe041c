"""The done index under `--output`: which pairs earlier runs finished, and how.

- `load_state()`: the latest row per pair_id, from `state/done.parquet` plus the manifests of
  runs that are not compacted into it yet (a killed run's part files count: that is how a
  re-run finishes the remainder without rendering done pairs again).
- `compact_state()`: rewrite `state/done.parquet` at the end of a run.

Driver-side (no torch). The columns are `schema.STATE_COLUMNS`.
"""

from __future__ import annotations

import json
import time

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.output.layout import Layout
from pipeline.schema import STATE_COLUMNS, state_schema

__all__ = ["load_state", "compact_state"]


def _compacted_runs(layout: Layout) -> list[str]:
    try:
        return json.loads(storage.read_bytes(layout.state_meta))["compacted_runs"]
    except FileNotFoundError:
        return []


def _run_dirs(layout: Layout) -> list[str]:
    listing = storage.list_files(storage.join(layout.output, "manifest"))
    runs = {rel.split("/")[0] for rel, _, _ in listing if rel.endswith(".parquet")}
    return sorted(runs)


def _latest(table: pa.Table) -> pa.Table:
    """The latest row per pair_id (by finished_at)."""
    if table.num_rows == 0:
        return table
    table = table.sort_by([("pair_id", "ascending"), ("finished_at", "descending")])
    pair = table.column("pair_id")
    keep = pc.invert(pc.equal(pair.slice(1), pair.slice(0, len(pair) - 1)).fill_null(False)) if len(pair) > 1 else None
    if keep is None:
        return table
    mask = pa.concat_arrays([pa.array([True]), keep.combine_chunks()])
    return table.filter(mask)


def load_state(layout: Layout, exclude_run: str | None = None) -> pa.Table:
    """Latest row per pair across the compacted index and every uncompacted run's manifest."""
    parts: list[pa.Table] = []
    if storage.exists(layout.state):
        parts.append(storage.read_parquet(layout.state, list(STATE_COLUMNS)))
    compacted = set(_compacted_runs(layout))
    for run in _run_dirs(layout):
        if run in compacted or run == exclude_run:
            continue
        for rel, _, _ in storage.list_files(layout.manifest_dir(run)):
            if rel.endswith(".parquet"):
                table = storage.read_parquet(storage.join(layout.manifest_dir(run), rel), list(STATE_COLUMNS))
                parts.append(table.cast(state_schema()))
    # duplicate_pair_id and superseded rows are not state: a pair_id naming several inputs at
    # once has no result, and a superseded row's pair has its result from another row
    not_state = pa.array(["duplicate_pair_id", "superseded"])
    tables = [t.filter(pc.invert(pc.is_in(t.column("error_code").fill_null(""), value_set=not_state))) for t in parts]
    if not tables:
        return state_schema().empty_table()
    return _latest(pa.concat_tables([t.cast(state_schema()) for t in tables]))


def compact_state(layout: Layout) -> int:
    """Fold every run's manifest into `state/done.parquet`; returns the number of pairs in it."""
    state = load_state(layout)
    storage.write_parquet(layout.state, state)
    # done.json lists the runs folded in; written after done.parquet so a kill in between only
    # means those runs are read again next time (idempotent), never that one is skipped.
    meta = {"compacted_runs": _run_dirs(layout), "pairs": state.num_rows, "updated_at": time.time()}
    storage.write_bytes(layout.state_meta, json.dumps(meta).encode())
    return state.num_rows
