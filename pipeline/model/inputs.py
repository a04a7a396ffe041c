"""The batch formats both pipelines (`DTCPipeline`, `PBEPipeline`) take and give: one owner, so
the render stage and Serve hand either model the same arrays.

- `as_image_batch` / `as_mask_batch`: uint8 NHWC or float NCHW images, bool or {0, 1} masks,
  checked against the model's size, with errors that name the argument and the shape expected.
- `convert_output`: float NCHW in [0, 1] -> the `output_type` the caller asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.utils import BaseOutput
from PIL import Image

__all__ = ["OUTPUT_TYPES", "PipelineOutput", "as_image_batch", "as_mask_batch", "convert_output"]

OUTPUT_TYPES = ("pil", "np", "uint8", "pt", "latent")


@dataclass
class PipelineOutput(BaseOutput):
    """`images`: list of PIL images ("pil"), float NHWC in [0, 1] ("np"), uint8 NHWC ("uint8"),
    float NCHW in [0, 1] ("pt"), or latents ("latent")."""

    images: list | np.ndarray | torch.Tensor


def as_image_batch(value, name: str, size: int) -> torch.Tensor:
    """uint8 (B, H, W, 3) or float (B, 3, H, W) in [0, 1] -> float (B, 3, size, size) in [0, 1]."""
    tensor = torch.as_tensor(value) if not isinstance(value, torch.Tensor) else value
    if tensor.dtype == torch.uint8:
        if tensor.ndim != 4 or tensor.shape[-1] != 3:
            raise ValueError(f"{name} as uint8 must be (B, H, W, 3), got shape {tuple(tensor.shape)}")
        tensor = tensor.permute(0, 3, 1, 2).float() / 255.0
    elif tensor.ndim != 4 or tensor.shape[1] != 3:
        raise ValueError(
            f"{name} must be (B, 3, H, W) floats in [0, 1] or (B, H, W, 3) uint8, got shape {tuple(tensor.shape)}"
        )
    if tuple(tensor.shape[-2:]) != (size, size):
        raise ValueError(f"{name} must be {size}x{size} (the model's size), got {tensor.shape[-2]}x{tensor.shape[-1]}")
    return tensor


def as_mask_batch(value, name: str, size: int, batch: int) -> torch.Tensor:
    """bool or {0, 1} (B, H, W) / (B, 1, H, W) -> float (B, 1, size, size)."""
    tensor = torch.as_tensor(value) if not isinstance(value, torch.Tensor) else value
    if tensor.ndim == 3:
        tensor = tensor[:, None]
    if tensor.ndim != 4 or tensor.shape[1] != 1:
        raise ValueError(f"{name} must be (B, H, W) or (B, 1, H, W), got shape {tuple(tensor.shape)}")
    if tuple(tensor.shape[-2:]) != (size, size) or tensor.shape[0] != batch:
        raise ValueError(f"{name} must be {batch} x 1 x {size} x {size}, got {tuple(tensor.shape)}")
    if tensor.dtype != torch.bool:
        values = torch.unique(tensor)
        if not bool(((values == 0) | (values == 1)).all()):
            raise ValueError(f"{name} must be binary (0/1 or bool), got values {values[:8].tolist()}")
    return tensor.float()


def convert_output(output: torch.Tensor, output_type: str) -> list | np.ndarray | torch.Tensor:
    """float (B, 3, H, W) in [0, 1] -> "pt" as it is, "uint8" / "np" NHWC arrays, or PIL images."""
    if output_type == "pt":
        return output
    as_uint8 = (output * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "uint8":
        return as_uint8
    if output_type == "np":
        return output.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in as_uint8]
