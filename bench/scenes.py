"""Scenes and variants benchmark: per-image throughput of `--variants 4` vs 1, and of 3-step
scenes vs the same renders as independent pairs, measured in the same run.

    python bench/scenes.py [--reps 2] [--steps 4] [--batch-size 4] [--scenes 16] [--pairs 16]

Five render jobs (`python -m jobs.render`, tiny model, one model actor of 1 CPU and 1 torch
thread, as bench/pipeline.py), each its own driver with a fresh output, run `--reps` times
interleaved (A B C D, then D C B A, ...) on the same machine state; each figure is the median
over the reps and the ratios are of medians:

- variants: `--pairs` pairs at `--variants 4` vs 4x as many pairs at `--variants 1`, the same
  `--batch-size` (pairs per model call): the same number of renders on both sides, an image
  being one render (N = 4 renders 4 per pair). Target: N = 4 per-image throughput >= 0.9 of N = 1.
  A control (`n1_same_call`): N = 1 at N x the batch size, model calls as large as N = 4's, so
  `ratio_same_call_size` is what variants cost beyond the larger calls they make.
- scenes: `--scenes` 3-step scenes (`make_scene_catalog`) vs the same 3x renders as independent
  pairs (each step's row with the photo as its context, the same bbox and product). Target:
  scenes >= 0.85 of independent pairs.

The figure the ratios use is the steady-state images/s on the model's clock: the renders of
the model calls that ended after the first one, over the time from its end to the last one's
(`render_ended_at`, the run record's `steady_rows_per_s` times N): Ray start-up, the model load
and the scene group-by before the first call are not throughput. To see the model calls
themselves, each job's driver is wrapped (driver-side only, nothing in the job changes) to keep
every arriving row's `render_ended_at` and `render_ms`: rows with the same end are one call,
whose length is `render_ms` x its rows. From them: renders per call (N x batch: variants ride
in the same call), model-only images/s (renders over the calls' summed time) and the model's
busy fraction over the steady window (calls' time / wall time from the first call's end to the
last's). For scenes the idle time before each call is split into before a later step's wave
(the step barrier: scoring, paste and cut in the actor) and before a block's first call
(waiting for the next block); `step_barrier_busy_fraction` is the later-step calls' time over
it plus the idle before them.

On a shared 2-core machine other work changes the speed of identical model calls from one job
to the next (`model_only_images_per_s` of calls of the same shape, `load_avg_1m`), and the
images/s ratios swing with it; `busy_ratio` (ratio of busy fractions: of images/s at equal
model speed, for calls of the same shape) cancels that and answers whether the model pool
idles. Both are reported, with each rep's ratio; `meets_target` is on images/s.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from common import ROOT, render_command, tiny_model  # noqa: E402  (bench/common.py: bench/ is first on sys.path)

# The job's own entry point, its driver's RunStats.add wrapped to write each arriving row's model
# call (render_ended_at, render_ms, pair_id, attempt) to the file named by DTC_BENCH_CALLS.
DRIVER = """
import json, os, sys
from pipeline.output import stats
from jobs.render import main
rows, add = [], stats.RunStats.add
def keep(self, batch):
    if "render_ended_at" in batch.column_names:
        cols = ("render_ended_at", "render_ms", "pair_id", "attempt")
        rows.extend(zip(*(batch[c].to_pylist() for c in cols)))
    add(self, batch)
stats.RunStats.add = keep
code = main(sys.argv[1:])
with open(os.environ["DTC_BENCH_CALLS"], "w") as f:
    json.dump(rows, f)
