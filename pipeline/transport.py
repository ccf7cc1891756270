"""Moving messages between processes: a sender thread and a receiver thread per link.

A stage's worker only ever sees ``Channel``s. Between processes, a ``Sender`` thread drains the
upstream process's outgoing channel and a ``Receiver`` thread fills the downstream process's
incoming one, so the same stage code runs in-process and under torchrun.

Each message crosses in two planes:

- **Control**: its header (kind, epoch, step, then the names, dtypes and shapes of its tensors)
  goes over the link's own gloo group, on the CPU. Markers are headers alone, so nothing on the
  GPU ever stands between a marker and the stage that waits for it.
- **Payload**: the tensors, by one of two paths. ``NcclPayload`` sends them GPU to GPU over the
  link's NCCL group, on the link thread's own CUDA stream: the stage's stream never waits for
  a transfer, and the transfer waits for the stage only through events. ``HostPayload`` sends
  them over the gloo group itself: on the CPU that is all there is, and on a GPU the tensors
  go through pinned host buffers; that is the path when ranks share a GPU, which NCCL refuses.
  The CPU exercises the very code of the shared-GPU path, copies aside.

NCCL from several threads, and why it is sound here (NCCL user guide, "Thread safety" and
"Using multiple NCCL communicators concurrently"):

1. NCCL calls to independent communicators on one device must not be issued in parallel from
   several threads. A middle stage has two link threads with a communicator each, so every
   NCCL call of a process is made under one lock (``NCCL_LOCK``). A message's tensors are one
   ``batch_isend_irecv``, one NCCL group call (group start, a send or receive per tensor, group
   end) that only enqueues work; its ``Work.wait`` comes after the lock is released (with NCCL
   it makes the link stream wait for the transfer, and posts nothing). So the lock is held for
   microseconds, except at a link's first operation, when the pair's connection is set up, a
   host-blocking meeting with the peer. Holding the lock then cannot deadlock either: a rank
   waits in it only for a peer that is about to post the matching half, with its own lock free
   or held for the same reason further along the pipeline in the same direction, which ends at
   its first or last stage.
2. NCCL kernels block until their peer's kernel runs, and any device-wide synchronisation
   (a ``cudaFree`` for one) then waits for them: kernels on two communicators can deadlock
   when they wait for each other in different orders on different ranks. Here every NCCL
   operation is posted only after its counterpart has been announced on the control plane,
   and behind nothing but work already queued on its GPU: the sender makes its link stream
   wait for the producing stage's event (on the device: no host wait), sends the header, then
   posts the send; the receiver posts the matching receive as soon as the header arrives. A
   send kernel thus waits for compute already queued, which waits only for its stage's
   inbound receives, that is for the rank before, and so on back to the feed; and for its
   peer's receive, which the peer posts on the header whatever its GPU is doing (taking only
   the lock of rule 1). Every wait points one way along the pipeline, so no cycle can form.
   The price: a receive may sit on its GPU through the sender's compute, an NCCL kernel
   holding a few SMs while it waits. The exception is a run with replicas: there a stage's
   compute also waits for its replicas' all-reduces, which their hosts issue, and a host may
   block (on a full queue, or in a device-wide synchronisation that waits for a receive
   spinning on this very GPU), so a cycle through two replicas' hosts could form. With
   replicas the sender therefore waits on the host until its tensors are computed before it
   sends the header (``NcclPayload.data_first``), as every sender did before: no NCCL kernel
   is posted before the data it carries exists.
3. Each communicator joins two ranks only and is used by exactly one thread on each side, in
   message order, so operations on any one communicator are issued in the same order on both
   ranks, as NCCL requires.

One thread per rank issuing every NCCL call was the alternative; it would have to multiplex
blocking gloo receives with NCCL calls in a polling loop, and buys nothing over rule 1's lock.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from localpipe.pipeline import device as dev
from localpipe.pipeline.channel import Channel
from localpipe.pipeline.message import HEADER_LEN, Kind, TensorSpec, decode, decode_spec, encode

OnError = Callable[[int, BaseException], None]  # a link to rank ``peer`` broke

NCCL_LOCK = threading.Lock()  # rule 1 above: one NCCL call at a time in a process


class _Payload:
    """A link's payload path: each message's tensors as one batch of point-to-point operations
    with the peer, posted in one call, then waited for."""

    def __init__(self, group, peer: int, device: torch.device) -> None:
        self.group, self.peer, self.device = group, peer, device

    def posting(self) -> contextlib.AbstractContextManager:
        """What is held while a batch is posted."""
        return contextlib.nullcontext()

    def ready(self, tensors: dict[str, Tensor]) -> None:
        """Called before the header goes out; nothing to do unless a payload says so."""

    def batch(self, op: Callable, tensors: Iterable[Tensor]) -> None:
        """``op`` (``dist.isend`` or ``dist.irecv``) on every tensor of a message."""
        ops = [dist.P2POp(op, t, self.peer, self.group) for t in tensors]
        with self.posting():
            works = dist.batch_isend_irecv(ops)
        for work in works:
            work.wait()  # NCCL: the link stream waits, not the host; it posts nothing


class HostPayload(_Payload):
    """Tensors over the link's gloo group, through host memory (pinned for a GPU). gloo posts
    a batch's operations one by one (it has no coalescing), still without waiting in between."""

    name = "gloo through host memory"

    def send(self, tensors: dict[str, Tensor]) -> None:
        # gloo reads the buffers on the host, so this waits for the link stream's copies
        self.batch(dist.isend, [t.contiguous() for t in dev.to_host(tensors).values()])

    def recv(self, specs: list[TensorSpec]) -> dict[str, Tensor]:
        buffers = {name: dev.host_buffer(shape, dtype, self.device)
                   for name, dtype, shape in specs}
        self.batch(dist.irecv, buffers.values())
        return {name: dev.to(b, self.device)  # on the link stream, no host wait
                for name, b in buffers.items()}


