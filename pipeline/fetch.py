"""Fetching input images under the URI allowlist (DESIGN.md "Inputs allowed"). No torch.

Allowed by default: `s3://` URIs, and local paths (plain or `file://`) that resolve, after
symlinks and `..`, inside the manifest's folder or an `--allow-root`. An `--allow-root` that is
an `s3://bucket/prefix` narrows S3 too: once one is given, only S3 URIs under such a prefix
(or under the manifest's own S3 folder) are read. `http(s)://` only with `--allow-http`; any
other scheme is refused. A refused URI is a failed row (`uri_not_allowed`), never a fetch:
no request leaves for `http://169.254.169.254/`.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from pipeline import storage
from pipeline.schema import RowError

__all__ = ["InputPolicy", "fetch"]

HTTP_TIMEOUT_S = 30
MAX_FETCH_BYTES = 256 * 2**20  # no photo or mask is this big; a larger body is refused unread


# A server has no manifest folder: this stands in for it (no local root, no S3 prefix).
SERVE_NO_FOLDER = "s3://"


@dataclass(frozen=True)
class InputPolicy:
    manifest_dir: str  # local folder or s3:// prefix of the manifest
    allow_roots: tuple[str, ...] = field(default_factory=tuple)
    allow_http: bool = False
    # how the user widens the allowlist, for the refusals' messages: the batch jobs' flags, or
    # Serve's builder arguments (`ServeArgs.input_policy`)
    roots_option: str = "--allow-root"
    http_option: str = "--allow-http"

    def local_roots(self) -> list[str]:
        roots = [r for r in (self.manifest_dir, *self.allow_roots) if "://" not in r]
        return [os.path.realpath(r) for r in roots]

    def s3_roots(self) -> list[str]:
        """The S3 prefixes inputs are limited to; empty = every bucket (the default)."""
        explicit = [r.rstrip("/") for r in self.allow_roots if storage.is_s3(r) and r[len("s3://") :].strip("/")]
        if explicit and storage.is_s3(self.manifest_dir) and self.manifest_dir[len("s3://") :].strip("/"):
            explicit.append(self.manifest_dir.rstrip("/"))
        return explicit

    def check(self, uri: str) -> str:
        """The URI to read, or RowError(uri_not_allowed)."""
        if storage.is_s3(uri):
            bucket, _, key = uri[len("s3://") :].partition("/")
            if not bucket:
                raise RowError("uri_not_allowed", f"{uri!r} names no bucket")
            roots = self.s3_roots()
            if roots:
                # S3 keys are literal, but a `..` segment must not look like it leaves a prefix.
                if any(part in (".", "..") for part in key.split("/")):
                    raise RowError("uri_not_allowed", f"{uri} has a '.' or '..' key segment")
                if not any(uri == root or uri.startswith(root + "/") for root in roots):
                    raise RowError("uri_not_allowed", f"{uri} is outside every allowed S3 prefix ({', '.join(roots)})")
            return uri
        if uri.startswith(("http://", "https://")):
            if not self.allow_http:
                raise RowError("uri_not_allowed", f"http(s) inputs are off (enable with {self.http_option}): {uri}")
            return uri
        if uri.startswith("file://"):
            uri = uri[len("file://") :]
        elif "://" in uri:
            raise RowError(
                "uri_not_allowed",
                f"scheme of {uri!r} is not allowed (s3://, local paths, http(s) with {self.http_option})",
            )
        real = os.path.realpath(uri)
        for root in self.local_roots():
            if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
                return real
        if self.manifest_dir == SERVE_NO_FOLDER:
            raise RowError("uri_not_allowed", f"{uri} is outside every {self.roots_option} folder")
        raise RowError("uri_not_allowed", f"{uri} is outside the manifest's folder and every {self.roots_option}")


def _http_get(uri: str) -> bytes:
    request = urllib.request.Request(uri, headers={"User-Agent": "dtc-render"})
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            body = response.read(MAX_FETCH_BYTES + 1)
    except urllib.error.HTTPError as e:
        code = "image_missing" if e.code == 404 else "fetch_failed"
        raise RowError(code, f"GET {uri} answered {e.code}") from e
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise RowError("fetch_failed", f"GET {uri} failed: {e}") from e
    if len(body) > MAX_FETCH_BYTES:
        raise RowError("too_large", f"{uri} is over {MAX_FETCH_BYTES} bytes")
    return body


def fetch(uri: str, policy: InputPolicy) -> bytes:
    """The bytes behind an allowed URI; RowError with image_missing / fetch_failed / uri_not_allowed."""
    target = policy.check(uri)
    if target.startswith(("http://", "https://")):
        return _http_get(target)
    try:
        return storage.read_bytes(target)
    except FileNotFoundError as e:
        raise RowError("image_missing", f"{uri} does not exist") from e
    except IsADirectoryError as e:
        raise RowError("image_unreadable", f"{uri} is a folder") from e
    except (storage.StorageError, OSError) as e:
        raise RowError("fetch_failed", f"cannot read {uri}: {e}") from e
