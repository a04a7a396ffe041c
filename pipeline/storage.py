"""Object storage: one API over local paths and `s3://` URIs.

Everything that touches bytes outside the process goes through here, so retries, atomic
writes and the S3 endpoint settings live in one place. Driver-side: no torch import.

`s3://` uses `pyarrow.fs.S3FileSystem` with the standard AWS settings (credentials chain,
`AWS_REGION`/`AWS_DEFAULT_REGION`, and `AWS_ENDPOINT_URL` for S3-compatible endpoints such
as MinIO or the test suite's moto server). Credentials are never logged.

Conditional writes (`read_versioned`, `put_if_absent`, `put_if_match`, `delete_if_match`: what
`_lock` is built on) use boto3 on S3, as pyarrow has no conditional PUT (`If-None-Match: *`,
`If-Match: <etag>`), from the same endpoint, region and attempt settings; on local files they
are a link/rename compare-and-swap whose version is the content's sha256 (see `put_if_match`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
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

from pipeline.schema import conform

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
    "version",
    "delete",
    "list_files",
    "sync_to_local",
    "is_transient",
    "retry_transient",
    "transient_pause",
    "s3_max_attempts",
    "PreconditionFailed",
    "read_versioned",
    "put_if_absent",
    "put_if_match",
    "delete_if_match",
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


def _s3_settings() -> tuple[str | None, str | None]:
    """(endpoint, region) from the standard AWS variables: one reading for pyarrow and boto3."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return endpoint, os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or `s3://bucket/key`."""
    if is_s3(uri):
        return _s3(*_s3_settings(), s3_max_attempts()), uri[len("s3://") :]
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


def read_parquet(uri: str, columns: list[str] | None = None, schema: pa.Schema | None = None) -> pa.Table:
    """A Parquet object as a Table, reading only `columns` when given (column chunks, not the
    whole object); FileNotFoundError when absent. Single-threaded: readers open many small
    files, and per-thread arena growth would make the driver's memory scale with their number.
    `schema` (instead of `columns`): its columns in its types, those the object lacks as nulls:
    files written before a column existed (the done index, earlier runs' manifests)."""
    fs, path = filesystem(uri)

    def conformed() -> pa.Table:
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            present = set(parquet.schema_arrow.names)
            return conform(parquet.read(columns=[n for n in schema.names if n in present], use_threads=False), schema)

    try:
        if schema is not None:
            return retry_transient(conformed)
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


def version(uri: str) -> str | None:
    """What changes when a file is replaced in place: a local file's size and mtime (a stat), an
    S3 object's ETag (a HEAD); None when it is absent, or for http(s), which has neither."""
    if is_s3(uri):
        bucket, key = _bucket_key(uri)
        try:
            return _s3_call(uri, "stat", lambda: _boto3().head_object(Bucket=bucket, Key=key))["ETag"]
        except FileNotFoundError:
            return None
    if "://" in uri and not uri.startswith("file://"):
        return None
    try:
        stat = os.stat(_local(uri))
    except FileNotFoundError:
        return None
    return f"{stat.st_size}:{stat.st_mtime_ns}"


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


# -- conditional writes (what `_lock` is built on) ---------------------------------------------------------------

CLAIM_WAIT_S = 1.0  # how long a local compare-and-swap waits for another writer's claim (held for microseconds)


class PreconditionFailed(Exception):
    """A conditional write or delete found the object present (`put_if_absent`), or no longer at
    the expected version (`put_if_match`, `delete_if_match`: changed, absent, or being changed)."""


def read_versioned(uri: str) -> tuple[bytes, str]:
    """(bytes, version) of an object, for a later `put_if_match` / `delete_if_match`; the version
    is the S3 ETag, or a local file's sha256. FileNotFoundError when absent."""
    if is_s3(uri):
        bucket, key = _bucket_key(uri)
        answer = _s3_call(uri, "read", lambda: _boto3().get_object(Bucket=bucket, Key=key))
        return _s3_call(uri, "read", answer["Body"].read), answer["ETag"]
    data = _read_local(_local(uri))
    if data is None:
        raise FileNotFoundError(uri)
    return data, _digest(data)