class NcclPayload(_Payload):
    """Tensors GPU to GPU over the link's NCCL group, on the link thread's stream: one NCCL
    group call per message, ordered after the producing stage on the device alone (rule 2)."""

    name = "NCCL"

    def __init__(self, group, peer: int, device: torch.device,
                 data_first: bool = False) -> None:
        """``data_first``: wait on the host until the tensors are computed before the header
        goes out (rule 2's exception, with replicas)."""
        super().__init__(group, peer, device)
        self.data_first = data_first

    def posting(self) -> contextlib.AbstractContextManager:
        return NCCL_LOCK  # rule 1

    def ready(self, tensors: dict[str, Tensor]) -> None:
        if self.data_first and tensors:
            dev.current_stream(self.device).synchronize()

    def send(self, tensors: dict[str, Tensor]) -> None:
        """The link stream already waits for the stage that computed ``tensors`` (the Sender's
        ``arrive``), and the NCCL stream for the link stream: no host wait."""
        self.batch(dist.isend, [t.contiguous() for t in tensors.values()])

    def recv(self, specs: list[TensorSpec]) -> dict[str, Tensor]:
        out = {name: torch.empty(shape, dtype=dtype, device=self.device)
               for name, dtype, shape in specs}
        self.batch(dist.irecv, out.values())
        return out


@dataclass
class Link:
    """One neighbour of this rank: its global rank, the gloo group for headers, the payload."""

    peer: int
    group: dist.ProcessGroup
    payload: HostPayload | NcclPayload


class _LinkThread(threading.Thread):
    """Pumps messages between a channel and one neighbour on a CUDA stream of its own. Any
    error (a dead peer, a broken connection) goes to ``on_error(peer, exc)``."""

    def __init__(self, channel: Channel, link: Link, device: torch.device,
                 on_error: OnError, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.channel, self.link, self.device, self.on_error = channel, link, device, on_error

    def run(self) -> None:
        try:
            with dev.use(self.device, dev.new_stream(self.device)):
                self.pump()
        except Exception as exc:
            self.on_error(self.link.peer, exc)

    def pump(self) -> None:
        raise NotImplementedError


class Sender(_LinkThread):
    """Sends each message of ``channel`` to the next stage: header, tensor list, tensors."""

    def __init__(self, channel: Channel, link: Link, device: torch.device,
                 on_error: OnError) -> None:
        super().__init__(channel, link, device, on_error, f"send-to-{link.peer}")

    def pump(self) -> None:
        while True:
            msg, _ = self.channel.get()
            msg = msg.arrive(self.device)  # this stream waits for the producing stage
            header, spec = encode(msg)
            self.link.payload.ready(msg.tensors)
            dist.send(header, dst=self.link.peer, group=self.link.group)
            if spec is not None:
                dist.send(spec, dst=self.link.peer, group=self.link.group)
                self.link.payload.send(msg.tensors)
            if msg.kind == Kind.STOP:
                return


class Receiver(_LinkThread):
    """Receives messages from the previous stage into ``channel`` (blocking while it is full)."""

    def __init__(self, channel: Channel, link: Link, device: torch.device,
                 on_error: OnError) -> None:
        super().__init__(channel, link, device, on_error, f"recv-from-{link.peer}")

    def pump(self) -> None:
        while True:
            header = torch.empty(HEADER_LEN, dtype=torch.int64)
            dist.recv(header, src=self.link.peer, group=self.link.group)
            msg, length = decode(header)
            if length:
                spec = torch.empty(length, dtype=torch.uint8)
                dist.recv(spec, src=self.link.peer, group=self.link.group)
                msg.tensors = self.link.payload.recv(decode_spec(spec))
                msg = msg.depart()  # ready once this stream's copies or receives are done
            self.channel.put(msg)
            if msg.kind == Kind.STOP:
                return
