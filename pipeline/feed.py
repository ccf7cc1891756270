"""Stage 0's input: the run as a stream of batches and markers.

Each epoch's training batches, then its test batches, then END_EPOCH; a CHECKPOINT marker every
--checkpoint-every batches; STOP at the end. Batches are made on stage 0's device (a GPU
from its own copy of the dataset; batches of a dataset given in Python are pinned on the host
and copied over), on the feed thread's own stream, and carry an event their consumer waits for.

With R replicas the feed of each (on its stage-0 rank) makes the same stream and sends the
shard of every batch that belongs to its replica; the feeds agree on stops (pipeline/replicas.py).

A position is (epoch, step, evaluate): the next training batch to run, and whether that
epoch's training is over and only its evaluation is still to do, which is where a stop during
an epoch's evaluation (or right after its last training batch) leaves a run. A CHECKPOINT
marker carries it as its ``flag``.
"""
from __future__ import annotations

import itertools
from typing import Callable, Iterator

import torch
from torch import Tensor

from localpipe.pipeline import console
from localpipe.pipeline import device as dev
from localpipe.pipeline.console import Progress
from localpipe.pipeline.checkpoint import Start
from localpipe.pipeline.data import Batches
from localpipe.pipeline.message import Kind, Message
from localpipe.pipeline.replicas import shard
from localpipe.pipeline.signals import StopRequest
from localpipe.stages.config import Config


def feed(cfg: Config, train: Batches, test: Batches, val: Batches | None,
         device: torch.device, start: Start, stop: StopRequest,
         replica: tuple[int, int] = (0, 1),
         agreement: Callable[[bool], bool] | None = None) -> Iterator[Message]:
    """The messages of the whole run from ``start`` on: each epoch's training batches, then its
    validation batches (with --val-split) and test batches, then END_EPOCH. ``--max-steps``
    ends training after that many batches, still closing with an evaluation. A confirmed stop
    request ends it after the batch in hand, with a checkpoint where training is to go on (none
    where the newest checkpoint already is). A progress bar follows the training batches of
    the whole run. ``replica`` is (r, R): this
    feed keeps shard r of R of every batch (an evaluation shard may be empty: it is not sent),
    shows progress only for r = 0, and asks ``agreement`` whether any feed has seen a stop."""
    r, replicas = replica
    steps = start.steps

    def mine(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return shard(x, r, replicas), shard(y, r, replicas)

    def stopping() -> bool:
        asked = stop.signum is not None
        return asked if agreement is None else agreement(asked)

    total = (cfg.epochs - start.epoch + 1) * len(train) - start.step
    if cfg.max_steps:
        total = max(0, min(total, cfg.max_steps - steps))
    progress = Progress(console.shown(cfg.progress_bar) and r == 0, cfg.epochs, total,
                        lines=r == 0)
    saved = (start.epoch, start.step, start.evaluate)  # the newest checkpoint's position
    try:
        for epoch in range(start.epoch, cfg.epochs + 1):
            fed = start.step if epoch == start.epoch else 0
            if not (epoch == start.epoch and start.evaluate):  # else it trained already
                if cfg.max_steps and steps >= cfg.max_steps:
                    break
                progress.epoch(epoch)
                for step, (x, y) in enumerate(train.epoch(epoch, fed, device), fed):
                    if stopping():
                        yield from _stopped(Message(Kind.CHECKPOINT, epoch, fed), saved)
                        return
                    yield batch(Kind.TRAIN, epoch, step, *mine(x, y), device)
                    progress.advance()
                    steps += 1
                    fed += 1
                    if steps == cfg.max_steps:
                        break
                    if cfg.checkpoint_every and steps % cfg.checkpoint_every == 0 \
                            and fed < len(train):  # an epoch's end checkpoints anyway
                        yield Message(Kind.CHECKPOINT, epoch, fed)
                        saved = (epoch, fed, False)
            progress.epoch(epoch, "evaluation")
            tests = itertools.chain(  # made batch by batch, as they go
                ((Kind.VALID, b) for b in (val.epoch(epoch, device=device) if val else ())),
                ((Kind.EVAL, b) for b in test.epoch(epoch, device=device)))
            for step, (kind, (x, y)) in enumerate(tests):
                if stopping():  # the evaluation starts over on resume
                    yield from _stopped(Message(Kind.CHECKPOINT, epoch, fed, flag=True), saved)
                    return
                x, y = mine(x, y)
                if len(y):
                    yield batch(kind, epoch, step, x, y, device)
            yield Message(Kind.END_EPOCH, epoch, fed)
            saved = (epoch + 1, 0, False) if fed == len(train) else (epoch, fed, False)
        yield Message(Kind.STOP, 0, 0)
    finally:
        progress.close()


def _stopped(checkpoint: Message, saved: tuple[int, int, bool]) -> Iterator[Message]:
    """A checkpoint where the run is to go on, unless the newest one is there already, then
    STOP, flagged as a run that stopped before its end."""
    if (checkpoint.epoch, checkpoint.step, checkpoint.flag) != saved:
        yield checkpoint
    yield Message(Kind.STOP, 0, 0, flag=True)


def batch(kind: Kind, epoch: int, step: int, x: Tensor, y: Tensor,
          device: torch.device) -> Message:
    """A batch message on ``device`` (copied without a host wait if made elsewhere), stamped
    with its event."""
    return Message(kind, epoch, step,
                   tensors={"x": dev.to(x, device), "y": dev.to(y, device)}).depart()
