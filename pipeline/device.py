"""Devices, streams and events: the one place in localpipe that tells a CPU from a GPU.

Everything else is written once for both. On a GPU the stages, the link threads and the data
feed each work on a CUDA stream of their own, and tensors handed from one stream to another
travel with an event: the producer records it (``depart``), the consumer's stream waits for it
and tells the caching allocator that it uses the tensor too (``arrive``), so ordering lives on
the device and no thread ever waits for the host. On the CPU a stream is a placeholder, events
are None, and every helper is a no-op or a plain copy. (torchgpipe's ``stream.py`` is the model.)

Where each stage runs is decided here as well: one device per process under torchrun (ranks
share a GPU when two of them hold the same one, by its UUID), neighbouring stages grouped
contiguously when one process holds more stages than there are GPUs.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator, Union

import torch
from torch import Tensor


class CPUStream:
    """The stream of a CPU device: work on it is done by the time a call returns."""

    def __repr__(self) -> str:
        return "<CPU stream>"


CPU_STREAM = CPUStream()
Stream = Union[torch.cuda.Stream, CPUStream]
Event = torch.cuda.Event


def is_cuda(device: torch.device) -> bool:
    return torch.device(device).type == "cuda"


def choose(requested: str) -> torch.device:
    """The device type of a run: ``--device cuda|cpu|auto`` (auto: a GPU when one is visible).
    Raises ValueError when a GPU is asked for and none is there."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", 0)
    return torch.device("cpu")


