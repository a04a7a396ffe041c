"""Ray Data blocks as pyarrow Tables: every stage reads and writes them with explicit types.

Arrow keeps a nullable list column a list column in every block; numpy batches turn the same
column into a tensor in one block and objects in the next, which Ray cannot concatenate.
"""

from __future__ import annotations

import pyarrow as pa

__all__ = ["set_columns", "PAYLOAD_TYPE"]

# Image payloads: raw uint8 bytes. 64-bit offsets: a block of big photos can pass 2 GiB.
PAYLOAD_TYPE = pa.large_binary()


def set_columns(table: pa.Table, columns: dict[str, pa.Array]) -> pa.Table:
    """Replace or append columns by name."""
    for name, values in columns.items():
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, values) if index >= 0 else table.append_column(name, values)
    return table
