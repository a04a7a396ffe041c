"""The first stage: manifest files in, rows tagged with their state bucket out.

Each task reads one manifest file (streamed in batches, bounded memory) and tags every row with
its pair's state bucket (`output.state.bucket_of`) and its file, for the resume stage's group-by.
`planned_batches` is the whole read + validate + resume path of one file on one machine, for
`--dry-run` and training: `rows.validate_rows` (a bad row becomes data) and
`resume.resume_batch` (`action` = render | reuse, and the carried columns `prev_*`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline import manifest
from pipeline.config import RENDER_DEFAULTS
from pipeline.output.state import bucket_of
from pipeline.resume import StateIndex, resume_batch
from pipeline.rows import validate_rows
from pipeline.schema import BUCKET, FILE_INDEX

__all__ = ["ReadConfig", "planned_batches", "read_files"]


@dataclass(frozen=True)
class ReadConfig:
    plan: manifest.ManifestPlan  # the files to read, and the schema they are cast to
    batch_rows: int = 16384  # rows per yielded block (the resume stage's shuffle regroups them)
    num_cpus: float = RENDER_DEFAULTS.cpu_stage_cpus  # per task

    def map_options(self) -> dict:
        return {"batch_size": 1, "num_cpus": self.num_cpus}


def _one_file(plan: manifest.ManifestPlan, file_index: int) -> manifest.ManifestPlan:
    return dataclasses.replace(
        plan,
        files=(plan.files[file_index],),
        file_rows=(plan.file_rows[file_index],),
        default_shards=(plan.default_shards[file_index],),
        partitions=None if plan.partitions is None else (plan.partitions[file_index],),
    )


def planned_batches(
    plan: manifest.ManifestPlan,
    file_index: int,
    conflicts: manifest.PairIdConflicts,
    index: StateIndex | None,
    batch_rows: int,
    verify_inputs: bool = False,
    row_range: tuple[int, int] | None = None,
) -> Iterator[pa.Table]:
    """One manifest file, streamed: validated rows with their resume action, on one machine
    (`--dry-run`, training): `conflicts` and `index` cover the whole manifest. `row_range`
    `(start, end)`: only the file's rows start <= row < end (a training store's part); the
    rows before it are streamed past unvalidated."""
    one = _one_file(plan, file_index)
    folder = manifest.file_folder(plan.files[file_index])
    partition = None if plan.partitions is None else plan.partitions[file_index]
    start, end = row_range or (0, plan.file_rows[file_index])
    for batch in manifest.iter_batches(one, batch_size=batch_rows):
        first = batch.column(manifest.SOURCE_ROW)[0].as_py()
        if first >= end:
            return
        if first + batch.num_rows <= start:
            continue
        batch = batch.slice(max(0, start - first), min(batch.num_rows, end - first) - max(0, start - first))
        yield resume_batch(validate_rows(batch, folder, conflicts, partition), index, verify_inputs)


def read_files(files: pa.Table, *, config: ReadConfig) -> Iterator[pa.Table]:
    """The stage (a generator `map_batches` function over blocks of `{"file_index": i}` rows):
    each file's rows as read, with their state bucket and file index, for the resume stage's
    group-by (`stages.resume_stage`: validation and the resume decision happen there, where
    all rows of a pair_id meet)."""
    for i in files["file_index"].to_pylist():
        one = _one_file(config.plan, int(i))
        for batch in manifest.iter_batches(one, batch_size=config.batch_rows):
            table = pa.Table.from_batches([batch])
            table = table.append_column(BUCKET, bucket_of(table["pair_id"]))
            yield table.append_column(FILE_INDEX, pa.array(np.full(table.num_rows, int(i), np.int32)))
