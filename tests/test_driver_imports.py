"""Driver-side modules (config, manifest planning, storage keys, checkpoint digests) must not
pull torch or diffusers into the driver process: proven in a fresh interpreter."""

import subprocess
import sys

DRIVER_MODULES = [
    "pipeline.config", "pipeline.storage", "pipeline.manifest", "pipeline.state", "pipeline.resume", "pipeline.sink",
    "pipeline.geometry", "pipeline.fetch", "pipeline.images", "pipeline.prepare", "pipeline.postprocess",
    "pipeline.dataflow", "pipeline.run", "pipeline.model.checkpoint", "jobs.render", "jobs.backfill",
    "pipeline.metrics", "pipeline.shard_metrics", "pipeline.report", "pipeline.quality",
]


def test_driver_modules_do_not_import_torch():
    code = (
        "import importlib, sys\n"
        f"for name in {DRIVER_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers'))\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"driver modules imported: {out.stdout.strip()[:300]}"
