"""The fusion table on the detail catalog (issue 29; the paper's Table 1), built in cached parts.

    python bench/detail.py --plan                  # what is cached, what remains, what each part costs
    python bench/detail.py --budget-s 3600         # run missing parts while the budget lasts, print the table
    OMP_NUM_THREADS=1 python bench/detail.py --budget-s 3600 --forms spatial,channel,off --seeds 0 &   # two at once
    python bench/detail.py --measure 20            # the cost basis: a 20-step run of each form, CPU-timed
    python bench/detail.py --calibration           # the detail CI test's calibration seeds (cached like the parts)
    python bench/run_all.py --only detail          # the table of the cached parts into RESULTS.md (trains nothing)

A **part** is one (fusion form, seed): a fresh train-tiny DTC of that form (`runs.with_film_mode`:
the committed models/train-tiny.safetensors' fitted VAE, so no stage 0 and the same VAE in every
session) trained `STEPS` steps by the training job's step (`runs.train_in_process`: `step.Learner`
on the training job's own prepared samples, no Ray) on the detail catalog's train rows, then the
test split rendered in process (`synthetic_eval.render_in_process`: the render job's prepare,
`Renderer`, paste-back; DDIM `RENDER_STEPS`, CFG `GUIDANCE`) and scored by
`pipeline.toy.detail_eval`. Each finished part appends one JSON line to `bench/detail_parts.jsonl`
(tracked: later sessions go on from it) with its metrics and its cost (wall s, CPU s, threads,
machine); a part whose recipe digest differs from `RECIPE`'s is stale and runs again.

Printed records (`"bench": "detail"`): `recipe` (the settings and the catalog's geometry),
`reference` rows (copy-paste of the hint, the empty hole, the VAE round trip of the true
composite's 64 px window: the most any model behind this VAE can show; measured, no training) and `chance`,
`committed` rows (the committed demo weights and the former channel weights they replaced, scored
on this test split: rendering only),
one `part` per cached part, one `table` row per form (mean +- sample std over its cached seeds,
n), and `remaining` (the parts still to run and their estimated cost from the cost basis).

`ci_calibration` (with `--calibration`, or from the cached seeds): the detail CI test's recipe
(`runs.detail_ci_run`: the same catalog, `runs.DETAIL_CI_STEPS` steps, DDIM 10) on
`runs.CALIBRATION_SEEDS`, each seed's detail accuracy trained, with the hint silenced and with
the form "off" trained, the gaps and their spread (sample std): what the CI test's margin
(tests/unit/test_detail_learned.py) must clear twice over. Each seed is one line of the parts
file (`"what": "ci_seed"`), keyed by the CI recipe's digest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import ROOT  # noqa: E402  (bench/common.py: bench/ is first on sys.path)

from pipeline.schema import DEFAULT_FILM_MODE, FUSION_FORMS  # noqa: E402
from pipeline.toy.runs import DETAIL_CATALOG  # noqa: E402

PARTS_FILE = os.path.join(ROOT, "bench", "detail_parts.jsonl")
WEIGHTS = os.path.join(ROOT, "models", "train-tiny.safetensors")
SEEDS = (0, 1, 2)
# The committed models, rendered and scored like a part (DDIM RENDER_STEPS, no training: seconds).
COMMITTED = (
    ("committed weights", WEIGHTS, "the demo's: docs/training.md's commands (jobs.train, 1000 steps)"),
    (
        "former channel weights",
        os.path.join(ROOT, "models", "train-tiny-channel.safetensors"),
        "models/train-tiny-channel.safetensors: the colour toy's channel FiLM export, trained on no code",
    ),
)
# The recipe of every part. STEPS from the cost basis (`--measure 20`, bench/detail_parts.jsonl:
# ~0.42 CPU s a step at batch 16, ~0.22 CPU s a rendered row): ~450 CPU s a part, two parts at
# once on 2 cores with one torch thread each (`--seeds`). 1000 steps, not the 3000 of the first two
# parts (kept in the parts file under their recipe): the demo weights' steps, where spatial FiLM
# already reads ~0.9 of the cells on seed 0, at a third of the cost, so the 15 parts fit a session.
# The rest is the CI recipe's (pipeline/toy/runs.py).
STEPS = 1000
RENDER_STEPS, GUIDANCE = 20, 5.0
CATALOG = DETAIL_CATALOG  # the CI recipe trains on the same catalog (pipeline/toy/runs.py)
TRAIN = dict(batch_size=16, learning_rate=1e-3, perceptual_weight=0.0, pixel_weight=0.0)
RECIPE = dict(steps=STEPS, render_steps=RENDER_STEPS, guidance=GUIDANCE, catalog=CATALOG, train=TRAIN)


def recipe_digest() -> str:
    return hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:12]


def emit(**record) -> None:
    print(json.dumps({"bench": "detail", **record}), flush=True)


def cached_parts(path: str) -> dict[tuple[str, int], dict]:
    """(form, seed) -> its part of the current recipe in the parts file `path` (the last line wins)."""
    parts = {}
    if os.path.exists(path):
        for line in open(path):
            part = json.loads(line)
            if part.get("recipe") == recipe_digest():  # a cost basis line has none
                parts[(part["form"], part["seed"])] = part
    return parts


def catalog(work: str) -> tuple[str, str]:
    """The detail catalog under `work` (made once; seconds): (manifest, test manifest)."""
    from pipeline.toy.catalog import make_training_catalog

    folder = os.path.join(work, "detail")
    manifest = os.path.join(folder, "manifest.parquet")
    if not os.path.exists(os.path.join(folder, "test.parquet")):
        make_training_catalog(folder, **CATALOG)
    return manifest, os.path.join(folder, "test.parquet")


def committed_vae_model(work: str) -> str:
    """The committed weights unpacked under `work`, in a folder named by the file's bytes (new
    weights never reuse an older unpacking)."""
    from pipeline.toy.runs import unpack

    folder = os.path.join(work, f"committed-{_sha256(WEIGHTS)[:12]}")
    return folder if os.path.exists(os.path.join(folder, "model_index.json")) else unpack(WEIGHTS, folder)


def score(images: dict, test: str) -> dict:
    import pyarrow.parquet as pq

    from pipeline.toy.detail_eval import evaluate_detail

    return evaluate_detail(pq.read_table(test).to_pylist(), images, os.path.dirname(test))


def run_part(work: str, form: str, seed: int, steps: int, test: str | None = None) -> dict:
    """Train and score one (form, seed) (on `test`, default the catalog's test split); returns its
    metrics and its cost: wall and CPU seconds in all, and CPU seconds per phase."""
    import torch

    from pipeline.model.presets import TRAIN_TINY_PRODUCT_SIZE
    from pipeline.toy.runs import train_in_process, with_film_mode
    from pipeline.toy.synthetic_eval import render_in_process
    from pipeline.toy.vae_fit import local_samples
    from pipeline.train.config import TrainConfig

    manifest, full_test = catalog(work)
    test = test or full_test
    began, cpu = time.perf_counter(), [time.process_time()]

    def lap() -> float:
        cpu.append(time.process_time())
        return round(cpu[-1] - cpu[-2], 1)

    init = os.path.join(work, f"init-{form}-{seed}")
    with_film_mode(committed_vae_model(work), init, form, seed=seed)
    samples, _ = local_samples(manifest, 64, TRAIN_TINY_PRODUCT_SIZE)
    setup_cpu_s = lap()
    cfg = TrainConfig(manifest=manifest, init_model=init, output=work, seed=seed, steps=steps, **TRAIN)
    trained, losses = train_in_process(init, manifest, cfg, train=samples)
    train_cpu_s = lap()
    images = render_in_process(trained, test, steps=RENDER_STEPS, guidance_scale=GUIDANCE)
    render_cpu_s = lap()
    metrics = score(images, test)
    return {
        "form": form,
        "seed": seed,
        "steps": steps,
        "metrics": metrics,
        "last_mse": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        "wall_s": round(time.perf_counter() - began, 1),
        "cpu_s": round(cpu[-1] - cpu[0], 1),
        "cpu_s_phases": {"setup": setup_cpu_s, "train": train_cpu_s, "render": render_cpu_s, "score": lap()},
        "rendered_rows": len(images),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs",
    }


def references(work: str) -> None:
    """Copy-paste of the hint, the empty hole and the VAE round trip (measured), and chance."""
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    from pipeline.toy.detail_eval import CHANCE, REFERENCES
    from pipeline.toy.synthetic_eval import copy_paste_images

    _, test = catalog(work)
    base = os.path.dirname(test)
    rows = pq.read_table(test).to_pylist()
    load = lambda uri: np.asarray(Image.open(os.path.join(base, uri)).convert("RGB"))  # noqa: E731
    pasted = copy_paste_images(test, 64, 56)
    emit(
        what="reference",
        row="copy-paste of the hint",
        note=REFERENCES["copy-paste of the hint"],
        **score(pasted, test),
    )
    empty = {r["pair_id"]: load(r["context_uri"]) for r in rows}
    emit(what="reference", row="empty hole", note=REFERENCES["empty hole"], **score(empty, test))
    round_trip = vae_round_trip(committed_vae_model(work), test, rows)
    emit(
        what="reference",
        row="VAE round trip",
        note="the true composite's window through the committed VAE, pasted back: a perfect model behind it",
        **score(round_trip, test),
    )
    emit(what="chance", **CHANCE, band_centre=REFERENCES["band centre"])
    for row, weights, note in COMMITTED:
        import torch

        from pipeline.model.loading import load_pipeline
        from pipeline.toy.runs import unpack
        from pipeline.toy.synthetic_eval import render_in_process

        folder = unpack(weights, os.path.join(work, os.path.basename(weights).removesuffix(".safetensors")))
        pipe = load_pipeline(folder, device="cpu", dtype=torch.float32)
        images = render_in_process(pipe, test, steps=RENDER_STEPS, guidance_scale=GUIDANCE)
        emit(what="committed", row=row, form=pipe.hint_encoder.config.film_mode, note=note, **score(images, test))


def vae_round_trip(model: str, test: str, rows: list[dict]) -> dict:
    """Own rows: the true composite's render window (the render job's `prepare_pair`, 64 px)
    encoded and decoded by `model`'s VAE and pasted back as a render is (`compose.postprocess`):
    the latents a perfect diffusion model would give. Swap rows have no true composite."""
    import numpy as np
    import torch

    from pipeline.compose import postprocess
    from pipeline.config import RENDER_DEFAULTS
    from pipeline.fetch import InputPolicy
    from pipeline.model.loading import load_pipeline
    from pipeline.model.presets import TRAIN_TINY_PRODUCT_SIZE
    from pipeline.stages.prepare_stage import PrepareConfig, prepare_pair

    base = os.path.dirname(test)
    vae = load_pipeline(model, device="cpu", dtype=torch.float32).vae
    config = PrepareConfig(InputPolicy(base), resolution=64, product_size=TRAIN_TINY_PRODUCT_SIZE)
    images = {}
    for row in (r for r in rows if r["role"] == "own"):
        pair = prepare_pair(
            *(os.path.join(base, row[k]) for k in ("target_uri", "product_uri", "mask_uri")), None, config
        )
        x = torch.from_numpy(pair.model["context"]).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            decoded = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        window = ((decoded[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
        images[row["pair_id"]] = np.asarray(
            postprocess(pair.context, window, pair.hole, pair.model["crop_box"], RENDER_DEFAULTS.feather_px)
        )
    return images


def table(parts: dict) -> None:
    from pipeline.toy.detail_eval import METRICS

    for form in FUSION_FORMS:
        runs = [p for (f, _), p in sorted(parts.items()) if f == form]
        if not runs:
            continue
        row = {"form": form, "seeds": [p["seed"] for p in runs], "n": len(runs)}
        for metric in METRICS:
            values = [p["metrics"][metric] for p in runs if p["metrics"][metric] is not None]
            row[metric] = round(statistics.mean(values), 4) if values else None
            row[f"{metric}_std"] = round(statistics.stdev(values), 4) if len(values) > 1 else None
        row["wall_s_mean"] = round(statistics.mean(p["wall_s"] for p in runs), 1)
        emit(what="table", **row)


def cost_basis(path: str) -> dict | None:
    """The latest `--measure` record in the parts file `path`."""
    basis = None
    if os.path.exists(path):
        for line in open(path):
            record = json.loads(line)
            if record.get("what") == "cost_basis":
                basis = record
    return basis


def estimate(form: str, basis: dict | None) -> float | None:
    """A part's CPU seconds at the current recipe, from the cost basis's per-step and per-row
    figures (a 2-core machine to itself: wall ~ CPU / 2 at best, ~ CPU with one thread)."""
    if not basis or form not in basis["forms"]:
        return None
    measured = basis["forms"][form]
    rows = 2 * CATALOG["n_test"]
    return round(
        measured["setup_cpu_s"] + STEPS * measured["cpu_s_per_step"] + rows * measured["cpu_s_per_rendered_row"]
    )


def plan(parts: dict, basis: dict | None) -> list[tuple[str, int]]:
    # seed-major: a session's budget buys one seed of every form first (the whole table at one
    # seed), then the spreads
    missing = [(f, s) for s in SEEDS for f in FUSION_FORMS if (f, s) not in parts]
    for (form, seed), part in sorted(parts.items()):
        cost = f"{part['wall_s']:.0f} s wall, {part['cpu_s']:.0f} s CPU"
        print(f"cached   {form:8s} seed {seed}: {cost} ({part['machine']})")
    for form, seed in missing:
        cost = estimate(form, basis)
        print(f"missing  {form:8s} seed {seed}: ~{cost if cost is not None else '?'} CPU s (cost basis: --measure)")
    total = sum(estimate(f, basis) or 0 for f, _ in missing)
    counts = f"{len(parts)} cached, {len(missing)} to run, ~{total / 3600:.1f} CPU h"
    print(f"recipe {recipe_digest()} ({STEPS} steps); {counts}")
    return missing


def measure(work: str, steps: int, forms: list[str], path: str) -> None:
    """A short part of each form (`steps` steps, 8 test products rendered): CPU seconds per
    training step and per rendered row, projected to a part of the recipe (STEPS steps, 64 rows)."""
    import pyarrow.parquet as pq

    _, test = catalog(work)
    subset = os.path.join(os.path.dirname(test), "test-8.parquet")
    pq.write_table(pq.read_table(test).slice(0, 16), subset)
    rows = pq.read_table(test).num_rows
    measured = {}
    for form in forms:
        part = run_part(work, form, 0, steps, test=subset)
        phases = part["cpu_s_phases"]
        per_step, per_row = phases["train"] / steps, phases["render"] / part["rendered_rows"]
        measured[form] = {
            "cpu_s_per_step": round(per_step, 3),
            "cpu_s_per_rendered_row": round(per_row, 2),
            "setup_cpu_s": phases["setup"],
            "wall_s": part["wall_s"],
            "cpu_s": part["cpu_s"],
            "projected_cpu_s": round(phases["setup"] + STEPS * per_step + rows * per_row),
            "projected_for_steps": STEPS,
        }
        print(f"[detail] {form}: {measured[form]}", file=sys.stderr, flush=True)
    record = {
        "what": "cost_basis",
        "steps": steps,
        "render_steps": RENDER_STEPS,
        "forms": measured,
        "torch_threads": part["torch_threads"],
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
        "measured": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    emit(**record)


CI_FORM = DEFAULT_FILM_MODE  # the CI test trains the default: a new default makes the calibration stale


def ci_recipe_digest(vae_model: str) -> str:
    """What a calibration seed's figures depend on: the CI recipe's every setting, the form, and
    the bytes of the VAE the runs train around (`vae_model`'s)."""
    from pipeline.toy import runs

    vae = os.path.join(vae_model, "vae")
    recipe = dict(
        catalog=runs.DETAIL_CATALOG,
        steps=runs.DETAIL_CI_STEPS,
        train=runs.DETAIL_CI_TRAIN,
        render_steps=runs.CI_RENDER_STEPS,
        guidance=runs.CI_GUIDANCE,
        form=CI_FORM,
        vae={name: _sha256(os.path.join(vae, name)) for name in sorted(os.listdir(vae))},
    )
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def calibration(work: str, path: str, run: bool) -> None:
    """The detail CI test's recipe on the calibration seeds (each cached as a `ci_seed` line of
    the parts file `path`; `run`: run the missing ones), then the `ci_calibration` record."""
    from pipeline.toy import runs

    vae_model = committed_vae_model(work)
    digest, seeds = ci_recipe_digest(vae_model), {}
    if os.path.exists(path):
        for line in open(path):
            record = json.loads(line)
            if record.get("what") == "ci_seed" and record.get("ci_recipe") == digest:
                seeds[record["seed"]] = record
    for seed in runs.CALIBRATION_SEEDS:
        if seed in seeds or not run:
            continue
        began, cpu = time.perf_counter(), time.process_time()
        result = runs.detail_ci_run(vae_model, os.path.join(work, f"ci-{seed}"), seed, CI_FORM, untrained=True)
        off = runs.detail_ci_run(vae_model, os.path.join(work, f"ci-{seed}-off"), seed, "off")
        record = {"what": "ci_seed", "ci_recipe": digest, **result, "off_trained": off["trained"]}
        record.update(wall_s=round(time.perf_counter() - began, 1), cpu_s=round(time.process_time() - cpu, 1))
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        seeds[seed] = record
    if len(seeds) < 2:
        return
    done = [seeds[s] for s in sorted(seeds)]
    acc = {k: [r[k]["detail_acc"] for r in done] for k in ("trained", "hint_silenced", "off_trained", "untrained")}
    gaps = {
        "silenced": [t - o for t, o in zip(acc["trained"], acc["hint_silenced"])],
        "off_trained": [t - o for t, o in zip(acc["trained"], acc["off_trained"])],
    }
    hue = [r["untrained"]["hue_error_deg"] - r["trained"]["hue_error_deg"] for r in done]
    emit(
        what="ci_calibration",
        ci_recipe=digest,
        form=CI_FORM,
        steps=runs.DETAIL_CI_STEPS,
        seeds=[r["seed"] for r in done],
        detail_acc=acc,
        gap={k: [round(g, 4) for g in v] for k, v in gaps.items()},
        # the spread of each quantity the test asserts (sample std over the seeds)
        gap_spread={k: round(statistics.stdev(v), 4) for k, v in gaps.items()},
        gap_min={k: round(min(v), 4) for k, v in gaps.items()},
        hue_gap_deg=[round(g, 2) for g in hue],
        hue_gap_spread_deg=round(statistics.stdev(hue), 2),
        wall_s=[r["wall_s"] for r in done],
        cpu_s=[r["cpu_s"] for r in done],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", help="catalog and model folders (default: a temporary folder)")
    parser.add_argument("--plan", action="store_true", help="print what is cached and what remains; run nothing")
    parser.add_argument("--budget-s", type=float, default=0, help="run missing parts while their estimate fits")
    parser.add_argument("--measure", type=int, help="the cost basis: a run of this many steps per form, timed")
    parser.add_argument("--forms", default=",".join(FUSION_FORMS), help="only these forms' parts (and --measure's)")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="only these seeds' parts")
    parser.add_argument("--parts-file", default=PARTS_FILE, help="the cached parts and cost basis (JSON lines)")
    parser.add_argument("--calibration", action="store_true", help="run the detail CI test's missing calibration runs")
    args = parser.parse_args()
    parts, basis = cached_parts(args.parts_file), cost_basis(args.parts_file)
    if args.plan:
        plan(parts, basis)
        return
    work = args.work or tempfile.mkdtemp(prefix="detail-")
    if args.measure:
        measure(work, args.measure, args.forms.split(","), args.parts_file)
        return
    if args.calibration:
        calibration(work, args.parts_file, run=True)
        return
    from pipeline.toy.catalog import detail_geometry

    emit(what="recipe", digest=recipe_digest(), **RECIPE, seeds=list(SEEDS), geometry=detail_geometry())
    began = time.perf_counter()
    if basis:
        emit(**basis)
    for form, seed in plan(parts, basis):
        if form not in args.forms.split(",") or str(seed) not in args.seeds.split(","):
            continue  # another process's share of the parts
        cost = estimate(form, basis) or float("inf")  # CPU s: a wall-clock bound on 2 cores, roughly
        if time.perf_counter() - began + cost > args.budget_s:
            continue
        part = {"recipe": recipe_digest(), **run_part(work, form, seed, STEPS)}
        with open(args.parts_file, "a") as f:
            f.write(json.dumps(part) + "\n")
        parts[(form, seed)] = part
    references(work)
    for part in parts.values():
        emit(what="part", **{k: v for k, v in part.items() if k != "recipe"})
    table(parts)
    calibration(work, args.parts_file, run=False)
    missing = [(f, s) for f in FUSION_FORMS for s in SEEDS if (f, s) not in parts]
    emit(
        what="remaining",
        parts=[f"{f}/{s}" for f, s in missing],
        estimated_cpu_s=sum(estimate(f, basis) or 0 for f, _ in missing),
    )


if __name__ == "__main__":
    main()
