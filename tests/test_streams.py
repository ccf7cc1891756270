"""The GPU stream logic, on the CPU, through the fake CUDA layer of ``fake_cuda.py``: every
stream that reads a tensor handed over from another stream (a stage's, a link's, a copy's)
has waited for its producer's event and told the caching allocator it uses it; no work goes
to a GPU's legacy default stream; the host reads host copies only once they are done; a link
sends over NCCL without a host wait.

Covered: ``device.py``'s depart, arrive, to, to_host, to_host_later, fired, host_buffer, use
and new_stream, as the in-process runner (``run_threads``, ``run_stage``, the channels and the
feed's ``batch``) and the link threads (``Sender``, ``Receiver``, both payloads, over an
in-process stand-in for torch.distributed) call them. Not covered: real kernels and their
timing, the stage code on a GPU (the stages here are stand-ins that read every tensor they get
and write their output), NCCL itself, and torch's own bookkeeping (the caching allocator's
events, ProcessGroupNCCL's streams: the layer models each transfer as a read or write on the
link stream, which is how ProcessGroupNCCL orders it)."""
import collections
import functools
import queue
import threading
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist

from fake_cuda import FakeCuda, value
from localpipe.pipeline import device as dev
from localpipe.pipeline.channel import Abort, Channel, StageFailed
from localpipe.pipeline.feed import batch
from localpipe.pipeline.inprocess import run_threads
from localpipe.pipeline.message import Kind, Message
from localpipe.pipeline.transport import HostPayload, Link, NcclPayload, Receiver, Sender
from localpipe.stages.config import Config

GPU0, GPU1 = torch.device("cuda", 0), torch.device("cuda", 1)


@pytest.fixture
def cuda(monkeypatch) -> FakeCuda:
    return FakeCuda(gpus=2).install(monkeypatch)


def test_the_fake_layer_flags_a_read_without_the_wait_or_the_record(cuda):
    """The checks below mean something: a tensor read on a stream that neither waited for its
    write nor was recorded for it is flagged twice, and once both are done, not at all."""
    producer, consumer = dev.new_stream(GPU0), dev.new_stream(GPU0)
    with dev.use(GPU0, producer):
        t = cuda.kernel(cuda.new(torch.zeros(2), GPU0, producer))
        ready = dev.record(GPU0)
    with dev.use(GPU0, consumer):
        cuda.kernel(t)
        assert len(cuda.problems) == 2 and "before waiting" in cuda.problems[0] \
            and "without record_stream" in cuda.problems[1]
        cuda.problems.clear()
        consumer.wait_event(ready)
        t.record_stream(consumer)
        cuda.kernel(t)
    assert cuda.problems == [] and cuda.on_default == []


class RelayStage:
    """The least a stage does: it reads every tensor it is handed on its stream, writes its
    output there, and stage 0 adds a skip tensor that the last stage is the first to read."""

    replica, replicas, indices, units = 0, None, [], []

    def __init__(self, cuda: FakeCuda, index: int) -> None:
        self.cuda, self.index = cuda, index
        self.seen: list[tuple] = []

    def train_step(self, x, y, skips):
        return self.eval_step(x, y, "train", skips), NoUpdate()

    def eval_step(self, x, y, phase, skips):
        self.seen.append((phase, x.device, sorted(skips), value(x).clone(), value(y).clone()))
        out = self.cuda.kernel(x, y, *skips.values())
        if self.index == 0:
            skips["h"] = self.cuda.kernel(x)
        return out

    def train(self) -> None:
        pass

    def eval(self) -> None:
        pass

    def set_position(self, epoch: int, step: int) -> None:
        pass

    def parameters(self) -> list:
        return []

    def state_dict(self) -> dict:
        return {}


class NoUpdate:
    def begin(self) -> None:
        pass

    def finish(self) -> None:
        pass


def test_stage_threads_wait_for_and_record_every_tensor_they_are_handed(cuda):
    """Three stages as threads of the in-process runner, the first two sharing GPU 0 (one
    stream each) and the last on GPU 1 (a copy between GPUs), fed through the feed's own
    ``batch`` (a copy from the host)."""
    devices = [GPU0, GPU0, GPU1]
    stages = [RelayStage(cuda, k) for k in range(3)]
    xs = [torch.arange(12.0).view(4, 3) * s for s in range(4)]  # exact under + 1
    y = torch.arange(4)

    def messages():  # runs in the feed thread, on its stream
        for step, x in enumerate(xs[:3]):
            yield batch(Kind.TRAIN, 1, step, x, y, devices[0])
        yield batch(Kind.EVAL, 1, 0, xs[3], y, devices[0])
        yield Message(Kind.STOP, 0, 0)

    reports = []
    run_threads(Config(save_dir="", log_every=0, comm_timeout=60), stages, devices, messages(),
                reports.append)
    assert [r["kind"] for r in reports] == ["final"] * 3
    assert cuda.problems == [] and cuda.on_default == []
    for k, stage in enumerate(stages):
        assert [s[0] for s in stage.seen] == ["train"] * 3 + ["test"]
        for (phase, device, skips, x, got_y), want in zip(stage.seen, xs):
            assert device == devices[k] and skips == ([] if k == 0 else ["h"])
            assert torch.equal(x, want + k) and torch.equal(got_y, y)


