"""A packed model: one safetensors file instead of a DTC folder's dozen (the committed
models/train-tiny.safetensors). `--model` takes it as it takes a folder.

    pack("models/train-tiny-run", "models/train-tiny.safetensors")   # a train-tiny folder -> one file
    unpack("models/train-tiny.safetensors", "models/train-tiny")      # and back: a DTC folder
    folder = unpacked_checkpoint("models/train-tiny.safetensors")     # unpacked once per node (cache)

The file holds every weighted component's tensors, prefixed by the component's name; its
metadata the preset the folder was built from (train-tiny), the FiLM mode, the VAE scaling
factor, the training provenance (`dtc_training.json`), and the model_index.json and model
digest of the folder it unpacks to: the driver reads those from the header without torch
(`checkpoint.packed_metadata`), so a run keyed on the packed file reuses the pairs rendered
with the unpacked folder, and the other way round. Unpacking checks the digest.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import uuid

import torch

from pipeline import storage
from pipeline.model.checkpoint import (
    CheckpointError,
    check_dtc_checkpoint,
    default_cache_dir,
    header_metadata,
    model_digest,
    packed_metadata,
    write_digest,
)
from pipeline.model.pipeline_dtc import DTCPipeline

__all__ = ["pack", "unpack", "unpacked_checkpoint", "PACKED_COMPONENTS"]

PACKED_COMPONENTS = ("vae", "unet", "hint_encoder", "hint_adapter", "image_encoder", "image_projection")
PROVENANCE_FILE = "dtc_training.json"  # train.export's (not imported: the model layer stays below train)


def _tensors(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value.contiguous()
        for name in PACKED_COMPONENTS
        for key, value in getattr(pipe, name).state_dict().items()
    }


def pack(model: str, out_file: str) -> None:
    """A train-tiny DTC folder -> one safetensors file at `out_file` (see the module docstring)."""
    from safetensors.torch import save_file

    # DTCPipeline itself, not loading.load_pipeline: loading resolves a packed --model through this module
    check_dtc_checkpoint(model)
    pipe = DTCPipeline.from_pretrained(model, dtype=torch.float32)
    provenance_path = os.path.join(model, PROVENANCE_FILE)
    provenance = open(provenance_path).read() if os.path.exists(provenance_path) else "{}"
    json.loads(provenance)  # a broken provenance file must not be packed
    trained = pipe.config.trained
    if trained is None:  # a folder written before the flag: the training export is what wrote provenance
        trained = provenance != "{}"
    metadata = {
        "preset": "train-tiny",
        "film_mode": pipe.hint_encoder.config.film_mode,
        "scaling_factor": str(pipe.vae.config.scaling_factor),
        "trained": json.dumps(trained),
        "dtc_training": provenance,
    }
    tensors = _tensors(pipe)
    with tempfile.TemporaryDirectory(prefix="dtc-pack-") as tmp:
        # the index and digest of the folder the file unpacks to: what the driver keys the run on
        draft = os.path.join(tmp, "draft.safetensors")
        save_file(tensors, draft, metadata=metadata)
        folder = _unpack_tensors(draft, os.path.join(tmp, "model"))
        with open(os.path.join(folder, "model_index.json")) as f:
            metadata["model_index"] = f.read()
        metadata["model_digest"] = model_digest(folder)
    save_file(tensors, out_file, metadata=metadata)


def _unpack_tensors(packed_file: str, out: str) -> str:
    from safetensors import safe_open

    from pipeline.model.presets import build_preset

    with safe_open(packed_file, framework="pt") as f:
        metadata = f.metadata()
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    pipe = build_preset(metadata["preset"], film_mode=metadata["film_mode"])
    for name in PACKED_COMPONENTS:
        prefix = f"{name}."
        getattr(pipe, name).load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    pipe.vae.register_to_config(scaling_factor=float(metadata["scaling_factor"]))
    provenance = metadata.get("dtc_training", "{}")
    # files packed before the flag: the training provenance says whether it was trained
    trained = json.loads(metadata["trained"]) if "trained" in metadata else provenance != "{}"
    pipe.register_to_config(trained=trained)  # the image encoder stays the preset's: random
    pipe.save_pretrained(out, safe_serialization=True)  # loading.save_pipeline's two lines (see pack)
    write_digest(out)
    if provenance != "{}":
        with open(os.path.join(out, PROVENANCE_FILE), "w") as f:
            f.write(provenance)
    return out


def unpack(packed_file: str, out: str) -> str:
    """The inverse of `pack`: a DTC folder at `out` that jobs.render loads; returns `out`. A
    file whose metadata records a model digest must unpack to exactly that model."""
    _unpack_tensors(packed_file, out)
    expected = header_metadata(packed_file).get("model_digest")
    got = model_digest(out)
    if expected is not None and got != expected:
        raise CheckpointError(f"{packed_file} unpacks to model {got[:12]}, its metadata says {expected[:12]}")
    return out


def unpacked_checkpoint(uri: str, cache_dir: str | None = None) -> str:
    """A local DTC folder holding the packed model at `uri` (local or s3://), unpacked once per
    node into the cache (keyed by its model digest), under a file lock, renamed into place."""
    digest = packed_metadata(uri)["model_digest"]
    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    final = os.path.join(cache_dir, f"packed-{digest[:24]}")
    with open(os.path.join(cache_dir, f"packed-{digest[:24]}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one unpacking process per node; the others wait, then reuse
        if os.path.exists(os.path.join(final, "model_index.json")):
            return final
        tmp = f"{final}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        try:
            source = uri
            if storage.is_s3(uri):
                source = os.path.join(tmp + "-file", os.path.basename(uri))
                os.makedirs(os.path.dirname(source))
                with open(source, "wb") as f:
                    f.write(storage.read_bytes(uri))
            unpack(source, tmp)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(tmp + "-file", ignore_errors=True)
    return final
