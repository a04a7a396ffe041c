"""The driver's sink: output-manifest rows, in part files, after their images exist. No torch.

Rows arrive from the last stage (images already written); `ManifestWriter` casts them to one
schema (the input columns as the plan typed them, then the output columns of DESIGN.md) and
writes `manifest/<run_id>/part-NNNNN.parquet` (columns outside the schema, such as the
stages' timings, are summed for the run record and not written) every `part_rows` rows or `flush_s` seconds,
so a killed run loses at most the rows of one unflushed part (their pairs are rendered again
by the next run; never lost). It also keeps the run's counts for the summary.
"""

from __future__ import annotations

import collections
import io
import time

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.state import Layout

__all__ = ["ManifestWriter", "OUTPUT_FIELDS", "output_schema"]

OUTPUT_FIELDS = [
    pa.field("status", pa.string()),
    pa.field("error_code", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("output_uri", pa.string()),
    pa.field("width", pa.int64()),
    pa.field("height", pa.int64()),
    pa.field("crop_box", pa.list_(pa.int64())),
    pa.field("seed", pa.int64()),
    pa.field("model_digest", pa.string()),
    pa.field("settings_digest", pa.string()),
    pa.field("steps", pa.int64()),
    pa.field("guidance_scale", pa.float64()),
    pa.field("scheduler", pa.string()),
    pa.field("clip_score", pa.float64()),
    pa.field("run_id", pa.string()),
    pa.field("attempt", pa.int64()),
    pa.field("render_ms", pa.float64()),
    pa.field("finished_at", pa.string()),
]
INTERNAL_PREFIX = "_"  # _source_file, _source_row: tracing aids, not input columns


def output_schema(input_schema: pa.Schema) -> pa.Schema:
    names = {f.name for f in OUTPUT_FIELDS}
    inputs = []
    for f in input_schema:
        if f.name in names or f.name.startswith(INTERNAL_PREFIX):
            continue
        if f.name == "bbox":  # normalised: [x0, y0, x1, y1] floats, whatever the input format
            f = pa.field("bbox", pa.list_(pa.float64()))
        inputs.append(f)
    if "shard" not in {f.name for f in inputs}:
        inputs.append(pa.field("shard", pa.string()))
    return pa.schema(inputs + OUTPUT_FIELDS)


class ManifestWriter:
    def __init__(self, layout: Layout, run_id: str, schema: pa.Schema, part_rows: int = 1000, flush_s: float = 30.0):
        self.layout, self.run_id, self.schema = layout, run_id, schema
        self.part_rows, self.flush_s = part_rows, flush_s
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.parts = 0
        self.last_flush = time.monotonic()
        self.rows = 0
        # steady-state throughput on the model's clock (render_ended_at): the rows of the model
        # calls that ended after the first one, over the time from its end to the last one's
        self.first_end: float | None = None
        self.first_rows = 0
        self.last_end: float | None = None
        self.model_rows = 0
        # the same on the driver's clock (batch arrivals), for comparison: Ray Data hands the
        # batches over in bunches, the first one late, which overstates it
        self.first_at: float | None = None
        self.first_at_rows = 0
        self.last_at: float | None = None
        self.status = collections.Counter()
        self.error_codes = collections.Counter()
        self.reused = 0
        self.shards: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        # per-stage busy time (seconds, summed over rows rendered in this run)
        self.stage_seconds = {"prepare": 0.0, "render": 0.0, "postprocess": 0.0}

    def add(self, batch: pa.Table) -> None:
        now = time.monotonic()
        if self.first_at is None:
            self.first_at, self.first_at_rows = now, batch.num_rows
        self.last_at = now
        if "render_ended_at" in batch.column_names:
            for ended, rows in collections.Counter(batch["render_ended_at"].to_pylist()).items():
                if ended is not None:
                    self._model_call(ended, rows)
        attempts = batch["attempt"].to_pylist()
        for stage, column in (("prepare", "prepare_ms"), ("render", "render_ms"), ("postprocess", "postprocess_ms")):
            if column in batch.column_names:
                self.stage_seconds[stage] += sum(ms or 0.0 for ms, a in zip(batch[column].to_pylist(), attempts) if a) / 1000
        table = pa.table({f.name: self._column(batch, f) for f in self.schema}, schema=self.schema)
        self.rows += table.num_rows
        self.status.update(table["status"].to_pylist())
        self.error_codes.update(c for c in table["error_code"].to_pylist() if c)
        self.reused += sum(1 for a in attempts if a == 0)
        for shard, status, attempt in zip(table["shard"].to_pylist(), table["status"].to_pylist(), attempts):
            self.shards[shard][status] += 1
            self.shards[shard]["reused" if attempt == 0 else "rendered"] += 1
        self.pending.append(table)
        self.pending_rows += table.num_rows
        if self.pending_rows >= self.part_rows or time.monotonic() - self.last_flush >= self.flush_s:
            self.flush()

    def _model_call(self, ended: float, rows: int) -> None:
        """`rows` rendered by a model call that ended at `ended` (a call's rows may come in parts)."""
        self.model_rows += rows
        if self.first_end is None or ended < self.first_end:
            self.first_end, self.first_rows = ended, 0
        if ended == self.first_end:
            self.first_rows += rows
        self.last_end = ended if self.last_end is None else max(self.last_end, ended)

    def steady_rows_per_s(self) -> float | None:
        """Rows/s rendered once the first model call is out (model load and the pipeline's
        start-up are not throughput), on the model's clock; None before two calls ended. With
        several actors, the others' first calls count: a conservative figure."""
        if self.first_end is None or self.last_end == self.first_end:
            return None
        return (self.model_rows - self.first_rows) / (self.last_end - self.first_end)

    def arrival_rows_per_s(self) -> float | None:
        """The same on the driver's clock: rows after the first arriving batch over the time since."""
        if self.first_at is None or self.last_at == self.first_at:
            return None
        return (self.rows - self.first_at_rows) / (self.last_at - self.first_at)

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
        table = pa.concat_tables(self.pending)
        sink = io.BytesIO()
        pq.write_table(table, sink)
        storage.write_bytes(self.layout.manifest_part(self.run_id, self.parts), sink.getvalue())
        self.parts += 1
        self.pending, self.pending_rows = [], 0
        # Hand freed Arrow buffers back to the OS: the driver sees thousands of small tables,
        # and a retaining allocator would otherwise make its memory grow with the row count.
        pa.default_memory_pool().release_unused()
