"""The stage loop: the one place where a stage meets its messages.

For every training batch a worker forwards its units, hands the detached output on at once and
only then runs its last unit's backward and optimizer step (§4.3): it never waits for a later
stage. Evaluation batches stream through the same path. A marker (end of epoch, checkpoint) is
forwarded first; then the stage snapshots its state and goes straight on with the next batch,
while its checkpoint writer puts the file on disk and passes the report on. Since every link is
FIFO, each stage saves after exactly the same batches: a consistent cut, without draining.
"""
from __future__ import annotations

import hashlib
import math
import time
from typing import Callable, Iterator

import torch

from localpipe.pipeline import checkpoint
from localpipe.pipeline import device as dev
from localpipe.pipeline.channel import Channel, StageFailed
from localpipe.pipeline.memory import DeviceMemory, StageMemory
from localpipe.pipeline.message import Kind, Message
from localpipe.pipeline.metrics import StageTimer
from localpipe.stages.blocks import NonFiniteLoss
from localpipe.stages.config import Config
from localpipe.stages.stage import Stage


class StepLog:
    """Every ``every`` training batches (over the whole run), each unit's local loss of that
    batch, for ``steps.jsonl``: copied to the host on the stage's stream without a wait, and
    reported once the copy is done (and, under --on-nan stop, the batch cleared by the
    ``LossWatch``: no record after a bad batch), or at the next marker."""

    def __init__(self, every: int, index: int, report: Callable[[dict], None]) -> None:
        self.every, self.index, self.report = every, index, report
        self.pending: list[tuple] = []

    def after(self, stage: Stage, msg: Message, steps: int, cleared: float = math.inf) -> None:
        if self.every and steps % self.every == 0:
            units = [u for u in stage.units if u.last_loss is not None]
            values, ready = dev.to_host_later(torch.stack([u.last_loss for u in units]))
            self.pending.append((ready, values, [u.index for u in units], {
                "kind": "log", "stage": self.index, "replica": stage.replica,
                "epoch": msg.epoch, "step": msg.step, "steps": steps, "time": time.time()}))
        self.flush(cleared=cleared)

    def flush(self, wait: bool = False, cleared: float = math.inf) -> None:
        """Report the records whose copies have landed (all, waiting, with ``wait``) up to
        the ``cleared`` training batch."""
        while self.pending and self.pending[0][3]["steps"] <= cleared \
                and (wait or dev.fired(self.pending[0][0])):
            ready, values, units, r = self.pending.pop(0)
            if ready is not None:
                ready.synchronize()
            self.report({**r, "losses": dict(zip(units, values.tolist()))})


class LossWatch:
    """Under --on-nan stop, whether any unit's loss of a training batch was NaN or infinite,
    found without the stage ever waiting for its device: each batch's losses (the units'
    ``last_loss``, on the device already) are kept by reference, and every ``every`` batches
    stacked and copied to the host without a wait, and looked at once the copy has landed. At
    a marker the worker waits for the look (``check(wait=True)``), so no checkpoint, record,
    evaluation or model is written after a bad batch. The run stops naming the first bad
    batch and its first unit, however late it looked. (The bad batch's update was never
    applied: ``stages.blocks.Update`` skips it on the device.)"""

    def __init__(self, every: int = 64) -> None:
        self.every = every
        self.batches: list[tuple[int, int, int, list[int], list[torch.Tensor]]] = []
        self.pending: list[tuple] = []  # (event, host values, batches)
        self.cleared = 0  # the training batches (counted over the run) known to be finite

    def after(self, stage: Stage, msg: Message, steps: int) -> None:
        """Keep batch ``steps`` (over the run; ``msg`` says where it sits) for a look."""
        units = [u for u in stage.units if u.last_loss is not None]
        self.batches.append((steps, msg.epoch, msg.step, [u.index for u in units],
                             [u.last_loss for u in units]))
        if len(self.batches) >= self.every:
            self._look()
        self.check()

    def _look(self) -> None:
        losses = [t for *_, batch in self.batches for t in batch]
        if losses:
            values, ready = dev.to_host_later(torch.stack(losses))
            self.pending.append((ready, values, self.batches))
        elif self.batches and not self.pending:  # nothing to look at: nothing can be bad
            self.cleared = self.batches[-1][0]
        self.batches = []

    def check(self, wait: bool = False) -> None:
        """Raise NonFiniteLoss for the first bad batch among those looked at (all of them,
        waiting for the copies, with ``wait``)."""
        if wait:
            self._look()
        while self.pending and (wait or dev.fired(self.pending[0][0])):
            ready, values, batches = self.pending.pop(0)
            if ready is not None:
                ready.synchronize()
            if bool(torch.isfinite(values).all()):  # a host tensor: no device wait
                self.cleared = batches[-1][0]
                continue
            values, at = values.tolist(), 0
            for _, epoch, step, units, losses in batches:
                for unit, value in zip(units, values[at:at + len(losses)]):
                    if not math.isfinite(value):
                        raise NonFiniteLoss(f"unit {unit}: loss is {value} at epoch {epoch}, "
                                            f"batch {step + 1}")
                at += len(losses)


