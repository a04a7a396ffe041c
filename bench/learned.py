"""A model that learned (issue 15): the train-tiny recipe end to end, one JSON line per figure.

    python bench/learned.py [--work DIR] [--steps 800]     # ~45 minutes on 2 shared cores
    python bench/learned.py --calibration-only              # the CI test's calibration, ~8 minutes

Every step is the production command, in a subprocess: `jobs.make_training_catalog` (the toy
catalog), `jobs.fit_vae` (stage 0), `jobs.train` with `pipeline/train/train-tiny.yaml` (channel
and spatial FiLM), `jobs.render` of the test split, `jobs.eval_synthetic`'s metrics. Records:

- `vae`: stage 0's PSNR on the val windows and its loss curve;
- `loss_curve`: the training loss (train.jsonl, every 25 steps) and the validation loss;
- `table`: the learning table on the test split: trained (channel FiLM, `LEARNED_FORM`), untrained
  (the stage-0 model: random DTC, fitted VAE), copy-paste of the hint (no model: the identity
  upper reference), hint branch off (the trained model with its FiLM heads zeroed), channel
  FiLM and spatial FiLM (trained alike), each with the five metrics;
- `profile`: the trained model with DDIM 40 (the default), DPM-Solver++ 20 (the fast profile) and
  fewer steps of each, with the metrics and the render's steady images/s (same run, same machine);
- `ci_calibration` (`--calibration-only`, its own section `learned_ci` of RESULTS.md): the CI
  test's recipe (`runs.ci_run`, with the committed models/train-tiny.safetensors as CI has it) on
  CALIBRATION_SEEDS: trained and untrained hue error per seed, their gap (what the test asserts)
  and its run-to-run spread (the gaps' sample standard deviation), and twice that spread: the
  least margin the CI test may assert.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import ROOT, render_command  # noqa: E402  (bench/common.py: bench/ is first on sys.path)

from pipeline.schema import FILM_MODES  # noqa: E402

# The colour toy's trained model and its hint-off ablation: channel FiLM, the default when this bench
# chose it and the form of models/train-tiny-channel.safetensors (the default since is spatial FiLM,
# chosen on fine detail: bench/detail.py). Pinned, so a re-run reproduces the section and reuses stage 0.
LEARNED_FORM = "channel"

RECIPE = os.path.join(ROOT, "pipeline", "train", "train-tiny.yaml")
CATALOG_FLAGS = ["--pairs", "448", "--val-fraction", "0.125", "--test-pairs", "32"]
PROFILES = [("ddim", 40), ("dpmpp", 20), ("ddim", 10), ("dpmpp", 10)]


def emit(**record) -> None:
    print(json.dumps({"bench": "learned", **record}), flush=True)


def run(*command: str) -> None:
    began = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    print(f"[learned] {command[0]} {time.perf_counter() - began:.0f}s", file=sys.stderr, flush=True)


def train(work: str, init: str, name: str, steps: int) -> str:
    output = os.path.join(work, f"train-{name}")
    run(
        "jobs.train",
        "--config",
        RECIPE,
        "--manifest",
        os.path.join(work, "toy", "manifest.parquet"),
        "--init-model",
        init,
        "--output",
        output,
        "--steps",
        str(steps),
        "--export",
        "final",
    )
    return output


def loss_curve(output: str) -> dict:
    lines = [json.loads(line) for line in open(os.path.join(output, "metrics", "train", "train.jsonl"))]
    train = [[r["step"], round(r["loss"], 4)] for r in lines if "loss" in r]
    val = [[r["step"], round(r["val_loss"], 4)] for r in lines if r.get("val_loss") is not None]
    return {"train": train, "val": val}


def render_and_score(work: str, model: str, run_id: str, scheduler: str = "ddim", steps: int = 40) -> dict:
    """jobs.render of the test split, then jobs.eval_synthetic's metrics (its JSON file)."""
    output = os.path.join(work, "renders", run_id)  # its own: every run writes images/<pair_id>.*
    test = os.path.join(work, "toy", "test.parquet")
    command = render_command(
        test,
        output,
        model,
        "--run-id",
        run_id,
        "--scheduler",
        scheduler,
        "--steps",
        str(steps),
        "--image-format",
        "png",
        "--batch-size",
        "8",
    )
    run(*command[2:])
    run("jobs.eval_synthetic", "--test-manifest", test, "--output", output, "--run-id", run_id)
    metrics = json.load(open(os.path.join(output, "metrics", run_id, "synthetic.json")))
    record = json.load(open(os.path.join(output, "runs", f"{run_id}.json")))
    keep = ("hue_error_deg", "swap", "retrieval_top1", "quadrant_acc", "masked_psnr_db", "own_rows", "missing_rows")
    return {k: metrics[k] for k in keep} | {"steady_rows_per_s": record.get("steady_rows_per_s")}


