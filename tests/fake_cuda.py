"""A fake CUDA layer: the stream logic of ``pipeline/device.py`` run, and checked, on the CPU.

``FakeCuda.install(monkeypatch)`` replaces torch.cuda's streams, events, current device and
current streams (per thread, as torch keeps them) with records, and lets CPU tensors stand
for GPU ones: a ``FakeCudaTensor`` is a CPU tensor whose ``device`` says ``cuda:i``. Nothing
runs asynchronously, so every value is right at once; what is checked is the order that the
code asks the devices for.

Each stream keeps a vector clock: how many operations it has queued, and how far it has
waited, through events, for every other stream. A GPU tensor remembers the stream from whose
pool the caching allocator gave it, the stream and tick of its last write, and the streams
``record_stream`` named. A read on stream S is safe when S has waited, directly or through
other streams, for the last write, and S is the tensor's own stream or one the allocator was
told about; a read on the host, when the reading thread has waited for the write (a stream's
or an event's ``synchronize``, an event's ``query``). ``problems`` lists every unsafe read,
``on_default`` every operation queued on a GPU's legacy default stream (what a thread gets
where it set no stream of its own), ``host_waits`` the thread of every host wait.

Copies follow torch (aten/src/ATen/native/cuda/Copy.cu): one between GPUs runs on the source
GPU's current stream, which first waits for the destination's current stream, and the
destination's current stream then waits for the copy; one from the host runs on the
destination's current stream; a result comes from the pool of its device's current stream.
"""
from __future__ import annotations

import contextlib
import itertools
import threading
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor

Clock = dict[int, int]  # stream id -> how many of its operations are known to be done


def _merge(into: Clock, other: Clock) -> None:
    for k, v in other.items():
        into[k] = max(into.get(k, 0), v)


class NotModelled(AssertionError):
    """The code under test did something on a fake GPU that this layer does not model."""


class FakeStream:
    def __init__(self, cuda: FakeCuda, device: torch.device, default: bool = False) -> None:
        self.cuda, self.device, self.default = cuda, device, default
        self.id = next(cuda.ids)
        self.clock: Clock = {self.id: 0}

    def wait_event(self, event: FakeEvent) -> None:
        self.cuda.wait(self, event.clock, "wait_event")

    def synchronize(self) -> None:
        self.cuda.host_wait(self.clock)

    def __repr__(self) -> str:
        return f"<{'default ' if self.default else ''}stream {self.id} on {self.device}>"


class FakeEvent:
    def __init__(self, cuda: FakeCuda, **_flags) -> None:
        self.cuda = cuda
        self.clock: Clock = {}

    def record(self, stream: FakeStream | None = None) -> None:
        stream = stream or self.cuda.current_stream()
        with self.cuda.lock:
            self.cuda.queue(stream, "an event's record")
            self.clock = dict(stream.clock)

    def query(self) -> bool:
        self.cuda.host_wait(self.clock)  # it has fired: the host now knows what came before
        return True

    def synchronize(self) -> None:
        self.cuda.host_wait(self.clock)

    def elapsed_time(self, end: FakeEvent) -> float:
        return 0.0


@dataclass
class Placement:
    """Where a fake GPU tensor lives, and what its reads must be ordered after."""

    device: torch.device
    pool: FakeStream  # the stream the caching allocator gave its memory to
    written: tuple[int, int] | None  # (stream id, tick) of its last write; None: never written
    recorded: set[int] = field(default_factory=set)  # streams named by record_stream


class FakeCudaTensor(Tensor):
    """A CPU tensor that stands for one on a GPU (its ``placement`` says where)."""

    placement: Placement

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func == Tensor.device.__get__:
            return args[0].placement.device
        if func == Tensor.is_cuda.__get__:
            return True
        if func == Tensor.copy_:
            return _layer.copy_to_host(*args, **kwargs)
        if func == Tensor.contiguous and args[0].is_contiguous():
            return args[0]
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if any(isinstance(o, Tensor) for o in (out if isinstance(out, (tuple, list)) else [out])):
            raise NotModelled(f"fake CUDA does not model {func} on a GPU tensor")
        return out

    def __repr__(self) -> str:
        return f"FakeCudaTensor(shape={tuple(self.shape)}, device={self.placement.device})"


