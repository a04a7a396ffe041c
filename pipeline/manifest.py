"""Input manifests: planning and streaming. Driver-side: no torch, no diffusers.

    plan = plan_manifest("s3://catalog/manifests/")     # schemas and row counts only
    conflicts = pair_id_conflicts(plan)                  # repeated pair_ids: streams that column alone
    for batch in iter_batches(plan, batch_size=4096):    # bounded memory, adds `shard`
        table = rows.validate_rows(batch, file_folder(plan.files[i]), conflicts, partition)  # pipeline.rows

A manifest is one file, a folder (read recursively, hive partitions such as
`dt=2026-11-26/part-0.parquet` included) or a glob (`*` within a folder name, `**` across
folders), local or `s3://`, in Parquet (.parquet/.pq), CSV (.csv) or JSON Lines
(.json/.jsonl/.ndjson). Columns are those of DESIGN.md "Input manifest".

Two kinds of problems, two ways out:
- the manifest as a whole is unusable (missing or unreadable, no rows, a required column
  missing or of the wrong type): `plan_manifest` raises `ManifestError` with one message naming
  the problem, and the job exits 2 before any work;
- one row is bad: `pipeline.rows.validate_rows` gives it an `error_code` and an `error_message`, and the job
  carries on (the row becomes a `failed` row of the output manifest).

CSV has no types, so every CSV column is read as a string except `seed` (int64): a pair_id
such as `0001` stays `0001`, and no pass-through column can fail a later block's type
inference. JSON Lines keeps its own types (a numeric pair_id is a wrong type there).
Storage that cannot be reached (e.g. S3 access denied or down) raises `StorageError` instead
(exit 1): that is not the manifest's fault.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import posixpath
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from pipeline import storage
from pipeline.schema import safe_name

__all__ = [
    "ManifestError",
    "ManifestPlan",
    "plan_manifest",
    "iter_batches",
    "iter_columns",
    "PairIdConflicts",
    "pair_id_conflicts",
    "conflicts_of",
    "file_folder",
]

REQUIRED_COLUMNS = ("pair_id", "context_uri", "product_uri")
STRING_COLUMNS = ("pair_id", "context_uri", "product_uri", "mask_uri", "shard", "scene_id")
FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
}
# Columns iter_batches adds so a failed row can be traced back to its file and line.
SOURCE_FILE, SOURCE_ROW = "_source_file", "_source_row"


class ManifestError(ValueError):
    """The manifest as a whole cannot be used; the message names the problem (exit code 2)."""


@dataclass(frozen=True)
class ManifestPlan:
    """What `plan_manifest` found; small and picklable, so it can travel to Ray tasks."""

    uri: str  # as given by the user
    format: str  # "parquet" | "csv" | "json"
    files: tuple[str, ...]  # absolute local paths or s3:// URIs, in read order
    # the folder given (or the file's folder): the allowlist's default root; row paths resolve
    # against each file's own folder (file_folder)
    base_dir: str
    schema: pa.Schema  # every file's columns, known ones in canonical types (see _canonical_type)
    num_rows: int
    file_rows: tuple[int, ...]  # rows per file, aligned with `files` (work splitting, progress)
    has_mask: bool  # a mask_uri column exists
    has_bbox: bool  # a bbox column exists
    default_shards: tuple[str, ...]  # per file: innermost hive partition "key=value", else the file's stem
    partitions: tuple[str, ...] | None = None  # per file: its partition value, for a backfill's partition range


# -- planning ------------------------------------------------------------------------------


def _partition_value(file: str, key: str) -> str | None:
    """The value of the innermost `key=value` folder in a file's path, if any."""
    for part in reversed(file.replace(os.sep, "/").split("/")[:-1]):
        name, sep, value = part.partition("=")
        if sep and name == key:
            return value
    return None