def stage0(work: str) -> str:
    """The catalog and the fitted VAE (reused when this --work has them); the `vae` line."""
    init = os.path.join(work, f"init-{LEARNED_FORM}")
    reused = os.path.exists(os.path.join(init, "vae_fit.json"))  # stage 0 of an earlier run of this --work
    if not reused:
        run("jobs.make_training_catalog", "--out", os.path.join(work, "toy"), *CATALOG_FLAGS)
        run(
            "jobs.fit_vae",
            "--manifest",
            os.path.join(work, "toy", "manifest.parquet"),
            "--out",
            init,
            "--torch-threads",
            "2",
        )
    fit = json.load(open(os.path.join(init, "vae_fit.json")))
    emit(
        what="vae",
        reused_from_earlier_run=reused,
        psnr_val_db=fit["psnr_val_db"],
        psnr_train_db=fit["psnr_train_db"],
        steps=fit["config"]["steps"],
        seconds=fit["seconds"],
        scaling_factor=fit["scaling_factor"],
        curve=[[p["step"], p["mse"]] for p in fit["curve"]],
    )
    return init


def learning_table(work: str, init: str, steps: int) -> dict:
    """Two trainings, the ablation models; one `table` line per row. Returns model paths."""
    from pipeline.toy import runs, synthetic_eval

    films = (LEARNED_FORM, *(m for m in FILM_MODES if m != LEARNED_FORM))
    for film in films[1:]:  # stage 0 fitted LEARNED_FORM's folder; the others share its VAE
        runs.with_film_mode(init, os.path.join(work, f"init-{film}"), film)
    models = {"untrained": init}
    began = time.perf_counter()
    # both FiLM modes at once, one torch thread each: on a shared 2-core machine that ends sooner
    with concurrent.futures.ThreadPoolExecutor(len(films)) as pool:
        outputs = list(pool.map(lambda film: train(work, os.path.join(work, f"init-{film}"), film, steps), films))
    seconds = round(time.perf_counter() - began, 1)
    for film, output in zip(films, outputs):
        emit(what="loss_curve", film=film, steps=steps, seconds_both=seconds, **loss_curve(output))
        models[f"{film} FiLM"] = os.path.join(output, "model")
    default = f"{LEARNED_FORM} FiLM"
    runs.hint_off(models[default], os.path.join(work, "hint-off"))
    models["hint branch off"] = os.path.join(work, "hint-off")
    rows = {name: render_and_score(work, model, name.replace(" ", "-")) for name, model in models.items()}
    test = os.path.join(work, "toy", "test.parquet")
    import pyarrow.parquet as pq

    images = synthetic_eval.copy_paste_images(test, 64, 56)
    test_rows = pq.read_table(test).to_pylist()
    rows["copy-paste of the hint"] = synthetic_eval.evaluate_images(test_rows, images, os.path.dirname(test))
    for name in (*(f"{film} FiLM" for film in films), "untrained", "copy-paste of the hint", "hint branch off"):
        metrics = {k: rows[name].get(k) for k in (*synthetic_eval.METRICS, "own_rows", "missing_rows")}
        emit(what="table", model=name, trained_default=name == default, scheduler="ddim", steps=40, **metrics)
    return models


def profiles(work: str, model: str) -> None:
    for scheduler, steps in PROFILES:
        metrics = render_and_score(work, model, f"profile-{scheduler}-{steps}", scheduler, steps)
        emit(what="profile", scheduler=scheduler, steps=steps, **metrics)


def calibration(work: str) -> None:
    """The CI test's run on the calibration seeds: the spread its margin must clear twice over."""
    from pipeline.toy import runs

    weights = runs.unpack(os.path.join(ROOT, "models", "train-tiny.safetensors"), os.path.join(work, "committed"))
    runs = []
    for seed in runs.CALIBRATION_SEEDS:  # a seed already run in this --work is read back, not run again
        done = os.path.join(work, f"ci-{seed}.json")
        if not os.path.exists(done):
            result = runs.ci_run(weights, os.path.join(work, f"ci-{seed}"), seed)
            json.dump(result, open(done, "w"))
        runs.append(json.load(open(done)))
    trained = [r["trained"]["hue_error_deg"] for r in runs]
    untrained = [r["untrained"]["hue_error_deg"] for r in runs]
    gaps = [u - t for u, t in zip(untrained, trained)]
    spread = statistics.stdev(gaps)  # of the quantity the test asserts: the gap, not one side of it
    emit(
        what="ci_calibration",
        seeds=list(runs.CALIBRATION_SEEDS),
        steps=runs.CI_STEPS,
        film_mode=runs.CI_FILM_MODE,
        trained_hue_error_deg=trained,
        untrained_hue_error_deg=untrained,
        gap_deg=[round(g, 2) for g in gaps],
        gap_mean_deg=round(statistics.mean(gaps), 2),
        spread_deg=round(spread, 2),
        two_spreads_deg=round(2 * spread, 2),
        smallest_gap_over_two_spreads=round(min(gaps) / max(2 * spread, 1e-9), 2),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--work",
        default=os.environ.get("DTC_BENCH_WORK"),
        help="keep everything here (default: "
        "$DTC_BENCH_WORK, else a temporary folder); a stage 0 already there is reused",
    )
    parser.add_argument("--steps", type=int, default=800, help="training steps of each FiLM mode")
    parser.add_argument(
        "--calibration-only", action="store_true", help="only the CI test's calibration (on the committed weights)"
    )
    args = parser.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="dtc-bench-learned-")
    os.makedirs(work, exist_ok=True)
    if args.calibration_only:
        return calibration(work)
    models = learning_table(work, stage0(work), args.steps)
    profiles(work, models[f"{LEARNED_FORM} FiLM"])


if __name__ == "__main__":
    main()
