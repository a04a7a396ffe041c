"""The prepared-sample store: training's inputs prepared once, as Parquet, reused by every run.

    info = prepare_store(plan, config, output, part_rows=64, row_group_rows=1)
    info.uri  # <output>/prepared/<digest>/, complete: store.json is there

Layout (the contract with `train.reader`; docs/training.md "The prepared-sample store"):

    <output>/prepared/<digest>/
        parts/<part>.parquet   one per manifest file's row range of `part_rows` rows: pair_id, split,
                               error_code, error_message and `dataset.TRAIN_PAYLOADS` (empty for
                               bad rows), in row groups of `row_group_rows` rows
        index.parquet          the good rows, sorted by split then pair_id: split, pair_id, part,
                               row_group, row
        store.json             written last: its presence means the store is complete

The digest (`prep_digest`) is a sha256 over everything that changes the prepared bytes or which
rows exist: each manifest file's URI, size and identity (a local file's content sha256, an S3
object's ETag), the model's resolution and product size, the crop margin, max pixels, the input
policy (manifest folder, allowed roots, http), `part_rows` (it names the parts) and
`PREP_VERSION`. The images a manifest points at are not hashed: a URI is taken to name fixed
bytes, so a changed image under the same URI needs an edited manifest (or the store deleted).

Preparation is a Ray Data job over the missing parts: each task reads its row range with the
render job's read and validation code, prepares it (`dataset.prepare_training_batch`), writes the
part itself (atomically: temp file + rename, one S3 PUT) and hands back only the small columns.
Parts already there are read back for their small columns, never rewritten: a killed preparation
re-run redoes only the missing parts. The driver holds no payload: it builds the row counts and
the index from the small columns, then writes index.parquet and store.json.

Driver-side: no torch.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import manifest, storage
from pipeline.stages.prepare_stage import PrepareConfig
from pipeline.train.dataset import TRAIN_PAYLOADS, RowCounts, prepare_training_batch, read_training_files

__all__ = [
    "PREP_VERSION",
    "FORMAT",
    "COMPRESSION",
    "COMPRESSION_LEVEL",
    "Part",
    "StoreInfo",
    "prep_inputs",
    "prep_digest",
    "plan_parts",
    "store_uri",
    "prepare_store",
]

# Bumped whenever the preparation code changes the bytes it writes (a new digest for every store).
PREP_VERSION = 1
FORMAT = 1  # store.json's layout version
# Parquet compression of the payload columns: zstd level 3, the choice bench/store.py measures
# (bench/RESULTS.md, section store: bytes and decode ms per sample at 512^2). Why: a sample's
# masks (4 of its 13 R^2 bytes) and the hint outside its hole are nearly all zeros, so zstd cuts
# even the noisy-photo catalog to about a sixth of raw (a sixth of the storage and of the bytes
# each step reads, on S3 the cost that counts), for a decode of a millisecond or two more per
# sample than raw: a few % of one core per GPU at the samples/s the cost model gives. Level 3 is
# ~15% smaller than level 1 for a decode within this VM's noise of it; level 9 gains ~5% more for
# ~3x the encode. PNG is smaller again but ~10x zstd's decode (and far more to encode).
COMPRESSION, COMPRESSION_LEVEL = "zstd", 3
PROGRESS_EVERY_S = 30.0
SMALL_COLUMNS = ("pair_id", "split", "error_code", "error_message")
PART_COLUMNS = (*SMALL_COLUMNS, *TRAIN_PAYLOADS)
INDEX_SCHEMA = pa.schema(
    [
        ("split", pa.string()),
        ("pair_id", pa.string()),
        ("part", pa.string()),
        ("row_group", pa.int32()),
        ("row", pa.int32()),
    ]
)
# What a part task hands back: the small columns and where each row sits.
ROWS_SCHEMA = pa.schema(
    [
        ("part", pa.string()),
        ("pair_id", pa.string()),
        ("split", pa.string()),
        ("error_code", pa.string()),
        ("error_message", pa.string()),
        ("row_group", pa.int32()),
        ("row", pa.int32()),
    ]
)


@dataclass(frozen=True)
class Part:
    """One unit of preparation: rows start <= row < end of manifest file `file_index`."""

    name: str
    file_index: int
    start: int
    end: int


def plan_parts(plan: manifest.ManifestPlan, part_rows: int) -> list[Part]:
    """The parts of a manifest, in manifest order; a name says which rows it holds."""
    return [
        Part(f"{i:05d}-{start:010d}", i, start, min(start + part_rows, rows))
        for i, rows in enumerate(plan.file_rows)
        for start in range(0, rows, part_rows)
    ]


def _file_identity(uri: str) -> dict:
    """A manifest file's identity: an S3 object's ETag (no read); a local file's content sha256
    (a touch or a rewrite of the same bytes keeps the store; an mtime would not)."""
    fs, path = storage.filesystem(uri)
    size = storage.retry_transient(lambda: fs.get_file_info(path)).size
    if storage.is_s3(uri):
        return {"uri": uri, "size": size, "etag": storage.version(uri)}
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return {"uri": uri, "size": size, "sha256": sha.hexdigest()}


def prep_inputs(plan: manifest.ManifestPlan, config: PrepareConfig, part_rows: int) -> dict:
    """Everything that enters the digest (recorded in store.json as `inputs`)."""
    policy = config.policy
    return {
        "prep_version": PREP_VERSION,
        "manifest": [_file_identity(f) for f in plan.files],
        "resolution": config.resolution,
        "product_size": config.product_size,
        "crop_margin": config.crop_margin,
        "max_pixels": config.max_pixels,
        "input_policy": {
            "manifest_dir": policy.manifest_dir,
            "allow_roots": list(policy.allow_roots),
            "allow_http": policy.allow_http,
        },
        "part_rows": part_rows,
    }


def prep_digest(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def store_uri(output: str, digest: str) -> str:
    return storage.join(output, "prepared", digest)


@dataclass
class StoreInfo:
    """A complete store, as its store.json says; `reused`: this run prepared nothing."""

    uri: str
    digest: str
    record: dict
    counts: RowCounts
    reused: bool = False
    parts_written: int = 0  # by this run
    prepare_s: float = 0.0  # by this run (0 when reused)
    extra: dict = field(default_factory=dict)

    @classmethod
    def load(cls, uri: str) -> StoreInfo | None:
        """The store at `uri` (a `prepared/<digest>` folder), or None when it is not complete."""
        try:
            record = json.loads(storage.read_bytes(storage.join(uri, "store.json")))
        except FileNotFoundError:
            return None
        return cls(uri, record["digest"], record, RowCounts.from_record(record["counts"]), reused=True)

    def part_uri(self, part: str) -> str:
        return storage.join(self.uri, "parts", f"{part}.parquet")

    def to_record(self) -> dict:
        """The run record's `store`."""
        return {
            "uri": self.uri,
            "digest": self.digest,
            "reused": self.reused,
            "parts": len(self.record["parts"]),
            "parts_written": self.parts_written,
            "prepare_s": round(self.prepare_s, 3),
        }


