"""Before/after: `bench/data_path.py` and `bench/pipeline.py` of two commits, interleaved in one run.

    python bench/before_after.py --base REV [--rounds 2] [--sizes 500] [--efficiency-rows 128]

A refactor that should not change behaviour must not change speed either. This checks out
`--base` into a temporary git worktree and runs each bench alternately on it and on this tree
(base, head, base, head, ...), so both sides see the same machine load on average; each tree
runs its own bench script against its own code, with this Python. Prints every bench's JSON
lines tagged with the tree, then one summary line per figure: the median of each side and the
ratio head / base, with the spread of each side across rounds (max - min) so a ratio can be
read against the noise. The pipeline bench runs smaller than its defaults (one size, a
shorter efficiency run) to keep the whole comparison around a quarter of an hour.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (bench record, figure) pairs compared; higher is better for rows/s and efficiency,
# lower for ms per pair and ratios over the codec floor.
FIGURES = [
    ("data_path", "path_ms_per_pair"),
    ("data_path", "ratio"),
    ("pipeline", "rows_per_s"),
    ("pipeline", "steady_rows_per_s"),
    ("pipeline", "driver_peak_rss_mb"),
    ("pipeline_efficiency", "efficiency"),
]


def run_bench(tree: str, command: list[str]) -> list[dict]:
    done = subprocess.run(
        [sys.executable, *command], cwd=tree, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=tree)
    )
    if done.returncode != 0:
        tail = done.stderr[-2000:]
        raise SystemExit(f"before_after: {' '.join(command)} in {tree} exited {done.returncode}: {tail}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="the commit to compare this tree against")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sizes", default="500")
    parser.add_argument("--efficiency-rows", type=int, default=128)
    parser.add_argument("--efficiency-steps", type=int, default=8)
    args = parser.parse_args()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    benches = {
        "data_path": ["bench/data_path.py"],
        "pipeline": [
            *("bench/pipeline.py", "--sizes", args.sizes),
            *("--efficiency-rows", str(args.efficiency_rows), "--efficiency-steps", str(args.efficiency_steps)),
        ],
    }
    results: dict[str, list[dict]] = {"base": [], "head": []}
    with tempfile.TemporaryDirectory(prefix="dtc-before-after-") as work:
        base_tree = os.path.join(work, "base")
        subprocess.run(["git", "worktree", "add", "--detach", "-q", base_tree, args.base], cwd=ROOT, check=True)
        try:
            for round_ in range(args.rounds):
                for command in benches.values():
                    for side, tree in (("base", base_tree), ("head", ROOT)):
                        for record in run_bench(tree, command):
                            record.update(side=side, round=round_)
                            results[side].append(record)
                            print(json.dumps(record), flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", base_tree], cwd=ROOT, check=False)
    for bench, figure in FIGURES:
        sides = {
            side: [r[figure] for r in records if r["bench"] == bench and figure in r]
            for side, records in results.items()
        }
        if not sides["base"] or not sides["head"]:
            continue
        base, after = statistics.median(sides["base"]), statistics.median(sides["head"])
        print(
            json.dumps(
                {
                    "bench": "before_after",
                    "figure": f"{bench}.{figure}",
                    "base": args.base,
                    "head": head.strip(),
                    "base_median": round(base, 3),
                    "head_median": round(after, 3),
                    "ratio_head_over_base": round(after / base, 3) if base else None,
                    "base_spread": round(max(sides["base"]) - min(sides["base"]), 3),
                    "head_spread": round(max(sides["head"]) - min(sides["head"]), 3),
                    "rounds": args.rounds,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
