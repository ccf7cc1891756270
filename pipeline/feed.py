"""Stage 0's input: the run as a stream of batches and markers.

Each epoch's training batches, then its test batches, then END_EPOCH; a CHECKPOINT marker every
--checkpoint-every batches; STOP at the end. Batches are moved to stage 0's device here, on the
feed thread's own stream, and carry an event their consumer waits for.
"""
from __future__ import annotations

import sys
from typing import Iterator

import torch
from torch import Tensor

from pipeline import device as dev
from pipeline.checkpoint import Start
from pipeline.data import Batches
from pipeline.message import Kind, Message
from pipeline.signals import StopRequest
from stages.config import Config


def feed(cfg: Config, train: Batches, test: Batches, device: torch.device, start: Start,
         stop: StopRequest) -> Iterator[Message]:
    """The messages of the whole run from ``start`` on. ``--max-steps`` ends training after
    that many batches, still closing with an evaluation. A stop request ends it at once,
    after a checkpoint."""
    from tqdm import tqdm

    steps = start.steps
    for epoch in range(start.epoch, cfg.epochs + 1):
        if cfg.max_steps and steps >= cfg.max_steps:
            break
        first = start.step if epoch == start.epoch else 0
        bar = tqdm(total=len(train), initial=first, desc=f"epoch {epoch}", leave=False,
                   disable=not cfg.progress_bar, file=sys.stderr)
        for step, (x, y) in enumerate(train.epoch(epoch, first), first):
            yield batch(Kind.TRAIN, epoch, step, x, y, device)
            bar.update()
            steps += 1
            if stop.signum is not None:
                yield Message(Kind.CHECKPOINT, epoch, step + 1)
                yield Message(Kind.STOP, 0, 0)
                return
            if steps == cfg.max_steps:
                break
            if cfg.checkpoint_every and steps % cfg.checkpoint_every == 0 \
                    and step + 1 < len(train):  # an epoch's end checkpoints anyway
                yield Message(Kind.CHECKPOINT, epoch, step + 1)
        bar.close()
        fed = step + 1
        for step, (x, y) in enumerate(test.epoch(epoch)):
            yield batch(Kind.EVAL, epoch, step, x, y, device)
        yield Message(Kind.END_EPOCH, epoch, fed)
    yield Message(Kind.STOP, 0, 0)


def batch(kind: Kind, epoch: int, step: int, x: Tensor, y: Tensor,
          device: torch.device) -> Message:
    """A batch message on ``device``, copied without a host wait and stamped with its event."""
    return Message(kind, epoch, step, {"x": dev.to(x, device), "y": dev.to(y, device)}).depart()
