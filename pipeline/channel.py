"""Bounded queues between the threads of one process, and the failure flag that stops them.

A ``Channel`` joins two neighbours (a stage and the next, a stage and its link thread, the feed
and stage 0): ``--queue-depth`` messages in flight give backpressure. Every wait polls the
process's ``Abort`` flag, so the first failure anywhere stops every thread within a poll. A
wait has no time limit of its own: a neighbour that takes too long is named by the watchdog
of the process that runs it (``pipeline/worker.py``), or by the control plane if it died or
froze, never by the stages that wait for it.
"""
from __future__ import annotations

import queue
import threading
import time

from localpipe.pipeline.message import Message


class StageFailed(RuntimeError):
    def __init__(self, stage: int, reason: str) -> None:
        super().__init__(f"stage {stage} failed: {reason}")
        self.stage, self.reason = stage, reason


class Abort:
    """The failure flag of one process: the first failure wins and stops every wait."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self.failure: StageFailed | None = None

    def fail(self, failure: StageFailed) -> None:
        with self._lock:
            if self.failure is None:
                self.failure = failure
        self._event.set()

    def check(self) -> None:
        if self._event.is_set():
            raise self.failure


POLL_S = 0.05


class Channel:
    """A bounded FIFO of messages that also counts the bytes of the tensors waiting in it."""

    def __init__(self, depth: int, abort: Abort, name: str) -> None:
        self._queue: queue.Queue[Message] = queue.Queue(maxsize=depth)
        self.abort, self.name = abort, name
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, msg: Message) -> float:
        """Enqueue; return the seconds spent blocked on a full queue."""
        size = msg.nbytes()
        with self._lock:  # counted before the consumer can take it, so never negative
            self._bytes += size
        try:
            return self._wait(lambda: self._queue.put(msg, timeout=POLL_S))[1]
        except BaseException:
            with self._lock:
                self._bytes -= size
            raise

    def get(self) -> tuple[Message, float]:
        """Dequeue; return the message and the seconds spent waiting for it."""
        msg, waited = self._wait(lambda: self._queue.get(timeout=POLL_S))
        with self._lock:
            self._bytes -= msg.nbytes()
        return msg, waited

    def qsize(self) -> int:
        return self._queue.qsize()

    def nbytes(self) -> int:
        """Bytes of the tensors of the messages in the queue now."""
        return self._bytes

    def _wait(self, op):
        start = time.perf_counter()
        while True:
            self.abort.check()
            try:
                return op(), time.perf_counter() - start
            except (queue.Full, queue.Empty):
                continue
