"""Validation renders: a fixed handful of val pairs rendered at each checkpoint, for the training page.

    pairs = pick_val_pairs(plan, cfg.val_renders)           # the driver, once per run (no torch)
    renders = ValRenders(spec, pipe, device)                 # rank 0, at setup: prepare the pairs
    renders.render(step, autocast=learner.autocast)          # rank 0, at step 0 and each checkpoint

The pairs are the first `--val-renders` val rows of the manifest, in manifest order, that pass
the read's checks: the same ones in every attempt of a run. Each goes through the render job's
own path: `prepare_pair` (fetch under the run's allowlist, decode, region, model inputs and hint),
`Renderer.render` (one `DTCPipeline` call for the handful, each pair with its manifest seed, so
columns differ by the weights alone) at `--val-render-steps` denoising steps and the default
guidance, and `compose.postprocess` (the paste-back into the whole photo). The renders are PNGs
under `metrics/<run_id>/val_renders/step_<step>/<pair_id>.png`, beside `pairs.json` (the pairs,
and why one could not be prepared); `training_page` shows them as a grid.

Rendering happens after the checkpoint's validation loss, in eval mode, under torch's RNG fork:
training after it draws the same numbers as a run that renders nothing.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc

from pipeline import manifest, storage
from pipeline.stages.read_stage import planned_batches

__all__ = ["PAIR_FIELDS", "pick_val_pairs", "val_renders_uri", "render_uri", "ValRenders"]

PAIR_FIELDS = ("pair_id", "context_uri", "product_uri", "mask_uri", "bbox", "seed")


def val_renders_uri(output: str, run_id: str) -> str:
    return storage.join(output, "metrics", run_id, "val_renders")


def render_uri(output: str, run_id: str, step: int, pair_id: str) -> str:
    return storage.join(val_renders_uri(output, run_id), f"step_{step:08d}", f"{pair_id}.png")


def pick_val_pairs(plan: manifest.ManifestPlan, count: int) -> tuple[dict, ...]:
    """The first `count` val rows of the manifest (in file then row order) that pass the read's
    checks, as PAIR_FIELDS dicts; reads the manifest only as far as it needs to."""
    if count == 0 or "split" not in plan.schema.names:
        return ()
    picked: list[dict] = []
    conflicts = manifest.PairIdConflicts()
    for i in range(len(plan.files)):
        for batch in planned_batches(plan, i, conflicts, None, batch_rows=1024):
            ok = pc.equal(pc.fill_null(batch["error_code"].cast("string"), ""), "")
            good = pc.and_(pc.equal(batch["split"].cast("string"), "val"), ok)
            for row in batch.filter(good).select(list(PAIR_FIELDS)).to_pylist():
                picked.append(row)
                if len(picked) == count:
                    return tuple(picked)
    return tuple(picked)


class ValRenders:
    """Rank 0's renderer of the picked pairs, on the training pipeline's own (live) modules."""

    def __init__(self, spec, pipe, device):
        from pipeline.model.renderer import Renderer
        from pipeline.schema import RowError
        from pipeline.stages.prepare_stage import PrepareConfig, prepare_pair

        self.spec, self.cfg = spec, spec.cfg
        self.renderer = Renderer(pipe, str(device))
        config = PrepareConfig(
            spec.input_policy,
            resolution=spec.resolution,
            product_size=spec.product_size,
            max_pixels=self.cfg.max_pixels,
            crop_margin=self.cfg.crop_margin,
        )
        self.pairs, listed = [], []
        for row in spec.val_pairs:
            try:
                pair = prepare_pair(row["context_uri"], row["product_uri"], row["mask_uri"], row["bbox"], config)
            except RowError as e:  # shown on the page, as the render job would fail the row
                listed.append({**row, "error": f"{e.code}: {e.message}"})
                continue
            except Exception as e:  # noqa: BLE001 - an input gone since the store was prepared: the page says so
                listed.append({**row, "error": f"prepare_failed: {type(e).__name__}: {e}"[:500]})
                continue
            self.pairs.append((row, pair))
            listed.append({**row, "error": None})
        index = json.dumps({"steps": self.cfg.val_render_steps, "pairs": listed}, indent=1, default=str)
        storage.write_bytes(storage.join(val_renders_uri(spec.output, spec.run_id), "pairs.json"), index.encode())

    def render(self, step: int, autocast) -> str | None:
        """The pairs through the current weights -> their PNGs for `step`. A failure (out of
        memory, storage) is returned as a line for the progress log, not raised: the grid misses
        that column, training goes on."""
        try:
            self._render(step, autocast)
        except Exception as e:  # noqa: BLE001 - a side product of training must not stop it
            return f"the validation renders of step {step} failed ({type(e).__name__}: {e}); the page skips them"
        return None

    def _render(self, step: int, autocast) -> None:
        import torch

        from pipeline import compose, images
        from pipeline.config import RENDER_DEFAULTS

        if not self.pairs:
            return
        device = torch.device(self.renderer.device)
        models = [pair.model for _, pair in self.pairs]

        def stack(key: str) -> np.ndarray:
            return np.stack([model[key] for model in models])

        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast():
            rendered = self.renderer.render(
                stack("context"),
                stack("hole"),
                stack("product"),
                stack("product_alpha"),
                np.asarray([row["seed"] for row, _ in self.pairs], dtype=np.int64),
                steps=self.cfg.val_render_steps,
                guidance_scale=RENDER_DEFAULTS.guidance_scale,
                hint=stack("hint"),
                hint_mask=stack("hint_mask"),
            )
        for (row, pair), window in zip(self.pairs, rendered):
            final = compose.postprocess(
                pair.context, window, pair.hole, pair.model["crop_box"], feather_px=RENDER_DEFAULTS.feather_px
            )
            data = images.encode_image(final, "png")
            storage.write_bytes(render_uri(self.spec.output, self.spec.run_id, step, row["pair_id"]), data)
