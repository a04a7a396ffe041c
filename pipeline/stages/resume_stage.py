"""The resume stage: one bucket of pair_ids at a time, every row of the run validated and given
its action (render | reuse), on the cluster.

    read_stage (rows + their bucket) ─▶ group by bucket (Ray Data hash shuffle) ─▶ resume_bucket ─▶ prepare

All rows of a pair_id meet in one call, with the one state file that can hold their pair
(`output.state`, hash-partitioned the same way). So per call: the pair_id conflicts among these
rows (`manifest.conflicts_of`: duplicates in any file, a backfill's superseded rows), each row
validated against its own file's folder and partition (`rows.validate_rows`), the bucket's
reusable state (`resume.reusable_state`, with `--verify-images` a HEAD per candidate image)
and the join (`resume.resume_batch`: same pair, seed and inputs; with `--verify-inputs` a stat
or HEAD per input file of a candidate). No process holds more than one bucket's state and the
rows of the buckets its shuffle partition received; the driver holds none.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import manifest, storage
from pipeline.config import RENDER_DEFAULTS
from pipeline.output.layout import Layout
from pipeline.output.state import read_bucket
from pipeline.resume import StateIndex, resume_batch, reusable_state
from pipeline.rows import validate_rows
from pipeline.schema import BUCKET, FILE_INDEX, require_columns
from pipeline.stages.scene_stage import GROUP, group_keys

__all__ = ["ResumeConfig", "resume_bucket"]


@dataclass(frozen=True)
class ResumeConfig:
    plan: manifest.ManifestPlan  # the files the rows came from (folders, partitions)
    output: str  # the run's --output (the state buckets under it)
    model_digest: str
    settings_digest: str
    force: bool = False  # reuse nothing (conflicts and validation still apply)
    retry_failed: bool = False  # failed rows are rendered again, not carried
    verify_images: bool = False  # an ok row is reused only if its image still exists (one HEAD each)
    verify_inputs: bool = False  # an ok row is reused only if its input files are unchanged (a HEAD or stat each)
    scenes: bool = False  # the manifest has scene columns: tag rows with their scene group (scene_stage.GROUP)
    num_cpus: float = RENDER_DEFAULTS.cpu_stage_cpus  # per task

    def partitions(self, rows: int) -> int:
        """Shuffle partitions: each reducer holds about 200k rows (~60 MB of manifest)."""
        return max(1, min(256, rows // 200_000 + 1))

    def map_options(self) -> dict:
        return {"num_cpus": self.num_cpus}


def resume_bucket(rows: pa.Table, *, config: ResumeConfig) -> pa.Table:
    """The stage (a `map_groups` function; one group = the run's rows of one state bucket)."""
    require_columns("resume", rows)
    plan = config.plan
    parts = None
    if plan.partitions is not None:
        parts = pc.take(pa.array(plan.partitions, pa.string()), rows[FILE_INDEX])
    conflicts = manifest.conflicts_of(rows["pair_id"], parts)
    bucket = int(rows[BUCKET][0].as_py())
    index = None if config.force else _bucket_index(rows, config)
    rows = rows.sort_by(FILE_INDEX)
    files = rows[FILE_INDEX].to_numpy()
    starts = np.flatnonzero(np.r_[True, files[1:] != files[:-1]]) if len(files) else np.array([], np.int64)
    out = []
    for start, stop in zip(starts, [*starts[1:], len(files)]):
        i = int(files[start])
        one_file = rows.slice(int(start), int(stop - start)).drop_columns([BUCKET, FILE_INDEX])
        partition = None if plan.partitions is None else plan.partitions[i]
        validated = validate_rows(one_file, manifest.file_folder(plan.files[i]), conflicts, partition)
        out.append(resume_batch(validated, index, config.verify_inputs))
    table = pa.concat_tables(out)
    if config.scenes:
        table = table.append_column(GROUP, group_keys(table["scene_id"], pa.array([bucket] * table.num_rows)))
    return table


def _bucket_index(rows: pa.Table, config: ResumeConfig) -> StateIndex | None:
    """The reusable state of this bucket, for the pair_ids of these rows only."""
    state = read_bucket(Layout(config.output), int(rows[BUCKET][0].as_py()))
    state = state.filter(pc.is_in(state["pair_id"], value_set=pc.unique(rows["pair_id"])))
    existing = None
    if config.verify_images:
        candidates = state.filter(pc.equal(state["status"], "ok"))["output_uri"].to_pylist()
        existing = {uri for uri in candidates if uri and storage.exists(uri)}
    state = reusable_state(state, config.model_digest, config.settings_digest, existing, config.retry_failed)
    return StateIndex(state) if state.num_rows else None
