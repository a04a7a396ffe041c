"""Region CLIP score: does the rendered region still look like the product? (METRICS.md)

    scorer = ClipScorer("/models/clip-vit-base-patch32", device="cuda")
    scores = scorer.score(outputs, regions_bbox, products)   # float64 [N], ~82-90 for DTC

score = 100 * cosine(CLIP image embedding of the output cropped to the region's bounding box
and padded to a square, CLIP image embedding of the product padded to a square), as in the
Paint-by-Example / DTC evaluations. Raw cosine, not clipped at 0.

Preprocessing is done in torch because transformers 5.x `CLIPImageProcessor` is
torchvision-backed (unusable here). It reproduces the PIL-backed processor (and OpenAI's
original PIL pipeline) to within 1 uint8 level: pad to a centred square with neutral grey (the
grey products are composited on), PIL-style two-pass bicubic resize to 224, CLIP mean/std.
`tests/unit/test_clip_score.py` checks it against `CLIPImageProcessorPil` and the score against a
computation done directly with transformers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPModel
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from pipeline.compose import NEUTRAL_GREY

__all__ = ["ClipScorer", "region_crop", "pad_to_square", "clip_pixel_values"]


def region_crop(image: np.ndarray, bbox: Sequence[float]) -> np.ndarray:
    """`image[y0:y1, x0:x1]` for bbox (x0, y0, x1, y1) in pixels; fractional edges grow the box
    outwards to whole pixels, and a box overhanging the image is clipped to it."""
    height, width = image.shape[:2]
    x0, y0 = max(math.floor(bbox[0]), 0), max(math.floor(bbox[1]), 0)
    x1, y1 = min(math.ceil(bbox[2]), width), min(math.ceil(bbox[3]), height)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"bbox {tuple(bbox)} covers no pixel of a {width} x {height} image")
    return image[y0:y1, x0:x1]


def pad_to_square(image: np.ndarray, fill: int = NEUTRAL_GREY) -> np.ndarray:
    """Centre an H x W x 3 uint8 image on a square of `fill` (odd margins: the extra row or
    column goes bottom/right, as `pipeline.images` pads products)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 uint8 image, got {image.shape} {image.dtype}")
    height, width = image.shape[:2]
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    square = np.full((side, side, 3), fill, dtype=np.uint8)
    square[top : top + height, left : left + width] = image
    return square


def clip_pixel_values(squares: Sequence[np.ndarray], size: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """Square H x H x 3 uint8 images -> N x 3 x size x size CLIP input (float32)."""
    mean = torch.tensor(OPENAI_CLIP_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    resized = []
    for square in squares:
        pixels = torch.from_numpy(np.ascontiguousarray(square)).to(device).permute(2, 0, 1)[None].float()
        side = pixels.shape[-1]
        # PIL resizes in two passes, horizontal then vertical, each rounded and clipped to
        # uint8; antialias=True selects PIL's bicubic kernel (a = -0.5, support widened when
        # shrinking). Following both keeps every pixel within 1 level of PIL, where one
        # float pass differs by ~20 levels on sharp edges (the overshoot PIL clips between passes).
        for out_size in ((side, size), (size, size)):
            pixels = F.interpolate(pixels, size=out_size, mode="bicubic", align_corners=False, antialias=True)
            pixels = pixels.round().clamp(0, 255)
        resized.append(pixels)
    return (torch.cat(resized) / 255.0 - mean) / std


class ClipScorer:
    """CLIP image model loaded once (e.g. per GPU actor); scores a batch of (output, region,
    product) triples with one forward of 2B images per `batch_size` pairs."""

    def __init__(self, model_dir: str, device: str | torch.device = "cpu", batch_size: int = 64) -> None:
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"CLIP model folder {model_dir!r} does not exist (a local folder is required)")
        self.device = torch.device(device)
        self.batch_size = batch_size  # pairs per forward: 2 * batch_size images at 224
        self.model = CLIPModel.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
        self.model.to(self.device).eval().requires_grad_(False)
        self.image_size = self.model.config.vision_config.image_size  # 224 for ViT-B/32

    @torch.no_grad()
    def embed(self, squares: Sequence[np.ndarray]) -> torch.Tensor:
        """Unit-norm image embeddings [N, D] (float32, on the device) of square uint8 images."""
        pixel_values = clip_pixel_values(squares, self.image_size, self.device)
        # transformers 5: an output object whose pooler_output is the projected embedding.
        embeddings = self.model.get_image_features(pixel_values=pixel_values).pooler_output
        return F.normalize(embeddings.float(), dim=-1)

    def score(
        self, outputs: Sequence[np.ndarray], regions_bbox: Sequence[Sequence[float]], products: Sequence[np.ndarray]
    ) -> np.ndarray:
        """100 * cosine per pair, float64 [N]. outputs/products: H x W x 3 uint8 (products
        already composited on grey if they had alpha); regions_bbox: (x0, y0, x1, y1) in the
        output's pixels."""
        if not len(outputs) == len(regions_bbox) == len(products):
            raise ValueError(f"got {len(outputs)} outputs, {len(regions_bbox)} boxes and {len(products)} products")
        scores = np.empty(len(outputs), dtype=np.float64)
        for start in range(0, len(outputs), self.batch_size):
            stop = start + self.batch_size
            regions = [pad_to_square(region_crop(o, b)) for o, b in zip(outputs[start:stop], regions_bbox[start:stop])]
            goods = [pad_to_square(p) for p in products[start:stop]]
            embeddings = self.embed(regions + goods)
            count = len(regions)
            cosine = (embeddings[:count] * embeddings[count:]).sum(dim=-1)
            scores[start : start + count] = 100.0 * cosine.double().cpu().numpy()
        return scores
