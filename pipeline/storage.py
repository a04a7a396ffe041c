"""Object storage: one API over local paths and `s3://` URIs.

Everything that touches bytes outside the process goes through here, so retries, atomic
writes and the S3 endpoint settings live in one place. Driver-side: no torch import.

`s3://` uses `pyarrow.fs.S3FileSystem` with the standard AWS settings (credentials chain,
`AWS_REGION`/`AWS_DEFAULT_REGION`, and `AWS_ENDPOINT_URL` for S3-compatible endpoints such
as MinIO or the test suite's moto server). Credentials are never logged.
"""

from __future__ import annotations

import functools
import os
import posixpath
import random
import time
import uuid
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

__all__ = [
    "StorageError",
    "is_s3",
    "join",
    "filesystem",
    "read_bytes",
    "write_bytes",
    "read_parquet",
    "write_parquet",
    "exists",
    "delete",
    "list_files",
    "sync_to_local",
    "is_transient",
    "retry_transient",
    "transient_pause",
    "s3_max_attempts",
]

_T = TypeVar("_T")
# Errors S3 means to be retried that the AWS SDK cannot retry itself: when a 503 SlowDown or
# 500 answers a ranged GET, the SDK writes the error body into the caller's fixed-size buffer,
# fails with "Failed to flush response stream" and classes that as a non-retryable
# INTERNAL_FAILURE (apache/doris#61636 and milvus-io/milvus#49872 retry it the same way).
TRANSIENT_MARKERS = (
    "Failed to flush response stream",
    "SlowDown",
    "InternalError",
    "ServiceUnavailable",
    "HTTP status 500",
    "HTTP status 502",
    "HTTP status 503",
    "HTTP status 504",
)
TRANSIENT_ATTEMPTS = 6


class StorageError(RuntimeError):
    """Storage is unreachable or an object cannot be read/written (exit code 1 territory)."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join key parts onto a local folder or an `s3://` prefix."""
    if is_s3(base):
        return base.rstrip("/") + "/" + "/".join(p.strip("/") for p in parts)
    return os.path.join(base, *parts)


@functools.lru_cache(maxsize=8)
def _s3(endpoint: str | None, region: str | None, max_attempts: int) -> pafs.S3FileSystem:
    kwargs: dict = {}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    if region:
        kwargs["region"] = region
    # Retries with backoff on throttling (SlowDown), 5xx answers and refused connections.
    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts)
    return pafs.S3FileSystem(**kwargs)


def s3_max_attempts() -> int:
    """Attempts per S3 request: `DTC_S3_MAX_ATTEMPTS` (default 8: an endpoint that is down is
    reported after ~50 s of backoff; lower it to fail fast)."""
    value = os.environ.get("DTC_S3_MAX_ATTEMPTS", "8")
    try:
        attempts = int(value)
    except ValueError:
        raise StorageError(f"DTC_S3_MAX_ATTEMPTS must be an integer, got {value!r}") from None
    if attempts < 1:
        raise StorageError(f"DTC_S3_MAX_ATTEMPTS must be >= 1, got {attempts}")
    return attempts


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or `s3://bucket/key`."""
    if is_s3(uri):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return _s3(endpoint, region, s3_max_attempts()), uri[len("s3://") :]
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def is_transient(error: BaseException) -> bool:
    """An S3 error worth retrying after a pause (throttling, 5xx), by its message."""
    return isinstance(error, OSError) and any(marker in str(error) for marker in TRANSIENT_MARKERS)


def transient_pause(attempt: int) -> None:
    """The wait after failed attempt `attempt` (1, 2, ...): jittered exponential backoff,
    0.1 s doubling, capped at 5 s."""
    time.sleep(min(5.0, 0.1 * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0))


def retry_transient(fn: Callable[[], _T], attempts: int = TRANSIENT_ATTEMPTS) -> _T:
    """`fn()`, tried again after `transient_pause` while it fails with a transient S3 error;
    any other error, or the last one, propagates unchanged."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except OSError as e:
            if attempt == attempts or not is_transient(e):
                raise
            transient_pause(attempt)
    raise AssertionError("unreachable")


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)

    def read() -> bytes:
        # open_input_file knows the size and reads in large ranged requests; the streaming
        # reader is far slower on large S3 objects (model files).
        with fs.open_input_file(path) as f:
            return f.read()

    try:
        return retry_transient(read)
    except FileNotFoundError:
        raise
    except OSError as e:
        if "NoSuchKey" in str(e) or "does not exist" in str(e) or "Path does not exist" in str(e):
            raise FileNotFoundError(uri) from e
        raise StorageError(f"cannot read {uri}: {e}") from e


def write_bytes(uri: str, data: bytes) -> None:
    """Write an object. Local files go to a temp name in the same folder and are renamed,
    so a reader (or a killed job) never sees half a file. An S3 PUT is atomic already."""
    fs, path = filesystem(uri)
    try:
        if is_s3(uri):

            def put() -> None:
                with fs.open_output_stream(path) as f:
                    f.write(data)

            retry_transient(put)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        raise StorageError(f"cannot write {uri}: {e}") from e


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    """A Parquet object as a Table, reading only `columns` when given (column chunks, not the
    whole object); FileNotFoundError when absent. Single-threaded: readers open many small
    files, and per-thread arena growth would make the driver's memory scale with their number."""
    fs, path = filesystem(uri)
    try:
        return retry_transient(lambda: pq.read_table(path, filesystem=fs, columns=columns, use_threads=False))
    except FileNotFoundError:
        raise
    except OSError as e:
        if "NoSuchKey" in str(e) or "does not exist" in str(e):
            raise FileNotFoundError(uri) from e
        raise StorageError(f"cannot read {uri}: {e}") from e


def write_parquet(uri: str, table: pa.Table) -> None:
    """Write a Table as one Parquet object, atomically (see `write_bytes`)."""
    import io

    sink = io.BytesIO()
    pq.write_table(table, sink)
    write_bytes(uri, sink.getvalue())


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    try:
        return retry_transient(lambda: fs.get_file_info(path)).type != pafs.FileType.NotFound
    except OSError as e:
        raise StorageError(f"cannot stat {uri}: {e}") from e


def delete(uri: str) -> None:
    fs, path = filesystem(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def list_files(prefix: str) -> list[tuple[str, int, int]]:
    """Every file under a folder/prefix as (path relative to it, size, mtime_ns), sorted."""
    fs, root = filesystem(prefix)
    root = root.rstrip("/")
    try:
        infos = retry_transient(
            lambda: fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        )
    except OSError as e:
        raise StorageError(f"cannot list {prefix}: {e}") from e
    head = root + "/"
    # Slicing the known prefix off is much faster than relpath on large listings (bench/scale.py).
    return sorted(
        (i.path[len(head) :] if i.path.startswith(head) else posixpath.relpath(i.path, root), i.size, i.mtime_ns or 0)
        for i in infos
        if i.type == pafs.FileType.File
    )


def sync_to_local(prefix: str, local_dir: str) -> list[str]:
    """Copy every object under `prefix` into `local_dir` (created); returns relative paths."""
    files = list_files(prefix)
    if not files:
        raise FileNotFoundError(f"nothing found under {prefix}")
    for rel, _size, _mtime in files:
        dest = os.path.join(local_dir, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(dest, "wb") as f:
            f.write(read_bytes(join(prefix, rel)))
    return [rel for rel, _, _ in files]