def payload_compression(compression: str) -> dict[str, str]:
    """Parquet's codec per column: the small columns always zstd (text), the payloads
    `compression` ("none" or "zstd"); one level for every zstd column."""
    return {c: ("zstd" if c in SMALL_COLUMNS else compression) for c in PART_COLUMNS}


def encode_part(
    table: pa.Table, row_group_rows: int, compression: str = COMPRESSION, level: int | None = COMPRESSION_LEVEL
) -> bytes:
    """A part's Parquet bytes: `row_group_rows` rows per row group (the unit a reader fetches)."""
    sink, codecs = io.BytesIO(), payload_compression(compression)
    pq.write_table(
        table.select(list(PART_COLUMNS)),
        sink,
        row_group_size=row_group_rows,
        compression=codecs,
        compression_level={c: level for c, codec in codecs.items() if codec == "zstd"},
        use_dictionary=False,
        write_statistics=list(SMALL_COLUMNS),
    )
    return sink.getvalue()


def _row_positions(table: pa.Table, part: str, row_groups: list[int]) -> pa.Table:
    """The small columns of a part's rows, with the part, row group and row of each."""
    groups = [g for g, n in enumerate(row_groups) for _ in range(n)]
    rows = [r for n in row_groups for r in range(n)]
    columns = {c: table[c].cast(pa.string()) for c in SMALL_COLUMNS}
    return pa.table(
        {
            "part": pa.array([part] * table.num_rows, pa.string()),
            **columns,
            "row_group": pa.array(groups, pa.int32()),
            "row": pa.array(rows, pa.int32()),
        },
        schema=ROWS_SCHEMA,
    )


def _existing_rows(uri: str, part: str) -> pa.Table:
    """A written part's small columns (column chunks only, no payload read) and positions."""
    fs, path = storage.filesystem(uri)

    def read() -> pa.Table:
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
            return _row_positions(parquet.read(columns=list(SMALL_COLUMNS), use_threads=False), part, sizes)

    try:
        return storage.retry_transient(read)
    except OSError as e:
        raise storage.StorageError(f"cannot read {uri}: {e}") from e


