"""Which rows of this run to render, and which to carry over from earlier runs. No torch.

The *reusable* state (`reusable_state`) is the latest row per pair with this run's model and
settings digests: `ok` rows (with `--verify-images`, only while their image still exists), and
`failed` rows unless `--retry-failed` (or their failure is one the run's own options decide:
REJUDGED_CODES). Manifest rows are joined against it (`StateIndex` + `resume_batch`): a valid
row whose pair and seed match gets `action="reuse"` and the earlier row's results (its output
manifest row is written again, with `attempt=0`); every other row gets `action="render"`.
`--force` reuses nothing. A render run does this one state bucket at a time on the cluster
(`stages.resume_stage`); `--dry-run` on the driver (`stages.read_stage.planned_batches`).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.schema import CARRIED_COLUMNS, PREV, RENDER, REUSE, state_schema

__all__ = ["reusable_state", "StateIndex", "resume_batch", "REJUDGED_CODES"]

# Failures that this run decides anew, judged again every run instead of carried over: an input
# refused by the allowlist may be allowed now (--allow-root, --allow-http); a scene's failures
# come from its other rows (a fixed gap, a predecessor that renders now). Judging any of them
# fetches nothing.
REJUDGED_CODES = ("uri_not_allowed", "scene_invalid", "upstream_failed")


def reusable_state(
    state: pa.Table, model_digest: str, settings_digest: str, existing_images: set[str] | None, retry_failed: bool
) -> pa.Table:
    """The state rows a run may reuse (see the module docstring). `existing_images`: the image
    URIs known to exist (None: trust the index, which records only images already written)."""
    if state.num_rows == 0:
        return state
    same = pc.and_(pc.equal(state["model_digest"], model_digest), pc.equal(state["settings_digest"], settings_digest))
    state = state.filter(same)
    ok = pc.equal(state["status"], "ok")
    if existing_images is None:
        has_image = pa.scalar(True)
    else:
        images = pa.array(sorted(existing_images), pa.string())
        has_image = pc.is_in(state["output_uri"], value_set=images).fill_null(False)
    rejudged = pc.is_in(state["error_code"], value_set=pa.array(REJUDGED_CODES)).fill_null(False)
    carried_failure = pc.and_(pc.and_(pc.invert(ok), pc.invert(rejudged)), pa.scalar(not retry_failed))
    return state.filter(pc.or_(pc.and_(ok, has_image), carried_failure))


class StateIndex:
    """pair_id -> (row, seed) over the reusable state, built once per worker process.

    (Arrow's hash join cannot carry list columns such as crop_box, and `index_in` would rebuild
    its hash table for every batch: a plain dict is built once and probed per row.)
    """

    def __init__(self, state: pa.Table):
        self.state = state.select(["pair_id", "seed", *CARRIED_COLUMNS])
        self.rows = {pair_id: i for i, pair_id in enumerate(self.state["pair_id"].to_pylist())}
        self.seeds = self.state["seed"].to_pylist()


def resume_batch(batch: pa.Table, index: StateIndex | None) -> pa.Table:
    """Add `action` and, for reused rows, the carried result columns `prev_*` (null elsewhere)."""
    n = batch.num_rows
    take: list[int | None] = [None] * n
    if index is not None:
        for i, (pair_id, seed, code) in enumerate(
            zip(batch["pair_id"].to_pylist(), batch["seed"].to_pylist(), batch["error_code"].to_pylist())
        ):
            row = index.rows.get(pair_id)
            if row is not None and not code and index.seeds[row] == seed:
                take[i] = row
    batch = batch.append_column("action", pa.array([RENDER if t is None else REUSE for t in take], pa.string()))
    if index is None:  # typed nulls: blocks with and without reused rows must concatenate
        carried = {c: pa.nulls(n, state_schema().field(c).type) for c in CARRIED_COLUMNS}
    else:
        rows = index.state.take(pa.array(take, pa.int64()))  # null index -> null row
        carried = {c: rows[c] for c in CARRIED_COLUMNS}
    for c in CARRIED_COLUMNS:
        batch = batch.append_column(PREV + c, carried[c])
    return batch
