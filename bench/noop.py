"""Where a small run's time goes, and what a re-run with nothing to render costs.

    python bench/noop.py [--pairs 12] [--steps 2]     # a 12-row catalog: render, then re-run twice
    python bench/noop.py --demo                       # `python -m jobs.demo` twice in a new folder

Each run is `python -m jobs.render` as its own driver process (a local Ray of its own, as a
user's run gets). One JSON line per run: its wall time (process start to exit), the run's own
`elapsed_s`, its `phase_seconds` from the run record (fold: the done index brought up to date, at
the start and at the end; plan: the rows read, validated and resumed in the driver; ray_start;
stream: the Ray Data graph, model actor start and load included, or the planned rows written
from the driver; metrics_report) and `startup_s` (wall minus elapsed: Python imports and the
checks before the run: manifest, model digest). The re-runs: `cluster` plans on the cluster as a
run of more than `driver_plan_rows` rows does (Ray start, the resume group-by, a model actor that
loads and renders nothing: what every re-run cost before), `driver` with the default settings.
Then `cluster resume alone`: the read + resume group-by of the `cluster` run on a fresh Ray, no
model (the `cluster` run's stream less this is its model actor's start and load).
`--demo`: the wall time of the demo's first run and of its re-run, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from common import ROOT, render_command, tiny_model  # noqa: E402  (bench/common.py: bench/ is first on sys.path)

sys.path.insert(0, ROOT)


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def timed(command: list[str], cwd: str = ROOT) -> float:
    env = dict(os.environ, PYTHONPATH=ROOT, RAY_USAGE_STATS_ENABLED="0")
    start = time.monotonic()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env)
    wall = time.monotonic() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} exited {done.returncode}: {done.stderr[-2000:]}")
    return wall


def small_run(pairs: int, steps: int) -> None:
    from pipeline.sample_catalog import make_catalog

    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_catalog(os.path.join(tmp, "catalog"), n_pairs=pairs, bad_rows=False)
        model, output = tiny_model(tmp), os.path.join(tmp, "out")
        cluster_plan = os.path.join(tmp, "cluster.yaml")
        with open(cluster_plan, "w") as f:
            f.write("driver_plan_rows: 0\n")
        flags = ["--steps", str(steps), "--batch-size", "4", "--image-format", "png"]
        for name, extra in (("first", []), ("cluster", ["--config", cluster_plan]), ("driver", [])):
            wall = timed(render_command(manifest, output, model, *flags, "--run-id", name, *extra))
            with open(os.path.join(output, "runs", f"{name}.json")) as f:
                record = json.load(f)
            emit(
                bench="noop",
                run=name,
                rows=record["counts"]["rows"],
                rendered=record["counts"]["rows"] - record["counts"]["reused"],
                stream=record["stream"],
                wall_s=round(wall, 2),
                elapsed_s=record["elapsed_s"],
                startup_s=round(wall - record["elapsed_s"], 2),
                phase_seconds=record["phase_seconds"],
            )
        emit(bench="noop", run="cluster resume alone", **resume_on_cluster(manifest, output, model, steps))


def resume_on_cluster(manifest: str, output: str, model: str, steps: int) -> dict:
    """The cluster re-run's stream without its model: the read + resume group-by alone, on a
    fresh local Ray (its start timed apart), as the `cluster` run does it."""
    from pipeline.config import RenderConfig
    from pipeline.dataflow import resumed_rows, stage_configs
    from pipeline.run import check, init_ray

    spec = check(RenderConfig(manifest=manifest, output=output, model=model, steps=steps, image_format="png"))
    start = time.monotonic()
    ray = init_ray(None)
    started = time.monotonic()
    read, resume, *_ = stage_configs(spec, 0.0)
    rows = resumed_rows(spec, read, resume).count()
    done = time.monotonic()
    ray.shutdown()
    return {"rows": rows, "ray_start_s": round(started - start, 2), "resume_group_by_s": round(done - started, 2)}


def demo_twice() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "demo_out")
        walls = [timed([sys.executable, "-m", "jobs.demo", "--out", out]) for _ in range(2)]
    first, second = walls
    emit(bench="demo_rerun", first_s=round(first, 1), second_s=round(second, 1), ratio=round(second / first, 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--demo", action="store_true", help="time `python -m jobs.demo` twice instead")
    args = parser.parse_args()
    if args.demo:
        demo_twice()
    else:
        small_run(args.pairs, args.steps)


if __name__ == "__main__":
    main()
