"""Quality metrics (METRICS.md): feature statistics, FID Inception, CLIP score, per-shard files, the QA report."""
