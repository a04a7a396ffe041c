"""Metrics benchmark: one JSON line per measurement.

    python bench/metrics.py                    # Inception images/s on CPU + FID square-root time at 2048^2
    python bench/metrics.py --device cuda --batches 20

Inception uses random weights (speed does not depend on them) at batch 16 on 299 x 299 uint8
input, so the TF1 resize is an identity gather and the network dominates. The Fréchet
distance is timed on 2048 x 2048 covariances of random correlated features: ours (two
symmetric eigendecompositions) and, when scipy happens to be importable, `scipy.linalg.sqrtm`
(pytorch-fid's method) on the same matrices; scipy is not a dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

# Run as a script, bench/ comes first on sys.path and bench/pipeline.py would shadow the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.metrics.feature_stats import FeatureStats, frechet_distance  # noqa: E402
from pipeline.metrics.inception import FIDInceptionV3  # noqa: E402


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def bench_inception(device: str, batch: int, batches: int) -> None:
    model = FIDInceptionV3().to(device).eval().requires_grad_(False)
    images = torch.randint(0, 256, (batch, 3, 299, 299), dtype=torch.uint8, device=device)
    with torch.no_grad():
        model(images[:2])  # warm-up: allocator, cuDNN algorithm choice
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(batches):
            model(images)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    emit(
        bench="inception_features",
        device=device if device == "cpu" else torch.cuda.get_device_name(),
        threads=torch.get_num_threads(),
        batch=batch,
        batches=batches,
        images_per_s=round(batch * batches / seconds, 2),
        ms_per_image=round(1000 * seconds / (batch * batches), 1),
    )


def bench_frechet(dim: int, samples: int) -> None:
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    real = FeatureStats.from_features(np.abs(rng.normal(size=(samples, dim)) @ mixing))
    gen = FeatureStats.from_features(np.abs(rng.normal(size=(samples, dim)) @ mixing + 0.1))
    mu1, s1, mu2, s2 = real.mean(), real.cov(), gen.mean(), gen.cov()

    start = time.perf_counter()
    ours = frechet_distance(mu1, s1, mu2, s2)
    ours_s = time.perf_counter() - start
    method = "eigvalsh(A S2 A), A = S1^1/2 by eigh"
    emit(bench="frechet_sqrt", method=method, dim=dim, n=samples, seconds=round(ours_s, 3), fid=ours)

    try:
        import scipy.linalg
    except ImportError:
        emit(bench="frechet_sqrt", method="scipy.linalg.sqrtm", skipped="scipy not importable")
        return
    start = time.perf_counter()
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    diff = mu1 - mu2
    reference = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)
    scipy_s = time.perf_counter() - start
    emit(
        bench="frechet_sqrt",
        method="scipy.linalg.sqrtm(S1 S2)",
        dim=dim,
        n=samples,
        seconds=round(scipy_s, 3),
        fid=reference,
        speedup_ours=round(scipy_s / ours_s, 2),
        relative_difference=abs(ours - reference) / abs(reference),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--batch", type=int, default=16, help="images per Inception forward")
    parser.add_argument("--batches", type=int, default=2, help="timed forwards (CPU: ~0.5 s per image on 2 cores)")
    parser.add_argument("--dim", type=int, default=2048, help="feature dimension of the FID covariances")
    parser.add_argument("--samples", type=int, default=4096, help="feature vectors behind each covariance")
    args = parser.parse_args()
    # Load average: on a shared machine, threaded LAPACK (eigh) slows down by up to 10x under contention.
    emit(bench="env", python=platform.python_version(), torch=torch.__version__, cpus=os.cpu_count(),
         load_avg_1min=round(os.getloadavg()[0], 2))  # fmt: skip
    bench_inception(args.device, args.batch, args.batches)
    bench_frechet(args.dim, args.samples)


if __name__ == "__main__":
    main()
