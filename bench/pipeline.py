"""Render-job benchmark: one JSON line per manifest size, then the driver-RSS verdict.

    python bench/pipeline.py [--sizes 1000,5000] [--steps 2]

Each size runs `python -m jobs.render` as its own driver process on a synthetic catalog (small
photos, tiny model, 2 steps) and reads back its run record: rows/s, per-stage busy seconds
(fetch+decode+preprocess, model, paste-back+encode+write) and the driver's peak RSS. The
driver holds rows, never images or the whole manifest, so its RSS must not grow with the
number of rows by more than 10% (`rss_growth`, measured in the same invocation).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def run_size(rows: int, steps: int, model: str, work: str) -> dict:
    sys.path.insert(0, ROOT)
    from pipeline.sample_catalog import make_catalog

    catalog = os.path.join(work, f"catalog-{rows}")
    manifest = make_catalog(catalog, n_pairs=rows, bad_rows=False, sizes=[(160, 120), (128, 128), (120, 160)], unique_images=32)
    output = os.path.join(work, f"out-{rows}")
    env = dict(os.environ, PYTHONPATH=ROOT, RAY_USAGE_STATS_ENABLED="0")
    command = [sys.executable, "-m", "jobs.render", "--manifest", manifest, "--output", output, "--model", model,
               "--steps", str(steps), "--batch-size", "16", "--run-id", "bench", "--cpus-per-actor", "1",
               "--torch-threads", "1"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"render of {rows} rows exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    with open(os.path.join(output, "runs", "bench.json")) as f:
        record = json.load(f)
    return {
        "bench": "pipeline", "rows": rows, "steps": steps, "wall_s": round(wall, 2), "rows_per_s": record["rows_per_s"],
        "stage_seconds": record["stage_seconds"], "driver_peak_rss_mb": record["driver_peak_rss_mb"],
        "ok": record["counts"]["ok"], "failed": record["counts"]["failed"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,5000")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dtc-bench-") as work:
        model = os.path.join(work, "dtc-tiny")
        subprocess.run([sys.executable, "-m", "jobs.make_model", "--preset", "tiny", "--out", model], cwd=ROOT,
                       check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=ROOT))
        results = []
        for rows in (int(s) for s in args.sizes.split(",")):
            results.append(run_size(rows, args.steps, model, work))
            emit(**results[-1])
    small, large = results[0], results[-1]
    growth = large["driver_peak_rss_mb"] / small["driver_peak_rss_mb"] - 1
    emit(bench="pipeline_rss", rows=[small["rows"], large["rows"]], rss_mb=[small["driver_peak_rss_mb"], large["driver_peak_rss_mb"]],
         rss_growth=round(growth, 4), target_max_growth=0.10, meets_target=growth <= 0.10)


if __name__ == "__main__":
    main()