def test_host_copies_are_read_only_once_done(cuda):
    """``to_host`` waits for its copies (gloo reads them at once); ``to_host_later``'s copy
    may be read once its event has fired, and not before."""
    stream = dev.new_stream(GPU0)
    with dev.use(GPU0, stream):
        t = cuda.kernel(cuda.new(torch.arange(3.0), GPU0, stream))
        host = dev.to_host({"t": t})["t"]
        cuda.read_on_host(host, "to_host")
        assert cuda.problems == [] and torch.equal(host, torch.arange(3.0) + 1)
        later, ready = dev.to_host_later(t)
        cuda.read_on_host(later, "to_host_later, too early")
        assert len(cuda.problems) == 1
        assert dev.fired(ready)
        cuda.read_on_host(later, "to_host_later")
    assert len(cuda.problems) == 1 and cuda.on_default == []


class P2POp(NamedTuple):
    op: object
    tensor: torch.Tensor
    peer: int
    group: str


class Wire:
    """torch.distributed between two threads of this process, a FIFO per group. A payload
    transfer reads or writes its tensor on the current (link) stream, as ProcessGroupNCCL
    orders it (its stream waits for the current one when posted, and the current one for it
    at ``Work.wait``), or on the host for a host tensor (gloo)."""

    def __init__(self, cuda: FakeCuda, monkeypatch) -> None:
        self.cuda = cuda
        self.queues: dict[str, queue.Queue] = collections.defaultdict(queue.Queue)
        for name in ("send", "recv", "batch_isend_irecv"):
            monkeypatch.setattr(dist, name, getattr(self, name))
        monkeypatch.setattr(dist, "P2POp", P2POp)

    def send(self, tensor, dst, group) -> None:
        self.queues[group].put(tensor.clone())

    def recv(self, tensor, src, group) -> None:
        tensor.copy_(self.queues[group].get(timeout=30))

    def batch_isend_irecv(self, ops: list[P2POp]) -> list:
        """Posts the operations without waiting, as NCCL does: a receive completes in its
        work's ``wait`` (which the transport calls after it has let go of the NCCL lock; a
        receive that waited here, under the lock, would keep the sender from posting)."""
        works = []
        for op in ops:
            t, gpu = op.tensor, op.tensor.is_cuda
            stream = self.cuda.current_stream(t.device) if gpu else None
            if op.op is dist.isend:
                if gpu:
                    self.cuda.read(t, stream, "a send")
                else:
                    self.cuda.read_on_host(t, "a send")
                self.queues[op.group].put(value(t).clone())
                works.append(Done())
            else:
                works.append(Received(self, op.group, t, stream))
        return works


class Done:
    def wait(self) -> None:
        pass


class Received:
    """A posted receive: its data lands when it is waited for."""

    def __init__(self, wire: Wire, group, tensor: torch.Tensor, stream) -> None:
        self.wire, self.group, self.tensor, self.stream = wire, group, tensor, stream

    def wait(self) -> None:
        value(self.tensor).copy_(self.wire.queues[self.group].get(timeout=30))
        if self.stream is not None:
            self.wire.cuda.write(self.tensor, self.stream)


@pytest.mark.parametrize("payload", [NcclPayload, HostPayload,
                                     functools.partial(NcclPayload, data_first=True)],
                         ids=["nccl", "host", "nccl-replicas"])
def test_links_send_only_what_their_stream_waited_for(cuda, monkeypatch, payload):
    """A stage on GPU 0 hands batches to its Sender; the Receiver's batches go to a stage on
    GPU 1. Every read is ordered after its write; over NCCL the sender never waits on the
    host (its stream waits for the stage's event instead), except with replicas, where it
    waits for its data before each header (transport.py, rule 2); over gloo the host reads
    only finished copies."""
    Wire(cuda, monkeypatch)
    abort, errors = Abort(), []

    def on_error(peer: int, exc: BaseException) -> None:
        errors.append(exc)
        abort.fail(StageFailed(peer, repr(exc)))

    outbox, inbox = Channel(2, abort, "out"), Channel(2, abort, "in")
    Sender(outbox, Link(1, "headers", payload("payloads", 1, GPU0)), GPU0, on_error).start()
    Receiver(inbox, Link(0, "headers", payload("payloads", 0, GPU1)), GPU1, on_error).start()
    sent = [torch.randn(2, 3, generator=torch.Generator().manual_seed(s)) for s in range(3)]

    def stage0() -> None:
        try:
            stream = dev.new_stream(GPU0)
            with dev.use(GPU0, stream):
                for step, x in enumerate(sent):
                    x = cuda.kernel(cuda.new(x, GPU0, stream))
                    outbox.put(Message(Kind.TRAIN, 0, step,
                                       tensors={"x": x, "y": cuda.kernel(x)}).depart())
                outbox.put(Message(Kind.STOP, 0, 0))
        except BaseException as exc:  # named in the test's failure, not lost with the thread
            on_error(-1, exc)

    threading.Thread(target=stage0, name="stage-0").start()
    got = []
    with dev.use(GPU1, dev.new_stream(GPU1)):
        while (msg := inbox.get()[0]).kind != Kind.STOP:
            msg = msg.arrive(GPU1)
            cuda.kernel(msg.x, msg.y)
            got.append(value(msg.x).clone())
    assert errors == [] and cuda.problems == [] and cuda.on_default == []
    assert all(torch.equal(g, x + 1) for g, x in zip(got, sent)) and len(got) == len(sent)
    if payload is NcclPayload:
        assert "send-to-1" not in cuda.host_waits
    elif isinstance(payload, functools.partial):
        assert "send-to-1" in cuda.host_waits