def plan_manifest(uri: str, partition_range: tuple[str, str, str] | None = None) -> ManifestPlan:
    """Find the manifest's files and check their schemas; reads footers/headers, never the table.

    `partition_range=(key, start, end)` keeps only files under a `key=value` folder with
    `start <= value <= end` (a date-range backfill over `dt=YYYY-MM-DD/` partitions).

    Parquet row counts come from the footers. CSV and JSON have no footer: their typed columns
    are streamed once (bounded memory) to count rows, which also surfaces a bad value deep in
    the file (e.g. `seed=abc` on line 900000) now rather than half-way through the job.
    """
    files, base_dir = _find_files(uri)
    if partition_range is not None:
        # A backfill: only the hive partitions `key=value` with start <= value <= end (ISO
        # dates compare as strings).
        key, start, end = partition_range
        files = [f for f in files if (v := _partition_value(f, key)) is not None and start <= v <= end]
        if not files:
            raise ManifestError(f"manifest {uri} has no {key}= partition between {start} and {end}")
    formats = {_format_of(f) for f in files}
    if len(formats) != 1:
        raise ManifestError(
            f"manifest {uri} mixes formats ({', '.join(sorted(formats))}); use one format per manifest"
        )
    fmt = formats.pop()
    filesystem = storage.filesystem(files[0])[0]

    headers: dict[str, list[str]] = {}  # CSV: each file's column names, in order
    if fmt == "csv":  # the header names decide the CSV column types: read them first
        for file in files:
            headers[file] = _read_file(
                file, lambda f=file: _make_fragment(ds.CsvFileFormat(), f, filesystem).physical_schema.names
            )
    file_format = _file_format(fmt, list(dict.fromkeys(n for names in headers.values() for n in names)))

    schemas: list[pa.Schema] = []
    file_rows: list[int] = []
    for file in files:
        fragment = _make_fragment(file_format, file, filesystem)
        physical = _read_file(file, lambda: fragment.physical_schema, headers.get(file))
        _check_columns(physical, file, fmt)
        schemas.append(pa.schema([pa.field(f.name, _canonical_type(f.name, f.type, fmt)) for f in physical]))
        if fmt == "parquet":
            file_rows.append(_read_file(file, fragment.count_rows))
        else:
            typed = [n for n in ("pair_id", "seed", "step", "bbox") if n in physical.names]
            count = lambda: sum(b.num_rows for b in fragment.to_batches(columns=typed, batch_size=65536))  # noqa: E731
            file_rows.append(_read_file(file, count, physical.names))
    try:
        schema = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ManifestError(f"manifest {uri}: its files disagree on column types: {e}") from e

    num_rows = sum(file_rows)
    if num_rows == 0:
        raise ManifestError(f"manifest {uri} is empty: {len(files)} file(s), 0 rows")
    return ManifestPlan(
        uri=uri,
        format=fmt,
        files=tuple(files),
        base_dir=base_dir,
        schema=schema,
        num_rows=num_rows,
        file_rows=tuple(file_rows),
        has_mask="mask_uri" in schema.names,
        has_bbox="bbox" in schema.names,
        default_shards=tuple(_default_shard(f) for f in files),
        partitions=None if partition_range is None else tuple(_partition_value(f, partition_range[0]) for f in files),
    )


def _find_files(uri: str) -> tuple[list[str], str]:
    """(manifest file URIs, base folder) for a file, a folder or a glob."""
    if not uri:
        raise ManifestError("no manifest given")
    if "*" in uri or "?" in uri:
        root, pattern = _split_glob(uri)
        regex = _glob_regex(pattern)
        listing = _list(root)
        files = [storage.join(root, entry[0]) for entry in listing if regex.fullmatch(entry[0].replace(os.sep, "/"))]
        files = [f for f in files if _is_data_file(f, root)]
        if not files:
            raise ManifestError(f"manifest glob {uri} matches no .parquet/.pq/.csv/.json/.jsonl file")
        return files, root

    uri = _absolute(uri)
    filesystem, path = storage.filesystem(uri)
    try:
        info = storage.retry_transient(lambda: filesystem.get_file_info(path))
    except OSError as e:
        raise _storage_problem(uri, e) from e
    if info.type == pafs.FileType.NotFound:
        raise ManifestError(f"manifest {uri} does not exist")
    if info.type == pafs.FileType.File:
        _format_of(uri)  # refuse an unknown extension now, with its own message
        return [uri], _parent(uri)
    files = [storage.join(uri, entry[0]) for entry in _list(uri)]
    files = [f for f in files if _is_data_file(f, uri)]
    if not files:
        raise ManifestError(f"manifest folder {uri} holds no .parquet/.pq/.csv/.json/.jsonl file")
    return files, uri


