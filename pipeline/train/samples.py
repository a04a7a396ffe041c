"""Prepared samples in a worker's memory, the deterministic data order, per-sample augmentation.

Exactness (a resumed run equals an uninterrupted one; 2 workers x b equal 1 worker x 2b) rests
on two pure functions, neither of which knows about workers:

- **order**: the run is one endless stream of train samples, epoch after epoch; global position
  g = step * batch_size + j is sample `permutation(seed, epoch)[g % N]` of epoch `g // N`, the
  permutation a `torch.randperm` seeded from (seed, epoch). Worker r of W takes positions
  j in [r * b, (r + 1) * b) of each step (b = batch_size / W). A restart at step k continues
  from position k * batch_size; every step has a full batch; an epoch may end mid-step.
- **per-sample randomness**: every draw for a sample (bbox or fine hole, flip, rotation angle,
  CFG drop, timestep, the noise and the two VAE posterior draws) comes, in a fixed order and a
  fixed amount, from a `torch.Generator` seeded from (seed, pair_id, epoch), not from a
  per-worker stream, so a sample sees the same draws on any worker, in any batch.

Validation draws come from (seed, pair_id, "val", k) for the k-th timestep of the fixed grid:
the same (t, noise) for a validation pair at every checkpoint, so checkpoint losses compare.

Sample i of a split is its i-th pair_id in sorted order, so its index does not depend on the
order preparation wrote the rows in. A sample source gives `len`, `pair_ids`, `digest` and
`fetch(indices) -> [Sample]`: the training job's is `reader.StoreReader` (row-group reads from
the prepared-sample store, memory independent of the dataset size); `SampleSet` holds a split in
memory (13 R^2 + 3 S^2 bytes a sample with both hole variants: 3.6 MB at R = 512, S = 224), for
the unit tier, the in-process bench and the VAE fit, which need no store.
"""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.compose import NEUTRAL_GREY
from pipeline.payload import SPECS, Sizes

__all__ = [
    "mix_seed",
    "Sample",
    "pair_ids_digest",
    "SampleSet",
    "TrainBatch",
    "Augment",
    "positions",
    "build_batch",
    "validation_items",
]

NUM_TRAIN_TIMESTEPS = 1000  # the SD schedule's


def mix_seed(*parts) -> int:
    """A 63-bit seed from any parts (stable across processes and Python versions, unlike hash())."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


@dataclass
class Sample:
    """One prepared pair, what augmentation reads (uint8 HWC images, bool masks)."""

    pair_id: str
    context: np.ndarray  # R x R x 3
    hole: np.ndarray  # R x R bool, the fine mask
    hint: np.ndarray  # R x R x 3, the inference hint for the fine hole
    hint_mask: np.ndarray  # R x R bool
    box_hole: np.ndarray  # the same three for the bounding-box hole (the fine ones for bbox rows)
    box_hint: np.ndarray
    box_hint_mask: np.ndarray
    product: np.ndarray  # S x S x 3, the product on grey at the image encoder's size

    @classmethod
    def from_payloads(cls, pair_id: str, payloads: dict, sizes: Sizes) -> Sample:
        """`dataset.TRAIN_PAYLOADS` (bytes or Arrow buffers) -> views of them, no copy; a bbox
        row's empty `box_*` payloads fall back to its own."""

        def unpack(key: str, fallback: str | None) -> np.ndarray:
            data = payloads[key]
            if fallback is not None and (data is None or not len(data)):
                data = payloads[fallback]
            return SPECS[key].unpack(data, sizes)

        return cls(pair_id, *(unpack(key, fallback) for key, fallback in SAMPLE_PAYLOADS.values()))


# Each array of a Sample (in field order): its payload column, and the column a bbox row's empty
# `box_*` payload falls back to.
SAMPLE_PAYLOADS = {
    "context": ("model_context", None),
    "hole": ("model_hole", None),
    "hint": ("model_hint", None),
    "hint_mask": ("model_hint_mask", None),
    "box_hole": ("box_hole", "model_hole"),
    "box_hint": ("box_hint", "model_hint"),
    "box_hint_mask": ("box_hint_mask", "model_hint_mask"),
    "product": ("model_product", None),
}


def pair_ids_digest(chunks) -> str:
    """Which samples a split holds (the order depends on N), recorded in every checkpoint:
    sha256 of its sorted pair_ids joined by newlines, fed in chunks (lists or Arrow arrays) so
    that a million ids never become one Python string."""
    h, first = hashlib.sha256(), True
    for chunk in chunks:
        ids = chunk.to_pylist() if hasattr(chunk, "to_pylist") else list(chunk)
        if ids:
            h.update((("" if first else "\n") + "\n".join(ids)).encode())
            first = False
    return h.hexdigest()[:16]


