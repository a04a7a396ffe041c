"""Load and save checkpoints (DTC, or Paint-by-Example folders): the one place weights enter the process.

    pipe = load_pipeline("s3://models/dtc/v3", device="cuda")   # bf16 on GPU, fp32 on CPU

A local folder is used in place; an `s3://` prefix is synced once per node into the cache
(`checkpoint.local_checkpoint`); a packed model (one `*.safetensors` file) is unpacked once per
node into the cache (`packed.unpacked_checkpoint`). Everything goes through the `from_pretrained`
of the class model_index.json's `_class_name` names: `DTCPipeline`, or `PBEPipeline` for a
`PaintByExamplePipeline` folder (the hub's Fantasy-Studio/Paint-by-Example, or `pbe-tiny`).
"""

from __future__ import annotations

import json

import diffusers
import torch
import transformers

from pipeline.model.checkpoint import (
    PBE_CLASS_NAME,
    CheckpointError,
    check_model_checkpoint,
    is_packed,
    local_checkpoint,
    write_digest,
)
from pipeline.model.pipeline_dtc import DTCPipeline
from pipeline.model.pipeline_pbe import PBEPipeline

__all__ = ["load_pipeline", "save_pipeline", "default_dtype", "optimize_pipeline"]

# model_index.json's `_class_name` -> the class that runs it (check_model_checkpoint admits no other)
PIPELINES = {"DTCPipeline": DTCPipeline, PBE_CLASS_NAME: PBEPipeline}


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on GPUs (the paper's speed, no fp16 VAE overflow), fp32 on CPUs (bf16 is slow there)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_pipeline(
    uri: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    scheduler: str | None = None,
    cache_dir: str | None = None,
) -> DTCPipeline | PBEPipeline:
    """A ready-to-run pipeline from a local folder or an `s3://` prefix."""
    # Loading bars are console noise in a batch job: the worker's lines reach the driver's console.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    if is_packed(uri):
        from pipeline.model.packed import unpacked_checkpoint

        folder = unpacked_checkpoint(uri, cache_dir)
    else:
        folder = local_checkpoint(uri, cache_dir)
    try:
        index = check_model_checkpoint(folder)
    except CheckpointError as e:  # name what the user gave, not the node cache's folder
        raise CheckpointError(f"{uri}: {e}") if folder != uri else e from e
    try:
        pipe = PIPELINES[index["_class_name"]].from_pretrained(folder, dtype=dtype or default_dtype(device))
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot load the checkpoint at {uri}: {e}") from e
    pipe.to(device)
    if scheduler is not None:
        pipe.use_scheduler(scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def optimize_pipeline(
    pipe: DTCPipeline | PBEPipeline, compile_model: bool = False, channels_last: bool = False
) -> DTCPipeline | PBEPipeline:
    """The GPU speed options, in place (both off by default; the outputs stay the same up to
    kernel rounding):

    - `channels_last`: NHWC weights for the convolution-heavy parts (UNet, hint encoder, VAE),
      which cuDNN's tensor-core kernels prefer; inputs are converted by the first conv.
    - `compile_model`: `torch.compile` of the UNet and the hint encoder, the two modules called
      every step (the VAE and DINOv2 run once per batch). The first batches of each new shape
      compile (minutes); keep the batch size fixed.

    A Paint-by-Example pipeline has no hint encoder: its UNet (and VAE) alone.
    """
    per_step = [name for name in ("unet", "hint_encoder") if hasattr(pipe, name)]
    if channels_last:
        for name in (*per_step, "vae"):
            getattr(pipe, name).to(memory_format=torch.channels_last)
    if compile_model:
        for name in per_step:
            setattr(pipe, name, torch.compile(getattr(pipe, name)))
    return pipe


def save_pipeline(pipe: DTCPipeline | PBEPipeline, out_dir: str) -> str:
    """save_pretrained (safetensors; a PBEPipeline writes the hub's layout) plus the digest file;
    returns the model digest."""
    diffusers.utils.logging.disable_progress_bar()  # "Writing model shards" bars: console noise
    transformers.utils.logging.disable_progress_bar()
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return write_digest(out_dir)
