"""SIGINT and SIGTERM: a request to checkpoint where the run is and stop.

A signal is first *received*, and becomes the run's stop once confirmed: in-process at once;
under torchrun by the control plane, after it has checked that no stage died (torchrun's agent
signals the survivors when a worker dies, which is no request to stop) and told every rank,
whichever rank the signal reached. Signals within two seconds of the first count as one (a
scheduler signals every process, torchrun's agent forwards what it gets); a later one ends the
process at once.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

from localpipe.pipeline.console import say

REPEAT_S = 2.0


class StopRequest:
    def __init__(self) -> None:
        self.received: int | None = None  # the signal this process got, not yet acted on
        self.received_at = 0.0
        self.signum: int | None = None  # the confirmed stop: stage 0's feed acts on it
        self.confirm_at_once = True

    @contextlib.contextmanager
    def installed(self, confirm_at_once: bool = True):
        """Handle SIGINT and SIGTERM inside the block; the previous handlers come back after.
        ``confirm_at_once=False`` leaves confirmation to the control plane. Off the main thread
        (``lp.fit`` called from a thread of the user's) Python allows no handlers: none."""
        self.confirm_at_once = confirm_at_once
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT,
                                                                      signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def confirm(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum
            say(f"{signal.Signals(signum).name} received, saving a checkpoint and stopping")

    def _handle(self, signum, _frame) -> None:
        now = time.monotonic()
        if self.received is None:
            self.received, self.received_at = signum, now
            if self.confirm_at_once:
                self.confirm(signum)
            return
        if now - self.received_at < REPEAT_S:
            return
        say(f"second {signal.Signals(signum).name}, stopping at once without a checkpoint")
        os._exit(128 + signum)
