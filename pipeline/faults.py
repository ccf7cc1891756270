"""The test hook LOCALPIPE_INJECT_FAULT: a failure, a kill, a freeze, a stall, NaN or a signal
at a chosen batch, so that the tests can show every failure path. It is read from the
environment here and applied in one place (``pipeline/lifecycle.py``: the stage it acts in, and
the feed), so no production signature carries it; a run without the variable has none."""
from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch

from localpipe.pipeline.message import Kind, Message

ENV = "LOCALPIPE_INJECT_FAULT"


def injected(replica: int = 0, attempt: int | None = None) -> "Fault | None":
    """This process's hook: the variable's, if it acts in replica ``replica``; ``attempt``
    (from 1) of a torchrun job, where the runner counts them (else torchrun's restart count
    says whether this is the first)."""
    fault = Fault.parse(os.environ.get(ENV))
    if fault is None or attempt is None:
        return fault if fault is None or fault.replica == replica else None
    return fault.for_rank(replica, attempt)


@dataclass(frozen=True)
class Fault:
    """A test hook, from LOCALPIPE_INJECT_FAULT="WHERE[/REPLICA]:STEP[:ACTION[:DELAY]]".

    It acts in replica REPLICA (0 by default) only. WHERE is a stage index: at its STEP-th
    training batch (1-based, over the whole run) that stage raises ("raise"), kills its own
    process with SIGKILL in the first attempt of a torchrun job ("kill"), stops it with SIGSTOP
    ("freeze"), hangs in the batch for good ("stall": a stage thread that never wakes up, not
    even in a later test of the same process), or feeds NaN into its units ("nan").
    WHERE "feed" acts in the data feed before its STEP-th training batch, "eval" before the
    STEP-th test batch of any epoch; there "sigint" and "sigterm" send that signal to the feed's
    own process. DELAY seconds pass first (while the other stages and the checkpoint writers go
    on), so that a test can know the checkpoints taken a few batches before are complete."""

    stage: int | str
    step: int
    action: str = "raise"
    delay: float = 0.0
    replica: int = 0
    first_attempt: bool = True  # kill and freeze act in the first attempt only

    @classmethod
    def parse(cls, text: str | None) -> "Fault | None":
        if not text:
            return None
        where, step, *rest = text.split(":")
        where, _, replica = where.partition("/")
        action = rest[0] if rest else "raise"
        delay = float(rest[1]) if len(rest) > 1 else 0.0
        return cls(where if where in ("feed", "eval") else int(where), int(step), action, delay,
                   int(replica or 0),
                   os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0")

    def for_rank(self, replica: int, attempt: int) -> "Fault | None":
        """This hook in a process of replica ``replica`` in attempt ``attempt`` (from 1) of a
        torchrun job: None unless it acts there."""
        return replace(self, first_attempt=attempt == 1) if replica == self.replica else None

    def apply(self, index: int, steps: int, x: torch.Tensor) -> torch.Tensor:
        if (index, steps) != (self.stage, self.step):
            return x
        time.sleep(self.delay)
        if self.action == "nan":
            return x * float("nan")
        if self.action == "stall":
            threading.Event().wait()
        if self.action in ("kill", "freeze"):
            if self.first_attempt:
                os.kill(os.getpid(), signal.SIGKILL if self.action == "kill" else signal.SIGSTOP)
            return x
        raise RuntimeError(f"injected fault at training step {steps}")

    def in_feed(self, where: str, step: int, stop) -> None:
        """The feed's hook; a signal is followed by a wait (up to 10 s) until ``stop`` has
        confirmed it, so that the feed's next check sees it wherever the handler runs."""
        if (where, step) != (self.stage, self.step):
            return
        if self.action in ("sigint", "sigterm"):
            os.kill(os.getpid(), signal.SIGINT if self.action == "sigint" else signal.SIGTERM)
            deadline = time.monotonic() + 10
            while stop.signum is None and time.monotonic() < deadline:
                time.sleep(0.01)
            return
        raise RuntimeError(f"injected fault in the data feed at {where} batch {step}")

    def stage_hook(self, index: int, steps: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """What stage ``index`` applies to each training batch's input, ``steps`` batches
        having been trained before this run started (a resumed run counts on)."""
        count = steps

        def hook(x: torch.Tensor) -> torch.Tensor:
            nonlocal count
            count += 1
            return self.apply(index, count, x)
        return hook

    def feed(self, messages: Iterator[Message], steps: int, stop) -> Iterator[Message]:
        """``messages`` with the feed's hook before each training batch (counted over the run,
        from ``steps``) and before each evaluation batch (counted within its epoch)."""
        tested = 0
        for msg in messages:
            if msg.kind == Kind.TRAIN:
                steps += 1
                self.in_feed("feed", steps, stop)
            elif msg.kind in (Kind.EVAL, Kind.VALID):
                tested += 1
                self.in_feed("eval", tested, stop)
            elif msg.kind == Kind.END_EPOCH:
                tested = 0
            yield msg
