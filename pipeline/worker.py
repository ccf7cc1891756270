"""The stage loop: the one place where a stage meets its messages.

For every training batch a worker forwards its units, hands the detached output on at once and
only then runs its last unit's backward and optimizer step (§4.3): it never waits for a later
stage. Evaluation batches stream through the same path; an end-of-epoch marker is forwarded,
then the stage writes its checkpoint file and reports its meters, timing and memory.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable

import torch

from pipeline import checkpoint
from pipeline.metrics import StageTimer, memory_stats
from pipeline.transport import Channel, Kind, Message, arrive, depart
from stages.stage import Stage


@dataclass(frozen=True)
class Fault:
    """A test hook: raise in ``stage`` at its ``step``-th training batch (1-based)."""

    stage: int
    step: int

    @classmethod
    def parse(cls, text: str | None) -> "Fault | None":
        if not text:
            return None
        stage, step = text.split(":")
        return cls(int(stage), int(step))


def run_stage(stage: Stage, index: int, inbox: Channel, outbox: Channel | None,
              report: Callable[[dict], None], device: torch.device, save_dir: str | None,
              fault: Fault | None = None, steps: int = 0) -> None:
    """Serve messages until STOP. ``outbox`` is None for the last stage, whose output is the
    logits; ``report`` receives a dict at every END_EPOCH and the final weights at STOP.
    ``steps`` counts the training batches done over the whole run (a resume starts above 0)."""
    timer = StageTimer()

    def send(msg: Message) -> None:
        if outbox is not None:
            timer.send_wait_s += outbox.put(depart(msg))

    while True:
        timer.occupancy.append(inbox.qsize())
        msg, waited = inbox.get()
        timer.recv_wait_s += waited
        start = time.perf_counter()
        msg = arrive(msg, device)
        if msg.kind == Kind.TRAIN:
            if timer.train_start is None:
                timer.train_start = time.time()
            steps += 1
            if fault is not None and fault.stage == index and fault.step == steps:
                raise RuntimeError(f"injected fault at training step {steps}")
            stage.train()
            stage.set_epoch(msg.epoch)
            out, update = stage.train_step(msg.x, msg.y)
            busy = time.perf_counter() - start
            send(replace(msg, x=out))
            start = time.perf_counter()
            update()
            _sync(device)
            timer.busy_s += busy + time.perf_counter() - start
            timer.train_end = time.time()
            timer.train_samples += msg.y.size(0)
            continue
        if msg.kind == Kind.EVAL:
            stage.eval()
            out = stage.eval_step(msg.x, msg.y)
            _sync(device)
            timer.busy_s += time.perf_counter() - start
            send(replace(msg, x=out))
            continue
        send(msg)
        if msg.kind == Kind.END_EPOCH:
            files = []
            if save_dir:
                files.append(checkpoint.save_stage(save_dir, msg.epoch, index,
                                                   stage.checkpoint_state()))
            report({"kind": "epoch", "stage": index, "epoch": msg.epoch, "step": steps,
                    "units": stage.indices, "meters": stage.take_meters(),
                    "timing": timer.take(), "memory": memory_stats(device), "files": files})
        else:  # STOP
            report({"kind": "final", "stage": index,
                    "state": {k: v.detach().cpu() for k, v in stage.state_dict().items()}})
            return


def _sync(device: torch.device) -> None:
    """On a GPU, make busy time mean device time (timing only; correctness needs no sync)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
