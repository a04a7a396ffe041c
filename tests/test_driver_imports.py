"""Driver-side modules (config, manifest planning, storage keys, checkpoint digests) must not
pull torch or diffusers into the driver process: proven in a fresh interpreter."""

import subprocess
import sys

DRIVER_MODULES = ["pipeline.storage", "pipeline.geometry", "pipeline.model.checkpoint"]


def test_driver_modules_do_not_import_torch():
    code = (
        "import importlib, sys\n"
        f"for name in {DRIVER_MODULES!r}:\n"
        "    try: importlib.import_module(name)\n"
        "    except ModuleNotFoundError as e:\n"
        "        if e.name != name: raise\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers'))\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"driver modules imported: {out.stdout.strip()[:300]}"