def _absolute(uri: str) -> str:
    if storage.is_s3(uri):
        return uri.rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return os.path.abspath(uri)


def file_folder(file: str) -> str:
    """The folder of one manifest file: its rows' relative paths resolve against it, so a
    partition folder (`dt=2026-11-26/`) carries its own images beside its manifest."""
    return _parent(file)


def _parent(uri: str) -> str:
    if storage.is_s3(uri):
        return uri.rsplit("/", 1)[0]
    return os.path.dirname(uri)


def _list(folder: str) -> list[tuple]:
    """`storage.list_files`: (path relative to the folder, ...) tuples, sorted."""
    try:
        return storage.list_files(folder)
    except storage.StorageError as e:
        if not storage.is_s3(folder):  # a local folder we cannot read is the manifest's problem
            raise ManifestError(f"manifest folder {folder} cannot be read: {e.__cause__ or e}") from e
        raise


def _split_glob(uri: str) -> tuple[str, str]:
    """`s3://b/m/dt=*/part-*.parquet` -> (`s3://b/m`, `dt=*/part-*.parquet`)."""
    if storage.is_s3(uri):
        scheme, rest = "s3://", uri[len("s3://") :]
    else:
        scheme, rest = "", _absolute(uri)
    parts = rest.split("/")
    first = next(i for i, p in enumerate(parts) if "*" in p or "?" in p)
    if scheme and first == 0:
        raise ManifestError(f"manifest glob {uri}: the bucket name cannot be a pattern")
    root = "/".join(parts[:first]) or "/"
    return scheme + root, "/".join(parts[first:])


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """`*` and `?` stay within one folder name; `**/` spans any number of folders."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def _relative(file: str, base: str) -> str:
    if storage.is_s3(file):
        return posixpath.relpath(file[len("s3://") :], base[len("s3://") :])
    return os.path.relpath(file, base).replace(os.sep, "/")


def _is_data_file(file: str, base: str) -> bool:
    """Manifest extension, and no `_`/`.` name on the way (`_SUCCESS`, `.crc`, `_temporary/`),
    the convention of Spark, Hive and pyarrow's own dataset discovery."""
    parts = _relative(file, base).split("/")
    if any(p.startswith(("_", ".")) for p in parts):
        return False
    return os.path.splitext(file)[1].lower() in FORMATS


def _format_of(file: str) -> str:
    ext = os.path.splitext(file)[1].lower()
    if ext not in FORMATS:
        raise ManifestError(
            f"cannot tell the format of manifest {file}: expected .parquet/.pq, .csv or .json/.jsonl/.ndjson"
        )
    return FORMATS[ext]


def _default_shard(file: str) -> str:
    """Innermost hive partition folder (`dt=2026-11-26`), else the file name without extension.

    The whole path counts, not only the part under the manifest's root, so that planning one
    partition (`.../dt=2026-11-26/`, as a backfill does day by day) gives the same shard as
    planning them all. Made to obey the pair_id charset (other characters become `_`) because a
    default the user never wrote must not fail every row of the file with `invalid_shard`.
    """
    path = file[len("s3://") :].split("/", 1)[-1] if storage.is_s3(file) else file.replace(os.sep, "/")
    parts = path.split("/")
    partitions = [p for p in parts[:-1] if "=" in p]
    name = partitions[-1] if partitions else os.path.splitext(parts[-1])[0]
    return safe_name(name, fallback="manifest")


def _file_format(fmt: str, csv_names: list[str]) -> ds.FileFormat:
    if fmt == "parquet":
        return ds.ParquetFileFormat()
    if fmt == "json":
        return ds.JsonFileFormat()
    types = {name: pa.string() for name in csv_names}
    for name in ("seed", "step"):
        if name in types:
            types[name] = pa.int64()
    return ds.CsvFileFormat(convert_options=pacsv.ConvertOptions(column_types=types))


