"""The prepared-sample store's payload encoding: bytes per sample vs decode ms per sample at 512^2.

    python bench/store.py [--pairs 12] [--resolution 512] [--rounds 5]

Prepares the sample catalog (`pipeline.sample_catalog`, masks and boxes) at R = 512, S = 224 with
the training job's own read and prepare code (`train.dataset`), then writes the same rows as a
store part (`train.store.encode_part`, one sample a row group) with the payload columns raw,
zstd at levels 1, 3 and 9, and, for comparison, each payload as a PNG inside a raw part. Decode =
what a reader does per sample: read its row group from the part's bytes and turn every payload
back into its array (`pipeline.payload` specs; PNG: PIL decode). Two catalogs: the sample catalog
as it is (flat synthetic colours up to 512 px, compress far better than photos) and the same at
1024^2 with photo-like noise in the photos (as bench/data_path.py), the figure to plan with.
Prints one JSON line per catalog and encoding (the median of `--rounds` rounds), and per catalog
a `store_plan` line: prepare ms per sample and, at the store's encoding, the store size and the
preparation core-hours for 1.2M pairs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.fetch import InputPolicy  # noqa: E402
from pipeline.manifest import plan_manifest  # noqa: E402
from pipeline.payload import PAYLOAD_TYPE, SPECS, Sizes  # noqa: E402
from pipeline.sample_catalog import make_catalog  # noqa: E402
from pipeline.stages.prepare_stage import PrepareConfig  # noqa: E402
from pipeline.train.dataset import TRAIN_PAYLOADS, prepare_training_batch, read_training_files  # noqa: E402
from pipeline.train.store import COMPRESSION, COMPRESSION_LEVEL, encode_part  # noqa: E402

PLAN_PAIRS = 1_200_000  # the paper's training set (issue 30): what the store would hold


def prepared_rows(folder: str, pairs: int, resolution: int, noisy: bool) -> tuple[pa.Table, float]:
    """The catalog's rows prepared as the store's parts hold them, and the prepare ms per sample
    (read, validate, fetch, decode, both hole variants; one process, one core)."""
    sizes = [(1024, 1024), (1024, 768)] if noisy else None  # photo-sized, as bench/data_path.py
    manifest = make_catalog(folder, n_pairs=pairs, bad_rows=False, sizes=sizes)
    if noisy:  # photo-like entropy in the photos (the synthetic scenes are flat colour)
        rng = np.random.default_rng(1)
        images = os.path.join(folder, "images")
        for name in sorted(os.listdir(images)):
            if name.endswith("-context.jpg"):
                path = os.path.join(images, name)
                photo = np.asarray(Image.open(path).convert("RGB")).astype(np.int16)
                noisy_photo = (photo + rng.integers(-12, 12, photo.shape)).clip(0, 255).astype(np.uint8)
                Image.fromarray(noisy_photo).save(path, quality=90)
    plan = plan_manifest(manifest)
    config = PrepareConfig(InputPolicy(manifest_dir=folder), resolution=resolution, product_size=224, batch_size=8)
    for _ in range(2):  # the second pass is timed: the first pays the imports and warm-up
        began = time.perf_counter()
        tables = [
            prepare_training_batch(batch, config=config)
            for batch in read_training_files({"file_index": [0]}, plan=plan, conflicts_ref=[])
        ]
        table = pa.concat_tables(tables)
        prepare_ms = (time.perf_counter() - began) * 1000 / table.num_rows
    assert not any(table["error_code"].to_pylist()), table["error_message"].to_pylist()
    return table, prepare_ms


def as_png(table: pa.Table, sizes: Sizes) -> pa.Table:
    """Every non-empty payload as a PNG of its array (masks as 8-bit grey)."""
    columns = {}
    for name in TRAIN_PAYLOADS:
        spec, out = SPECS[name], []
        for value in table[name].to_pylist():
            if not value:
                out.append(b"")
                continue
            array = spec.unpack(value, sizes)
            buffer = io.BytesIO()
            Image.fromarray(array.view(np.uint8) if array.dtype == bool else array).save(buffer, format="PNG")
            out.append(buffer.getvalue())
        columns[name] = pa.array(out, PAYLOAD_TYPE)
    for name, column in columns.items():
        table = table.set_column(table.schema.get_field_index(name), name, column)
    return table


def decode_all(data: bytes, sizes: Sizes, png: bool) -> int:
    """Read every sample's row group and rebuild its arrays; returns the samples decoded."""
    part = pq.ParquetFile(io.BytesIO(data))
    for group in range(part.num_row_groups):
        row = part.read_row_group(group, columns=list(TRAIN_PAYLOADS), use_threads=False)
        for name in TRAIN_PAYLOADS:
            value = row[name][0].as_buffer()
            if value is None or value.size == 0:
                continue
            if png:
                np.asarray(Image.open(io.BytesIO(value.to_pybytes())))
            else:
                SPECS[name].unpack(value, sizes).copy()  # a copy: what a batch gets
    return part.num_row_groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    sizes = Sizes(args.resolution, 224)
    for catalog, noisy in (("sample_catalog", False), ("photo_1024_noise", True)):
        with tempfile.TemporaryDirectory() as folder:
            table, prepare_ms = prepared_rows(folder, args.pairs, args.resolution, noisy)
        raw_payload = sum(len(v) for c in TRAIN_PAYLOADS for v in table[c].to_pylist()) / table.num_rows
        # raw: the small columns keep the store's zstd, the payloads none
        encodings = [("raw", "none", 3, table), *(("zstd", "zstd", lvl, table) for lvl in (1, 3, 9))]
        began = time.perf_counter()
        png_table = as_png(table, sizes)
        png_encode_ms = (time.perf_counter() - began) * 1000 / table.num_rows
        encodings.append(("png", "none", 3, png_table))
        for name, codec, level, rows in encodings:
            began = time.perf_counter()
            data = encode_part(rows, 1, codec, level)
            write_ms = (time.perf_counter() - began) * 1000 / table.num_rows
            times = []
            for _ in range(args.rounds):
                began = time.perf_counter()
                n = decode_all(data, sizes, png=name == "png")
                times.append((time.perf_counter() - began) * 1000 / n)
            record = {
                "bench": "store_encoding",
                "catalog": catalog,
                "resolution": args.resolution,
                "product_size": 224,
                "samples": table.num_rows,
                "encoding": name if codec == "none" else f"{name}-{level}",
                "bytes_per_sample": round(len(data) / table.num_rows),
                "raw_payload_bytes_per_sample": round(raw_payload),
                "ratio_to_raw": round(len(data) / table.num_rows / raw_payload, 3),
                "decode_ms_per_sample": round(statistics.median(times), 3),
                "encode_ms_per_sample": round(write_ms + (png_encode_ms if name == "png" else 0.0), 3),
                "rounds": args.rounds,
            }
            print(json.dumps(record), flush=True)
            if name == "zstd" and (level, codec) == (COMPRESSION_LEVEL, COMPRESSION):  # the store's choice
                chosen = len(data) / table.num_rows
        print(
            json.dumps(
                {
                    "bench": "store_plan",
                    "catalog": catalog,
                    "resolution": args.resolution,
                    "encoding": f"{COMPRESSION}-{COMPRESSION_LEVEL}",
                    "prepare_ms_per_sample": round(prepare_ms, 1),
                    "bytes_per_sample": round(chosen),
                    "pairs": PLAN_PAIRS,
                    "store_tb": round(chosen * PLAN_PAIRS / 1e12, 3),
                    "prepare_core_hours": round(prepare_ms * PLAN_PAIRS / 3.6e6, 1),
                    "note": "prepare: one process, one core of this machine, no Ray; mask and bbox rows alternate",
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
