"""The stage loop: the one place where a stage meets its messages.

For every training batch a worker forwards its units, hands the detached output on at once and
only then runs its last unit's backward and optimizer step (§4.3): it never waits for a later
stage. Evaluation batches stream through the same path. A marker (end of epoch, checkpoint) is
forwarded, then the stage writes its checkpoint file and reports: since every link is FIFO,
each stage saves after exactly the same batches, a consistent cut without draining.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch

from pipeline import checkpoint
from pipeline.metrics import StageTimer, memory_stats
from pipeline.transport import Channel, Kind, Message, arrive, depart
from stages.blocks import NonFiniteLoss
from stages.stage import Stage


@dataclass(frozen=True)
class Fault:
    """A test hook, from LOCALPIPE_INJECT_FAULT="STAGE:STEP[:ACTION]": at its STEP-th training
    batch (1-based, over the whole run) stage STAGE raises ("raise"), kills its own process
    with SIGKILL on the first attempt of a torchrun job ("kill"), or feeds NaN into its
    units ("nan")."""

    stage: int
    step: int
    action: str = "raise"

    @classmethod
    def parse(cls, text: str | None) -> "Fault | None":
        if not text:
            return None
        stage, step, *action = text.split(":")
        return cls(int(stage), int(step), *action)

    def apply(self, index: int, steps: int, x: torch.Tensor) -> torch.Tensor:
        if (index, steps) != (self.stage, self.step):
            return x
        if self.action == "nan":
            return x * float("nan")
        if self.action == "kill":
            if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
                os.kill(os.getpid(), signal.SIGKILL)
            return x
        raise RuntimeError(f"injected fault at training step {steps}")


def run_stage(stage: Stage, index: int, inbox: Channel, outbox: Channel | None,
              report: Callable[[dict], None], device: torch.device, save_dir: str | None,
              fault: Fault | None = None, steps: int = 0) -> None:
    """Serve messages until STOP. ``outbox`` is None for the last stage, whose output is the
    logits. ``report`` receives a dict at every END_EPOCH and CHECKPOINT marker (after this
    stage has saved its file) and the final weights at STOP. ``steps`` counts the training
    batches done over the whole run (a resumed run starts above 0)."""
    timer = StageTimer()

    def send(msg: Message) -> None:
        if outbox is not None:
            timer.send_wait_s += outbox.put(depart(msg))

    def train(msg: Message, start: float) -> float:
        """Forward, hand on, update; return the busy seconds (sending excluded)."""
        x = msg.x if fault is None else fault.apply(index, steps, msg.x)
        stage.train()
        stage.set_epoch(msg.epoch)
        out, update = stage.train_step(x, msg.y)
        busy = time.perf_counter() - start
        send(replace(msg, x=out))
        start = time.perf_counter()
        update()
        _sync(device)
        return busy + time.perf_counter() - start

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
            try:
                timer.busy_s += train(msg, start)
            except NonFiniteLoss as exc:
                raise NonFiniteLoss(f"{exc} at epoch {msg.epoch}, batch {msg.step + 1}") from None
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
        if msg.kind == Kind.STOP:
            report({"kind": "final", "stage": index,
                    "state": {k: v.detach().cpu() for k, v in stage.state_dict().items()}})
            return
        # END_EPOCH or CHECKPOINT: every batch before the marker is done here, and only those
        r = {"kind": msg.kind.name.lower(), "stage": index, "epoch": msg.epoch,
             "step": msg.step, "steps": steps, "units": stage.indices}
        if msg.kind == Kind.END_EPOCH:
            r.update(meters=stage.take_meters(), timing=timer.take())
        r["files"] = [] if not save_dir else [
            checkpoint.save_stage(save_dir, steps, index, stage.checkpoint_state())]
        if msg.kind == Kind.END_EPOCH:  # after the save, whose buffers count too
            r["memory"] = memory_stats(device)
        report(r)


def _sync(device: torch.device) -> None:
    """On a GPU, make busy time mean device time (timing only; correctness needs no sync)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
