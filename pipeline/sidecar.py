"""A process beside rank 0 that turns a run's records into TensorBoard event files and
``curves.png``, so that neither drawing nor TensorBoard ever holds a training process's GIL.

    python -m localpipe.pipeline.sidecar RUN_FOLDER

It follows ``metrics.jsonl`` and ``steps.jsonl`` in the folder, told through stdin when to look:
"epoch" (a new epoch record: write its events and draw the curves again), "step" (new step
records), "close" (the last look, then exit). Commands that arrive while it is busy are taken
together. The event files are written afresh from the records at every start, and the curves
drawn at once where there are records, so that after a resume (a new branch of a run included)
both show exactly what ``metrics.jsonl`` holds, never an abandoned future (TensorBoard's
``purge_step`` would keep the old file and only hide its later steps). It imports neither torch
nor the training code; without the ``tensorboard`` package it only draws.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import sys

from localpipe.pipeline.curves import draw_run, read
from localpipe.pipeline.files import atomic_write


class Follow:
    """The complete lines appended to a file since the last look."""

    def __init__(self, path: str) -> None:
        self.path, self.offset = path, 0

    def new(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        done = data.rfind(b"\n") + 1
        self.offset += done
        return [json.loads(line) for line in data[:done].splitlines() if line.strip()]


class Board:
    """TensorBoard scalars of the run, through tensorboard's own event writer."""

    def __init__(self, folder: str) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.Event, self.Summary = Event, Summary
        path = os.path.join(folder, "tensorboard")
        shutil.rmtree(path, ignore_errors=True)
        self.writer = EventFileWriter(path)

    def add(self, scalars: dict[str, float], step: int, when: float) -> None:
        values = [self.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()
                  if v is not None]
        self.writer.add_event(self.Event(wall_time=when, step=step,
                                         summary=self.Summary(value=values)))

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def epoch_scalars(r: dict) -> dict[str, float]:
    out = {f"{phase}/{key}": r.get(f"{phase}_{key}") for phase in ("train", "val", "test")
           for key in ("error", "loss")}
    out.update({"train/loss_local": r["train_loss_local"],
                "train/loss_global": r["train_loss_global"],
                "samples_per_s": r["samples_per_s"]})
    for b in r["blocks"]:
        for phase in ("train", "val", "test"):
            out[f"block_{b['block']}/{phase}_error"] = b.get(f"{phase}_error")
    for s in r["stages"]:
        total = s["busy_s"] + s["recv_wait_s"] + s["send_wait_s"]
        if total > 0:
            out[f"stage_{s['stage']}/busy_share"] = s["busy_s"] / total
    return out


def step_scalars(r: dict) -> dict[str, float]:
    out = {f"local_loss/unit_{u}": v for u, v in r["loss"].items()}
    out.update(lr=r["lr"], samples_per_s=r["samples_per_s"])
    return out


def commands() -> set[str]:
    """The next command, with every other one already waiting; empty at the end of stdin."""
    got = set()
    line = sys.stdin.readline()
    while line:
        got.add(line.strip())
        if not select.select([sys.stdin], [], [], 0)[0]:
            break
        line = sys.stdin.readline()
    return got or {"close"}


def main(folder: str) -> int:
    try:
        board = Board(folder)
    except ImportError:
        board = None
    epochs = Follow(os.path.join(folder, "metrics.jsonl"))
    steps = Follow(os.path.join(folder, "steps.jsonl"))
    todo = {"epoch"} if read(folder, "metrics.jsonl") else set()  # a resumed run's, at once
    while True:
        if board is not None:
            for r in steps.new():
                board.add(step_scalars(r), r["steps"], r["time"])
            for r in epochs.new():
                board.add(epoch_scalars(r), r["epoch"], r["time"])
            board.flush()
        if todo & {"epoch", "close"}:
            atomic_write(os.path.join(folder, "curves.png"), lambda f: draw_run(folder, f))
        if "close" in todo:
            if board is not None:
                board.close()
            return 0
        todo = commands()


def run(folder: str) -> int:
    """``main``, with a failure (a curves.png that cannot be written, say) as one line on
    stderr, which the run reports as its own (pipeline/records.py): never a traceback in the
    user's terminal."""
    try:
        return main(folder)
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(run(sys.argv[1]))
