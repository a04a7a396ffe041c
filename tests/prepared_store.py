"""A prepared-sample store written from prepared rows, following the store layout (docs/training.md),
for the reader's tests: parts of `part_rows` rows in row groups of `row_group_rows`, the index
sorted by (split, pair_id), store.json written last. Rows go into parts in the order given, so
a test can shuffle them and see that the sample order is the index's, not the parts'."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.train.dataset import TRAIN_PAYLOADS

PART_COLUMNS = ["pair_id", "split", "error_code", "error_message", *TRAIN_PAYLOADS]


def write_test_store(
    rows: pa.Table, uri: str, resolution: int, product_size: int, part_rows: int = 4, row_group_rows: int = 2
) -> str:
    rows = rows.select(PART_COLUMNS)
    index = []
    parts = []
    for start in range(0, rows.num_rows, part_rows):
        name = f"part-{len(parts):05d}"
        part = rows.slice(start, part_rows)
        sink = io.BytesIO()
        pq.write_table(part, sink, row_group_size=row_group_rows)
        storage.write_bytes(storage.join(uri, "parts", f"{name}.parquet"), sink.getvalue())
        parts.append(name)
        for i, (pair_id, split, code) in enumerate(
            zip(*(part[c].to_pylist() for c in ("pair_id", "split", "error_code")))
        ):
            if not code:
                index.append(
                    {
                        "split": split,
                        "pair_id": pair_id,
                        "part": name,
                        "row_group": i // row_group_rows,
                        "row": i % row_group_rows,
                    }
                )
    table = pa.Table.from_pylist(
        index,
        schema=pa.schema(
            [
                ("split", pa.string()),
                ("pair_id", pa.string()),
                ("part", pa.string()),
                ("row_group", pa.int32()),
                ("row", pa.int32()),
            ]
        ),
    )
    table = table.take(pc.sort_indices(table, [("split", "ascending"), ("pair_id", "ascending")]))
    storage.write_parquet(storage.join(uri, "index.parquet"), table)
    info = {
        "format": 1,
        "digest": "test",
        "row_group_rows": row_group_rows,
        "parts": parts,
        "resolution": resolution,
        "product_size": product_size,
    }
    storage.write_bytes(storage.join(uri, "store.json"), json.dumps(info).encode())
    return uri
