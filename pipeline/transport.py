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
   NCCL call of a process is made under one lock (``NCCL_LOCK``). With NCCL the calls only
   enqueue work (``Work.wait`` makes the link stream wait, it does not block the host), so the
   lock is held for microseconds, except at a link's first operation, when the pair's
   connection is set up, a host-blocking meeting with the peer (and throughout, if the user
   sets TORCH_NCCL_BLOCKING_WAIT). Holding the lock then cannot deadlock either: a rank waits
   in it only for a peer that is about to post the matching half, with its own lock free or
   held for the same reason further down the pipeline, which ends at the last stage.
2. NCCL kernels block until their peer's kernel runs, and any device-wide synchronisation
   (a ``cudaFree`` for one) then waits for them: two communicators in flight can deadlock when
   their operations depend on each other in different orders on different ranks. Here every
   NCCL operation is enqueued only after its counterpart has been announced on the control
   plane: the sender first waits on the host for its tensors to be computed, then sends the
   header, then enqueues the send; the receiver enqueues the matching receive as soon as the
   header arrives, depending on nothing else. No NCCL kernel therefore waits for work that
   depends on its own rank's progress, so no cycle can form, and a kernel's wait is bounded by
   its peer posting the other half.
3. Each communicator joins two ranks only and is used by exactly one thread on each side, in
   message order, so operations on any one communicator are issued in the same order on both
   ranks, as NCCL requires.

One thread per rank issuing every NCCL call was the alternative; it would have to multiplex
blocking gloo receives with NCCL calls in a polling loop, and buys nothing over rule 1's lock.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from localpipe.pipeline import device as dev
from localpipe.pipeline.channel import Channel
from localpipe.pipeline.message import HEADER_LEN, Kind, TensorSpec, decode, decode_spec, encode

OnError = Callable[[int, BaseException], None]  # a link to rank ``peer`` broke

NCCL_LOCK = threading.Lock()  # rule 1 above: one NCCL call at a time in a process


class HostPayload:
    """Tensors over the link's gloo group, through host memory (pinned for a GPU)."""

    name = "gloo through host memory"

    def __init__(self, group, peer: int, device: torch.device) -> None:
        self.group, self.peer, self.device = group, peer, device

    def prepare(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Host copies, complete when this returns (a GPU's tensors go to pinned buffers)."""
        return dev.to_host(tensors)

    def send(self, tensors: dict[str, Tensor]) -> None:
        for t in tensors.values():
            dist.send(t.contiguous(), dst=self.peer, group=self.group)

    def recv(self, specs: list[TensorSpec]) -> dict[str, Tensor]:
        out = {}
        for name, dtype, shape in specs:
            buffer = dev.host_buffer(shape, dtype, self.device)
            dist.recv(buffer, src=self.peer, group=self.group)
            out[name] = dev.to(buffer, self.device)  # on the link stream, no host wait
        return out


class NcclPayload:
    """Tensors GPU to GPU over the link's NCCL group, on the link thread's stream."""

    name = "NCCL"

    def __init__(self, group, peer: int, device: torch.device) -> None:
        self.group, self.peer, self.device = group, peer, device

    def prepare(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Wait on the host until the tensors are computed (rule 2: data before header)."""
        dev.current_stream(self.device).synchronize()
        return tensors

    def send(self, tensors: dict[str, Tensor]) -> None:
        for t in tensors.values():
            with NCCL_LOCK:
                dist.isend(t.contiguous(), dst=self.peer, group=self.group).wait()

    def recv(self, specs: list[TensorSpec]) -> dict[str, Tensor]:
        out = {}
        for name, dtype, shape in specs:
            buffer = torch.empty(shape, dtype=dtype, device=self.device)
            with NCCL_LOCK:
                dist.irecv(buffer, src=self.peer, group=self.group).wait()  # a stream wait
            out[name] = buffer
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
            tensors = self.link.payload.prepare(msg.tensors) if msg.tensors else {}
            header, spec = encode(msg)
            dist.send(header, dst=self.link.peer, group=self.link.group)
            if spec is not None:
                dist.send(spec, dst=self.link.peer, group=self.link.group)
                self.link.payload.send(tensors)
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
