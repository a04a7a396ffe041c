"""Checkpoint folders: validation, the model digest, and the per-node cache for `s3://` models.

Driver-safe (no torch): the driver needs the digest to decide which pairs are already done,
and workers need a local folder to hand to `from_pretrained`.

- `check_checkpoint(folder)`: one clear `CheckpointError` naming what is missing;
  `check_model_checkpoint(uri)`: a DTC or a Paint-by-Example folder, what `--model` takes;
  `check_sd_schedule(folder, uri)`: a source folder's training schedule is SD-1.x's.
- `model_digest(uri)`: sha256 over the weight files (relative path + bytes, in path order),
  stored as `dtc_digest.json` beside the weights by `write_digest`, so a driver reads one small
  object instead of hashing gigabytes. A digest file whose file list or sizes no longer match
  the folder is ignored and the digest recomputed.
- `local_checkpoint(uri)`: local folders as they are; `s3://` prefixes synced once per node into
  a cache, under an exclusive file lock, into a temp folder renamed into place, so two
  processes loading at once never see (or leave) half a model.
- A packed model (one `*.safetensors` file, `model.packed`: the committed train-tiny weights)
  is read here from its header alone: its metadata carries the model_index.json and the model
  digest of the folder it unpacks to, so the driver checks and keys it as that folder.
- `weights_warning(index)`: what an untrained model (or a random image encoder) makes
  meaningless, from the flags model_index.json records (`DTCPipeline`'s `trained`,
  `image_encoder_trained`); the console and the QA page print it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import uuid

from pipeline import storage
from pipeline.model.schedule import SD_SCHEDULE

__all__ = [
    "CheckpointError",
    "check_checkpoint",
    "check_dtc_checkpoint",
    "check_model_checkpoint",
    "check_sd_schedule",
    "model_digest",
    "write_digest",
    "local_checkpoint",
    "DIGEST_FILE",
    "DTC_COMPONENTS",
    "is_packed",
    "packed_metadata",
    "header_metadata",
    "weights_warning",
    "UNTRAINED_WARNING",
    "RANDOM_IMAGE_ENCODER_WARNING",
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
# A Paint-by-Example folder (the hub's Fantasy-Studio/Paint-by-Example): what our path runs of it;
# its safety_checker and feature_extractor, when listed, are checked like any component but unused.
PBE_CLASS_NAME = "PaintByExamplePipeline"
PBE_COMPONENTS = ("vae", "unet", "image_encoder", "scheduler")
PACKED_SUFFIX = ".safetensors"
UNTRAINED_WARNING = "untrained model: pixels and identity scores are meaningless"
RANDOM_IMAGE_ENCODER_WARNING = "random image encoder: identity scores are meaningless"


class CheckpointError(ValueError):
    """The checkpoint is missing or malformed; the message names the file at fault."""


def _listing(uri: str) -> list[tuple[str, int, int]]:
    try:
        return storage.list_files(uri)
    except storage.StorageError as e:
        raise CheckpointError(f"cannot list checkpoint {uri}: {e}") from e


def check_checkpoint(uri: str, required: tuple[str, ...] = (), class_name: str | None = None) -> dict:
    """Validate a diffusers pipeline folder (local or s3); returns its parsed model_index.json.

    Every component named in model_index.json must have its folder with a config, and model
    components must have a weights file. `required` names components that must be listed;
    `class_name` the pipeline class it must hold, checked first (a folder of another kind is
    named as such, not by the first component it lacks).
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
    if class_name is not None and index.get("_class_name") != class_name:
        raise CheckpointError(_class_problem(uri, index.get("_class_name"), class_name))
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


def is_packed(uri: str) -> bool:
    """A packed model: one safetensors file holding every component (`model.packed.pack`)."""
    return uri.endswith(PACKED_SUFFIX)


def packed_metadata(uri: str) -> dict[str, str]:
    """The metadata of a packed model's safetensors header, which must name its model index
    and digest (what the driver keys a run on)."""
    metadata = header_metadata(uri)
    missing = [key for key in ("model_index", "model_digest") if key not in metadata]
    if missing:
        raise CheckpointError(
            f"{uri} is not a packed DTC model of this version (its metadata has no {', '.join(missing)}): "
            "unpack it (`pipeline.model.packed.unpack`) and pack it again (`python -m jobs.demo --pack-weights DIR`)"
        )
    return metadata


def header_metadata(uri: str) -> dict[str, str]:
    """The metadata of a safetensors header (8-byte length, then JSON), read without torch: a
    local file reads only its header."""
    try:
        if storage.is_s3(uri):
            data = storage.read_bytes(uri)
        else:
            with open(uri[len("file://") :] if uri.startswith("file://") else uri, "rb") as f:
                data = f.read(8)
                data += f.read(int.from_bytes(data, "little")) if len(data) == 8 else b""
        length = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + length])
    except (OSError, storage.StorageError) as e:
        raise CheckpointError(f"cannot read the packed model {uri}: {e}") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{uri} is not a safetensors file: {e}") from e
    return header.get("__metadata__") or {}