def _make_fragment(file_format: ds.FileFormat, file: str, filesystem: pafs.FileSystem) -> ds.Fragment:
    return file_format.make_fragment(storage.filesystem(file)[1], filesystem=filesystem)


_T = TypeVar("_T")


def _read_file(file: str, read: Callable[[], _T], csv_names: list[str] | None = None) -> _T:
    """Run `read()` (again after a transient S3 error), turning pyarrow's errors into messages
    that name the file (and, for CSV, the column: pyarrow only gives its number)."""
    with _file_errors(file, csv_names):
        return storage.retry_transient(read)


@contextlib.contextmanager
def _file_errors(file: str, csv_names: list[str] | None = None) -> Iterator[None]:
    """Re-raise a read error of `file` as the ManifestError / StorageError it means."""
    try:
        yield
    except Exception as e:
        mapped = _file_error(file, e, csv_names)
        if mapped is e:
            raise
        raise mapped from e


def _file_error(file: str, error: Exception, csv_names: list[str] | None) -> Exception:
    """The ManifestError / StorageError a read error of `file` means (others: itself)."""
    if isinstance(error, FileNotFoundError):
        return ManifestError(f"manifest file {file} does not exist")
    if isinstance(error, (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError)):
        message = str(error)
        found = re.search(r"CSV column #(\d+)", message)
        if found and csv_names and int(found.group(1)) < len(csv_names):
            message = f"column {csv_names[int(found.group(1))]}: {message}"
        return ManifestError(f"manifest file {file} cannot be read: {message}")
    if isinstance(error, OSError):
        return _storage_problem(file, error)
    return error


def _storage_problem(uri: str, error: OSError) -> Exception:
    # Local: unreadable is the manifest's problem (exit 2). S3: a network or permission error
    # is the storage's (exit 1), so a nightly retry can tell them apart.
    if storage.is_s3(uri):
        return storage.StorageError(f"cannot read manifest {uri}: {error}")
    return ManifestError(f"manifest {uri} cannot be read: {error}")


def _is_string_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_list_type(t: pa.DataType) -> bool:
    return (
        pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_list_view(t)
    )


def _check_columns(schema: pa.Schema, file: str, fmt: str) -> None:
    """Required columns present, and the known columns of a type we can read."""
    names = schema.names
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise ManifestError(
            f"manifest file {file} misses required column(s) {', '.join(missing)} (it has: {', '.join(names)})"
        )
    if "mask_uri" not in names and "bbox" not in names:
        raise ManifestError(
            f"manifest file {file} has neither a mask_uri nor a bbox column: one is needed to mark the region"
        )
    if ("scene_id" in names) != ("step" in names):
        raise ManifestError(f"manifest file {file}: scene_id and step go together (a scene's rows need both columns)")
    for field in schema:
        t = field.type
        if pa.types.is_null(t):  # an all-null column: every row says so itself
            continue
        if field.name in STRING_COLUMNS and not _is_string_type(t):
            raise ManifestError(f"manifest file {file}: column {field.name} must be a string, got {t}")
        if field.name in ("seed", "step") and not pa.types.is_integer(t):
            raise ManifestError(f"manifest file {file}: column {field.name} must be an integer (int64), got {t}")
        if field.name == "bbox":
            numeric_list = _is_list_type(t) and (
                pa.types.is_integer(t.value_type)
                or pa.types.is_floating(t.value_type)
                or pa.types.is_null(t.value_type)
            )
            text_ok = fmt in ("csv", "json") and _is_string_type(t)
            if not (numeric_list or text_ok):
                expected = "a list of 4 numbers" + (
                    ' or a JSON array string "[x0, y0, x1, y1]"' if fmt != "parquet" else ""
                )
                raise ManifestError(f"manifest file {file}: column bbox must be {expected}, got {t}")


