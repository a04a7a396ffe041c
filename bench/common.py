"""What the bench scripts share: the repository root on sys.path, the tiny model, the render command.

Each bench runs as `python bench/<name>.py`; Python puts bench/ first on sys.path, where
bench/pipeline.py would shadow the `pipeline` package, so each script inserts ROOT first.
"""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model(folder: str) -> str:
    """`python -m jobs.make_model --preset tiny` into `folder/dtc-tiny` (once); returns the folder.
    A subprocess, so the measuring process never imports torch for it."""
    model = os.path.join(folder, "dtc-tiny")
    if not os.path.exists(os.path.join(model, "model_index.json")):
        command = [sys.executable, "-m", "jobs.make_model", "--preset", "tiny", "--out", model]
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=ROOT))
    return model


def render_command(manifest: str, output: str, model: str, *flags: str) -> list[str]:
    """`python -m jobs.render` on one model actor of 1 CPU and 1 torch thread, plus `flags`."""
    return [
        *(sys.executable, "-m", "jobs.render", "--manifest", manifest, "--output", output, "--model", model),
        *("--cpus-per-actor", "1", "--torch-threads", "1", *flags),
    ]