def weights_warning(index: dict) -> str | None:
    """What this model's weights make meaningless (model_index.json's flags), or None: an
    untrained DTC renders noise-like pixels; a random image encoder scores identity on random
    features. A folder written before the flags existed records neither: no warning (unknown)."""
    if index.get("trained") is False:
        return UNTRAINED_WARNING
    if index.get("image_encoder_trained") is False:
        return RANDOM_IMAGE_ENCODER_WARNING
    return None


def check_dtc_checkpoint(uri: str) -> dict:
    """`check_checkpoint` for a DTC folder (or a packed model's header): its model_index.json,
    or CheckpointError naming the problem (a missing component, another pipeline class)."""
    if is_packed(uri):
        index = json.loads(packed_metadata(uri)["model_index"])
        if index.get("_class_name") != "DTCPipeline":
            raise CheckpointError(_class_problem(uri, index.get("_class_name"), "DTCPipeline"))
        return index
    return check_checkpoint(uri, required=DTC_COMPONENTS, class_name="DTCPipeline")


def _class_problem(uri: str, found, expected: str) -> str:
    if found == PBE_CLASS_NAME and expected == "DTCPipeline":  # e.g. PBE's folder as jobs.train's --init-model
        return (
            f"{uri} is a Paint-by-Example folder, not a DTCPipeline; a DTC warm-started from it: "
            "`python -m jobs.make_model --from-parts --pbe DIR --dinov2 DIR --out OUT`"
        )
    return f"{uri} holds a {found!r}, not a {expected}; build one with `python -m jobs.make_model --from-parts ...`"


def check_model_checkpoint(uri: str) -> dict:
    """What the render job, backfills and Serve accept as `--model`: a DTC (`check_dtc_checkpoint`)
    or a Paint-by-Example folder, told apart by model_index.json's `_class_name`. Returns the
    model_index.json; a PBE folder's, which records no sizes, gets the `resolution`,
    `product_size` and `input_layout` its components give (what `PBEPipeline` derives), so the
    driver reads one index for either model. CheckpointError names anything else."""
    if is_packed(uri):
        return check_dtc_checkpoint(uri)
    index = check_checkpoint(uri)
    name = index.get("_class_name")
    if name == "DTCPipeline":
        return check_dtc_checkpoint(uri)
    if name != PBE_CLASS_NAME:
        raise CheckpointError(
            f"{uri} holds a {name!r}, not a DTCPipeline or a {PBE_CLASS_NAME}; "
            "build a DTC with `python -m jobs.make_model --from-parts ...`"
        )
    check_checkpoint(uri, required=PBE_COMPONENTS)
    check_sd_schedule(uri, uri)
    unet, vae, encoder = (_component_config(uri, name) for name in ("unet", "vae", "image_encoder"))
    if unet.get("in_channels") != 9:
        raise CheckpointError(f"{uri}/unet has in_channels={unet.get('in_channels')}; Paint-by-Example's UNet takes 9")
    try:
        resolution = int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
        product_size = int(encoder["image_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{uri}: unet, vae or image_encoder config.json lacks a size field ({e})") from e
    return {**index, "resolution": resolution, "product_size": product_size, "input_layout": "pbe"}


def _component_config(uri: str, name: str) -> dict:
    try:
        return json.loads(storage.read_bytes(storage.join(uri, name, "config.json")))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{uri}/{name}/config.json is not valid JSON: {e}") from e


def check_sd_schedule(folder: str, uri: str) -> None:
    """The source folder's scheduler config may be any class (SD and PBE ship PNDM) and may lack
    sampling settings (`clip_sample`, ...): those are replaced by `schedule.sd_scheduler()`. Its
    *training* schedule is what the UNet learnt to denoise, so where the config states one it must
    be SD's. `folder`: local or s3://; `uri`: the folder as the user named it, for the message."""
    try:
        config = json.loads(storage.read_bytes(storage.join(folder, "scheduler", "scheduler_config.json")))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{uri}/scheduler/scheduler_config.json is not valid JSON: {e}") from e
    if config.get("trained_betas") is not None:
        raise CheckpointError(f"{uri}/scheduler sets trained_betas; SD-1.x's betas are scaled_linear, 0.00085..0.012")
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type"):
        value, expected = config.get(key, SD_SCHEDULE[key]), SD_SCHEDULE[key]
        if isinstance(expected, float):
            same = isinstance(value, (int, float)) and math.isclose(value, expected)
        else:
            same = value == expected
        if not same:
            raise CheckpointError(f"{uri}/scheduler has {key}={value!r}; the SD-1.x schedule has {expected!r}")


def model_digest(uri: str) -> str:
    """sha256 over the checkpoint's weight files; read from `dtc_digest.json` when it still
    describes the folder, else computed (an `s3://` model is synced into the node cache first).
    A packed model's is the folder's it unpacks to (its metadata; checked when it is unpacked)."""
    if is_packed(uri):
        return packed_metadata(uri)["model_digest"]
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
