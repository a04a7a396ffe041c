"""Input manifests: planning, streaming and row validation. Driver-side: no torch, no diffusers.

    plan = plan_manifest("s3://catalog/manifests/")     # schemas and row counts only
    duplicates = duplicate_pair_ids(plan)                # streams the pair_id column alone
    for batch in iter_batches(plan, batch_size=4096):    # bounded memory, adds `shard`
        rows = validate_rows(batch, plan.base_dir, duplicates)

A manifest is one file, a folder (read recursively, hive partitions such as
`dt=2026-11-26/part-0.parquet` included) or a glob (`*` within a folder name, `**` across
folders), local or `s3://`, in Parquet (.parquet/.pq), CSV (.csv) or JSON Lines
(.json/.jsonl/.ndjson). Columns are those of DESIGN.md "Input manifest".

Two kinds of problems, two ways out:
- the manifest as a whole is unusable (missing or unreadable, no rows, a required column
  missing or of the wrong type): `plan_manifest` raises `ManifestError` with one message naming
  the problem, and the job exits 2 before any work;
- one row is bad: `validate_rows` gives it an `error_code` and an `error_message`, and the job
  carries on (the row becomes a `failed` row of the output manifest).

CSV has no types, so every CSV column is read as a string except `seed` (int64): a pair_id
such as `0001` stays `0001`, and no pass-through column can fail a later block's type
inference. JSON Lines keeps its own types (a numeric pair_id is a wrong type there).
Storage that cannot be reached (e.g. S3 access denied or down) raises `StorageError` instead
(exit 1): that is not the manifest's fault.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import posixpath
import re
import sys
from collections.abc import Callable, Iterator, Set
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from pipeline import storage

__all__ = [
    "PAIR_ID_RE",
    "ManifestError",
    "ManifestPlan",
    "plan_manifest",
    "iter_batches",
    "duplicate_pair_ids",
    "validate_rows",
    "stable_seed",
    "file_folder",
]

# pair_id, shard and run_id name objects under --output: this charset (and no leading dot)
# keeps every key inside it. `\Z` rather than `$` so that "id\n" does not match.
PAIR_ID_RE = re.compile(r"(?!\.)[A-Za-z0-9._=-]{1,200}\Z")

REQUIRED_COLUMNS = ("pair_id", "context_uri", "product_uri")
STRING_COLUMNS = ("pair_id", "context_uri", "product_uri", "mask_uri", "shard")
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".ndjson": "json"}
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
    base_dir: str  # the folder given (or the file's folder): the allowlist's default root. Row paths resolve against each file's own folder (file_folder)
    schema: pa.Schema  # every file's columns, known ones in canonical types (see _canonical_type)
    num_rows: int
    file_rows: tuple[int, ...]  # rows per file, aligned with `files` (work splitting, progress)
    has_mask: bool  # a mask_uri column exists
    has_bbox: bool  # a bbox column exists
    default_shards: tuple[str, ...]  # per file: innermost hive partition "key=value", else the file's stem


def stable_seed(pair_id: str) -> int:
    """Default seed: the first 8 bytes of sha256(pair_id), big-endian, masked to 63 bits.

    Stable across processes and Python versions (unlike `hash()`), and non-negative int64.
    """
    digest = hashlib.sha256(pair_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


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
        raise ManifestError(f"manifest {uri} mixes formats ({', '.join(sorted(formats))}); use one format per manifest")
    fmt = formats.pop()
    filesystem = storage.filesystem(files[0])[0]

    headers: dict[str, list[str]] = {}  # CSV: each file's column names, in order
    if fmt == "csv":  # the header names decide the CSV column types: read them first
        for file in files:
            headers[file] = _read_file(file, lambda f=file: _make_fragment(ds.CsvFileFormat(), f, filesystem).physical_schema.names)
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
            typed = [n for n in ("pair_id", "seed", "bbox") if n in physical.names]
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
        raise ManifestError(f"cannot tell the format of manifest {file}: expected .parquet/.pq, .csv or .json/.jsonl/.ndjson")
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
    name = re.sub(r"[^A-Za-z0-9._=-]", "_", name).lstrip(".")[:200]
    return name or "manifest"


def _file_format(fmt: str, csv_names: list[str]) -> ds.FileFormat:
    if fmt == "parquet":
        return ds.ParquetFileFormat()
    if fmt == "json":
        return ds.JsonFileFormat()
    types = {name: pa.string() for name in csv_names}
    if "seed" in types:
        types["seed"] = pa.int64()
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
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_list_view(t)


def _check_columns(schema: pa.Schema, file: str, fmt: str) -> None:
    """Required columns present, and the known columns of a type we can read."""
    names = schema.names
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise ManifestError(f"manifest file {file} misses required column(s) {', '.join(missing)} (it has: {', '.join(names)})")
    if "mask_uri" not in names and "bbox" not in names:
        raise ManifestError(f"manifest file {file} has neither a mask_uri nor a bbox column: one is needed to mark the region")
    for field in schema:
        t = field.type
        if pa.types.is_null(t):  # an all-null column: every row says so itself
            continue
        if field.name in STRING_COLUMNS and not _is_string_type(t):
            raise ManifestError(f"manifest file {file}: column {field.name} must be a string, got {t}")
        if field.name == "seed" and not pa.types.is_integer(t):
            raise ManifestError(f"manifest file {file}: column seed must be an integer (int64), got {t}")
        if field.name == "bbox":
            numeric_list = _is_list_type(t) and (
                pa.types.is_integer(t.value_type) or pa.types.is_floating(t.value_type) or pa.types.is_null(t.value_type)
            )
            text_ok = fmt in ("csv", "json") and _is_string_type(t)
            if not (numeric_list or text_ok):
                expected = "a list of 4 numbers" + (' or a JSON array string "[x0, y0, x1, y1]"' if fmt != "parquet" else "")
                raise ManifestError(f"manifest file {file}: column bbox must be {expected}, got {t}")


def _canonical_type(name: str, t: pa.DataType, fmt: str) -> pa.DataType:
    """One type per known column, whatever the writer chose (dictionary strings, int32 seeds,
    fixed-size int bboxes): the scanner casts every file to it, so batches look alike."""
    if name in STRING_COLUMNS:
        return pa.string()
    if name == "seed":
        return pa.int64()
    if name == "bbox":
        if _is_string_type(t) or (pa.types.is_null(t) and fmt == "csv"):
            return pa.string()
        return pa.list_(pa.float64())
    return t


# -- streaming -----------------------------------------------------------------------------


def iter_batches(plan: ManifestPlan, batch_size: int = 4096) -> Iterator[pa.RecordBatch]:
    """Stream the manifest file by file in batches of at most `batch_size` rows.

    Every batch has `plan.schema`'s columns plus `shard` (the row's own value, or the file's
    default when null/empty), `_source_file` and `_source_row` (0-based row within the file).
    """
    for index, batch in _scan(plan, None, batch_size):
        file, default = plan.files[index], plan.default_shards[index]
        if "shard" in batch.schema.names:
            given = batch.column("shard")
            empty = pc.or_kleene(pc.is_null(given), pc.equal(given, ""))
            shard = pc.if_else(empty, default, given)
            batch = batch.set_column(batch.schema.get_field_index("shard"), "shard", shard)
        else:
            batch = batch.append_column("shard", pa.array([default] * batch.num_rows, pa.string()))
        yield batch


def duplicate_pair_ids(plan: ManifestPlan) -> set[str]:
    """Every pair_id that occurs more than once in the whole manifest.

    Streams the pair_id column alone; memory grows with the number of *distinct* ids: each
    batch is reduced to (id, count) and the partial counts are merged whenever they pile up.
    """
    partials: list[pa.Table] = []
    pending = 0
    for _, batch in _scan(plan, ["pair_id"], 1 << 16):
        ids = pc.drop_null(batch.column(0))
        counts = pa.table({"pair_id": ids}).group_by("pair_id").aggregate([("pair_id", "count")])
        partials.append(pa.table({"pair_id": counts["pair_id"], "n": counts["pair_id_count"]}))
        pending += counts.num_rows
        if pending > 1 << 22:
            partials = [_merge_counts(partials)]
            pending = partials[0].num_rows
    if not partials:
        return set()
    merged = _merge_counts(partials)
    return set(merged.filter(pc.greater(merged["n"], 1))["pair_id"].to_pylist())


def _merge_counts(partials: list[pa.Table]) -> pa.Table:
    merged = pa.concat_tables(partials).group_by("pair_id").aggregate([("n", "sum")])
    return pa.table({"pair_id": merged["pair_id"], "n": merged["n_sum"]})


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
                        batch = batch.append_column(SOURCE_ROW, pa.array(np.arange(row, row + batch.num_rows, dtype=np.int64)))
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
    plan: ManifestPlan, file: str, file_format: ds.FileFormat, filesystem: pafs.FileSystem,
    columns: list[str] | None, batch_size: int, skip: int,
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


# -- row validation ------------------------------------------------------------------------


def validate_rows(batch: Any, base_dir: str | ManifestPlan, duplicates: Set[str] = frozenset()) -> Any:
    """Check each row and normalise the columns later stages rely on. A bad row becomes data.

    `batch`: a dict of numpy arrays (Ray's "numpy" format), a pandas DataFrame, or a pyarrow
    Table/RecordBatch; the same kind comes back (a Table for a RecordBatch), with every input
    column kept and these set:
    - `error_code`, `error_message`: "" when the row is fine, else the first problem found:
      `invalid_pair_id`, `duplicate_pair_id`, `missing_uri`, `region_missing`,
      `region_ambiguous`, `bad_bbox`, `invalid_shard`;
    - `context_uri`, `product_uri`, `mask_uri`: relative paths resolved against `base_dir`
      (URIs with a scheme and absolute paths are kept: the allowlist judges them later);
      None when empty;
    - `bbox`: `[x0, y0, x1, y1]` floats or None (whether it lies inside the photo is only known
      after decoding: `pipeline.images.region_from_bbox`);
    - `seed`: int64, the given one or `stable_seed(pair_id)`;
    - `shard`: as given (`iter_batches` already filled the default).
    """
    base = base_dir.base_dir if isinstance(base_dir, ManifestPlan) else base_dir
    columns, num_rows = _columns(batch)
    absent = [None] * num_rows
    pair_ids = columns.get("pair_id", absent)
    masks = columns.get("mask_uri", absent)
    bboxes = columns.get("bbox", absent)
    seeds = columns.get("seed", absent)
    shards = columns.get("shard", absent)
    context_uris = columns.get("context_uri", absent)
    product_uris = columns.get("product_uri", absent)

    out: dict[str, list] = {k: [] for k in ("error_code", "error_message", "context_uri", "product_uri", "mask_uri", "bbox", "seed", "shard")}
    for i in range(num_rows):
        pair_id = _text(pair_ids[i])
        context_uri, product_uri, mask_uri = (_text(v) for v in (context_uris[i], product_uris[i], masks[i]))
        context_uri, product_uri, mask_uri = (_resolve(u, base) if u and u.strip() else None for u in (context_uri, product_uri, mask_uri))
        shard = _text(shards[i])
        bbox_given = not _missing(bboxes[i]) and not (isinstance(bboxes[i], str) and not bboxes[i].strip())
        bbox, bbox_problem = _parse_bbox(bboxes[i]) if bbox_given else (None, None)

        code, message = "", ""
        if pair_id is None or not PAIR_ID_RE.match(pair_id):
            code = "invalid_pair_id"
            message = f"pair_id {_show(pair_id)} must be 1-200 characters of [A-Za-z0-9._=-], not starting with '.'"
        elif pair_id in duplicates:
            code, message = "duplicate_pair_id", f"pair_id {pair_id!r} occurs more than once in the manifest"
        elif context_uri is None or product_uri is None:
            empty = "context_uri" if context_uri is None else "product_uri"
            code, message = "missing_uri", f"{empty} is empty"
        elif mask_uri is None and not bbox_given:
            code, message = "region_missing", "neither mask_uri nor bbox is given: one marks the region to repaint"
        elif mask_uri is not None and bbox_given:
            code, message = "region_ambiguous", "both mask_uri and bbox are given: give one"
        elif bbox_problem:
            code, message = "bad_bbox", bbox_problem
        elif shard is None or not PAIR_ID_RE.match(shard):
            code = "invalid_shard"
            message = f"shard {_show(shard)} must be 1-200 characters of [A-Za-z0-9._=-], not starting with '.'"

        out["error_code"].append(code)
        out["error_message"].append(message)
        out["context_uri"].append(context_uri)
        out["product_uri"].append(product_uri)
        out["mask_uri"].append(mask_uri)
        out["bbox"].append(bbox)
        out["seed"].append(_seed(seeds[i], pair_id))
        out["shard"].append(shard)
    return _attach(batch, out)


def _columns(batch: Any) -> tuple[dict[str, list], int]:
    """Every column as a list of Python values, whatever the batch format."""
    if isinstance(batch, (pa.Table, pa.RecordBatch)):
        return {name: batch.column(name).to_pylist() for name in batch.schema.names}, batch.num_rows
    pandas = sys.modules.get("pandas")  # imported by the caller if it passes a DataFrame
    if pandas is not None and isinstance(batch, pandas.DataFrame):
        return {name: batch[name].tolist() for name in batch.columns}, len(batch)
    if isinstance(batch, dict):
        columns = {name: list(values) for name, values in batch.items()}  # a 2-D bbox array gives rows
        lengths = {len(v) for v in columns.values()}
        if len(lengths) > 1:
            raise ValueError(f"batch columns have different lengths: {sorted(lengths)}")
        return columns, lengths.pop() if lengths else 0
    raise TypeError(f"batch must be a dict of numpy arrays, a pandas DataFrame or a pyarrow Table, got {type(batch).__name__}")


def _attach(batch: Any, out: dict[str, list]) -> Any:
    if isinstance(batch, (pa.Table, pa.RecordBatch)):
        table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
        types = {"bbox": pa.list_(pa.float64()), "seed": pa.int64()}
        for name, values in out.items():
            column = pa.array(values, types.get(name, pa.string()))
            index = table.schema.get_field_index(name)
            table = table.set_column(index, name, column) if index >= 0 else table.append_column(name, column)
        return table
    arrays = {}
    for name, values in out.items():
        if name == "seed":
            arrays[name] = np.asarray(values, dtype=np.int64)
        else:
            arrays[name] = np.empty(len(values), dtype=object)
            arrays[name][:] = values
    if isinstance(batch, dict):
        return {**batch, **arrays}
    result = batch.copy()
    for name, values in arrays.items():
        result[name] = values
    return result


def _missing(value: Any) -> bool:
    """None, NaN (pandas/numpy nulls) and pandas.NA."""
    if value is None:
        return True
    if isinstance(value, (float, np.floating)):
        return math.isnan(value)
    return type(value).__name__ == "NAType"


def _text(value: Any) -> str | None:
    if _missing(value):
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _show(value: str | None) -> str:
    if value is None:
        return "(null)"
    return repr(value if len(value) <= 60 else value[:57] + "...")


def _resolve(uri: str, base: str) -> str:
    """Relative paths join the manifest's folder; anything with a scheme or absolute stays."""
    if "://" in uri or uri.startswith(("file:", "/")):
        return uri
    if storage.is_s3(base):
        bucket_and_key = posixpath.normpath(posixpath.join(base[len("s3://") :], uri))
        return "s3://" + bucket_and_key
    return os.path.normpath(os.path.join(base, uri))


def _parse_bbox(value: Any) -> tuple[list[float] | None, str | None]:
    """(bbox, None) or (None, why it is bad). Accepts a sequence or a JSON array string."""
    raw = value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None, f"bbox {_show(raw)} is not a JSON array [x0, y0, x1, y1]"
    try:
        values = list(value)
    except TypeError:
        return None, f"bbox {_show(str(raw))} is not a list [x0, y0, x1, y1]"
    if len(values) != 4 or any(isinstance(v, (bool, np.bool_, str)) or _missing(v) for v in values):
        return None, f"bbox {_show(str(raw))} must be 4 numbers [x0, y0, x1, y1]"
    try:
        x0, y0, x1, y1 = (float(v) for v in values)
    except (TypeError, ValueError):
        return None, f"bbox {_show(str(raw))} must be 4 numbers [x0, y0, x1, y1]"
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return None, f"bbox {[x0, y0, x1, y1]} has a value that is not finite"
    if min(x0, y0, x1, y1) < 0:
        return None, f"bbox {[x0, y0, x1, y1]} has a negative coordinate"
    if x1 <= x0 or y1 <= y0:
        return None, f"bbox {[x0, y0, x1, y1]} is empty or inverted: need x0 < x1 and y0 < y1"
    return [x0, y0, x1, y1], None


def _seed(value: Any, pair_id: str | None) -> int:
    if _missing(value):
        return stable_seed(pair_id or "")
    # Ray turns an int64 column with nulls into float64; those are whole numbers.
    return int(value)
