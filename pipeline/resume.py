"""Which rows of this run to render, and which to carry over from earlier runs. No torch.

The *reusable* state (`reusable_state`) is the latest row per pair with this run's model and
settings digests: `ok` rows (with `--verify-images`, only while their image still exists), and
`failed` rows unless `--retry-failed` (or their failure is one the run's own options decide:
REJUDGED_CODES). Manifest rows are joined against it (`StateIndex` + `resume_batch`): a valid
row whose pair matches and whose inputs are the ones the earlier row was rendered from (the
`inputs_digest` of its input columns: context, product and mask URIs, bbox, seed, scene_id and
step) gets `action="reuse"` and the earlier row's results (its output manifest row is written
again, with `attempt=0`); every other row gets `action="render"`. With `--verify-inputs` an ok
row is reused only while its input files are the ones it was rendered from, too (`storage.version`
of each: a stat locally, a HEAD on S3, per reused row).
`--force` reuses nothing. A render run does this one state bucket at a time on the cluster
(`stages.resume_stage`); `--dry-run` on the driver (`stages.read_stage.planned_batches`).
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.schema import CARRIED_COLUMNS, PREV, RENDER, REUSE, set_columns, state_schema

__all__ = ["reusable_state", "StateIndex", "resume_batch", "inputs_digest", "inputs_version", "REJUDGED_CODES"]

# A row's inputs: what its pixels are made from. URIs, bbox and seed as validated (resolved,
# normalised), so that a relative path and its absolute form are the same input.
INPUT_COLUMNS = ("context_uri", "product_uri", "mask_uri", "bbox", "seed", "scene_id", "step")
URI_COLUMNS = ("context_uri", "product_uri", "mask_uri")

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


def inputs_digest(batch: pa.Table) -> pa.Array:
    """Each validated row's digest of its INPUT_COLUMNS (a column the manifest lacks counts as null)."""
    n = batch.num_rows
    columns = [batch[c].to_pylist() if c in batch.column_names else [None] * n for c in INPUT_COLUMNS]
    return pa.array(
        [
            hashlib.blake2b(json.dumps(values, default=str).encode(), digest_size=16).hexdigest()
            for values in zip(*columns)
        ],
        pa.string(),
    )


def inputs_version(uris: list[str | None]) -> str | None:
    """The versions of a row's input files in one string (`storage.version` of each: a stat, or a
    HEAD on S3); None when one of them has none (absent, http)."""
    versions = [storage.version(uri) if uri else "" for uri in uris]
    if any(v is None for v in versions):
        return None
    return hashlib.blake2b("\n".join(versions).encode(), digest_size=16).hexdigest()


class StateIndex:
    """pair_id -> (row, seed) over the reusable state, built once per worker process.

    (Arrow's hash join cannot carry list columns such as crop_box, and `index_in` would rebuild
    its hash table for every batch: a plain dict is built once and probed per row.)
    """

    def __init__(self, state: pa.Table):
        self.state = state.select(["pair_id", "seed", *CARRIED_COLUMNS])
        self.rows = {pair_id: i for i, pair_id in enumerate(self.state["pair_id"].to_pylist())}
        self.seeds = self.state["seed"].to_pylist()
        digests = state["inputs_digest"] if "inputs_digest" in state.column_names else pa.nulls(state.num_rows)
        self.inputs = digests.to_pylist()
        self.status = self.state["status"].to_pylist()
        self.versions = self.state["inputs_version"].to_pylist()

    def same_inputs(self, row: int, digest: str) -> bool:
        # A row from before inputs were recorded (null digest) is taken as rendered from this
        # row's inputs, and the reuse records them: re-rendering every pair of an existing
        # output after an upgrade would cost what its runs cost, and these rows were reused on
        # pair_id and seed before. An input edited before that first run goes unnoticed:
        # --force re-renders such pairs.
        return self.inputs[row] is None or self.inputs[row] == digest


def resume_batch(batch: pa.Table, index: StateIndex | None, verify_inputs: bool = False) -> pa.Table:
    """Add `inputs_digest`, `action` and, for reused rows, the carried result columns `prev_*`
    (null elsewhere). `verify_inputs`: an ok row is reused only if its input files' versions
    are those recorded when it was rendered (a row without them is rendered again)."""
    n = batch.num_rows
    digests = inputs_digest(batch)
    take: list[int | None] = [None] * n
    if index is not None:
        uris = [batch[c].to_pylist() for c in URI_COLUMNS]
        for i, (pair_id, seed, code, digest) in enumerate(
            zip(batch["pair_id"].to_pylist(), batch["seed"].to_pylist(), batch["error_code"].to_pylist(), digests)
        ):
            row = index.rows.get(pair_id)
            if row is None or code or index.seeds[row] != seed or not index.same_inputs(row, digest.as_py()):
                continue
            if verify_inputs and index.status[row] == "ok":
                recorded = index.versions[row]
                if recorded is None or recorded != inputs_version([u[i] for u in uris]):
                    continue
            take[i] = row
    batch = set_columns(batch, {"inputs_digest": digests})
    batch = batch.append_column("action", pa.array([RENDER if t is None else REUSE for t in take], pa.string()))
    if index is None:  # typed nulls: blocks with and without reused rows must concatenate
        carried = {c: pa.nulls(n, state_schema().field(c).type) for c in CARRIED_COLUMNS}
    else:
        rows = index.state.take(pa.array(take, pa.int64()))  # null index -> null row
        carried = {c: rows[c] for c in CARRIED_COLUMNS}
    for c in CARRIED_COLUMNS:
        batch = batch.append_column(PREV + c, carried[c])
    return batch
