"""The driver's sink: output-manifest rows, in part files, after their images exist. No torch.

Rows arrive from the finish stage (images already written); `ManifestWriter` casts them to the
run's output schema (`schema.output_schema`: the input columns as the plan typed them, then
the output columns of DESIGN.md; columns outside it, such as the stages' timings, are not
written) and writes `manifest/<run_id>/part-NNNNN.parquet` every `part_rows` rows or `flush_s`
seconds, so a killed run loses at most the rows of one unflushed part (their pairs are
rendered again by the next run; never lost). `fence`, when given, is called with the part's
name right before each part is written and raises to stop the write (the driver passes
`OutputLock.check`: a run that lost the output lock writes no more rows). The run's counts are
`pipeline.output.stats`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pyarrow as pa

from pipeline import storage
from pipeline.output.layout import Layout

__all__ = ["ManifestWriter"]


class ManifestWriter:
    def __init__(
        self,
        layout: Layout,
        run_id: str,
        schema: pa.Schema,
        part_rows: int,
        flush_s: float = 30.0,
        fence: Callable[[str], None] | None = None,
    ):
        self.layout, self.run_id, self.schema, self.fence = layout, run_id, schema, fence
        self.part_rows, self.flush_s = part_rows, flush_s
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.parts = 0  # part files written
        self.last_flush = time.monotonic()

    def add(self, batch: pa.Table) -> pa.Table:
        """Queue a block's rows (flushing when a part is full or old); returns them as written."""
        table = pa.table({f.name: self._column(batch, f) for f in self.schema}, schema=self.schema)
        self.pending.append(table)
        self.pending_rows += table.num_rows
        if self.pending_rows >= self.part_rows or time.monotonic() - self.last_flush >= self.flush_s:
            self.flush()
        return table

    @staticmethod
    def _column(batch: pa.Table, field: pa.Field) -> pa.ChunkedArray | pa.Array:
        if field.name not in batch.column_names:
            return pa.nulls(batch.num_rows, field.type)
        column = batch[field.name]
        if column.type == field.type:
            return column
        if pa.types.is_null(column.type):
            return pa.nulls(batch.num_rows, field.type)
        return column.cast(field.type)

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.pending:
            return
        if self.fence is not None:
            self.fence(f"manifest part {self.parts}")
        storage.write_parquet(self.layout.manifest_part(self.run_id, self.parts), pa.concat_tables(self.pending))
        self.parts += 1
        self.pending, self.pending_rows = [], 0
        # Hand freed Arrow buffers back to the OS: the driver sees thousands of small tables,
        # and a retaining allocator would otherwise make its memory grow with the row count.
        pa.default_memory_pool().release_unused()
