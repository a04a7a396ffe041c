"""Rank 0's training logs: `metrics/<run_id>/train.jsonl` and TensorBoard event files beside it.

    log = TrainLog(spec.output, spec.run_id, start_step, enabled=rank == 0)
    log.add({"step": 10, "loss": 0.12, "lr": 1e-5, ...})  # a train.jsonl line and its TensorBoard scalars
    log.flush()                                            # at each checkpoint and at the end

`train.jsonl` is kept in memory and rewritten whole at each flush, cut back to the step the run
resumed from, so it always describes the path to the current weights.

TensorBoard's event files (`metrics/<run_id>/tensorboard/`, `tensorboard --logdir` reads them)
are append-only, so each attempt writes a new one, opened with `purge_step = start + 1` (0 for a
run starting at step 0): a SessionLog.START event at which TensorBoard's readers drop the points
an earlier attempt logged past the restart step. Each step then shows once, in order, whatever
the earlier attempt wrote before it died. On `s3://` output the attempt's file is written in a
local folder and uploaded whole at each flush (a few KB per hundred lines).

Every number of a line becomes a scalar: the known ones under the tags of TAGS, any other under
`train/<key>`; `step`, `time` (the event's wall time) and the `best` flag are not scalars.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from pipeline import storage

__all__ = ["TAGS", "TrainLog", "log_uri", "tensorboard_uri"]

TAGS = {
    "loss": "train/loss",
    "mse": "train/mse",
    "pixel": "train/pixel",
    "perceptual": "train/perceptual",
    "grad_norm": "train/grad_norm",
    "lr": "train/lr",
    "epoch": "train/epoch",
    "samples_per_s": "perf/samples_per_s",
    "data_s": "perf/data_wait_s",  # per step: waiting for this worker's samples
    "compute_s": "perf/compute_s",  # per step: forward, backward, optimizer
    "decode_s": "perf/decode_s",  # per step: the x0 decode of the pixel and perceptual terms
    "val_loss": "val/loss",
}
_NOT_SCALARS = ("step", "time", "best")


def log_uri(output: str, run_id: str) -> str:
    return storage.join(output, "metrics", run_id, "train.jsonl")


def tensorboard_uri(output: str, run_id: str) -> str:
    return storage.join(output, "metrics", run_id, "tensorboard")


class TrainLog:
    """Rank 0's `train.jsonl` and TensorBoard events; a no-op on the other ranks (`enabled`)."""

    def __init__(self, output: str, run_id: str, start_step: int, enabled: bool):
        self.uri, self.events_uri = log_uri(output, run_id), tensorboard_uri(output, run_id)
        self.enabled, self.lines, self.writer, self.local = enabled, [], None, None
        if not enabled:
            return
        try:
            text = storage.read_bytes(self.uri).decode()
        except FileNotFoundError:
            text = ""
        self.lines = [line for line in text.splitlines() if line and json.loads(line)["step"] <= start_step]
        from torch.utils.tensorboard import SummaryWriter

        if storage.is_s3(self.events_uri):
            self.local = tempfile.mkdtemp(prefix="dtc-train-events-")
        else:
            os.makedirs(self.events_uri, exist_ok=True)
        self.writer = SummaryWriter(self.local or self.events_uri, purge_step=start_step + 1 if start_step else 0)

    def add(self, record: dict) -> None:
        if not self.enabled:
            return
        self.lines.append(json.dumps(record))
        step, walltime = record["step"], record.get("time")
        for key, value in record.items():
            if key in _NOT_SCALARS or value is None or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            self.writer.add_scalar(TAGS.get(key, f"train/{key}"), value, step, walltime=walltime)
        if record.get("data_s") is not None and record.get("compute_s") is not None:
            step_s = record["data_s"] + record["compute_s"]
            self.writer.add_scalar("perf/step_s", step_s, step, walltime=walltime)
            self.writer.add_scalar("perf/data_wait_fraction", record["data_s"] / max(step_s, 1e-12), step, walltime)

    def flush(self) -> None:
        if not self.enabled:
            return
        storage.write_bytes(self.uri, ("\n".join(self.lines) + "\n").encode())
        self.writer.flush()
        if self.local:  # this attempt's event file(s), uploaded whole
            for name in os.listdir(self.local):
                with open(os.path.join(self.local, name), "rb") as f:
                    storage.write_bytes(storage.join(self.events_uri, name), f.read())

    def close(self) -> None:
        if self.writer is not None:
            self.flush()
            self.writer.close()
            self.writer = None
        if self.local:
            shutil.rmtree(self.local, ignore_errors=True)
