"""Moving messages between neighbouring stages; nothing here knows what a stage computes.

Inside a process, neighbours share a bounded ``Channel``. Between processes, a ``DistSender``
thread drains the upstream process's outgoing channel into ``torch.distributed`` sends and a
``DistReceiver`` thread fills the downstream process's incoming channel, so a worker sees the
same ``Channel`` whichever way its stage is run. Every wait has a timeout and every wait gives up
at once when any stage of the run has failed.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, replace
from enum import IntEnum

import torch
import torch.distributed as dist
from torch import Tensor


class Kind(IntEnum):
    TRAIN = 0
    EVAL = 1
    END_EPOCH = 2  # every batch of the epoch, train and test, has gone before it
    STOP = 3
    CHECKPOINT = 4  # save now; (epoch, step) is where training continues


@dataclass
class Message:
    kind: Kind
    epoch: int
    step: int  # batch index within the epoch's train or test pass
    x: Tensor | None = None
    y: Tensor | None = None
    ready: torch.cuda.Event | None = None  # in-process CUDA: x and y are ready once it fires


class StageFailed(RuntimeError):
    def __init__(self, stage: int, reason: str) -> None:
        super().__init__(f"stage {stage} failed: {reason}")
        self.stage = stage


class Abort:
    """The run-wide failure flag of one process: the first failure wins and stops every wait."""

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
    """A bounded FIFO of messages between two neighbours: ``depth`` in flight gives backpressure."""

    def __init__(self, depth: int, abort: Abort, timeout: float, name: str) -> None:
        self._queue: queue.Queue[Message] = queue.Queue(maxsize=depth)
        self.abort, self.timeout, self.name = abort, timeout, name

    def put(self, msg: Message, timeout: float | None = -1.0) -> float:
        """Enqueue; return the seconds spent blocked on a full queue. ``timeout`` defaults to
        --comm-timeout; None waits for as long as no stage fails."""
        return self._wait(lambda: self._queue.put(msg, timeout=POLL_S), "send to", timeout)[1]

    def get(self, timeout: float | None = -1.0) -> tuple[Message, float]:
        """Dequeue; return the message and the seconds spent waiting for it."""
        return self._wait(lambda: self._queue.get(timeout=POLL_S), "receive from", timeout)

    def qsize(self) -> int:
        return self._queue.qsize()

    def _wait(self, op, verb: str, timeout: float | None):
        limit = self.timeout if timeout == -1.0 else timeout
        start = time.perf_counter()
        while True:
            self.abort.check()
            try:
                return op(), time.perf_counter() - start
            except (queue.Full, queue.Empty):
                waited = time.perf_counter() - start
                if limit is not None and waited > limit:
                    raise TimeoutError(f"could not {verb} {self.name} for {waited:.0f} s "
                                       f"(--comm-timeout {limit:g})") from None


# ------------------------------------------------------------------- CUDA streams in a process
def depart(msg: Message) -> Message:
    """Mark the moment the producing stream finished x and y (no-op off CUDA)."""
    if msg.x is not None and msg.x.is_cuda:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(msg.x.device))
        return replace(msg, ready=event)
    return msg


def arrive(msg: Message, device: torch.device) -> Message:
    """Make x and y safe to use on this thread's stream and device.

    The consumer's stream waits for the producer's event, and ``record_stream`` keeps the
    caching allocator from reusing the memory while this stream may still read it.
    """
    if msg.x is None:
        return msg
    x, y = msg.x, msg.y
    if msg.ready is not None:
        stream = torch.cuda.current_stream(device)
        stream.wait_event(msg.ready)
        x.record_stream(stream)
        y.record_stream(stream)
    if x.device != device:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return replace(msg, x=x, y=y, ready=None)


# ----------------------------------------------------------------- between processes
HEADER_LEN = 8  # kind, epoch, step, ndim, then up to four dimensions of x


def _header(msg: Message, device: torch.device) -> Tensor:
    shape = [] if msg.x is None else list(msg.x.shape)
    if len(shape) > HEADER_LEN - 4:
        raise ValueError(f"activations of {len(shape)} dimensions cannot be sent")
    values = [int(msg.kind), msg.epoch, msg.step, len(shape), *shape]
    return torch.tensor(values + [0] * (HEADER_LEN - len(values)), dtype=torch.int64,
                        device=device)


class _Link(threading.Thread):
    """A thread that pumps messages between a channel and one neighbouring rank. Any error
    (a dead peer, a broken connection) goes to ``on_error``: the whole run must stop."""

    def __init__(self, channel: Channel, group, peer: int, device: torch.device,
                 on_error, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.channel, self.group, self.peer, self.device, self.on_error = (
            channel, group, peer, device, on_error)

    def run(self) -> None:
        try:
            _use_device(self.device)
            self.pump()
        except Exception as exc:
            self.on_error(f"lost the link to stage {self.peer}: {_first_line(exc)}")

    def pump(self) -> None:
        raise NotImplementedError


class DistSender(_Link):
    """Sends each message of ``channel`` to rank ``peer``: a fixed-size header, then x and y.

    Plain blocking sends in order, one link per process group: ``batch_isend_irecv`` can hang
    on gloo. The channel in front of it holds the ``--queue-depth`` messages in flight.
    """

    def __init__(self, channel: Channel, group, peer: int, device: torch.device,
                 on_error) -> None:
        super().__init__(channel, group, peer, device, on_error, f"send-to-{peer}")

    def pump(self) -> None:
        while True:
            msg, _ = self.channel.get(timeout=None)
            dist.send(_header(msg, self.device), dst=self.peer, group=self.group)
            if msg.x is not None:
                dist.send(msg.x.contiguous(), dst=self.peer, group=self.group)
                dist.send(msg.y, dst=self.peer, group=self.group)
            if msg.kind == Kind.STOP:
                return


class DistReceiver(_Link):
    """Receives messages from rank ``peer`` into ``channel`` (blocking while it is full)."""

    def __init__(self, channel: Channel, group, peer: int, device: torch.device,
                 on_error) -> None:
        super().__init__(channel, group, peer, device, on_error, f"recv-from-{peer}")

    def pump(self) -> None:
        while True:
            header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
            dist.recv(header, src=self.peer, group=self.group)
            kind, epoch, step, ndim, *dims = header.tolist()
            msg = Message(Kind(kind), epoch, step)
            if ndim:
                msg.x = torch.empty(dims[:ndim], device=self.device)
                msg.y = torch.empty(dims[0], dtype=torch.int64, device=self.device)
                dist.recv(msg.x, src=self.peer, group=self.group)
                dist.recv(msg.y, src=self.peer, group=self.group)
            self.channel.put(msg, timeout=None)
            if msg.kind == Kind.STOP:
                return


def _use_device(device: torch.device) -> None:
    """The current CUDA device is per thread: a link thread must pick its rank's GPU itself."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def _first_line(exc: Exception) -> str:
    text = (str(exc).splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text[:200]}"