def _canonical_type(name: str, t: pa.DataType, fmt: str) -> pa.DataType:
    """One type per known column, whatever the writer chose (dictionary strings, int32 seeds,
    fixed-size int bboxes): the scanner casts every file to it, so batches look alike."""
    if name in STRING_COLUMNS:
        return pa.string()
    if name in ("seed", "step"):
        return pa.int64()
    if name == "bbox":
        if _is_string_type(t) or (pa.types.is_null(t) and fmt == "csv"):
            return pa.string()
        return pa.list_(pa.float64())
    return t


# -- streaming -----------------------------------------------------------------------------


def iter_columns(plan: ManifestPlan, columns: list[str], batch_size: int = 65536) -> Iterator[pa.RecordBatch]:
    """Stream only `columns` of the manifest (cast to `plan.schema`), file by file: a check of
    one column reads that column, not the rows (a 1M-row file's URIs are hundreds of MB)."""
    for _, batch in _scan(plan, columns, batch_size):
        yield batch


def iter_batches(plan: ManifestPlan, batch_size: int = 4096) -> Iterator[pa.RecordBatch]:
    """Stream the manifest file by file in batches of at most `batch_size` rows.

    Every batch has `plan.schema`'s columns plus `shard` (the row's own value, or the file's
    default when null/empty), `_source_file` and `_source_row` (0-based row within the file).
    """
    for index, batch in _scan(plan, None, batch_size):
        default = plan.default_shards[index]
        if "shard" in batch.schema.names:
            given = batch.column("shard")
            empty = pc.or_kleene(pc.is_null(given), pc.equal(given, ""))
            shard = pc.if_else(empty, default, given)
            batch = batch.set_column(batch.schema.get_field_index("shard"), "shard", shard)
        else:
            batch = batch.append_column("shard", pa.array([default] * batch.num_rows, pa.string()))
        yield batch


@dataclass(frozen=True)
class PairIdConflicts:
    """pair_ids that name more than one input row, and what becomes of their rows.

    In one manifest every row of a repeated pair_id fails `duplicate_pair_id` (no silent
    winner). Across the partitions of a backfill's range (full daily catalog dumps repeat most
    pairs every day) the latest partition wins: rows of a pair_id in an earlier partition are
    `skipped` (`superseded`); a pair_id repeated within its latest partition has no winner,
    and all its rows, on every day, fail `duplicate_pair_id`. `latest` holds every pair_id
    found in more than one partition: for full daily dumps, nearly every pair (the driver and
    each read worker hold it once)."""

    duplicates: frozenset[str] = frozenset()
    latest: dict[str, str] = dataclasses.field(default_factory=dict)  # pair_id -> its winning partition

    def superseded(self, pair_id: str | None, partition: str | None) -> bool:
        return partition is not None and self.latest.get(pair_id, partition) != partition


def pair_id_conflicts(plan: ManifestPlan) -> PairIdConflicts:
    """The whole manifest's conflicts, on one machine (`--dry-run`, training). Streams the
    pair_id column alone; memory grows with the number of *distinct* ids: each batch is reduced
    to (id, partition, count) and the partial counts are merged whenever they pile up. A render
    run finds the same conflicts bucket by bucket on the cluster (`stages.resume_stage`)."""
    partials: list[pa.Table] = []
    pending = 0
    for index, batch in _scan(plan, ["pair_id"], 1 << 16):
        part = "" if plan.partitions is None else plan.partitions[index]
        partials.append(_counts(batch.column(0), pa.array([part] * batch.num_rows, pa.string())))
        pending += partials[-1].num_rows
        if pending > 1 << 22:
            partials = [_merge_counts(partials)]
            pending = partials[0].num_rows
    if not partials:
        return PairIdConflicts()
    return _conflicts(_merge_counts(partials), plan.partitions is not None)


def conflicts_of(pair_ids: pa.Array, parts: pa.Array | None) -> PairIdConflicts:
    """The conflicts among these rows alone (`parts`: each row's partition, None without a
    backfill range): exact for a set of rows that holds every row of each of its pair_ids."""
    parts = pa.array([""] * len(pair_ids), pa.string()) if parts is None else parts
    return _conflicts(_counts(pair_ids, parts), partitioned=True)