@dataclass
class SampleSet:
    """One split's prepared samples, stacked uint8 arrays (N first), sorted by pair_id."""

    pair_ids: list[str]
    context: np.ndarray  # N x R x R x 3
    hole: np.ndarray  # N x R x R bool, the fine mask
    hint: np.ndarray  # N x R x R x 3, the inference hint for the fine hole
    hint_mask: np.ndarray  # N x R x R bool
    box_hole: np.ndarray  # the same three for the bounding-box hole (equal to the fine ones for bbox rows)
    box_hint: np.ndarray
    box_hint_mask: np.ndarray
    product: np.ndarray  # N x S x S x 3, the product on grey at the image encoder's size

    def __len__(self) -> int:
        return len(self.pair_ids)

    @property
    def digest(self) -> str:
        return pair_ids_digest([self.pair_ids])

    def fetch(self, indices) -> list[Sample]:
        """The samples at `indices` (views of the stacked arrays)."""
        return [Sample(self.pair_ids[i], *(getattr(self, f)[i] for f in SAMPLE_PAYLOADS)) for i in indices]

    @classmethod
    def from_rows(cls, rows: list[dict], resolution: int, product_size: int) -> SampleSet:
        """Rows of the prepared dataset (`dataset.TRAIN_PAYLOADS` as bytes) -> arrays."""
        sizes = Sizes(resolution, product_size)
        rows = sorted(rows, key=lambda r: r["pair_id"])
        samples = [Sample.from_payloads(row["pair_id"], row, sizes) for row in rows]

        def stack(field: str) -> np.ndarray:
            spec = SPECS[SAMPLE_PAYLOADS[field][0]]
            out = np.empty((len(samples), *spec.shape(sizes)), dtype=spec.dtype)
            for i, sample in enumerate(samples):
                out[i] = getattr(sample, field)
            return out

        return cls([sample.pair_id for sample in samples], *(stack(f) for f in SAMPLE_PAYLOADS))


@dataclass
class TrainBatch:
    """What one forward needs, as the inference pipeline's tensors. Images [0, 1], NCHW."""

    image: torch.Tensor  # B x 3 x R x R, the photo window (the target)
    hole: torch.Tensor  # B x 1 x R x R, 1 = hole
    hint: torch.Tensor  # B x 3 x R x R in [-1, 1], 0 outside the hint mask
    product: torch.Tensor  # B x 3 x S x S, the image encoder's view
    drop: torch.Tensor  # B bool: context -> the null embedding
    timesteps: torch.Tensor  # B int64
    noise: torch.Tensor  # B x C x L x L: eps
    latent_noise: torch.Tensor  # B x C x L x L: the VAE posterior draw of z0
    masked_latent_noise: torch.Tensor  # B x C x L x L: the VAE posterior draw of z_m

    def to(self, device) -> TrainBatch:
        return TrainBatch(**{k: v.to(device) for k, v in self.__dict__.items()})

    def __len__(self) -> int:
        return self.image.shape[0]


@dataclass(frozen=True)
class Augment:
    """The recipe's per-sample augmentation settings (TrainConfig's)."""

    bbox_mask_prob: float
    flip_prob: float
    rotate_degrees: float
    cfg_drop: float


def positions(step: int, batch_size: int, rank: int, world: int) -> range:
    """Global stream positions of worker `rank`'s share of step `step` (0-based)."""
    per_worker = batch_size // world
    start = step * batch_size + rank * per_worker
    return range(start, start + per_worker)


_PERMUTATIONS: dict[tuple[int, int, int], torch.Tensor] = {}
_PERMUTATIONS_LOCK = threading.Lock()  # prefetch threads compute their steps' picks too


def sample_at(position: int, seed: int, n: int) -> tuple[int, int]:
    """(sample index, epoch) at a global stream position."""
    epoch, offset = divmod(position, n)
    key = (seed, epoch, n)
    with _PERMUTATIONS_LOCK:
        permutation = _PERMUTATIONS.get(key)
        if permutation is None:
            if len(_PERMUTATIONS) > 4:
                _PERMUTATIONS.clear()
            generator = torch.Generator().manual_seed(mix_seed(seed, "order", epoch))
            permutation = _PERMUTATIONS[key] = torch.randperm(n, generator=generator)
    return int(permutation[offset]), epoch


