"""pipeline.metrics against torchmetrics (the reference implementation) on the same features:
FID to 1e-6 relative, merged shard statistics equal to one pass to 1e-9, KID on the same
subsets, storage round trip, and the driver-safety of the module (no torch import)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from pipeline.metrics.feature_stats import (
    ClipStats,
    FeatureStats,
    fid_from_stats,
    frechet_distance,
    kid,
    kid_from_subsets,
)


class FeaturesAsImages(torch.nn.Module):
    """A torchmetrics feature extractor whose "images" are the features themselves."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def correlated_features(seed: int, n: int, dim: int, shift: float = 0.0) -> np.ndarray:
    # Non-trivial covariances (correlated, ReLU-like positive) so sqrt(S1 S2) is no identity.
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    return np.abs(rng.normal(size=(n, dim)) @ mixing + shift)


def test_fid_matches_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance

    dim = 96
    real = correlated_features(0, 700, dim)
    gen = correlated_features(1, 500, dim, shift=0.3)
    metric = FrechetInceptionDistance(feature=FeaturesAsImages(dim))
    for chunk in np.array_split(real, 3):
        metric.update(torch.from_numpy(chunk), real=True)
    metric.update(torch.from_numpy(gen), real=False)
    expected = float(metric.compute())

    ours = fid_from_stats(FeatureStats.from_features(real), FeatureStats.from_features(gen))
    assert expected > 1.0
    assert ours == pytest.approx(expected, rel=1e-6)


def test_fid_of_a_set_with_itself_is_zero():
    # n < d on purpose: singular covariance, the case that breaks naive square roots.
    for n, dim in ((300, 256), (500, 64)):
        stats = FeatureStats.from_features(correlated_features(2, n, dim))
        trace = np.trace(stats.cov())
        assert abs(fid_from_stats(stats, stats)) <= 1e-9 * 2 * trace


def test_equal_covariances_leave_the_mean_term():
    rng = np.random.default_rng(3)
    x = correlated_features(3, 400, 48)
    sigma = FeatureStats.from_features(x).cov()
    mu1, mu2 = rng.normal(size=48), rng.normal(size=48)
    expected = float(((mu1 - mu2) ** 2).sum())
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(expected, abs=1e-9 * np.trace(sigma))
    # The same through statistics: a shifted copy has the same covariance up to rounding.
    shifted = FeatureStats.from_features(x + mu2)
    assert fid_from_stats(FeatureStats.from_features(x), shifted) == pytest.approx(
        float((mu2**2).sum()), abs=1e-6 * np.trace(sigma)
    )


def test_merged_shard_statistics_equal_one_pass():
    real = correlated_features(4, 1000, 128)
    gen = correlated_features(5, 900, 128, shift=0.2)
    one_pass = fid_from_stats(FeatureStats.from_features(real), FeatureStats.from_features(gen))

    cuts = [1, 38, 300]  # unequal shards, one of a single image
    real_shards = [FeatureStats.from_features(part) for part in np.split(real, cuts)]
    gen_shards = [FeatureStats.from_features(part) for part in np.split(gen, [450, 451])]
    real_total = sum(real_shards[1:], real_shards[0])
    gen_total = FeatureStats.merge(FeatureStats.empty(128), sum(reversed(gen_shards[:-1]), gen_shards[-1]))
    assert (real_total.n, gen_total.n) == (1000, 900)
    assert fid_from_stats(real_total, gen_total) == pytest.approx(one_pass, rel=1e-9)


def test_stats_storage_round_trip_is_exact():
    stats = FeatureStats.from_features(correlated_features(6, 50, 32).astype(np.float16))
    loaded = FeatureStats.from_npz_bytes(stats.to_npz_bytes())
    assert loaded.n == stats.n
    assert np.array_equal(loaded.sum, stats.sum)
    assert np.array_equal(loaded.sum_outer, stats.sum_outer)
    with pytest.raises(ValueError, match="dimension 32 and 16"):
        stats + FeatureStats.empty(16)


def _torchmetrics_kid(real: np.ndarray, gen: np.ndarray, subset_size: int, subsets: int, seed: int):
    from torchmetrics.image.kid import KernelInceptionDistance

    with warnings.catch_warnings():  # "will save all extracted features in buffer": that is the point here
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(
            feature=FeaturesAsImages(real.shape[1]), subsets=subsets, subset_size=subset_size
        )
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(gen), real=False)
    torch.manual_seed(seed)
    mean, std = metric.compute()
    return float(mean), float(std)