def put_if_absent(uri: str, data: bytes) -> str:
    """Create the object only if it does not exist (PreconditionFailed otherwise); returns its
    version. S3: PUT with If-None-Match: *. Local: the bytes go to a temp file that is hard-linked
    to the name (link(2) never replaces), so a reader never sees a partly written file."""
    if is_s3(uri):
        bucket, key = _bucket_key(uri)
        put = functools.partial(_boto3().put_object, Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        return _s3_conditional_put(uri, data, put)
    path = _local(uri)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = _temp_copy(path, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise PreconditionFailed(f"{uri} exists") from None
        finally:
            os.unlink(tmp)
    except OSError as e:
        raise StorageError(f"cannot create {uri}: {e}") from e
    return _digest(data)


def put_if_match(uri: str, data: bytes, version: str, stale_claim_s: float = 60.0) -> str:
    """Replace the object with `data` only if it is still at `version`; returns the new version,
    or raises PreconditionFailed. The callers' contents never repeat (a counter or token in
    them), so a version, once replaced, never comes back.

    S3: PUT with If-Match: <etag>, atomic at S3. Local files: a compare-and-swap of link(2) and
    rename(2), three steps:
    1. claim: our bytes are written to a temp file, hard-linked to `<path>.cas-<version>` (link
       fails when the name exists: one writer at a time claims the replacement of a version),
       and the temp name removed, so our bytes now live under the claim name only;
    2. verify: the file still holds `version` (else the claim is dropped: PreconditionFailed);
    3. commit: the claim is renamed onto the file (readers see the old or the new one, whole),
       and the file is read back: it must hold our bytes.
    Why it is race-free: the file changes only by a commit, and a commit from `version` needs
    that version's claim, which one writer holds from before its verify to its commit; a writer
    that read an older version claims another name and fails its verify.
    A claim older than `stale_claim_s` was left by a writer that died (or froze) inside these
    few system calls; it is broken (renamed away) so the file is not frozen at that version.
    Residual window: a writer frozen for longer than `stale_claim_s` between its claim and its
    commit loses its bytes with the broken claim, but on waking its rename may move another
    writer's claim over a newer version: the result is a version no writer believes it owns
    (it never confirms someone else's bytes), or, if that other writer was itself between its
    verify and its commit, a commit that writer rightly confirms."""
    if is_s3(uri):
        bucket, key = _bucket_key(uri)
        put = functools.partial(_boto3().put_object, Bucket=bucket, Key=key, Body=data, IfMatch=version)
        return _s3_conditional_put(uri, data, put)
    return _local_swap(uri, version, data, stale_claim_s)


def delete_if_match(uri: str, version: str, stale_claim_s: float = 60.0) -> None:
    """Delete the object only if it is still at `version` (PreconditionFailed when it changed
    or is absent). S3: DELETE with If-Match. Local: the claim and verify of `put_if_match`, then
    the file is renamed away and checked to be the version verified (put back if not)."""
    if is_s3(uri):
        bucket, key = _bucket_key(uri)
        try:
            _s3_call(uri, "delete", lambda: _boto3().delete_object(Bucket=bucket, Key=key, IfMatch=version))
        except FileNotFoundError:
            raise PreconditionFailed(f"{uri} is absent") from None
        return
    _local_swap(uri, version, None, stale_claim_s)


@functools.lru_cache(maxsize=8)
def _boto3_client(endpoint: str | None, region: str | None, max_attempts: int):
    import boto3
    from botocore.config import Config

    # A session per client: boto3's default session is not thread-safe; the client is (the lock's
    # heartbeat thread and the driver share it). Retries as pyarrow's: throttling, 5xx, refused connections.
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        config=Config(retries={"max_attempts": max_attempts, "mode": "standard"}),
    )


def _boto3():
    return _boto3_client(*_s3_settings(), s3_max_attempts())


def _bucket_key(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


def _s3_call(uri: str, what: str, fn: Callable[[], _T]) -> _T:
    """`fn()` (a boto3 call) with S3's answers as ours: 412 -> PreconditionFailed, 404 ->
    FileNotFoundError, 409 ConditionalRequestConflict (a concurrent conditional write) retried,
    anything else StorageError (botocore's messages carry no credentials)."""
    from botocore.exceptions import BotoCoreError, ClientError

    for attempt in range(1, TRANSIENT_ATTEMPTS + 1):
        try:
            return fn()
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "PreconditionFailed" or status == 412:
                raise PreconditionFailed(f"{uri}: precondition failed ({what})") from None
            if code in ("NoSuchKey", "NotFound", "404") or status == 404:
                raise FileNotFoundError(uri) from None
            if (code == "ConditionalRequestConflict" or status == 409) and attempt < TRANSIENT_ATTEMPTS:
                transient_pause(attempt)
                continue
            raise StorageError(f"cannot {what} {uri}: {e}") from None
        except BotoCoreError as e:
            raise StorageError(f"cannot {what} {uri}: {e}") from None
    raise AssertionError("unreachable")


def _s3_conditional_put(uri: str, data: bytes, put: Callable[[], dict]) -> str:
    try:
        return _s3_call(uri, "write", put)["ETag"]
    except PreconditionFailed:
        # The SDK retries a PUT whose answer was lost; if the first attempt had landed, the retry
        # fails its own precondition. The object holding exactly our bytes means it did.
        try:
            current, etag = read_versioned(uri)
        except FileNotFoundError:
            raise PreconditionFailed(f"{uri}: precondition failed (write)") from None
        if current == data:
            return etag
        raise


def _local(uri: str) -> str:
    return os.path.abspath(uri[len("file://") :] if uri.startswith("file://") else uri)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_local(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _temp_copy(path: str, data: bytes) -> str:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
    return tmp


def _local_swap(uri: str, version: str, data: bytes | None, stale_claim_s: float) -> str:
    """`put_if_match` (data) or `delete_if_match` (None) on a local file: see `put_if_match`."""
    path = _local(uri)
    claim = f"{path}.cas-{version[:32]}"
    try:
        tmp = _temp_copy(path, data or b"")
        try:
            ino = os.stat(tmp).st_ino
            claimed = _link_claim(tmp, claim, stale_claim_s)
        finally:
            os.unlink(tmp)  # our bytes now live under the claim name only (why: put_if_match)
        if not claimed:
            raise PreconditionFailed(f"{uri}: another writer is replacing version {version[:12]}")
        try:
            current = _read_local(path)
            if current is None or _digest(current) != version:
                raise PreconditionFailed(f"{uri}: no longer at version {version[:12]}")
            if data is None:
                _remove_version(path, version)
                return ""
            with contextlib.suppress(FileNotFoundError):  # our claim was broken: the read-back decides
                os.rename(claim, path)
            if _read_local(path) != data:
                raise PreconditionFailed(f"{uri}: replaced by another writer")
            return _digest(data)
        finally:
            _drop_claim(claim, ino)
    except OSError as e:
        raise StorageError(f"cannot replace {uri}: {e}") from e


def _link_claim(tmp: str, claim: str, stale_claim_s: float) -> bool:
    """Hard-link `tmp` to `claim`; waits up to CLAIM_WAIT_S while another writer holds it and
    breaks a claim older than `stale_claim_s`. False when still held."""
    deadline = time.monotonic() + CLAIM_WAIT_S
    while True:
        try:
            os.link(tmp, claim)
            return True
        except FileExistsError:
            pass
        try:
            held = os.stat(claim)
        except FileNotFoundError:
            continue  # released meanwhile
        if time.time() - held.st_mtime > stale_claim_s:
            _break_claim(claim, held.st_ino)
        elif time.monotonic() > deadline:
            return False
        else:
            time.sleep(0.01)


def _break_claim(claim: str, ino: int) -> None:
    """Remove the stale claim with inode `ino`; a fresh claim that took its name meanwhile is put
    back (it would only have made its writer retry)."""
    trash = f"{claim}.broken-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(claim, trash)
    except FileNotFoundError:
        return
    try:
        if os.stat(trash).st_ino != ino:
            with contextlib.suppress(FileExistsError):
                os.link(trash, claim)
    finally:
        os.unlink(trash)


def _drop_claim(claim: str, ino: int) -> None:
    """Remove our claim if it is still ours (committed claims are gone already: renamed)."""
    with contextlib.suppress(FileNotFoundError):
        if os.stat(claim).st_ino == ino:
            os.unlink(claim)


def _remove_version(path: str, version: str) -> None:
    """Delete `path`, which a held claim shows at `version`: renamed away first and checked, so a
    file that another writer put there meanwhile (our claim broken while we were frozen) is put
    back rather than deleted."""
    trash = f"{path}.del-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        raise PreconditionFailed(f"{path} is absent") from None
    try:
        if _digest(_read_local(trash) or b"") != version:
            with contextlib.suppress(FileExistsError):
                os.link(trash, path)
            raise PreconditionFailed(f"{path}: replaced by another writer")
    finally:
        os.unlink(trash)