FEED = "feed"  # the watchdog's name for the data feed


class Watchdog:
    """When each stage of a process (and the data feed) began the message it is on. One that
    spends more than --comm-timeout seconds on one message is stuck (in a device wait that
    never returns, say): it is named, the earliest first, never the neighbours that wait for
    it, which wait without a limit of their own."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.since: dict[int | str, float] = {}

    def begin(self, who: int | str) -> None:
        self.since[who] = time.monotonic()

    def end(self, who: int | str) -> None:
        self.since.pop(who, None)

    def stuck(self) -> StageFailed | None:
        now = time.monotonic()
        late = [(since, who) for who, since in list(self.since.items())
                if now - since > self.limit]
        if not late:
            return None
        since, who = min(late, key=lambda item: item[0])
        what = "the data feed: stuck" if who == FEED else "stuck"
        return StageFailed(0 if who == FEED else who,
                           f"{what} for {now - since:.0f} s on one message "
                           f"(--comm-timeout {self.limit:g})")


def watched(messages: Iterator[Message], watchdog: Watchdog) -> Iterator[Message]:
    """``messages``, with ``watchdog`` told how long the feed takes to make each one (not
    how long it then waits for room in stage 0's queue)."""
    it = iter(messages)
    while True:
        watchdog.begin(FEED)
        try:
            msg = next(it)
        except StopIteration:
            return
        finally:
            watchdog.end(FEED)
        yield msg


def check_evaluation(meters: dict[int, dict[str, dict]], epoch: int) -> None:
    """--on-nan stop holds at evaluation too: the first unit whose test (or validation) loss
    was NaN or infinite on some batch of ``epoch`` stops the run, named."""
    for index, phases in sorted(meters.items()):
        for phase in ("val", "test"):
            if phases[phase]["nonfinite"]:
                raise NonFiniteLoss(f"unit {index}: {phases[phase]['nonfinite']} {phase} "
                                    f"batch(es) gave a non-finite loss in the evaluation of "
                                    f"epoch {epoch}")


def digest(state: dict[str, torch.Tensor]) -> str:
    """A fingerprint of a stage's final state: replicas that kept one model agree on it."""
    sha = hashlib.sha256()
    for name, t in state.items():
        sha.update(name.encode())
        sha.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def run_stage(stage: Stage, index: int, inbox: Channel, outbox: Channel | None,
              report: Callable[[dict], None], device: torch.device, cfg: Config,
              steps: int = 0,
              devices: DeviceMemory | None = None, watchdog: Watchdog | None = None) -> None:
    """Serve messages until STOP. ``outbox`` is None for the last stage, whose output is the
    logits. ``report`` receives, in order, a dict for every END_EPOCH and CHECKPOINT marker
    (once this stage's file is written in ``cfg.save_dir``) and the final weights at STOP;
    every --log-every training batches, each unit's loss ("log"). ``steps`` counts the training
    batches done over the whole run (a resumed run starts above 0). ``devices`` samples the
    process's device memory at epoch ends, once all of its stages on ``device`` have got there
    (by default this stage is the only one); ``watchdog`` is told when the stage starts and
    ends each message."""
    timer = StageTimer(device)
    memory = StageMemory(stage, inbox.nbytes)
    devices = devices or DeviceMemory([device])
    writer = checkpoint.Writer(cfg.save_dir, index, report)
    watchdog = watchdog or Watchdog(float("inf"))
    step_log = StepLog(cfg.log_every, index, report)
    watch = LossWatch() if cfg.on_nan == "stop" else None

    def send(msg: Message) -> None:
        if outbox is not None:
            timer.send_wait_s += outbox.put(msg.depart())

    def train(msg: Message) -> None:
        stage.train()
        stage.set_position(msg.epoch, msg.step)
        started = timer.clock.start()
        skips = msg.skips()
        with memory.watching():
            out, update = stage.train_step(msg.x, msg.y, skips)
            if stage.replicas is not None:  # the replicas' sum is issued before any blocking
                update.begin()  # put, so every rank issues its collectives in one order
        timer.clock.stop(started)
        send(msg.handing_on(out, skips))
        started = timer.clock.start()
        if stage.replicas is None:
            update.begin()
        update.finish()
        timer.clock.stop(started)
        memory.after_step()

    try:
        while True:
            writer.check()
            timer.occupancy.append(inbox.qsize())
            memory.saw_queue()
            watchdog.end(index)
            msg, waited = inbox.get()
            watchdog.begin(index)
            timer.recv_wait_s += waited
            msg = msg.arrive(device)
            if msg.kind == Kind.TRAIN:
                if timer.train_start is None:
                    timer.train_start = time.time()
                steps += 1
                train(msg)
                if watch is not None:
                    watch.after(stage, msg, steps)
                timer.train_end = time.time()
                timer.train_samples += msg.y.size(0)
                step_log.after(stage, msg, steps, math.inf if watch is None else watch.cleared)
                continue
            if msg.kind in (Kind.EVAL, Kind.VALID):
                stage.eval()
                started = timer.clock.start()
                skips = msg.skips()
                out = stage.eval_step(msg.x, msg.y, "val" if msg.kind == Kind.VALID else "test",
                                      skips)
                timer.clock.stop(started)
                send(msg.handing_on(out, skips))
                continue
            if watch is not None:  # a marker: no file is written after a bad batch
                watch.check(wait=True)
            send(msg)
            step_log.flush(wait=True)  # a marker: every logged batch is reported before it
            if msg.kind == Kind.STOP:
                writer.close()  # every checkpoint report goes out before the final one
                state = {k: v.detach().cpu() for k, v in stage.state_dict().items()}
                report({"kind": "final", "stage": index, "replica": stage.replica,
                        "stopped": msg.flag,
                        "digest": digest(state) if cfg.replicas > 1 else None,
                        "state": state if stage.replica == 0 else None})
                return
            # END_EPOCH or CHECKPOINT: every batch before the marker is done here, and only those
            r = {"kind": msg.kind.name.lower(), "stage": index, "replica": stage.replica,
                 "epoch": msg.epoch, "step": msg.step, "steps": steps, "units": stage.indices}
            if msg.kind == Kind.END_EPOCH:
                own = memory.take()
                done = msg.step >= stage.epoch_steps  # else --max-steps cut it short
                r.update(meters=stage.take_meters(done), timing=timer.take(), memory=own,
                         device_memory=devices.epoch_end(device, msg.epoch, index,
                                                         own["current_bytes"]))
                if cfg.on_nan == "stop":  # before this epoch's checkpoint or record is written
                    check_evaluation(r["meters"], msg.epoch)
            r["evaluate"] = msg.kind == Kind.CHECKPOINT and msg.flag
            state = stage.checkpoint_state() if cfg.save_dir else None  # every replica sums
            writer.submit(steps, r["evaluate"], state if stage.replica == 0 else None, r)
    finally:
        writer.abandon()
