"""Driver-side modules (the facade, config, manifest planning, storage keys, the driver itself,
checkpoint digests, the jobs) must not pull torch or diffusers into the driver process:
proven in a fresh interpreter."""

import subprocess
import sys

DRIVER_MODULES = [
    "pipeline",
    "pipeline.config",
    "pipeline.schema",
    "pipeline.storage",
    "pipeline.manifest",
    "pipeline.rows",
    "pipeline.fetch",
    "pipeline.images",
    "pipeline.regions",
    "pipeline.compose",
    "pipeline.resume",
    "pipeline.dry_run",
    "pipeline.record",
    "pipeline.nodes",
    "pipeline.run",
    "pipeline.driver",
    "pipeline.payload",
    "pipeline.dataflow",
    "pipeline.capacity",
    "pipeline.watchdog",
    "pipeline.output.layout",
    "pipeline.output.lock",
    "pipeline.output.state",
    "pipeline.output.sink",
    "pipeline.output.stats",
    "pipeline.stages.read_stage",
    "pipeline.stages.prepare_stage",
    "pipeline.stages.render_stage",
    "pipeline.stages.finish_stage",
    "pipeline.metrics.feature_stats",
    "pipeline.metrics.shards",
    "pipeline.metrics.report",
    "pipeline.metrics.page",
    "pipeline.metrics.qa",
    "pipeline.metrics.extract",
    "pipeline.model.checkpoint",
    "jobs.render",
    "jobs.backfill",
    "jobs.metrics",
    "jobs.compare",
    "pipeline.metrics.compare",
    "pipeline.metrics.compare_page",
    "jobs.train",
    "jobs.make_training_catalog",
    "pipeline.train",
    "pipeline.train.config",
    "pipeline.train.dataset",
    "pipeline.train.recipe",
    "pipeline.train.record",
    "pipeline.toy.catalog",
    "pipeline.train.export",
    "pipeline.train.faults",
    "pipeline.train.logs",
    "pipeline.train.val_renders",
    "pipeline.train.training_page",
]


def test_driver_modules_do_not_import_torch():
    code = (
        f"import importlib, sys\nHEAVY = {('torch', 'diffusers', 'transformers', 'scipy')!r}\n"
        f"for name in {DRIVER_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in HEAVY)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"driver modules imported: {out.stdout.strip()[:300]}"
