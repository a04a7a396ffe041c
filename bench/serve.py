"""Serve benchmark: one JSON line per client concurrency (1, 4, 16) against the DTC app.

    python bench/serve.py [--levels 1,4,16] [--steps 4] [--max-batch-size 8] [--batch-wait-s 0.05]

Builds the tiny model into a temp folder (`python -m jobs.make_model --preset tiny`), starts a
local Ray (2 CPUs) and Serve on 127.0.0.1 with one CPU replica, and sends multipart renders
(4 different 320x240 JPEG scenes, bbox regions, distinct seeds) from N client threads, each
thread one request at a time. Per level: latency p50/p99 (client side, whole request),
requests/s, the replica's model calls and mean batch size over the level, and throughput
relative to concurrency 1 measured in the same run (the ratio is what to compare across
machines). p99 of a few dozen requests is close to the maximum: read it as a tail, not a
percentile to quote.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from common import ROOT, tiny_model  # noqa: E402  (bench/common.py: bench/ is first on sys.path)


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_pairs(count: int) -> list[dict]:
    import numpy as np
    from PIL import Image

    from pipeline.sample_catalog import product, scene

    def encode(array, fmt: str) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
        return buffer.getvalue()

    rng = np.random.default_rng(0)
    return [
        {
            "context": encode(scene(320, 240, rng), "JPEG"),
            "product": encode(product(128, rng), "PNG"),
            "bbox": json.dumps([40 + 20 * i, 60, 180 + 20 * i, 200]),
        }
        for i in range(count)
    ]


def run_level(base: str, headers: dict, pairs: list[dict], concurrency: int, requests_total: int, steps: int) -> dict:
    import numpy as np
    import requests

    local = threading.local()

    def one(i: int) -> tuple[float, int]:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        pair = pairs[i % len(pairs)]
        files = {"context": ("c.jpg", pair["context"]), "product": ("p.png", pair["product"])}
        start = time.perf_counter()
        response = local.session.post(
            f"{base}/v1/render",
            files=files,
            data={"bbox": pair["bbox"], "seed": str(i), "steps": str(steps)},
            headers=headers,
            timeout=300,
        )
        return (time.perf_counter() - start) * 1000, response.status_code

    stats_before = requests.get(f"{base}/v1/stats", headers=headers, timeout=30).json()
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests_total)))
    wall = time.perf_counter() - start
    stats_after = requests.get(f"{base}/v1/stats", headers=headers, timeout=30).json()
    latencies = np.asarray([ms for ms, status in results if status == 200])
    model_calls = stats_after["model_calls"] - stats_before["model_calls"]
    rendered = stats_after["rendered"] - stats_before["rendered"]
    return {
        "bench": "serve",
        "concurrency": concurrency,
        "requests": requests_total,
        "steps": steps,
        "ok": int(latencies.size),
        "failed": requests_total - int(latencies.size),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1) if latencies.size else None,
        "p99_ms": round(float(np.percentile(latencies, 99)), 1) if latencies.size else None,
        "throughput_rps": round(latencies.size / wall, 2),
        "wall_s": round(wall, 2),
        "model_calls": model_calls,
        "mean_batch_size": round(rendered / model_calls, 2) if model_calls else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--levels", default="1,4,16", help="client concurrencies, comma-separated")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-s", type=float, default=0.05)
    parser.add_argument(
        "--requests-per-client", type=int, default=4, help="requests per level = max(16, this x concurrency)"
    )
    args = parser.parse_args()
    levels = [int(level) for level in args.levels.split(",")]
    sys.path.insert(0, ROOT)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    with tempfile.TemporaryDirectory(prefix="dtc-bench-serve-") as work:
        model = tiny_model(work)
        import ray
        from ray import serve

        from pipeline.serve import app_builder

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        port = free_port()
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 300})
            serve.run(
                app_builder(
                    {
                        "model_uri": model,
                        "max_batch_size": args.max_batch_size,
                        "batch_wait_timeout_s": args.batch_wait_s,
                        "max_ongoing_requests": max(2 * args.max_batch_size, max(levels)),
                        "steps": args.steps,
                        "num_cpus": 1,
                        "image_format": "jpeg",
                    }
                ),
                name="dtc-bench",
                route_prefix="/",
            )
            base, headers = f"http://127.0.0.1:{port}", {}
            pairs = make_pairs(4)
            run_level(base, headers, pairs, 2, 4, args.steps)  # warm-up: first calls allocate and compile kernels
            first_rps = None
            for concurrency in levels:
                record = run_level(
                    base, headers, pairs, concurrency, max(16, args.requests_per_client * concurrency), args.steps
                )
                first_rps = first_rps or record["throughput_rps"]
                record["throughput_vs_first_level"] = (
                    round(record["throughput_rps"] / first_rps, 2) if first_rps else None
                )
                emit(**record)
        finally:
            serve.shutdown()
            ray.shutdown()


if __name__ == "__main__":
    main()