def _rotate(product: torch.Tensor, degrees: float) -> torch.Tensor:
    """3 x S x S in [0, 1] turned about its centre, bilinear, neutral grey where nothing maps."""
    if degrees == 0:
        return product
    grey = NEUTRAL_GREY / 255.0
    angle = math.radians(degrees)
    theta = torch.tensor([[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0]])
    grid = F.affine_grid(theta[None], [1, *product.shape], align_corners=False)
    turned = F.grid_sample(product[None] - grey, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return turned[0] + grey


def _draws(
    generator: torch.Generator, latent_shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A sample's draws, always the same amount in the same order: 4 uniforms, t, 3 noises."""
    uniforms = torch.rand(4, generator=generator)
    timestep = torch.randint(0, NUM_TRAIN_TIMESTEPS, (1,), generator=generator)
    noises = torch.randn(3, *latent_shape, generator=generator)
    return uniforms, timestep, noises


def _as_batch(arrays: list[tuple], angles: list[float], rest: list[tuple]) -> TrainBatch:
    """Per-sample uint8 HWC arrays -> the batch tensors, converted exactly as `DTCPipeline.__call__`
    converts its uint8 inputs (NHWC stacked, permuted, /255: channels-last strides, which decide
    the convolution kernels and so the last bits), so a sample's tensors equal inference's."""
    context, hole, hint, hint_mask, product = (np.stack(column) for column in zip(*arrays))

    def as_images(value: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(value).permute(0, 3, 1, 2).float() / 255.0

    hint_tensor = torch.where(torch.from_numpy(hint_mask)[:, None], as_images(hint) * 2 - 1, 0.0)  # = x / 127.5 - 1
    products = as_images(product)
    for i, angle in enumerate(angles):
        if angle:
            products[i] = _rotate(products[i], angle)
    drop, timesteps, noise, latent_noise, masked_latent_noise = (torch.stack(column) for column in zip(*rest))
    return TrainBatch(
        image=as_images(context),
        hole=torch.from_numpy(hole)[:, None].float(),
        hint=hint_tensor,
        product=products,
        drop=drop,
        timesteps=timesteps,
        noise=noise,
        latent_noise=latent_noise,
        masked_latent_noise=masked_latent_noise,
    )


def build_batch(
    samples, indices: list[tuple[int, int]], seed: int, augment: Augment, latent_shape: tuple[int, ...]
) -> TrainBatch:
    """The training batch of (sample index, epoch) pairs from a sample source (`fetch`), each
    augmented from its own generator."""
    arrays, angles, rest = [], [], []
    for item, (_, epoch) in zip(samples.fetch([index for index, _ in indices]), indices):
        generator = torch.Generator().manual_seed(mix_seed(seed, item.pair_id, epoch))
        uniforms, timestep, noises = _draws(generator, latent_shape)
        box = bool(uniforms[0] < augment.bbox_mask_prob)
        hole, hint, hint_mask = (
            (item.box_hole, item.box_hint, item.box_hint_mask) if box else (item.hole, item.hint, item.hint_mask)
        )
        sample = (item.context, hole, hint, hint_mask, item.product)
        if bool(uniforms[1] < augment.flip_prob):  # joint: the photo, its hole and hint, the product
            sample = tuple(a[:, ::-1] for a in sample)
        arrays.append(sample)
        angles.append(float(uniforms[2] * 2 - 1) * augment.rotate_degrees)
        rest.append((uniforms[3] < augment.cfg_drop, timestep[0], *noises))
    return _as_batch(arrays, angles, rest)


def validation_items(samples, timesteps: list[int]) -> list[tuple[int, int]]:
    """The fixed validation grid: (sample index, grid position) for every pair and timestep."""
    return [(i, k) for i in range(len(samples)) for k in range(len(timesteps))]


def build_validation_batch(
    samples, items: list[tuple[int, int]], seed: int, timesteps: list[int], latent_shape: tuple[int, ...]
) -> TrainBatch:
    """Validation: the fine hole, no flip, rotation or drop; (t, noise) from the fixed grid."""
    arrays, rest = [], []
    for item, (_, k) in zip(samples.fetch([index for index, _ in items]), items):
        generator = torch.Generator().manual_seed(mix_seed(seed, item.pair_id, "val", k))
        noises = torch.randn(3, *latent_shape, generator=generator)
        arrays.append((item.context, item.hole, item.hint, item.hint_mask, item.product))
        rest.append((torch.tensor(False), torch.tensor(timesteps[k]), *noises))
    return _as_batch(arrays, [0.0] * len(items), rest)
