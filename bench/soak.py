"""Soak: one long render with the tiny model, driver and worker memory sampled over time.

    python bench/soak.py [--rows 2000] [--steps 1] [--interval 1.0]

Runs `python -m jobs.render` as its own driver (with its own local Ray) on a synthetic catalog
of small photos, and once per `--interval` records the resident set size of the driver and of
every Ray worker process under it (`ray::...` processes: the model actor(s) and the CPU-stage
workers), together with how many rows the run has written so far (read from the output
manifest's part files, flushed every 50 rows here). Prints every 10th sample as a JSON line,
then a verdict: memory at the end of the rows (100% written) against memory at the 25% mark, for the
driver and for each model actor; the target is within 10% (a leak per row would show as
growth proportional to the rows between the two marks).

The model actor's RSS also counts the Ray object-store pages it has read blocks from
(`shmem`): they accumulate as the store hands out fresh offsets, up to the store's size, and
are the object store's memory, not the actor's (Ray's dashboard shows RSS minus SHM for the
same reason). So the actor's verdict is on RSS minus shared memory; its RSS is printed too.
The driver's shared memory is ~0, so its verdict is on plain RSS.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import psutil
import pyarrow.parquet as pq
from common import ROOT, render_command, tiny_model  # noqa: E402  (bench/common.py: bench/ is first on sys.path)

sys.path.insert(0, ROOT)
TARGET = 0.10


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


class RowCounter:
    """Rows written so far: the sum of the part files' footers (each part read once)."""

    def __init__(self, folder: str) -> None:
        self.folder, self.seen, self.rows = folder, set(), 0

    def __call__(self) -> int:
        for part in sorted(glob.glob(os.path.join(self.folder, "part-*.parquet"))):
            if part not in self.seen:
                try:
                    self.rows += pq.read_metadata(part).num_rows
                except OSError:  # not there any more or not yet complete: next round
                    continue
                self.seen.add(part)
        return self.rows


def memory(pid: int) -> dict[str, float]:
    """RSS and its parts in MB from /proc: `anon` is the process's own heap (what a leak
    grows); `shmem` is shared memory it has touched, mostly Ray object-store pages holding the
    blocks it read, which counts in RSS but is the object store's, bounded by its size."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssShmem"):
                fields[key] = int(value.split()[0]) / 1024
    return {
        "rss": round(fields["VmRSS"], 1),
        "anon": round(fields["RssAnon"], 1),
        "shmem": round(fields["RssShmem"], 1),
    }


def workers(driver: psutil.Process) -> dict[str, dict]:
    """{pid: {role, rss, anon, shmem}} of the Ray worker processes under the driver."""
    found = {}
    try:
        children = driver.children(recursive=True)
    except psutil.NoSuchProcess:
        return found
    for proc in children:
        try:
            title = " ".join(proc.cmdline())
            if title.startswith("ray::"):
                found[str(proc.pid)] = {"role": title.split()[0], **memory(proc.pid)}
        except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError, KeyError):
            continue
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--print-every", type=int, default=10, help="print every Nth sample (all are used)")
    args = parser.parse_args()
    from pipeline.sample_catalog import make_catalog

    with tempfile.TemporaryDirectory(prefix="dtc-soak-") as work:
        model = tiny_model(work)
        manifest = make_catalog(
            os.path.join(work, "catalog"),
            n_pairs=args.rows,
            bad_rows=False,
            sizes=[(96, 80), (80, 96), (96, 96)],
            unique_images=32,
        )
        config = os.path.join(work, "soak.yaml")
        with open(config, "w") as f:
            f.write("manifest_part_rows: 50\n")
        output = os.path.join(work, "out")
        flags = (
            "--steps",
            str(args.steps),
            "--batch-size",
            "8",
            "--run-id",
            "soak",
            "--config",
            config,
            "--no-metrics",
        )
        command = render_command(manifest, output, model, *flags)
        log = open(os.path.join(work, "render.log"), "w")
        job = subprocess.Popen(
            command,
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=ROOT, RAY_USAGE_STATS_ENABLED="0"),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        driver = psutil.Process(job.pid)
        count = RowCounter(os.path.join(output, "manifest", "soak"))
        samples = []
        start = time.monotonic()
        while job.poll() is None:
            try:
                own = memory(job.pid)
            except (FileNotFoundError, KeyError):
                break
            sample = {
                "t": round(time.monotonic() - start, 1),
                "rows": count(),
                "driver": own,
                "workers": workers(driver),
            }
            sample["workers_rss_mb"] = round(sum(w["rss"] for w in sample["workers"].values()), 1)
            samples.append(sample)
            if len(samples) % args.print_every == 1:
                emit(
                    bench="soak_sample",
                    t=sample["t"],
                    rows=sample["rows"],
                    driver=own,
                    workers_rss_mb=sample["workers_rss_mb"],
                    model_actors=[
                        {k: w[k] for k in ("rss", "anon", "shmem")}
                        for w in sample["workers"].values()
                        if "DTCRenderer" in w["role"]
                    ],
                )
            time.sleep(args.interval)
        code = job.wait()
        log.close()
        if code != 0:
            raise SystemExit(f"render exited {code}:\n{open(log.name).read()[-3000:]}")
        with open(os.path.join(output, "runs", "soak.json")) as f:
            record = json.load(f)
        total = record["counts"]["rows"]

        # The marks: the first sample with 25% of the rows written, and the last one taken
        # while rows were still being rendered (after it the actors are torn down and the driver
        # compacts the state: not the steady state a leak would show in).
        quarter = next(s for s in samples if s["rows"] >= 0.25 * total)
        end = [s for s in samples if s["rows"] < total][-1]
        marks = {"driver": (quarter["driver"], end["driver"])}
        for pid, w in quarter["workers"].items():  # the model actors: long-lived, present at both marks
            if "DTCRenderer" in w["role"] and pid in end["workers"]:
                marks[f"model_actor_{pid}"] = (w, end["workers"][pid])
        growth = {
            name: {
                "rss": round(b["rss"] / a["rss"] - 1, 4),
                "rss_minus_shmem": round((b["rss"] - b["shmem"]) / (a["rss"] - a["shmem"]) - 1, 4),
            }
            for name, (a, b) in marks.items()
        }
        emit(
            bench="soak",
            rows=total,
            ok=record["counts"]["ok"],
            failed=record["counts"]["failed"],
            steps=args.steps,
            elapsed_s=record["elapsed_s"],
            rows_per_s=record["rows_per_s"],
            samples=len(samples),
            marks_rows=[quarter["rows"], end["rows"]],
            memory_mb_at_marks={
                name: [{k: m[k] for k in ("rss", "anon", "shmem")} for m in pair] for name, pair in marks.items()
            },
            growth=growth,
            driver_rss_mb_by_rows=record["driver_rss_mb_by_rows"],
            workers_rss_mb_at_marks=[quarter["workers_rss_mb"], end["workers_rss_mb"]],
            target_max_growth=TARGET,
            verdict_on="driver: RSS; model actors: RSS minus shared memory (object-store pages)",
            meets_target=len(growth) >= 2
            and all(g["rss" if name == "driver" else "rss_minus_shmem"] <= TARGET for name, g in growth.items()),
        )


if __name__ == "__main__":
    main()
