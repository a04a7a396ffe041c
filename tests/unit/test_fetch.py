"""The input allowlist (DESIGN.md "Inputs allowed") and the storage layer's transient-error
retry, on their own: no Ray, no network."""

from __future__ import annotations

import os

import pytest

from pipeline import storage
from pipeline.fetch import InputPolicy, fetch
from pipeline.schema import RowError


def _refused(policy: InputPolicy, uri: str) -> str:
    with pytest.raises(RowError) as info:
        policy.check(uri)
    assert info.value.code == "uri_not_allowed"
    return info.value.message


def test_defaults_allow_s3_and_the_manifest_folder_only(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    policy = InputPolicy(str(tmp_path))
    assert policy.check("s3://any-bucket/any/key.jpg") == "s3://any-bucket/any/key.jpg"
    assert policy.check(str(tmp_path / "a.jpg")) == os.path.realpath(tmp_path / "a.jpg")
    assert policy.check(f"file://{tmp_path}/a.jpg") == os.path.realpath(tmp_path / "a.jpg")
    assert "outside the manifest's folder" in _refused(policy, "/etc/hostname")
    assert "outside the manifest's folder" in _refused(policy, f"{tmp_path}/../elsewhere.jpg")
    assert "--allow-http" in _refused(policy, "http://169.254.169.254/latest/meta-data/")
    assert "scheme" in _refused(policy, "ftp://host/a.jpg")
    assert "no bucket" in _refused(policy, "s3:///key.jpg")
    assert (
        InputPolicy(str(tmp_path), allow_http=True).check("https://cdn.example/p.png") == "https://cdn.example/p.png"
    )
    assert InputPolicy(str(tmp_path), allow_roots=("/etc",)).check("/etc/hostname") == "/etc/hostname"


def test_an_s3_allow_root_narrows_s3_to_its_prefixes(tmp_path):
    policy = InputPolicy("s3://catalog/2026/manifests", allow_roots=("s3://photos/approved/", str(tmp_path)))
    assert policy.s3_roots() == ["s3://photos/approved", "s3://catalog/2026/manifests"]
    assert policy.check("s3://photos/approved/a.jpg") == "s3://photos/approved/a.jpg"
    assert policy.check("s3://catalog/2026/manifests/img/a.jpg") == "s3://catalog/2026/manifests/img/a.jpg"
    assert "outside every allowed S3 prefix" in _refused(policy, "s3://photos/approved-not/a.jpg")
    assert "outside every allowed S3 prefix" in _refused(policy, "s3://private/keys.jpg")
    assert "'..'" in _refused(policy, "s3://photos/approved/../private/a.jpg")
    # a local manifest: only the named prefixes; a bare "s3://" root (the Serve app's) narrows nothing
    assert InputPolicy(str(tmp_path), allow_roots=("s3://photos/approved",)).s3_roots() == ["s3://photos/approved"]
    assert InputPolicy("s3://", allow_roots=()).check("s3://b/k") == "s3://b/k"
    serve = InputPolicy("s3://", allow_roots=("s3://b/ok", str(tmp_path)))  # how the Serve app builds it
    assert serve.check("s3://b/ok/k") == "s3://b/ok/k" and serve.local_roots() == [os.path.realpath(tmp_path)]
    assert "outside every allowed S3 prefix" in _refused(serve, "s3://b/other/k")


def test_a_refused_uri_is_never_fetched(tmp_path):
    with pytest.raises(RowError) as info:
        fetch("http://169.254.169.254/latest/meta-data/", InputPolicy(str(tmp_path)))
    assert info.value.code == "uri_not_allowed"
    with pytest.raises(RowError) as info:
        fetch(str(tmp_path / "missing.jpg"), InputPolicy(str(tmp_path)))
    assert info.value.code == "image_missing"


def test_transient_s3_errors_are_retried_and_others_are_not(monkeypatch):
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError(
                "AWS Error INTERNAL_FAILURE during GetObject operation: "
                "Failed to flush response stream (eof: 0, bad: 1)"
            )
        return "bytes"

    assert storage.retry_transient(flaky) == "bytes" and len(calls) == 3

    calls.clear()

    def denied():
        calls.append(1)
        raise OSError("AWS Error ACCESS_DENIED during GetObject operation: Access Denied")

    with pytest.raises(OSError, match="ACCESS_DENIED"):
        storage.retry_transient(denied)
    assert len(calls) == 1

    calls.clear()

    def always_slow():
        calls.append(1)
        raise OSError("AWS Error SLOW_DOWN (HTTP status 503) during HeadObject operation: SlowDown")

    with pytest.raises(OSError, match="SlowDown"):
        storage.retry_transient(always_slow, attempts=4)
    assert len(calls) == 4
    assert not storage.is_transient(ValueError("SlowDown"))  # only storage errors


def test_s3_attempts_setting(monkeypatch):
    monkeypatch.setenv("DTC_S3_MAX_ATTEMPTS", "3")
    assert storage.s3_max_attempts() == 3
    for bad in ("zero", "0"):
        monkeypatch.setenv("DTC_S3_MAX_ATTEMPTS", bad)
        with pytest.raises(storage.StorageError, match="DTC_S3_MAX_ATTEMPTS"):
            storage.s3_max_attempts()
