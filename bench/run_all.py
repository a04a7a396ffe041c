"""Run every benchmark and write bench/RESULTS.md from what they print (never edited by hand).

    python bench/run_all.py [--only model,data_path] [--out bench/RESULTS.md]
    python bench/run_all.py --gpu-results gpu_results.jsonl   # the device check's output -> section gpu

Each bench prints JSON lines; this runs them one after another (ratios inside a bench are
measured in the same run), keeps their JSON lines verbatim, and writes the page with the date,
the machine and the exact commands. With `--only`, the other benches' sections already on the
page are kept as they were (each section says when it was run). With `--gpu-results FILE` (what
`bench/gpu/run.sh` wrote on a device machine) the `gpu` section is written from that file, its
table (images/s, MFU, peak memory per batch and layout) first, the lines verbatim below; without
`--only` no bench is run then and the other sections are kept.
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
    "train_data_wait": ["bench/train.py", "--data-wait"],
    "store": ["bench/store.py"],
    "train_scale": ["bench/train_scale.py"],
    "learned": ["bench/learned.py"],
    "learned_ci": ["bench/learned.py", "--calibration-only"],
    # issue 29's fusion table from the parts cached in bench/detail_parts.jsonl (trains nothing:
    # `python bench/detail.py --budget-s 3600` runs the missing parts that fit, commit the file)
    "detail": ["bench/detail.py"],
    "noop": ["bench/noop.py"],
    "demo_rerun": ["bench/noop.py", "--demo"],
    # issue 27's refactor (options, payload owner, renames) against the commit before it
    "before_after_27": ["bench/before_after.py", "--base", "748d8c4"],
}
GPU_COMMAND = "bash bench/gpu/run.sh   # on a device machine, .whl/ carried (bench/gpu/README.md)"


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


def gpu_section(path: str) -> list[str]:
    """The `gpu` section from the device check's JSON lines: device, versions, the throughput
    table, then the other measurements and every line verbatim."""
    records = [json.loads(line) for line in open(path).read().splitlines() if line.startswith("{")]
    by_what: dict[str, list[dict]] = {}
    for r in records:
        by_what.setdefault(r["what"] if r["bench"] == "gpu" else r["bench"], []).append(r)
    env = (by_what.get("env") or [{}])[0]
    peak = (by_what.get("matmul_peak") or [{}])[0]
    device = env.get("gpu") or f"CPU ({env.get('cpus')} cores; --cpu-smoke)"
    lines = [
        "## gpu",
        "",
        f"`{GPU_COMMAND.split('   #')[0]}` wrote `{os.path.basename(path)}`,"
        " and `python bench/run_all.py --gpu-results FILE` this section from it.",
        "",
        f"Device: {device}; driver {env.get('driver')}, CUDA {env.get('cuda')}; torch {env.get('torch')},"
        f" diffusers {env.get('diffusers')}, transformers {env.get('transformers')}, Python {env.get('python')},"
        f" {env.get('cpus')} CPUs. Measured matmul peak ({peak.get('dtype')}, n={peak.get('n')}):"
        f" {peak.get('tflops')} TFLOP/s, MFU's denominator.",
        "",
        "| layout | batch | images/s | MFU | s/step | fixed s/call | peak GiB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in by_what.get("throughput", []):
        if "error" in r:
            lines.append(f"| {r['layout']} | {r['batch']} | {r['error']} | | | | |")
            continue
        lines.append(
            f"| {r['layout']} | {r['batch']} | {r['images_per_s']} | {r['mfu']:.1%} | {r['seconds_per_step']}"
            f" | {r['fixed_s']} | {r['peak_memory_gib']} |"
        )
    method = next((r["method"] for r in by_what.get("throughput", []) if "method" in r), None)
    if method:
        lines += ["", f"Extrapolated to 40 steps: {method}."]
    summary = []
    for what in ("best", "host_syncs", "oom_split", "cpu_stages", "train", "compile"):
        for r in by_what.get(what, []):
            fields = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("bench", "what", "method"))
            summary.append(f"- {what}: {fields}")
    return [*lines, "", *summary, "", "```json", *(json.dumps(r) for r in records), "```", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="comma-separated subset of " + ",".join(BENCHES))
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "RESULTS.md"))
    parser.add_argument("--gpu-results", help="JSON lines of bench/gpu/run.sh: (re)write the gpu section from them")
    args = parser.parse_args()
    if args.gpu_results and not os.path.exists(args.gpu_results):
        parser.error(f"--gpu-results {args.gpu_results}: no such file")
    chosen = args.only.split(",") if args.only else ([] if args.gpu_results else list(BENCHES))
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
        "GPU figures (sd15 at 512^2, 40 DDIM steps, CFG 5: images/s and MFU; section gpu) come from:",
        "",
        f"    {GPU_COMMAND}",
        "",
    ]
    kept = _sections(args.out) if args.only or args.gpu_results else {}
    ran = {
        name: [f"## {name}", "", f"`{command}` (started {started}, {status})", "", "```json", *lines, "```", ""]
        for name, command, started, status, lines in sections
    }
    if args.gpu_results:
        ran["gpu"] = gpu_section(args.gpu_results)
    for name in [*BENCHES, "gpu"]:
        page += ran.get(name) or kept.get(name) or []
    with open(args.out, "w") as f:
        f.write("\n".join(page))
    print(f"[bench] wrote {args.out}")


if __name__ == "__main__":
    main()
