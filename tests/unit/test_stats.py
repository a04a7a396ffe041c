"""pipeline.output.stats.RunStats: steady-state throughput on the model's clock; and the sink
(pipeline.output.sink.ManifestWriter) writes the output schema only."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.output.layout import Layout
from pipeline.output.sink import ManifestWriter
from pipeline.output.stats import RunStats
from pipeline.schema import output_schema


def _batch(pair_ids: list[str], ended: list[float | None]) -> pa.Table:
    return pa.table(
        {
            "pair_id": pair_ids,
            "status": ["ok"] * len(pair_ids),
            "attempt": [1] * len(pair_ids),
            "shard": ["s"] * len(pair_ids),
            "error_code": pa.nulls(len(pair_ids), pa.string()),
            "render_ended_at": pa.array(ended, pa.float64()),
        }
    )


def test_steady_throughput_runs_on_the_model_clock(tmp_path):
    writer = ManifestWriter(
        Layout(str(tmp_path)), "r1", output_schema(pa.schema([("pair_id", pa.string())])), part_rows=4
    )
    stats = RunStats()
    # Model calls of 4 rows ending at t = 10 (the first: model load, not throughput), 12, 14, 16,
    # handed to the driver out of order, a call's rows split over two batches, a reused row
    # (no model call) among them.
    for batch in (
        _batch(["a", "b"], [12.0, 12.0]),
        _batch(["c", "d", "e", "f", "r"], [12.0, 12.0, 10.0, 10.0, None]),
        _batch(["g", "h"], [10.0, 10.0]),
        _batch(["i", "j", "k", "l", "m", "n", "o", "p"], [16.0] * 4 + [14.0] * 4),
    ):
        writer.add(batch)
        stats.add(batch)
    assert stats.steady_rows_per_s() == 12 / (16.0 - 10.0)
    assert stats.arrival_rows_per_s() is not None  # the driver's clock, kept for comparison
    assert stats.rows == 17 and stats.ok == 17 and stats.shards["s"]["rendered"] == 17
    writer.flush()
    written = pa.concat_tables(
        pq.read_table(tmp_path / "manifest" / "r1" / f"part-{i:05d}.parquet") for i in range(writer.parts)
    )
    assert written.num_rows == 17 and "render_ended_at" not in written.column_names  # a figure, not an output column


def test_no_steady_figure_before_two_model_calls():
    stats = RunStats()
    assert stats.steady_rows_per_s() is None
    stats.add(_batch(["a", "b"], [5.0, 5.0]))
    stats.add(_batch(["c"], [None]))  # reused rows only
    assert stats.steady_rows_per_s() is None