def prepare_parts(
    items: pa.Table,
    *,
    uri: str,
    plan: manifest.ManifestPlan,
    conflicts_ref: list,
    config: PrepareConfig,
    row_group_rows: int,
    compression: str,
    stall_part: str | None = None,
) -> pa.Table:
    """The job's one stage (a `map_batches` function over part rows): write each missing part,
    read back each written one; either way its rows' small columns and positions."""
    out = []
    for item in items.to_pylist():
        part_uri = storage.join(uri, "parts", f"{item['name']}.parquet")
        if item["written"]:
            out.append(_existing_rows(part_uri, item["name"]))
            continue
        if item["name"] == stall_part:  # chaos tests only (pipeline.train.faults): a killed preparation
            time.sleep(3600)
        rows = read_training_files(
            {"file_index": [item["file_index"]]},
            plan=plan,
            conflicts_ref=conflicts_ref,
            batch_rows=config.batch_size,
            row_range=(item["start"], item["end"]),
        )
        prepared = [prepare_training_batch(batch, config=config) for batch in rows]
        if not prepared:
            continue
        table = pa.concat_tables(prepared)
        storage.write_bytes(part_uri, encode_part(table, row_group_rows, compression))
        sizes = [min(row_group_rows, table.num_rows - s) for s in range(0, table.num_rows, row_group_rows)]
        out.append(_row_positions(table, item["name"], sizes))
    return pa.concat_tables(out) if out else ROWS_SCHEMA.empty_table()


def prepare_store(
    plan: manifest.ManifestPlan,
    config: PrepareConfig,
    output: str,
    *,
    part_rows: int,
    row_group_rows: int,
    compression: str = COMPRESSION,
    stall_part: str | None = None,
) -> StoreInfo:
    """The store for these inputs under `output`: reused when complete, else its missing parts
    prepared (a Ray Data job, `config.num_cpus` per task), then index.parquet and store.json."""
    import ray

    begin = time.monotonic()
    inputs = prep_inputs(plan, config, part_rows)
    digest = prep_digest(inputs)
    uri = store_uri(output, digest)
    if (info := StoreInfo.load(uri)) is not None:
        return info
    parts = plan_parts(plan, part_rows)
    listed = storage.list_files(storage.join(uri, "parts"))
    written = {rel.removesuffix(".parquet") for rel, _, _ in listed if rel.endswith(".parquet")}
    items = [
        {"name": p.name, "file_index": p.file_index, "start": p.start, "end": p.end, "written": p.name in written}
        for p in parts
    ]
    # The pair_id conflicts only when there is something to prepare: a whole-manifest scan whose
    # memory grows with the distinct ids, which a run reusing its store must not pay.
    conflicts = manifest.pair_id_conflicts(plan)
    conflicts_ref = [ray.put(conflicts)] if conflicts.duplicates else []
    job = ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
        prepare_parts,
        batch_format="pyarrow",
        batch_size=1,
        num_cpus=config.num_cpus,
        fn_kwargs=dict(
            uri=uri,
            plan=plan,
            conflicts_ref=conflicts_ref,
            config=config,
            row_group_rows=row_group_rows,
            compression=compression,
            stall_part=stall_part,
        ),
    )
    counts, good, said = RowCounts(), [], time.monotonic()
    print(f"[dtc-train] store {uri}: {len(written)} of {len(parts)} parts there, preparing the rest", flush=True)
    for batch in job.iter_batches(batch_format="pyarrow", batch_size=None):
        counts.add(*(batch[c].to_pylist() for c in SMALL_COLUMNS))
        good.append(batch.filter(pc.equal(pc.fill_null(batch["error_code"], ""), "")))
        if time.monotonic() - said > PROGRESS_EVERY_S:  # a long preparation says how far it is
            said = time.monotonic()
            print(f"[dtc-train] store {digest}: {counts.total} of {plan.num_rows} rows", flush=True)
    index = pa.concat_tables([t.cast(ROWS_SCHEMA) for t in good]) if good else ROWS_SCHEMA.empty_table()
    index = index.select(INDEX_SCHEMA.names).sort_by([("split", "ascending"), ("pair_id", "ascending")])
    storage.write_parquet(storage.join(uri, "index.parquet"), index.cast(INDEX_SCHEMA))
    prepare_s = time.monotonic() - begin
    record = {
        "format": FORMAT,
        "digest": digest,
        "inputs": inputs,
        "row_group_rows": row_group_rows,
        "compression": {  # codec-level per column
            c: "none" if codec == "none" else f"{codec}-{COMPRESSION_LEVEL}"
            for c, codec in payload_compression(compression).items()
        },
        "columns": list(PART_COLUMNS),
        "parts": [p.name for p in parts],
        "counts": counts.to_record(),
        "resolution": config.resolution,
        "product_size": config.product_size,
        "prepare_s": round(prepare_s, 3),
        "created_at": datetime.now(UTC).isoformat(),
    }
    storage.write_bytes(storage.join(uri, "store.json"), json.dumps(record, indent=1).encode())
    done = len(parts) - len(written & {p.name for p in parts})
    return StoreInfo(uri, digest, record, counts, reused=False, parts_written=done, prepare_s=prepare_s)
