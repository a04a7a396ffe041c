"""Checkpoint folders: validation, the model digest, and the per-node cache for `s3://` models.

Driver-safe (no torch): the driver needs the digest to decide which pairs are already done,
and workers need a local folder to hand to `from_pretrained`.

- `check_checkpoint(folder)`: one clear `CheckpointError` naming what is missing.
- `model_digest(uri)`: sha256 over the weight files (relative path + bytes, in path order),
  stored as `dtc_digest.json` beside the weights by `write_digest`, so a driver reads one small
  object instead of hashing gigabytes. A digest file whose file list or sizes no longer match
  the folder is ignored and the digest recomputed.
- `local_checkpoint(uri)`: local folders as they are; `s3://` prefixes synced once per node into
  a cache, under an exclusive file lock, into a temp folder renamed into place, so two
  processes loading at once never see (or leave) half a model.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import uuid

from pipeline import storage

__all__ = [
    "CheckpointError",
    "check_checkpoint",
    "check_dtc_checkpoint",
    "model_digest",
    "write_digest",
    "local_checkpoint",
    "DIGEST_FILE",
    "DTC_COMPONENTS",
]

DIGEST_FILE = "dtc_digest.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
# Components without weights (their folder holds only a config).
CONFIG_ONLY = {
    "scheduler": "scheduler_config.json",
    "tokenizer": "tokenizer_config.json",
    "feature_extractor": "preprocessor_config.json",
}
SYNC_MARKER = ".dtc_sync.json"
# What a DTC folder holds (model_index.json names them); the render job refuses one without them.
DTC_COMPONENTS = ("vae", "unet", "hint_encoder", "hint_adapter", "image_encoder", "image_projection", "scheduler")


class CheckpointError(ValueError):
    """The checkpoint is missing or malformed; the message names the file at fault."""


def _listing(uri: str) -> list[tuple[str, int, int]]:
    try:
        return storage.list_files(uri)
    except storage.StorageError as e:
        raise CheckpointError(f"cannot list checkpoint {uri}: {e}") from e


def check_checkpoint(uri: str, required: tuple[str, ...] = ()) -> dict:
    """Validate a diffusers pipeline folder (local or s3); returns its parsed model_index.json.

    Every component named in model_index.json must have its folder with a config, and model
    components must have a weights file. `required` names components that must be listed.
    """
    files = {rel for rel, _size, _mtime in _listing(uri)}
    if not files:
        raise CheckpointError(f"no checkpoint at {uri}: the folder is empty or does not exist")
    if "model_index.json" not in files:
        raise CheckpointError(f"{uri} is not a diffusers checkpoint: model_index.json is missing")
    try:
        index = json.loads(storage.read_bytes(storage.join(uri, "model_index.json")))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{uri}/model_index.json is not valid JSON: {e}") from e
    components = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0]}
    for name in required:
        if name not in components:
            raise CheckpointError(f"{uri}/model_index.json lists no '{name}' component")
    for name in components:
        config = CONFIG_ONLY.get(name, "config.json")
        if name == "tokenizer":
            if not any(f.startswith(f"{name}/") for f in files):
                raise CheckpointError(f"{uri}: the '{name}' folder is missing")
            continue
        if f"{name}/{config}" not in files:
            raise CheckpointError(f"{uri}: {name}/{config} is missing")
        if name not in CONFIG_ONLY and not any(
            f.startswith(f"{name}/") and f.endswith(WEIGHT_SUFFIXES) for f in files
        ):
            raise CheckpointError(f"{uri}: {name}/ has no weights file (*.safetensors or *.bin)")
    return index


def _weight_files(listing: list[tuple[str, int, int]]) -> list[tuple[str, int]]:
    return [(rel, size) for rel, size, _ in listing if rel.endswith(WEIGHT_SUFFIXES)]


def _hash_weights(folder: str, weights: list[tuple[str, int]]) -> str:
    digest = hashlib.sha256()
    for rel, _size in weights:
        digest.update(rel.encode() + b"\0")
        with open(os.path.join(folder, rel), "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def write_digest(folder: str) -> str:
    """Hash a local checkpoint's weights and store the digest beside them; returns it."""
    weights = _weight_files(storage.list_files(folder))
    digest = _hash_weights(folder, weights)
    record = {"algorithm": "sha256", "digest": digest, "files": [[rel, size] for rel, size in weights]}
    storage.write_bytes(os.path.join(folder, DIGEST_FILE), json.dumps(record, indent=1).encode())
    return digest


def check_dtc_checkpoint(uri: str) -> dict:
    """`check_checkpoint` for a DTC folder: its model_index.json, or CheckpointError naming
    the problem (a missing component, another pipeline class)."""
    index = check_checkpoint(uri, required=DTC_COMPONENTS)
    if index.get("_class_name") != "DTCPipeline":
        raise CheckpointError(
            f"{uri} holds a {index.get('_class_name')!r}, not a DTCPipeline; "
            "build one with `python -m jobs.make_model --from-parts ...`"
        )
    return index


def model_digest(uri: str) -> str:
    """sha256 over the checkpoint's weight files; read from `dtc_digest.json` when it still
    describes the folder, else computed (an `s3://` model is synced into the node cache first)."""
    listing = _listing(uri)
    weights = _weight_files(listing)
    if not weights:
        raise CheckpointError(f"{uri} holds no weight files")
    if any(rel == DIGEST_FILE for rel, _, _ in listing):
        try:
            record = json.loads(storage.read_bytes(storage.join(uri, DIGEST_FILE)))
            if [tuple(x) for x in record["files"]] == weights:
                return record["digest"]
        except (ValueError, KeyError, TypeError):
            pass  # unreadable digest file: recompute below
    return _hash_weights(local_checkpoint(uri), weights)


def default_cache_dir() -> str:
    return os.environ.get("DTC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "dtc-render", "models")


def local_checkpoint(uri: str, cache_dir: str | None = None) -> str:
    """A local folder holding the checkpoint at `uri` (synced from S3 once per node)."""
    if not storage.is_s3(uri):
        path = uri[len("file://") :] if uri.startswith("file://") else uri
        if not os.path.isdir(path):
            raise CheckpointError(f"no checkpoint folder at {uri}")
        return os.path.abspath(path)
    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    key = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:24]
    final = os.path.join(cache_dir, key)
    listing = _listing(uri)
    if not listing:
        raise CheckpointError(f"no checkpoint at {uri}: nothing under that prefix")
    # The listing (names, sizes, modification times) says whether the cached copy is current.
    fingerprint = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    with open(os.path.join(cache_dir, f"{key}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one syncing process per node; the others wait, then reuse
        marker = os.path.join(final, SYNC_MARKER)
        if os.path.exists(marker):
            with open(marker) as f:
                if json.load(f).get("fingerprint") == fingerprint:
                    return final
        tmp = os.path.join(cache_dir, f"{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        try:
            storage.sync_to_local(uri, tmp)
            with open(os.path.join(tmp, SYNC_MARKER), "w") as f:
                json.dump({"uri": uri, "fingerprint": fingerprint}, f)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