sys.exit(code)
"""


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def catalogs(work: str, n_scenes: int, pairs: int, variants: int) -> dict[str, str]:
    """The four manifests: variant pairs (N x `pairs` and `pairs`), the scenes, and the scenes'
    renders as independent pairs."""
    sys.path.insert(0, ROOT)
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.sample_catalog import make_catalog, make_scene_catalog

    sizes = [(160, 120), (128, 128), (120, 160)]
    many = make_catalog(os.path.join(work, "pairs"), n_pairs=pairs * variants, bad_rows=False, sizes=sizes)
    few = os.path.join(work, "pairs", "first.parquet")  # the first `pairs` of them, beside (relative URIs)
    pq.write_table(pq.read_table(many).slice(0, pairs), few)
    scenes = make_scene_catalog(os.path.join(work, "scenes"), n_scenes=n_scenes, steps=3)
    table = pq.read_table(scenes)
    photo = {}
    for scene_id, step, context in zip(*(table[c].to_pylist() for c in ("scene_id", "step", "context_uri"))):
        if step == 1:
            photo[scene_id] = context
    flat = pa.table(
        {
            "pair_id": pa.array([p.replace("scene-", "flat-") for p in table["pair_id"].to_pylist()], pa.string()),
            "context_uri": pa.array([photo[s] for s in table["scene_id"].to_pylist()], pa.string()),
            "product_uri": table["product_uri"],
            "bbox": table["bbox"],
        }
    )
    independent = os.path.join(work, "scenes", "independent.parquet")  # beside the scenes: same images
    pq.write_table(flat, independent)
    return {"n1": many, "n4": few, "scenes": scenes, "independent": independent}


def run_job(name: str, rep: int, manifest: str, model: str, work: str, flags: list[str], variants: int) -> dict:
    """One render job; its figures from the run record and the model calls its driver saw."""
    output = os.path.join(work, f"out-{name}-{rep}")
    calls_file = os.path.join(work, f"calls-{name}-{rep}.json")
    env = dict(os.environ, PYTHONPATH=ROOT, RAY_USAGE_STATS_ENABLED="0", DTC_BENCH_CALLS=calls_file)
    command = render_command(manifest, output, model, *flags, "--run-id", "bench", "--no-metrics")
    command = [sys.executable, "-c", DRIVER, *command[3:]]  # [python, -m, jobs.render, ...] -> the wrapper
    load = os.getloadavg()[0]  # the machine's load: other work slows identical model calls
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{name} render exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    with open(os.path.join(output, "runs", "bench.json")) as f:
        record = json.load(f)
    with open(calls_file) as f:
        seen = json.load(f)
    load = max(load, os.getloadavg()[0])
    return {"wall_s": wall, "load_avg_1m": load, "record": record, **model_calls(seen, variants)}


def model_calls(rows: list, variants: int) -> dict:
    """The model calls behind the rows: steady images/s, model-only images/s, busy fraction, idle
    time before each call by kind (a scene's later step, or a block's first call)."""
    by_end: dict[float, list] = collections.defaultdict(list)
    for ended, render_ms, pair_id, attempt in rows:
        if ended is not None and attempt:
            by_end[ended].append((render_ms, pair_id))
    calls = []
    for ended in sorted(by_end):
        members = by_end[ended]
        later = all("-step-" in p and not p.endswith("-step-1") and p.startswith("scene-") for _, p in members)
        calls.append(
            {
                "end": ended,
                "seconds": members[0][0] * len(members) / 1000,  # render_ms: the call's time per pair
                "renders": len(members) * variants,
                "kind": "later_step" if later else "first",
            }
        )
    first, steady = calls[0], calls[1:]
    later = sum(c["seconds"] for c in steady if c["kind"] == "later_step")
    window = calls[-1]["end"] - first["end"]
    idle = {"later_step": 0.0, "first": 0.0}
    for before, call in zip(calls, steady):
        idle[call["kind"]] += max(0.0, call["end"] - call["seconds"] - before["end"])
    return {
        "calls": len(calls),
        "renders": sum(c["renders"] for c in calls),
        "renders_per_call": sorted({c["renders"] for c in calls}),
        "images_per_s": sum(c["renders"] for c in steady) / window,
        "model_only_images_per_s": sum(c["renders"] for c in calls) / sum(c["seconds"] for c in calls),
        "busy_fraction": sum(c["seconds"] for c in steady) / window,
        "idle_s_before_later_steps": idle["later_step"],
        "idle_s_before_blocks": idle["first"],
        "later_step_calls": sum(1 for c in calls if c["kind"] == "later_step"),
        # the model's share of the time across a step barrier: later-step calls over them plus the idle before them
        "step_barrier_busy_fraction": later / (later + idle["later_step"]) if later else None,
    }


def summary(runs: list[dict], variants: int) -> dict:
    """Median figures of one configuration over the reps (and each rep's images/s)."""

    def med(key: str, digits: int = 3) -> float:
        return round(statistics.median(r[key] for r in runs), digits)

    return {
        "renders": runs[0]["renders"],
        "model_calls": runs[0]["calls"],
        "renders_per_call": runs[0]["renders_per_call"],
        "images_per_s": med("images_per_s"),
        "images_per_s_by_rep": [round(r["images_per_s"], 3) for r in runs],
        "record_steady_images_per_s": round(
            statistics.median(r["record"]["steady_rows_per_s"] * variants for r in runs), 3
        ),
        "model_only_images_per_s": med("model_only_images_per_s"),
        "busy_fraction": med("busy_fraction"),
        "wall_s": med("wall_s", 1),
        "load_avg_1m": med("load_avg_1m", 1),
        "ok": runs[0]["record"]["counts"]["ok"],
        "failed": runs[0]["record"]["counts"]["failed"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--scenes", type=int, default=16, help="3-step scenes (3x as many renders)")
    parser.add_argument("--pairs", type=int, default=16, help="pairs at --variants 4 (4x as many at 1)")
    args = parser.parse_args()
    n = 4
    b, common = args.batch_size, ["--steps", str(args.steps)]
    configs = {  # name -> (variants, extra flags)
        "n1": (1, ["--batch-size", str(b)]),
        "n4": (n, ["--batch-size", str(b), "--variants", str(n)]),
        "n1_same_call": (1, ["--batch-size", str(b * n)]),  # N=1 in calls as large as N=4's
        "independent": (1, ["--batch-size", str(b)]),
        "scenes": (1, ["--batch-size", str(b)]),
    }
    with tempfile.TemporaryDirectory(prefix="dtc-bench-scenes-") as work:
        model = tiny_model(work)
        manifests = catalogs(work, args.scenes, args.pairs, n)
        manifests["n1_same_call"] = manifests["n1"]
        runs: dict[str, list[dict]] = {name: [] for name in configs}
        order = list(configs)
        for rep in range(args.reps):
            for name in order if rep % 2 == 0 else order[::-1]:
                variants, flags = configs[name]
                runs[name].append(run_job(name, rep, manifests[name], model, work, common + flags, variants))
                print(f"[scenes] rep {rep} {name}: {runs[name][-1]['images_per_s']:.3f} images/s", file=sys.stderr)
        figures = {name: summary(runs[name], configs[name][0]) for name in configs}
        scenes = figures["scenes"]
        scenes["idle_s_before_later_steps"] = round(
            statistics.median(r["idle_s_before_later_steps"] for r in runs["scenes"]), 3
        )
        scenes["idle_s_before_blocks"] = round(statistics.median(r["idle_s_before_blocks"] for r in runs["scenes"]), 3)
        scenes["later_step_calls"] = runs["scenes"][0]["later_step_calls"]
        scenes["step_barrier_busy_fraction"] = round(
            statistics.median(r["step_barrier_busy_fraction"] for r in runs["scenes"]), 3
        )

        def by_rep(num: str, den: str) -> list[float]:  # each rep's ratio: runs close in time, under the same load
            return [round(x["images_per_s"] / y["images_per_s"], 3) for x, y in zip(runs[num], runs[den])]

        def busy(num: str, den: str) -> float:  # the ratio at equal model speed, for calls of the same shape
            return round(figures[num]["busy_fraction"] / figures[den]["busy_fraction"], 3)

        variant_ratio = figures["n4"]["images_per_s"] / figures["n1"]["images_per_s"]
        same_call = figures["n4"]["images_per_s"] / figures["n1_same_call"]["images_per_s"]
        scene_ratio = scenes["images_per_s"] / figures["independent"]["images_per_s"]
        emit(
            bench="scenes",
            model="tiny",
            steps=args.steps,
            batch_size=args.batch_size,
            cpus_per_actor=1,
            torch_threads=1,
            reps=args.reps,
            order=" ".join(order) + " | reversed on odd reps",
            cpus=os.cpu_count(),
            figure="steady images/s on the model's clock (render_ended_at: renders of the calls after the first "
            "over the time from its end to the last one's), median over the reps; busy_fraction: model-call "
            "time / that window; busy_ratio*: the ratio of busy fractions, i.e. of images/s at equal model speed "
            "for calls of the same shape (the machine's load changes the speed of identical model calls between "
            "jobs: compare model_only_images_per_s and load_avg_1m)",
            variants={
                "n1": {"pairs": args.pairs * n, "variants": 1, **figures["n1"]},
                "n4": {"pairs": args.pairs, "variants": n, **figures["n4"]},
                "n1_same_call": {
                    "pairs": args.pairs * n,
                    "variants": 1,
                    "batch_size": b * n,
                    **figures["n1_same_call"],
                },
                "ratio": round(variant_ratio, 3),
                "ratio_by_rep": by_rep("n4", "n1"),
                "ratio_same_call_size": round(same_call, 3),
                "ratio_same_call_size_by_rep": by_rep("n4", "n1_same_call"),
                "busy_ratio_same_call_size": busy("n4", "n1_same_call"),
                "target": 0.9,
                "meets_target": variant_ratio >= 0.9,
                "meets_target_at_equal_model_speed": busy("n4", "n1_same_call") >= 0.9,
            },
            scenes={
                "independent": {"pairs": args.scenes * 3, **figures["independent"]},
                "scenes": {"scenes": args.scenes, "steps_per_scene": 3, **scenes},
                "ratio": round(scene_ratio, 3),
                "ratio_by_rep": by_rep("scenes", "independent"),
                "busy_ratio": busy("scenes", "independent"),
                "target": 0.85,
                "meets_target": scene_ratio >= 0.85,
                "meets_target_at_equal_model_speed": busy("scenes", "independent") >= 0.85,
            },
        )


if __name__ == "__main__":
    main()