_layer: FakeCuda  # the installed layer, for the tensors' __torch_function__


def value(t: Tensor) -> Tensor:
    """The CPU data behind a fake GPU tensor (the tensor itself for a host one)."""
    with torch._C.DisableTorchFunctionSubclass():
        return t.as_subclass(Tensor)


class FakeCuda:
    """The layer: each thread's current device and streams, and what the checks found."""

    def __init__(self, gpus: int = 2) -> None:
        self.ids = itertools.count(1)
        self.lock = threading.RLock()
        self.local = threading.local()
        self.defaults = {torch.device("cuda", k): FakeStream(self, torch.device("cuda", k), True)
                         for k in range(gpus)}
        self.problems: list[str] = []
        self.on_default: list[str] = []
        self.host_waits: list[str] = []

    def install(self, monkeypatch) -> FakeCuda:
        global _layer
        _layer = self
        to, empty = Tensor.to, torch.empty
        for name, fake in [("current_stream", self.current_stream),
                           ("Stream", self.make_stream), ("Event", self.make_event),
                           ("device", self.device_context), ("stream", self.stream_context)]:
            monkeypatch.setattr(torch.cuda, name, fake)
        monkeypatch.setattr(Tensor, "to", lambda t, *a, **k: self.to(to, t, *a, **k))
        monkeypatch.setattr(Tensor, "record_stream", lambda t, s: self.record_stream(t, s))
        monkeypatch.setattr(Tensor, "pin_memory", lambda t: t.clone())
        monkeypatch.setattr(torch, "empty", lambda *a, **k: self.empty(empty, *a, **k))
        return self

    # ------------------------------------------------------------ per-thread device and streams
    def device(self, device=None) -> torch.device:
        if isinstance(device, int):
            return torch.device("cuda", device)
        if device is None or torch.device(device).index is None:
            return torch.device("cuda", getattr(self.local, "device", 0))
        return torch.device(device)

    def _current(self) -> dict[torch.device, FakeStream]:
        return self.local.__dict__.setdefault("current", {})

    def current_stream(self, device=None) -> FakeStream:
        device = self.device(device)
        return self._current().get(device, self.defaults[device])

    def make_stream(self, device=None, **_priority) -> FakeStream:
        return FakeStream(self, self.device(device))

    def make_event(self, **flags) -> FakeEvent:
        return FakeEvent(self, **flags)

    @contextlib.contextmanager
    def device_context(self, device) -> Iterator[None]:
        before = self.device()
        self.local.device = self.device(device).index
        try:
            yield
        finally:
            self.local.device = before.index

    @contextlib.contextmanager
    def stream_context(self, stream: FakeStream | None) -> Iterator[None]:
        """torch.cuda.stream: the stream's device and the stream current, both put back after."""
        if stream is None:
            yield
            return
        current, before = self._current(), self._current().get(stream.device)
        with self.device_context(stream.device):
            current[stream.device] = stream
            try:
                yield
            finally:
                if before is None:
                    del current[stream.device]
                else:
                    current[stream.device] = before

    # ------------------------------------------------------------ ordering
    def queue(self, stream: FakeStream, what: str) -> int:
        """One operation on ``stream``; its tick."""
        with self.lock:
            if stream.default:
                self.on_default.append(f"{what} on {stream}")
            stream.clock[stream.id] += 1
            return stream.clock[stream.id]

    def wait(self, stream: FakeStream, clock: Clock, what: str) -> None:
        with self.lock:
            self.queue(stream, what)
            _merge(stream.clock, clock)

    def host_wait(self, clock: Clock) -> None:
        with self.lock:
            self.host_waits.append(threading.current_thread().name)
            _merge(self.local.__dict__.setdefault("host", {}), clock)

    def read(self, t: FakeCudaTensor, stream: FakeStream, what: str) -> None:
        """``stream`` reads ``t``: flag it unless ordered after the write and known to the
        allocator."""
        p = t.placement
        with self.lock:
            self.queue(stream, what)
            if p.written is not None and stream.clock.get(p.written[0], 0) < p.written[1]:
                self.problems.append(f"{what}: {stream} reads a tensor before waiting for its "
                                     f"write on stream {p.written[0]}")
            if stream is not p.pool and stream.id not in p.recorded:
                self.problems.append(f"{what}: {stream} reads a tensor of stream {p.pool.id}'s "
                                     f"pool without record_stream")

    def write(self, t: FakeCudaTensor, stream: FakeStream) -> None:
        t.placement.written = (stream.id, self.queue(stream, "a write"))

    def read_on_host(self, t: Tensor, what: str) -> None:
        """This thread reads a host tensor that a stream may have written."""
        written = getattr(t, "fake_written", None)
        host = self.local.__dict__.setdefault("host", {})
        if written is not None and host.get(written[0], 0) < written[1]:
            with self.lock:
                self.problems.append(f"{what}: the host reads a tensor before waiting for its "
                                     f"write on stream {written[0]}")

    def new(self, data: Tensor, device: torch.device, on: FakeStream | None = None
            ) -> FakeCudaTensor:
        """``data`` as a GPU tensor from the pool of this thread's current stream on ``device``,
        written by ``on`` (None: not written yet)."""
        t = data.as_subclass(FakeCudaTensor)
        t.placement = Placement(device, self.current_stream(device), None)
        if on is not None:
            self.write(t, on)
        return t

    def kernel(self, *inputs: FakeCudaTensor) -> FakeCudaTensor:
        """A kernel on this thread's current stream of the inputs' GPU: it reads each input
        and writes a new tensor, the first input plus one."""
        device = inputs[0].device
        assert all(t.device == device for t in inputs), "a kernel's inputs on two GPUs"
        stream = self.current_stream(device)
        for t in inputs:
            self.read(t, stream, "a kernel")
        return self.new(value(inputs[0]) + 1, device, stream)

    # ------------------------------------------------------------ torch's calls, faked
    def to(self, original, t: Tensor, *args, **kwargs) -> Tensor:
        target = kwargs.get("device", args[0] if args else None)
        fake, device_like = isinstance(t, FakeCudaTensor), isinstance(target, (str, torch.device))
        if not fake and not (device_like and torch.device(target).type == "cuda"):
            return original(t, *args, **kwargs)
        if not device_like or len(args) > 1 or set(kwargs) - {"device", "non_blocking"}:
            raise NotModelled(f"fake CUDA models .to(device, non_blocking) only: {args} {kwargs}")
        target = self.device(target)
        if not fake:  # from the host: on the destination's current stream
            return self.new(t.clone(), target, self.current_stream(target))
        if target == t.device:
            return t
        if target.type != "cuda":
            raise NotModelled("fake CUDA does not model .to(cpu); device.py copies with copy_")
        source, destination = self.current_stream(t.device), self.current_stream(target)
        self.wait(source, dict(destination.clock), "a copy's wait for its destination")
        self.read(t, source, f"a copy to {target}")
        out = self.new(value(t).clone(), target, source)
        self.wait(destination, dict(source.clock), "a wait for a copy")
        return out

    def copy_to_host(self, host: Tensor, t: FakeCudaTensor, non_blocking: bool = False
                     ) -> Tensor:
        """``host.copy_(t)``: on ``t``'s GPU's current stream."""
        if isinstance(host, FakeCudaTensor) or not isinstance(t, FakeCudaTensor):
            raise NotModelled("fake CUDA models copy_ from a GPU to the host only")
        stream = self.current_stream(t.device)
        self.read(t, stream, "a copy to the host")
        host.copy_(value(t))
        host.fake_written = (stream.id, self.queue(stream, "a write to the host"))
        if not non_blocking:
            self.host_wait(stream.clock)
        return host

    def record_stream(self, t: Tensor, stream: FakeStream) -> None:
        if not isinstance(t, FakeCudaTensor):
            raise NotModelled("record_stream of a host tensor")
        with self.lock:
            t.placement.recorded.add(stream.id)

    def empty(self, original, *size, device=None, pin_memory: bool = False, **kwargs) -> Tensor:
        if device is not None and torch.device(device).type == "cuda":
            return self.new(original(*size, **kwargs), self.device(device))
        return original(*size, device=device, **kwargs)  # pinned or not: host memory
