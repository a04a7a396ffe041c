"""`Renderer`: the model (DTC or Paint-by-Example) loaded once, rendering batches of model-size
uint8 arrays. No Ray, no columns.

    renderer = Renderer.from_pretrained("s3://models/dtc/v3", scheduler="ddim")
    images = renderer.render(context, hole, product, product_alpha, seeds, steps=40, guidance_scale=5.0,
                             hint=hint, hint_mask=hint_mask)

The one object that runs the model, for the Ray Data GPU stage (`stages.render_stage`) and
for Serve alike: a batch of B pairs is one pipeline call (one UNet call of 2B per step with
CFG), each pair with its own generator, so a pair's pixels do not depend on its batch-mates
beyond 1 uint8 level. Steps and guidance are call arguments: nothing is set on it between
calls. `identity` (`model.identity.IdentityScorer`) scores renders against their products with
the model's own image encoder (DINOv2 for DTC, the CLIP vision tower for Paint-by-Example: each
pipeline names its `identity_encoder` and normalisation). `is_out_of_memory` / `free_memory` /
`is_device_fault` let callers handle GPU errors without touching torch themselves.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from pipeline.model.identity import IdentityScorer
from pipeline.model.loading import load_pipeline, optimize_pipeline
from pipeline.model.pipeline_dtc import DTCPipeline
from pipeline.model.pipeline_pbe import PBEPipeline

__all__ = ["Renderer"]

log = logging.getLogger(__name__)


class Renderer:
    def __init__(self, pipe: DTCPipeline | PBEPipeline, device: str):
        self.pipe = pipe
        self.device = device
        self.model_calls = 0  # pipeline calls made (Serve's /v1/stats, tests)
        self.identity = IdentityScorer(
            pipe.identity_encoder, pipe.config.product_size, device, mean=pipe.image_mean, std=pipe.image_std
        )

    @classmethod
    def from_pretrained(
        cls,
        model_uri: str,
        *,
        device: str | None = None,
        scheduler: str = "ddim",
        torch_threads: int | None = None,
        compile_model: bool = False,
        channels_last: bool = False,
    ) -> Renderer:
        """Load the checkpoint (local folder or s3:// prefix) on `device` (default: cuda when
        there is one). `torch_threads`: Ray gives a fractional-CPU actor OMP_NUM_THREADS=1.
        `compile_model` / `channels_last`: the GPU speed options of `loading.optimize_pipeline`."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if torch_threads:
            torch.set_num_threads(torch_threads)
        pipe = load_pipeline(model_uri, device=device, scheduler=scheduler)
        if compile_model or channels_last:
            optimize_pipeline(pipe, compile_model=compile_model, channels_last=channels_last)
        log.info("renderer ready on %s (pid %d, %d torch threads)", device, os.getpid(), torch.get_num_threads())
        return cls(pipe, device)

    @property
    def resolution(self) -> int:
        """The working resolution R: context and hole inputs are R x R."""
        return self.pipe.config.resolution

    @property
    def product_size(self) -> int:
        """The image encoder's input size S: product inputs are S x S."""
        return self.pipe.config.product_size

    def render(
        self,
        context: np.ndarray,
        hole: np.ndarray,
        product: np.ndarray,
        product_alpha: np.ndarray,
        seeds: np.ndarray,
        *,
        steps: int,
        guidance_scale: float,
        hint: np.ndarray | None = None,
        hint_mask: np.ndarray | None = None,
    ) -> np.ndarray:
        """uint8 (B,R,R,3) windows, bool (B,R,R) holes, uint8 (B,S,S,3) products and bool
        (B,S,S) product alphas, int64 (B,) seeds -> uint8 (B,R,R,3) renders.

        `hint` (uint8 B,R,R,3) and `hint_mask` (bool B,R,R), together: the hint at working
        resolution from `compose.preprocess`. Without them the pipeline builds the hint from the
        S x S product (`DTCPipeline.build_hint`), with less detail."""
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.model_calls += 1
        return self.pipe(
            image=torch.from_numpy(np.ascontiguousarray(context)),
            mask_image=torch.from_numpy(np.ascontiguousarray(hole)).bool(),
            product_image=torch.from_numpy(np.ascontiguousarray(product)),
            product_alpha=torch.from_numpy(np.ascontiguousarray(product_alpha)).bool(),
            hint_image=None if hint is None else torch.from_numpy(np.ascontiguousarray(hint)),
            hint_mask=None if hint_mask is None else torch.from_numpy(np.ascontiguousarray(hint_mask)).bool(),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type="uint8",
        ).images

    @staticmethod
    def is_out_of_memory(error: BaseException) -> bool:
        return isinstance(error, torch.OutOfMemoryError)

    def free_memory(self) -> None:
        """After an out-of-memory error: hand the cached blocks back before a smaller try."""
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def is_device_fault(self, error: BaseException) -> bool:
        """A device-side fault poisons the CUDA context: every later call would fail too."""
        return self.device.startswith("cuda") and "CUDA error" in str(error)
