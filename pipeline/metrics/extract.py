"""Metric features of rendered pairs, taken in the model actor (METRICS.md).

`QualityExtractor` runs on the same device as DTC, on the batch the model just rendered:
- Inception pool3 features of the rendered window (generated side) and of the context's
  window (real side: the same crop, the model's input), from uint8 pixels before any lossy
  encoding, stored as fp16 (4 KB per image);
- the CLIP region score: the render cropped to the region's bounding box, padded square, vs
  the product padded square (on grey), 100 * cosine;
- the CLIP floor: the product vs the next pair's product of the batch (an unrelated product),
  so the score's high floor can be read.
Both extractors together cost well under 1% of a DTC render.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["QualityExtractor", "save_random_extractors"]


class QualityExtractor:
    def __init__(self, inception_weights: str | None, clip_model: str | None, device: str):
        from pipeline.model.checkpoint import local_checkpoint

        self.inception = self.clip = None
        if inception_weights:
            from pipeline.metrics.inception import load_inception

            self.inception = load_inception(inception_weights, device=device)
        if clip_model:
            from pipeline.metrics.clip_score import ClipScorer

            self.clip = ClipScorer(local_checkpoint(clip_model), device=device)

    def __call__(self, rendered: np.ndarray, context: np.ndarray, hole: np.ndarray, product: np.ndarray) -> dict:
        """uint8 (B,R,R,3) renders and context windows, (B,R,R) holes, (B,S,S,3) products ->
        {"feat_gen", "feat_real": list of fp16 bytes | None, "clip_score", "clip_floor": list of float | None}."""
        n = len(rendered)
        out: dict[str, list] = {
            "feat_gen": [None] * n,
            "feat_real": [None] * n,
            "clip_score": [None] * n,
            "clip_floor": [None] * n,
        }
        if n == 0:
            return out
        if self.inception is not None:
            features = self.inception.features(np.concatenate([rendered, context]))
            out["feat_gen"] = [f.astype(np.float16).tobytes() for f in features[:n]]
            out["feat_real"] = [f.astype(np.float16).tobytes() for f in features[n:]]
        if self.clip is not None:
            from pipeline.regions import bounding_box

            boxes = [bounding_box(h) for h in hole]
            out["clip_score"] = [float(s) for s in self.clip.score(list(rendered), boxes, list(product))]
            if n > 1:
                from pipeline.metrics.clip_score import pad_to_square

                emb = self.clip.embed([pad_to_square(p) for p in product])
                floor = 100.0 * (emb * emb.roll(-1, dims=0)).sum(dim=-1).double().cpu().numpy()
                out["clip_floor"] = [float(v) for v in floor]
        return out


def save_random_extractors(folder: str, seed: int = 0) -> tuple[str, str]:
    """Random-weight Inception (the standard file's keys) and a tiny random CLIP, for the demo
    and tests: (weights file, CLIP folder). Their figures measure nothing; reports say so."""
    import torch
    import transformers
    from transformers import CLIPConfig, CLIPModel

    from pipeline.metrics.inception import FIDInceptionV3, random_init_

    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(seed)
    weights = os.path.join(folder, "inception-random.pth")
    if not os.path.exists(weights):
        torch.save(random_init_(FIDInceptionV3(), seed=seed).state_dict(), weights)
    clip_dir = os.path.join(folder, "clip-tiny-random")
    if not os.path.exists(os.path.join(clip_dir, "config.json")):
        config = CLIPConfig(
            # the special tokens inside the tiny vocabulary (CLIP's 49406/49407 are not: a warning)
            text_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                vocab_size=100,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            ),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=224,
                patch_size=32,
            ),
            projection_dim=16,
        )
        transformers.utils.logging.disable_progress_bar()  # console noise
        CLIPModel(config).save_pretrained(clip_dir)
    return weights, clip_dir