def test_kid_matches_torchmetrics_on_the_same_subsets():
    real = correlated_features(7, 120, 64)
    gen = correlated_features(8, 90, 64, shift=0.1)
    subset_size, subsets, seed = 50, 6, 11
    # torchmetrics draws, per subset, randperm(n_real) then randperm(n_gen) from torch's
    # global generator: replay the same draws.
    torch.manual_seed(seed)
    real_subsets, gen_subsets = [], []
    for _ in range(subsets):
        real_subsets.append(torch.randperm(len(real))[:subset_size].numpy())
        gen_subsets.append(torch.randperm(len(gen))[:subset_size].numpy())
    expected_mean, expected_std = _torchmetrics_kid(real, gen, subset_size, subsets, seed)

    mean, std = kid_from_subsets(real, gen, real_subsets, gen_subsets)
    assert expected_mean > 0 and expected_std > 0
    assert mean == pytest.approx(expected_mean, rel=1e-9)
    assert std == pytest.approx(expected_std, rel=1e-9)


def test_kid_full_set_estimate_matches_torchmetrics():
    real = correlated_features(9, 80, 32)
    gen = correlated_features(10, 80, 32, shift=0.5)
    expected_mean, _ = _torchmetrics_kid(real, gen, subset_size=80, subsets=1, seed=0)  # any permutation of all
    mean, std = kid_from_subsets(real, gen, [np.arange(80)], [np.arange(80)])
    assert mean == pytest.approx(expected_mean, rel=1e-9)
    assert std == 0.0


def test_kid_is_seeded_and_checks_subset_size():
    real = correlated_features(12, 60, 16)
    gen = correlated_features(13, 40, 16, shift=1.0)
    different = kid(real, gen, subset_size=30, subsets=5, seed=1)
    assert different == kid(real, gen, subset_size=30, subsets=5, seed=1)
    # Unbiased: two draws from one set score ~0 (either sign), far below a shifted set.
    assert abs(kid(real, real, subset_size=30, subsets=20)[0]) < 0.1 * different[0]
    with pytest.raises(ValueError, match=r"subset_size must be in \[2, min\(n_real, n_gen\)\] = \[2, 40\]"):
        kid(real, gen, subset_size=41)


def test_summary_kid_does_not_depend_on_row_order():
    # The job's first summary sees features in arrival order, a recomputation in file order:
    # both must report the same KID (it was once 0.0800 vs 0.0778 on the same rows).
    import pyarrow as pa

    from pipeline.metrics.shards import FEATURE_DIM, compute_summary

    n = 12
    real = correlated_features(20, n, FEATURE_DIM).astype(np.float16)
    gen = correlated_features(21, n, FEATURE_DIM, shift=0.5).astype(np.float16)
    table = pa.table(
        {
            "pair_id": [f"p{i:02d}" for i in range(n)],
            "shard": ["a"] * n,
            "feat_real": [r.tobytes() for r in real],
            "feat_gen": [g.tobytes() for g in gen],
            "clip_score": [80.0] * n,
            "clip_floor": [60.0] * n,
        }
    )
    shuffled = table.take(pa.array(np.random.default_rng(3).permutation(n)))
    first, second = (compute_summary("r", {}, t, {}, {})["global"] for t in (table, shuffled))
    assert first["kid_mean"] is not None and first["kid_subset_size"] == n // 2
    assert (first["kid_mean"], first["kid_std"]) == (second["kid_mean"], second["kid_std"])


def test_clip_stats_merge():
    a, b = [80.0, 90.0, 85.5], [70.0, 99.0]
    merged = ClipStats.from_scores(a) + ClipStats.from_scores(b)
    everything = np.array(a + b)
    summary = merged.summary()
    assert summary["n"] == 5
    assert summary["mean"] == pytest.approx(everything.mean(), rel=1e-12)
    assert summary["std"] == pytest.approx(everything.std(), rel=1e-9)
    assert [summary[k] for k in ("p10", "p50", "p90")] == pytest.approx(list(np.percentile(everything, [10, 50, 90])))
    assert ClipStats().summary()["mean"] is None
    with pytest.raises(ValueError, match="finite"):
        ClipStats.from_scores([1.0, float("nan")])
