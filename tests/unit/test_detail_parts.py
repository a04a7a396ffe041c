"""bench/detail.py's per-part cache: a part of the current recipe counts as done, a stale one
(another recipe digest) runs again, the cost basis prices what remains, and the table is the
mean and sample std over the cached seeds of each form."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import detail  # noqa: E402  (bench/detail.py)

sys.path.remove(os.path.join(ROOT, "bench"))  # bench/pipeline.py must not shadow the package later


def _part(form: str, seed: int, detail_acc: float, recipe: str | None = None) -> dict:
    metrics = dict.fromkeys(("code_exact", "hue_error_deg", "hue_slope", "swap", "masked_psnr_db", "masked_ssim"), 0.5)
    return {
        "recipe": recipe or detail.recipe_digest(),
        "form": form,
        "seed": seed,
        "metrics": {**metrics, "detail_acc": detail_acc},
        "wall_s": 10.0,
        "cpu_s": 20.0,
        "machine": "test",
    }


def test_the_plan_counts_cached_parts_and_prices_the_rest(tmp_path):
    basis = {
        "what": "cost_basis",
        "forms": {
            form: {"setup_cpu_s": 1.0, "cpu_s_per_step": 0.1, "cpu_s_per_rendered_row": 1.0}
            for form in detail.FUSION_FORMS
        },
    }
    lines = [basis, _part("channel", 0, 0.9), _part("channel", 1, 0.8), _part("add", 0, 0.7, recipe="stale")]
    parts_file = tmp_path / "parts.jsonl"
    parts_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    command = [sys.executable, "bench/detail.py", "--plan", "--parts-file", str(parts_file)]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "2 cached, 13 to run" in out
    assert "missing  add      seed 0" in out  # the stale part runs again
    each = 1 + detail.STEPS * 0.1 + 2 * detail.CATALOG["n_test"] * 1.0
    assert f"~{round(each)} CPU s" in out


def test_the_table_is_the_mean_and_sample_std_over_seeds(capsys):
    parts = {("channel", 0): _part("channel", 0, 0.9), ("channel", 1): _part("channel", 1, 0.7)}
    detail.table(parts)
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["form"] == "channel" and row["n"] == 2 and row["seeds"] == [0, 1]
    assert row["detail_acc"] == pytest.approx(0.8) and row["detail_acc_std"] == pytest.approx(0.1414, abs=1e-4)