def _counts(pair_ids, parts) -> pa.Table:
    """(pair_id, part, n) for the non-null ids."""
    table = pa.table({"pair_id": pair_ids, "part": parts})
    table = table.filter(pc.is_valid(table["pair_id"]))
    counts = table.group_by(["pair_id", "part"]).aggregate([("pair_id", "count")])
    return pa.table({"pair_id": counts["pair_id"], "part": counts["part"], "n": counts["pair_id_count"]})


def _conflicts(counts: pa.Table, partitioned: bool) -> PairIdConflicts:
    """The rule of `PairIdConflicts`, from (pair_id, part, n) counts."""
    if not partitioned:
        return PairIdConflicts(frozenset(counts.filter(pc.greater(counts["n"], 1))["pair_id"].to_pylist()))
    per_pair = counts.group_by("pair_id").aggregate([("part", "max"), ("part", "count")])
    several = per_pair.filter(pc.greater(per_pair["part_count"], 1))
    latest = dict(zip(several["pair_id"].to_pylist(), several["part_max"].to_pylist()))
    at_latest = counts.join(per_pair.select(["pair_id", "part_max"]), "pair_id")
    at_latest = at_latest.filter(
        pc.and_(pc.equal(at_latest["part"], at_latest["part_max"]), pc.greater(at_latest["n"], 1))
    )
    return PairIdConflicts(frozenset(at_latest["pair_id"].to_pylist()), latest)


def _merge_counts(partials: list[pa.Table]) -> pa.Table:
    merged = pa.concat_tables(partials).group_by(["pair_id", "part"]).aggregate([("n", "sum")])
    return pa.table({"pair_id": merged["pair_id"], "part": merged["part"], "n": merged["n_sum"]})


def _scan(plan: ManifestPlan, columns: list[str] | None, batch_size: int) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(file index, batch) over every file, cast to `plan.schema`; `_source_*` columns added
    when all columns are read."""
    filesystem = storage.filesystem(plan.files[0])[0]
    file_format = _file_format(plan.format, plan.schema.names)
    for index, file in enumerate(plan.files):
        row = 0  # rows of this file already yielded
        for attempt in range(1, storage.TRANSIENT_ATTEMPTS + 1):
            try:
                for batch in _scan_file(plan, file, file_format, filesystem, columns, batch_size, skip=row):
                    if columns is None:
                        batch = batch.append_column(SOURCE_FILE, pa.array([file] * batch.num_rows, pa.string()))
                        batch = batch.append_column(
                            SOURCE_ROW, pa.array(np.arange(row, row + batch.num_rows, dtype=np.int64))
                        )
                    row += batch.num_rows
                    yield index, batch
                break
            except storage.StorageError as e:
                # A stream cut by a transient S3 error cannot be resumed: scan the file again
                # and skip the rows already handed out.
                if attempt == storage.TRANSIENT_ATTEMPTS or not storage.is_transient(e.__cause__):
                    raise
                storage.transient_pause(attempt)


def _scan_file(
    plan: ManifestPlan,
    file: str,
    file_format: ds.FileFormat,
    filesystem: pafs.FileSystem,
    columns: list[str] | None,
    batch_size: int,
    skip: int,
) -> Iterator[pa.RecordBatch]:
    """The non-empty batches of one file from row `skip` on."""
    fragment = _make_fragment(file_format, file, filesystem)
    # The plan's schema makes the scanner cast each file's columns to the unified types and
    # fill the columns a file lacks with nulls.
    scanner = ds.Scanner.from_fragment(fragment, schema=plan.schema, columns=columns, batch_size=batch_size)
    batches = _read_file(file, scanner.to_batches)
    names = _read_file(file, lambda: fragment.physical_schema.names) if plan.format == "csv" else None
    while True:
        with _file_errors(file, names):
            batch = next(batches, None)
        if batch is None:
            return
        if skip >= batch.num_rows:
            skip -= batch.num_rows
            continue
        batch, skip = batch.slice(skip), 0
        if batch.num_rows:
            yield batch
