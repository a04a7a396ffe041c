"""`bench/run_all.py --gpu-results` writes the `gpu` section of the results page from the device
check's JSON lines (bench/gpu/run.sh), here on the output of its CPU smoke (`make gpu-smoke`,
tests/data/gpu_smoke_results.jsonl), keeping the page's other sections as they were."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import ROOT

SMOKE_OUTPUT = os.path.join(ROOT, "tests", "data", "gpu_smoke_results.jsonl")


def write_page(tmp_path, page: str | None) -> str:
    out = tmp_path / "RESULTS.md"
    if page is not None:
        out.write_text(page)
    command = [sys.executable, "bench/run_all.py", "--gpu-results", SMOKE_OUTPUT, "--out", str(out)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=ROOT))
    return out.read_text()


def test_the_gpu_section_has_a_row_per_batch_and_layout_and_every_line(tmp_path):
    records = [json.loads(line) for line in open(SMOKE_OUTPUT)]
    throughput = [r for r in records if r.get("what") == "throughput"]
    assert {r["layout"] for r in throughput} >= {"eager", "channels_last"}
    page = write_page(tmp_path, None)
    section = page[page.index("## gpu") :]
    rows = [
        line for line in section.splitlines() if line.startswith("| ") and not line.startswith(("| layout", "| ---"))
    ]
    assert len(rows) == len(throughput)
    for r in throughput:  # a batch the check could not measure says why
        cells = f"{r['error']} |" if "error" in r else f"{r['images_per_s']} | {r['mfu']:.1%} |"
        assert f"| {r['layout']} | {r['batch']} | {cells}" in section
    method = next(r["method"] for r in throughput if "method" in r)
    assert "Extrapolated to 40 steps: " + method in section
    for what in ("best", "host_syncs", "oom_split", "cpu_stages", "train", "compile"):
        assert f"\n- {what}: " in section, what
    assert "bash bench/gpu/run.sh" in page and "Python 3.12" in section
    # every record verbatim, in the order the check printed them
    assert section.split("```json\n")[1].split("\n```")[0].splitlines() == [json.dumps(r) for r in records]


def test_the_other_sections_of_the_page_are_kept(tmp_path):
    page = write_page(tmp_path, "# Benchmark results\n\n## model\n\nkept line\n\n## gpu\n\nan older device run\n")
    assert "## model\n\nkept line" in page
    assert "an older device run" not in page and page.count("## gpu") == 1
