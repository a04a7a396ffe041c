"""Distribution and score statistics for the metrics protocol (`METRICS.md`): numpy only.

Driver-safe: no torch (nor scipy) import, so `jobs.metrics` can merge shard statistics and
compute the global FID/KID on a CPU-only driver.

    real = FeatureStats.from_features(real_features)             # per shard, per side
    gen = FeatureStats.from_features(gen_features)
    total = sum(shard_stats[1:], shard_stats[0])                 # exact merge: plain addition
    fid = fid_from_stats(real_total, gen_total)
    kid_mean, kid_std = kid(real_features, gen_features, subset_size=min(1000, n), subsets=100)
    clip = ClipStats.from_scores(scores) + ClipStats.from_scores(more_scores)

Conventions follow torchmetrics / pytorch-fid so the figures are comparable with published
ones: unbiased covariance (n - 1), KID with the cubic polynomial kernel `(x.y / d + 1)^3`,
KID std over subsets with ddof=0.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "ScoreHistogram",
    "FeatureStats",
    "frechet_distance",
    "fid_from_stats",
    "kid",
    "kid_from_subsets",
    "ClipStats",
]

# Bumped when the npz layout changes, so an old statistics file is refused, not misread.
_STATS_FORMAT = 1


def _symmetric_from_upper(matrix: np.ndarray) -> np.ndarray:
    # Mirror the upper triangle: `x.T @ x` from BLAS is not always bit-symmetric, and exact
    # symmetry makes storage (upper triangle only) and merging round-trip bit for bit.
    upper = np.triu(matrix)
    return upper + np.triu(matrix, 1).T


@dataclass(eq=False)  # arrays: elementwise == would make `a == b` ambiguous
class FeatureStats:
    """Mergeable first and second moments of a feature set, in float64.

    Float64 on purpose: float32 sums drift measurably already at 10k images, and merging
    shards must be exact addition.
    """

    n: int  # number of feature vectors
    sum: np.ndarray  # float64 [d]: sum of x
    sum_outer: np.ndarray  # float64 [d, d]: sum of x x^T, exactly symmetric

    def __post_init__(self) -> None:
        self.sum = np.asarray(self.sum, dtype=np.float64)
        self.sum_outer = np.asarray(self.sum_outer, dtype=np.float64)
        d = self.sum.shape[0] if self.sum.ndim == 1 else -1
        if self.sum.ndim != 1 or self.sum_outer.shape != (d, d):
            raise ValueError(
                f"FeatureStats needs sum [d] and sum_outer [d, d], got {self.sum.shape} and {self.sum_outer.shape}"
            )
        if self.n < 0:
            raise ValueError(f"FeatureStats.n must be >= 0, got {self.n}")

    @property
    def dim(self) -> int:
        return self.sum.shape[0]

    @classmethod
    def empty(cls, dim: int) -> FeatureStats:
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    @classmethod
    def from_features(cls, features: np.ndarray) -> FeatureStats:
        """Statistics of `features` [n, d] (any float dtype; accumulated in float64)."""
        x = np.asarray(features)
        if x.ndim != 2:
            raise ValueError(f"features must be [n, d], got shape {x.shape}")
        x = x.astype(np.float64, copy=False)
        return cls(int(x.shape[0]), x.sum(axis=0), _symmetric_from_upper(x.T @ x))

    @staticmethod
    def merge(a: FeatureStats, b: FeatureStats) -> FeatureStats:
        if a.dim != b.dim:
            raise ValueError(f"cannot merge feature statistics of dimension {a.dim} and {b.dim}")
        return FeatureStats(a.n + b.n, a.sum + b.sum, a.sum_outer + b.sum_outer)

    def __add__(self, other: FeatureStats) -> FeatureStats:
        return FeatureStats.merge(self, other)

    def mean(self) -> np.ndarray:
        if self.n < 1:
            raise ValueError("mean of an empty feature set")
        return self.sum / self.n

    def cov(self) -> np.ndarray:
        """Unbiased covariance (divides by n - 1), computed as torchmetrics does from the sums."""
        if self.n < 2:
            raise ValueError(f"covariance needs at least 2 feature vectors, got {self.n}")
        mean = self.mean()
        return (self.sum_outer - self.n * np.outer(mean, mean)) / (self.n - 1)

    def to_npz_bytes(self) -> bytes:
        """npz with n, sum and the upper triangle of sum_outer (half the bytes, exact)."""
        rows, cols = np.triu_indices(self.dim)
        buffer = io.BytesIO()
        np.savez(
            buffer,
            format=np.int64(_STATS_FORMAT),
            n=np.int64(self.n),
            sum=self.sum,
            sum_outer_upper=self.sum_outer[rows, cols],
        )
        return buffer.getvalue()

    @classmethod
    def from_npz_bytes(cls, data: bytes) -> FeatureStats:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            version = int(npz["format"]) if "format" in npz else None
            if version != _STATS_FORMAT:
                raise ValueError(f"feature statistics format {version}, expected {_STATS_FORMAT}")
            total = npz["sum"]
            upper = npz["sum_outer_upper"]
            n = int(npz["n"])
        dim = total.shape[0]
        if upper.shape != (dim * (dim + 1) // 2,):
            raise ValueError(f"sum_outer_upper has {upper.shape[0]} entries, not {dim * (dim + 1) // 2} (d={dim})")
        rows, cols = np.triu_indices(dim)
        sum_outer = np.zeros((dim, dim))
        sum_outer[rows, cols] = upper
        sum_outer[cols, rows] = upper
        return cls(n, total, sum_outer)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """`|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2)` in float64.

    `S1 S2` is not symmetric, so its eigenvalues are not safe to take with `eigvalsh`; but it
    is similar to `A S2 A` with `A = S1^(1/2)` (A^-1 (A S2 A) A = S1 S2 when S1 is invertible,
    and by continuity otherwise), which is symmetric positive semi-definite: two symmetric
    eigendecompositions give the trace of the square root, much faster than `scipy.linalg.sqrtm`
    at 2048 x 2048 and without its complex-valued rounding noise.
    """
    mu1 = np.asarray(mu1, dtype=np.float64)
    mu2 = np.asarray(mu2, dtype=np.float64)
    sigma1 = np.asarray(sigma1, dtype=np.float64)
    sigma2 = np.asarray(sigma2, dtype=np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"frechet_distance needs means [d] and covariances [d, d] of one d, got "
            f"{mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}"
        )
    # eigh reads one triangle only: symmetrise so both triangles count.
    sigma1 = (sigma1 + sigma1.T) / 2
    sigma2 = (sigma2 + sigma2.T) / 2
    eigenvalues, eigenvectors = np.linalg.eigh(sigma1)
    # A covariance is PSD; rounding leaves tiny negative eigenvalues (many when n < d).
    root = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T
    middle = root @ sigma2 @ root
    product_eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = float(np.sqrt(np.clip(product_eigenvalues, 0.0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def fid_from_stats(real: FeatureStats, gen: FeatureStats) -> float:
    """FID between two feature sets given by their (possibly merged) statistics."""
    if real.dim != gen.dim:
        raise ValueError(f"real features have dimension {real.dim}, generated {gen.dim}")
    return frechet_distance(real.mean(), real.cov(), gen.mean(), gen.cov())


def _polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    # Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3: diagonal terms dropped from the
    # within-set sums. Equal sizes reduce to torchmetrics' `maximum_mean_discrepancy`.
    m, n, d = x.shape[0], y.shape[0], x.shape[1]
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    sum_xx = k_xx.sum() - np.trace(k_xx)
    sum_yy = k_yy.sum() - np.trace(k_yy)
    return float(sum_xx / (m * (m - 1)) + sum_yy / (n * (n - 1)) - 2.0 * k_xy.sum() / (m * n))


def kid_from_subsets(
    real_features: np.ndarray,
    gen_features: np.ndarray,
    real_subsets: Sequence[np.ndarray],
    gen_subsets: Sequence[np.ndarray],
) -> tuple[float, float]:
    """KID mean and std (ddof=0) over explicit subsets: `real_subsets[i]` and `gen_subsets[i]`
    are index arrays into the two feature sets. One subset of all indices is the full-set
    unbiased estimate. Exposed so a test can feed the exact subsets torchmetrics draws."""
    if len(real_subsets) != len(gen_subsets) or not real_subsets:
        raise ValueError(
            f"need as many real as generated subsets (at least 1), got {len(real_subsets)} and {len(gen_subsets)}"
        )
    real = np.asarray(real_features, dtype=np.float64)
    gen = np.asarray(gen_features, dtype=np.float64)
    if real.ndim != 2 or gen.ndim != 2 or real.shape[1] != gen.shape[1]:
        raise ValueError(f"features must be [n, d] with one d, got {real.shape} and {gen.shape}")
    scores = []
    for real_index, gen_index in zip(real_subsets, gen_subsets):
        real_index, gen_index = np.asarray(real_index), np.asarray(gen_index)
        if len(real_index) < 2 or len(gen_index) < 2:
            raise ValueError("each KID subset needs at least 2 samples per side")
        scores.append(_polynomial_mmd2_unbiased(real[real_index], gen[gen_index]))
    values = np.asarray(scores)
    return float(values.mean()), float(values.std())


def kid(
    real_features: np.ndarray, gen_features: np.ndarray, subset_size: int = 1000, subsets: int = 100, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance (mean, std over `subsets` random subsets of `subset_size`
    per side, drawn without replacement within a subset), as torchmetrics computes it.

    `subset_size` must not exceed either set: the caller picks e.g. `min(1000, n)` and
    records it, since KID values at different subset sizes have different variance.
    """
    n_real, n_gen = len(real_features), len(gen_features)
    if not 2 <= subset_size <= min(n_real, n_gen):
        limit = min(n_real, n_gen)
        raise ValueError(f"subset_size must be in [2, min(n_real, n_gen)] = [2, {limit}], got {subset_size}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    rng = np.random.default_rng(seed)
    real_subsets, gen_subsets = [], []
    for _ in range(subsets):
        real_subsets.append(rng.permutation(n_real)[:subset_size])
        gen_subsets.append(rng.permutation(n_gen)[:subset_size])
    return kid_from_subsets(real_features, gen_features, real_subsets, gen_subsets)


@dataclass(eq=False)
class ClipStats:
    """CLIP scores of a shard (or run): float64 sums for mean/std, values for percentiles.

    The values are kept (8 bytes per row) because percentiles do not merge from sums.
    """

    count: int = 0
    sum: float = 0.0
    sum_sq: float = 0.0
    values: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @classmethod
    def from_scores(cls, scores: Sequence[float] | np.ndarray) -> ClipStats:
        values = np.asarray(scores, dtype=np.float64).reshape(-1)
        if not np.isfinite(values).all():
            raise ValueError("CLIP scores must be finite (leave failed rows out)")
        return cls(int(values.size), float(values.sum()), float((values * values).sum()), values)

    def __add__(self, other: ClipStats) -> ClipStats:
        return ClipStats(
            self.count + other.count,
            self.sum + other.sum,
            self.sum_sq + other.sum_sq,
            np.concatenate([self.values, other.values]),
        )

    def summary(self) -> dict[str, float | int | None]:
        """n, mean, std (ddof=0), p10, p50, p90; figures are None when there is no score."""
        if self.count == 0:
            return {"n": 0, "mean": None, "std": None, "p10": None, "p50": None, "p90": None}
        mean = self.sum / self.count
        variance = max(self.sum_sq / self.count - mean * mean, 0.0)  # clip rounding below 0
        p10, p50, p90 = np.percentile(self.values, [10, 50, 90])
        return {
            "n": self.count,
            "mean": mean,
            "std": variance**0.5,
            "p10": float(p10),
            "p50": float(p50),
            "p90": float(p90),
        }


class ScoreHistogram:
    """A score distribution in fixed 0.1-wide bins over [-100, 100] (cosine x 100 scores):
    memory that does not grow with the rows (the driver's run statistics).

    The one definition of the identity figures the console summary, the run record and the QA
    page print (each reads `summary()`): the scores are rounded to 0.1 (their bin), then
    pXX is numpy's default percentile of them (linear between the two nearest ranks: the p50
    of an even count is the mean of the middle two); the mean is the scores' own (exact sums);
    both rounded to 0.01."""

    LOW, HIGH, WIDTH = -100.0, 100.0, 0.1

    def __init__(self):
        self.bins = np.zeros(int(round((self.HIGH - self.LOW) / self.WIDTH)) + 1, dtype=np.int64)
        self.count, self.sum = 0, 0.0

    @classmethod
    def of(cls, scores: Sequence[float | None]) -> ScoreHistogram:
        histogram = cls()
        histogram.add(scores)
        return histogram

    def add(self, scores: Sequence[float | None]) -> None:
        values = np.asarray([s for s in scores if s is not None], dtype=np.float64)
        values = values[np.isfinite(values)]  # a NaN score is no score (its row is flagged for review)
        if not values.size:
            return
        index = np.clip(np.round((values - self.LOW) / self.WIDTH), 0, len(self.bins) - 1).astype(np.int64)
        np.add.at(self.bins, index, 1)
        self.count += int(values.size)
        self.sum += float(values.sum())

    def _value(self, index: np.ndarray | int) -> np.ndarray:
        return self.LOW + np.asarray(index) * self.WIDTH

    def _order_statistic(self, cumulative: np.ndarray, rank: int) -> float:
        """The rank-th smallest binned score (0-based)."""
        return float(self._value(int(np.searchsorted(cumulative, rank + 1))))

    def percentile(self, q: float) -> float | None:
        """numpy's default (linear) percentile of the binned scores; None without scores."""
        if not self.count:
            return None
        cumulative = np.cumsum(self.bins)
        position = q / 100 * (self.count - 1)
        below = int(np.floor(position))
        low = self._order_statistic(cumulative, below)
        high = self._order_statistic(cumulative, min(below + 1, self.count - 1))
        return round(low + (position - below) * (high - low), 2)

    def mean(self) -> float | None:
        if not self.count:
            return None
        return round(self.sum / self.count, 2)

    def summary(self) -> dict[str, float | int | None]:
        """n, mean, p10, p50, p90 (None without scores)."""
        return {"n": self.count, "mean": self.mean(), **{f"p{q}": self.percentile(q) for q in (10, 50, 90)}}
