"""The first stage: manifest files in, validated rows with their resume action out.

Each task reads one manifest file (streamed in batches, bounded memory), validates its rows
(`rows.validate_rows`: a bad row becomes data) and joins them against the reusable state of
earlier runs (`resume.resume_batch`: `action` = render | reuse, and the carried result columns
`prev_*` of reused rows). `planned_batches` is the same path on the driver, for `--dry-run`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa

from pipeline import manifest
from pipeline.resume import StateIndex, resume_batch
from pipeline.rows import validate_rows

__all__ = ["ReadConfig", "planned_batches", "read_files"]


@dataclass(frozen=True)
class ReadConfig:
    plan: manifest.ManifestPlan  # the files to read, and the schema they are cast to
    batch_rows: int = 64  # rows per yielded batch (a few model batches)
    num_cpus: float = 0.5  # per task

    def map_options(self) -> dict:
        return {"batch_size": 1, "num_cpus": self.num_cpus}


def planned_batches(
    plan: manifest.ManifestPlan,
    file_index: int,
    conflicts: manifest.PairIdConflicts,
    index: StateIndex | None,
    batch_rows: int,
) -> Iterator[pa.Table]:
    """One manifest file, streamed: validated rows with their resume action."""
    one = dataclasses.replace(
        plan,
        files=(plan.files[file_index],),
        file_rows=(plan.file_rows[file_index],),
        default_shards=(plan.default_shards[file_index],),
    )
    folder = manifest.file_folder(plan.files[file_index])
    partition = None if plan.partitions is None else plan.partitions[file_index]
    for batch in manifest.iter_batches(one, batch_size=batch_rows):
        yield resume_batch(validate_rows(batch, folder, conflicts, partition), index)


_PER_PROCESS: dict[str, object] = {}  # this run's conflicts and state index, once per worker process


def read_files(files: dict, *, config: ReadConfig, conflicts_ref: list, state_ref: list) -> Iterator[pa.Table]:
    """The stage (a generator `map_batches` function over blocks of `{"file_index": i}` rows).

    The pair_id conflicts and the state arrive as object refs inside lists (Ray resolves only
    top-level refs); each worker process fetches them, and builds the state's index, once per
    run, not per file."""
    import ray

    refs = tuple(ref[0].hex() if ref else None for ref in (conflicts_ref, state_ref))
    if _PER_PROCESS.get("refs") != refs:  # a new run (a reused worker process), or the first file
        _PER_PROCESS.clear()
        _PER_PROCESS["refs"] = refs
        _PER_PROCESS["conflicts"] = ray.get(conflicts_ref[0]) if conflicts_ref else manifest.PairIdConflicts()
        _PER_PROCESS["state"] = StateIndex(ray.get(state_ref[0])) if state_ref else None
    conflicts, state_index = _PER_PROCESS["conflicts"], _PER_PROCESS["state"]
    for i in files["file_index"]:
        yield from planned_batches(config.plan, int(i), conflicts, state_index, config.batch_rows)