def stage_devices(stages: int, first: torch.device) -> list[torch.device]:
    """The device of each of K in-process stages: on n GPUs, stage k goes to GPU ⌊k·n/K⌋, so
    neighbours share a GPU and only n − 1 stage boundaries cross devices."""
    if not is_cuda(first):
        return [first] * stages
    n = min(torch.cuda.device_count(), stages)
    return [torch.device("cuda", k * n // stages) for k in range(stages)]


def rank_device(kind: torch.device, local_rank: int) -> torch.device:
    """This rank's device under torchrun: local rank r takes GPU r mod n of the n GPUs it
    sees (all of the node's, or one of its own where CUDA_VISIBLE_DEVICES differs per rank).
    Whether ranks then share a GPU is ``shared_gpus``' to say, from the GPUs' identities."""
    if not is_cuda(kind):
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def bind(device: torch.device) -> None:
    """Make ``device`` this process's current GPU: every CUDA call that names no device (a
    collective's or ``gather_object``'s staging tensors, a library's workspace) uses it, and
    it is GPU 0 until set."""
    if is_cuda(device):
        torch.cuda.set_device(device)


def shared_gpus(uuids: list[str | None]) -> set[str]:
    """The GPUs (UUIDs) that two or more ranks hold, from every rank's ``uuid``: identity, not
    counts, tells, since a rank that sees one GPU sees it as GPU 0 whichever it is. CPU ranks
    (None) hold none."""
    held = [u for u in uuids if u is not None]
    return {u for u in held if held.count(u) > 1}


def memory(device: torch.device) -> tuple[int, str]:
    """The bytes a run can hope to use on ``device``'s kind, and what they are: the smallest
    visible GPU's memory, or this machine's RAM."""
    if is_cuda(device):
        n = torch.cuda.device_count()
        return min(torch.cuda.get_device_properties(k).total_memory for k in range(n)), "a GPU"
    with open("/proc/meminfo") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    return kib * 1024, "this machine's RAM"


def uuid(device: torch.device) -> str | None:
    """A GPU's identity across processes (NVML and CUDA number GPUs apart)."""
    return f"GPU-{torch.cuda.get_device_properties(device).uuid}" if is_cuda(device) else None


def gpu_mode(device: torch.device) -> str | None:
    """How ``device``'s GPU takes work from several processes: "MPS" where an MPS control
    daemon serves them (its pipe is visible), else NVML's compute mode: "DEFAULT" (they take
    turns, time-sliced), "EXCLUSIVE_PROCESS" (one process only), "PROHIBITED". None on the
    CPU, or where NVML cannot tell (no nvidia-ml-py, no driver library, a restricted
    container)."""
    if not is_cuda(device):
        return None
    pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    if os.path.exists(os.path.join(pipe, "control")):
        return "MPS"
    try:
        import pynvml

        pynvml.nvmlInit()
        mode = pynvml.nvmlDeviceGetComputeMode(pynvml.nvmlDeviceGetHandleByUUID(uuid(device)))
        return {pynvml.NVML_COMPUTEMODE_DEFAULT: "DEFAULT",
                pynvml.NVML_COMPUTEMODE_EXCLUSIVE_PROCESS: "EXCLUSIVE_PROCESS",
                pynvml.NVML_COMPUTEMODE_PROHIBITED: "PROHIBITED"}.get(mode)
    except Exception:
        return None


# ---------------------------------------------------------------------------- streams, events
def current_stream(device: torch.device) -> Stream:
    return torch.cuda.current_stream(device) if is_cuda(device) else CPU_STREAM


def new_stream(device: torch.device) -> Stream:
    return torch.cuda.Stream(device) if is_cuda(device) else CPU_STREAM


@contextlib.contextmanager
def use(device: torch.device, stream: Stream | None = None) -> Iterator[None]:
    """Make ``device`` (and ``stream`` on it) current for this thread: the current CUDA device
    and stream are per thread, so every thread that touches a GPU starts here."""
    if not is_cuda(device):
        yield
        return
    with torch.cuda.device(device):
        if stream is None:
            yield
        else:
            with torch.cuda.stream(stream):
                yield


def record(device: torch.device) -> Event | None:
    """An event marking what the current stream of ``device`` has queued so far."""
    if not is_cuda(device):
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def synchronize(device: torch.device) -> None:
    """Wait on the host for every stream of ``device`` (setup and measurement only)."""
    if is_cuda(device):
        torch.cuda.synchronize(device)


def depart(tensors: dict[str, Tensor]) -> Event | None:
    """Mark the moment the producing stream has finished writing ``tensors``."""
    first = next(iter(tensors.values()), None)
    return record(first.device) if first is not None else None


def arrive(tensors: dict[str, Tensor], ready: Event | None,
           device: torch.device) -> dict[str, Tensor]:
    """Make tensors from another stream (or GPU) safe to use on this thread's stream of
    ``device``: the one place where a stream waits for another's tensors.

    The stream that reads them waits for the producer's event, and ``record_stream`` keeps the
    caching allocator from reusing their memory while that stream may still read them. From
    another GPU, that stream is one of this thread's own on the source GPU, the copy's: torch
    runs a copy between GPUs on the *source*'s current stream (behind the destination's
    current stream, which then waits for the copy), and in a thread that never set one there,
    that is the legacy default stream, which every thread of the process shares. The copy's
    stream comes from torch's high-priority pool on the source GPU (handed out in turn, never
    created), which no stage or link stream is taken from (``new_stream``: the normal pool),
    so a copy never queues behind a stage's compute; the event orders it like any other."""
    if ready is None:  # host tensors (or a CPU run): nothing to wait for
        return {k: to(t, device) for k, t in tensors.items()}
    source = ready_device(tensors)
    stream = current_stream(device) if source == device else \
        torch.cuda.Stream(source, priority=-1)
    with torch.cuda.stream(stream):
        stream.wait_event(ready)
        for t in tensors.values():
            t.record_stream(stream)
        return {k: to(t, device) for k, t in tensors.items()}



def ready_device(tensors: dict[str, Tensor]) -> torch.device:
    return next(iter(tensors.values())).device


def to(tensor: Tensor, device: torch.device) -> Tensor:
    """Copy to ``device`` without a host sync: from the host (pinned first) on the current
    stream of ``device``; from another GPU only inside ``arrive``, which orders the copy."""
    if tensor.device == device:
        return tensor
    if is_cuda(device) and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def to_host(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Copies in host memory of ``tensors``, complete when this returns: pinned buffers filled on
    the current stream, which this thread then waits for (a link thread, never a stage's)."""
    out = {}
    for k, t in tensors.items():
        if t.is_cuda:
            buffer = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            buffer.copy_(t, non_blocking=True)
            out[k] = buffer
        else:
            out[k] = t
    first = next(iter(tensors.values()), None)
    if first is not None and first.is_cuda:
        torch.cuda.current_stream(first.device).synchronize()
    return out


def to_host_later(tensor: Tensor) -> tuple[Tensor, Event | None]:
    """A host copy of ``tensor`` that holds its values once the returned event has fired
    (None: at once); the copy is queued on the current stream, so nothing waits for it."""
    if not tensor.is_cuda:
        return tensor, None
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host, record(tensor.device)


def fired(event: Event | None) -> bool:
    return event is None or event.query()


def host_buffer(shape: list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A host tensor to receive into, pinned when it will go on to ``device``'s GPU."""
    return torch.empty(shape, dtype=dtype, pin_memory=is_cuda(device))


def allocator(device: torch.device) -> dict[str, int]:
    """This process's caching allocator on a GPU now, and its peak since the last call, which
    restarts it ({} on the CPU)."""
    if not is_cuda(device):
        return {}
    out = {"allocated_bytes": torch.cuda.memory_allocated(device),
           "peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
           "reserved_bytes": torch.cuda.memory_reserved(device)}
    torch.cuda.reset_peak_memory_stats(device)
    return out


def gpus() -> dict:
    """The CUDA build and the names of the visible GPUs, for a run's provenance."""
    return {"cuda": torch.version.cuda,
            "gpus": [torch.cuda.get_device_name(k) for k in range(torch.cuda.device_count())]}


def release(device: torch.device) -> None:
    """Return cached blocks and restart the allocator's peak: after a throwaway network, or
    between two measurements, so that neither counts in the next."""
    if is_cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------------------- timing
class Clock:
    """Busy time of one stream: on the CPU the wall time of each interval, on a GPU the
    stream's time from a step's first kernel to the end of its last, gaps between included.
    Each GPU interval is a pair of CUDA events on the stream: the first fires once the host
    has recorded it and the stream has done all it was given before (a wait for the step's
    input falls outside), the second when the step's last kernel is done. So idle gaps inside
    the step count as busy: where the host launches kernels more slowly than the GPU runs
    them (launch-bound: small batches) or waits for the stream mid-step; only when the host
    keeps ahead of the GPU is this the kernels' own time. Telling the two apart would need a
    host sync per kernel. Intervals are resolved once both events have fired (checked without
    waiting as intervals are added, so that few are ever held) or at ``take`` (at a marker),
    so timing never stalls the host."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0
        self.pending: list[tuple[Event, Event]] = []

    def start(self) -> Event | float:
        if not is_cuda(self.device):
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def stop(self, started: Event | float) -> None:
        if isinstance(started, float):
            self.seconds += time.perf_counter() - started
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record(torch.cuda.current_stream(self.device))
        self.pending.append((started, end))
        while self.pending and self.pending[0][1].query():
            a, b = self.pending.pop(0)
            self.seconds += a.elapsed_time(b) / 1000.0

    def take(self) -> float:
        """Seconds measured since the last call (waits for the last interval on a GPU)."""
        if self.pending:
            self.pending[-1][1].synchronize()
            self.seconds += sum(a.elapsed_time(b) for a, b in self.pending) / 1000.0
            self.pending = []
        seconds, self.seconds = self.seconds, 0.0
        return seconds
