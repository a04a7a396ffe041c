"""`identity_score`: did the product survive the render? The model's own image encoder, no extra weights.

    scorer = IdentityScorer(pipe.identity_encoder, pipe.config.product_size, "cuda", pipe.image_mean, pipe.image_std)
    scores = scorer.score(rendered, holes, products)   # float64 (B,), 100 * cosine
    chosen, scores = best_variants(scorer, rendered, holes, products, n)   # best of N per pair

The rendered window is cropped to its region's bounding box and padded square on grey, exactly
as the CLIP region score crops it (`metrics.clip_score.region_crop` / `pad_to_square`); the
product is the image encoder's own input (the product on grey at S x S). Both go through the
model's image encoder in one forward; each image's embedding is the mean of its output tokens:
for DTC, DINOv2's, the tokens it conditions on (before the projection); for Paint-by-Example,
its CLIP vision tower's (PBE conditions on that tower's pooled token, through its mapper).
The score is 100 * their cosine: 100 for the product itself, lower the more the region
departs from it. It is a relative measure, as any embedding cosine: compare rows of one model,
and calibrate a review threshold (`--min-identity-score`) on renders someone has looked at.

`best_variants` is the best-of-N rule, the one copy the render stage (`--variants`) and Serve
(the `variants` request option) both call: a pair's N renders scored, the highest kept, the
first of equals (`choose_best`, also the rule under `--select clip`).

Why mean tokens and not the CLS token: a position-free summary of every patch, and on the tiny
random encoder of tests and the demo the CLS output sits near one direction for every image
(cosines 75-100 between unrelated images), where mean tokens spread them out.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.metrics.clip_score import pad_to_square, region_crop
from pipeline.model.pipeline_dtc import IMAGENET_MEAN, IMAGENET_STD
from pipeline.regions import bounding_box

__all__ = ["IdentityScorer", "best_variants", "choose_best"]


class IdentityScorer:
    def __init__(
        self,
        image_encoder: torch.nn.Module,
        size: int,
        device: str | torch.device,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ):
        self.encoder = image_encoder  # pixel_values -> last_hidden_state (DINOv2, a CLIP vision tower)
        self.size = size  # the encoder's input size S (the pipeline's product_size)
        self.device = torch.device(device)
        self.mean, self.std = mean, std  # the normalisation the encoder was trained on

    @torch.no_grad()
    def embed(self, squares: list[np.ndarray]) -> torch.Tensor:
        """Square uint8 H x H x 3 images -> unit-norm (N, D) float32 embeddings."""
        dtype = next(self.encoder.parameters()).dtype
        pixels = []
        for square in squares:
            x = torch.from_numpy(np.ascontiguousarray(square)).to(self.device).permute(2, 0, 1)[None].float() / 255
            if x.shape[-1] != self.size:
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
            pixels.append(x)
        mean = torch.tensor(self.mean, device=self.device)[:, None, None]
        std = torch.tensor(self.std, device=self.device)[:, None, None]
        batch = ((torch.cat(pixels) - mean) / std).to(dtype)
        tokens = self.encoder(pixel_values=batch).last_hidden_state
        return F.normalize(tokens.float().mean(dim=1), dim=-1)

    def score(self, rendered: np.ndarray, holes: np.ndarray, products: np.ndarray) -> np.ndarray:
        """uint8 (B*N,R,R,3) rendered windows, bool (B*N,R,R) their holes, uint8 (B,S,S,3)
        products (on grey) -> float64 (B*N,) identity scores, 100 * cosine. Renders i*N..i*N+N-1
        are product i's (N variants of one pair): each product is encoded once."""
        if len(rendered) != len(holes) or (len(products) and len(rendered) % len(products)):
            raise ValueError(f"got {len(rendered)} renders, {len(holes)} holes and {len(products)} products")
        if not len(rendered):
            return np.zeros(0, dtype=np.float64)
        regions = [pad_to_square(region_crop(r, bounding_box(h))) for r, h in zip(rendered, holes)]
        embeddings = self.embed(regions + [pad_to_square(p) for p in products])
        count = len(regions)
        goods = embeddings[count:].repeat_interleave(count // len(products), dim=0)
        cosine = (embeddings[:count] * goods).sum(dim=-1)
        return 100.0 * cosine.double().cpu().numpy()


def choose_best(scores: np.ndarray) -> np.ndarray:
    """float (B, N) scores of B pairs' N variants -> int64 (B,): each pair's best variant, the
    first of equals (a fixed rule, so a re-run or an online render picks the same one)."""
    return np.argmax(scores, axis=1).astype(np.int64)


def best_variants(
    scorer: IdentityScorer, rendered: np.ndarray, holes: np.ndarray, products: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (B*N,R,R,3) renders (pair i's variants at rows i*N..i*N+N-1), bool (B*N,R,R) their
    holes, uint8 (B,S,S,3) products -> (int64 (B,) the chosen variant of each pair, float64
    (B, N) every variant's identity score), in one encoder forward."""
    scores = scorer.score(rendered, holes, products).reshape(-1, n)
    return choose_best(scores), scores
