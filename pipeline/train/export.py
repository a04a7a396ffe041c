"""A trained checkpoint -> `model/`: a DTC folder that `jobs.render --model` and Serve load as it is.

    digest = export_model("s3://models/dtc/untrained", weights_folder, "s3://models/dtc/train-v1/model", provenance)

The init model supplies the frozen parts (VAE, DINOv2, scheduler) and the configs; the
checkpoint's `trainable.safetensors` replaces the UNet, hint encoder, hint adapter and image
projection weights (strict: every key, nothing else). The folder is written by
`loading.save_pipeline` (safetensors + `dtc_digest.json`, its own model digest) plus
`dtc_training.json` (which run, which step, which losses: not a weight file, so not in the
digest). It runs in a Ray task, so the driver never imports torch.

Publishing (`publish_folder`): a local folder is copied beside its target and renamed into
place; on S3 the old objects are deleted first and `model_index.json` and `dtc_digest.json` go
last, so a reader that lists the prefix mid-export finds no `model_index.json` and refuses it
(`check_dtc_checkpoint`) instead of loading half a model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid

from pipeline import storage

__all__ = ["publish_folder", "export_model", "PROVENANCE_FILE"]

PROVENANCE_FILE = "dtc_training.json"


def publish_folder(local_dir: str, uri: str, last: tuple[str, ...] = ()) -> None:
    """Make `uri` (local folder or s3:// prefix) hold exactly the files of `local_dir`."""
    files = sorted(rel for rel, _, _ in storage.list_files(local_dir))
    if not storage.is_s3(uri):
        target = os.path.abspath(uri)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        staging = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        shutil.copytree(local_dir, staging)
        if os.path.exists(target):
            shutil.rmtree(target)
        os.rename(staging, target)
        return
    for rel, _, _ in storage.list_files(uri):
        storage.delete(storage.join(uri, rel))
    ordered = [f for f in files if f not in last] + [f for f in last if f in files]
    for rel in ordered:
        with open(os.path.join(local_dir, rel), "rb") as f:
            storage.write_bytes(storage.join(uri, rel), f.read())


def _local_copy(source) -> tuple[str, str | None]:
    """(local folder, temp folder to remove) for a Ray Checkpoint or a folder URI."""
    if isinstance(source, str):
        if not storage.is_s3(source):
            return source, None
        tmp = tempfile.mkdtemp(prefix="dtc-export-weights-")
        storage.sync_to_local(source, tmp)
        return tmp, tmp
    tmp = tempfile.mkdtemp(prefix="dtc-export-weights-")
    source.to_directory(tmp)
    return tmp, tmp


def export_model(init_model: str, source, out_uri: str, provenance: dict) -> str:
    """Init model + checkpoint weights -> a DTC folder at `out_uri`; returns its model digest.

    `source`: a `ray.train.Checkpoint` or a folder URI (local or s3://) holding `trainable.safetensors`."""
    import torch

    from pipeline.model.loading import load_pipeline, save_pipeline
    from pipeline.train.step import load_trainable

    weights_dir, weights_tmp = _local_copy(source)
    out_tmp = tempfile.mkdtemp(prefix="dtc-export-")
    try:
        pipe = load_pipeline(init_model, device="cpu", dtype=torch.float32)
        load_trainable(pipe, weights_dir)
        pipe.register_to_config(trained=True)  # the model folder says it was trained (weights_warning)
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.eval()
        digest = save_pipeline(pipe, out_tmp)
        with open(os.path.join(out_tmp, PROVENANCE_FILE), "w") as f:
            json.dump({**provenance, "model_digest": digest}, f, indent=1, default=str)
        publish_folder(out_tmp, out_uri, last=("model_index.json", "dtc_digest.json"))
    finally:
        shutil.rmtree(out_tmp, ignore_errors=True)
        if weights_tmp:
            shutil.rmtree(weights_tmp, ignore_errors=True)
    return digest
