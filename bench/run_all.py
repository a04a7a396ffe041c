"""Run every benchmark and write bench/RESULTS.md from what they print (never edited by hand).

    python bench/run_all.py [--only model,data_path] [--out bench/RESULTS.md]

Each bench prints JSON lines; this runs them one after another (ratios inside a bench are
measured in the same run), keeps their JSON lines verbatim, and writes the page with the date,
the machine and the exact commands. With `--only`, the other benches' sections already on the
page are kept as they were (each section says when it was run). On a machine with a GPU, `bench/model.py` adds the sd15
images/s and MFU lines; the GPU command is on the page either way.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHES = {
    "model": ["bench/model.py"],
    "data_path": ["bench/data_path.py"],
    "scale": ["bench/scale.py"],
    "pipeline": ["bench/pipeline.py"],
    "scenes": ["bench/scenes.py"],
    "metrics": ["bench/metrics.py"],
    "serve": ["bench/serve.py"],
    "soak": ["bench/soak.py"],
    "train": ["bench/train.py"],
    "learned": ["bench/learned.py"],
    "learned_ci": ["bench/learned.py", "--calibration-only"],
}
GPU_COMMAND = (
    "python bench/model.py --gpu-batches 1,2,4,8,16 --steps 40   # on the GPU node; add --compile to try torch.compile"
)


def machine() -> str:
    gpu = "none"
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
        gpu = out.stdout.strip() or "none"
    except (OSError, subprocess.TimeoutExpired):
        pass
    cpus = f"{os.cpu_count()} CPUs, {platform.machine()}"
    return f"{platform.node()}: {cpus}, Python {platform.python_version()}, GPU {gpu}"


def _sections(path: str) -> dict[str, list[str]]:
    """The `## name` sections of an existing page, as lines (empty when there is no page)."""
    if not os.path.exists(path):
        return {}
    sections: dict[str, list[str]] = {}
    current = None
    for line in open(path).read().splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
            sections[current] = []
        if current is not None:
            sections[current].append(line)
    return sections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="comma-separated subset of " + ",".join(BENCHES))
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "RESULTS.md"))
    args = parser.parse_args()
    chosen = args.only.split(",") if args.only else list(BENCHES)
    sections = []
    for name in chosen:
        command = [sys.executable, *BENCHES[name]]
        started = datetime.datetime.now(datetime.UTC)
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        for line in lines:
            json.loads(line)  # only well-formed records reach the page
        status = "ok" if done.returncode == 0 else f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"
        sections.append(
            (name, " ".join(["python", *BENCHES[name]]), started.isoformat(timespec="seconds"), status, lines)
        )
        print(f"[bench] {name}: {status}, {len(lines)} record(s)", flush=True)
    page = [
        "# Benchmark results",
        "",
        f"Written by `python bench/run_all.py` on {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC.",
        f"Machine: {machine()}.",
        "",
        "GPU figures (sd15 at 512^2, 40 DDIM steps, CFG 5: images/s and MFU) come from:",
        "",
        f"    {GPU_COMMAND}",
        "",
    ]
    kept = _sections(args.out) if args.only else {}
    ran = {
        name: [f"## {name}", "", f"`{command}` (started {started}, {status})", "", "```json", *lines, "```", ""]
        for name, command, started, status, lines in sections
    }
    for name in BENCHES:
        page += ran.get(name) or kept.get(name) or []
    with open(args.out, "w") as f:
        f.write("\n".join(page))
    print(f"[bench] wrote {args.out}")


if __name__ == "__main__":
    main()
