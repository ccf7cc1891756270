"""Memory per stage, true even when stages share a device, and memory per device, once.

A device's allocator counts every stage on it together, so a stage's own bytes are counted
from its own tensors instead: parameters, gradients and optimizer state (each storage once),
the activations its units hold for backward (through autograd's saved-tensor hooks, on the
stage's first training batch: every full batch has the same shapes), and the messages waiting
in its input queue. Each process then samples, at one instant, its allocator and the
current bytes of its stages on that device: what the stages do not own (the CUDA context
aside: workspaces, temporaries, a step in flight) is reported as ``unattributed_bytes``, so
the stages' bytes plus that figure equal the allocator's. NVML's view of the whole GPU comes
once per device.
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
from typing import Callable

import torch
from torch import Tensor, nn

from localpipe.pipeline import device as dev


class LiveBytes:
    """Peak bytes of the tensors autograd saves for backward while ``hooks()`` is active (each
    storage once, parameters left out): the activations a step holds."""

    def __init__(self, params) -> None:
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.refs: dict[int, int] = {}
        self.current = self.peak = 0
        self.lock = threading.Lock()

    def pack(self, t: Tensor):
        key = t.untyped_storage().data_ptr()
        if key in self.skip:
            return t
        with self.lock:
            if not self.refs.get(key):
                self.current += t.untyped_storage().nbytes()
                self.peak = max(self.peak, self.current)
            self.refs[key] = self.refs.get(key, 0) + 1
        return _Held(t, key, self)

    @staticmethod
    def unpack(held):
        return held if isinstance(held, Tensor) else held.tensor

    def release(self, key: int, nbytes: int) -> None:
        with self.lock:
            self.refs[key] -= 1
            if not self.refs[key]:
                del self.refs[key]
                self.current -= nbytes

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Held:
    def __init__(self, tensor: Tensor, key: int, meter: LiveBytes) -> None:
        self.tensor, self.key, self.meter = tensor, key, meter
        self.nbytes = tensor.untyped_storage().nbytes()

    def __del__(self) -> None:
        self.meter.release(self.key, self.nbytes)


def _storage_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def static_bytes(module: nn.Module, optimizers) -> dict[str, int]:
    """What a stage holds between steps: parameters and buffers, gradients that exist now, and
    its optimizers' state."""
    params = list(module.parameters())
    return {"params_bytes": _storage_bytes([*params, *module.buffers()]),
            "grads_bytes": _storage_bytes(p.grad for p in params if p.grad is not None),
            "optimizer_bytes": _storage_bytes(v for opt in optimizers for s in opt.state.values()
                                              for v in s.values())}


class StageMemory:
    """One stage's own bytes: ``take()`` gives the epoch's peak breakdown and the bytes now. The
    activations are measured once, on the stage's first training batch (later full batches
    have the same shapes), so the hooks never slow the steady state."""

    def __init__(self, stage, queued: Callable[[], int] = lambda: 0) -> None:
        """``stage`` has ``parameters()`` and ``optimizers()``; ``queued()`` gives the bytes of
        the messages waiting in its input queue."""
        self.stage, self.queued = stage, queued
        self.live = LiveBytes(stage.parameters())
        self.activations: int | None = None
        self.queue_peak = 0

    def watching(self):
        """The hooks that measure this training step's activations, the first time only."""
        return self.live.hooks() if self.activations is None else _NULL

    def after_step(self) -> None:
        if self.activations is None:
            self.activations = self.live.peak

    def saw_queue(self) -> None:
        self.queue_peak = max(self.queue_peak, self.queued())

    def take(self) -> dict:
        s = static_bytes(self.stage, self.stage.optimizers())
        # each optimizer's gradients exist together, from its backward to its step
        grads = max([s["grads_bytes"]] + [_storage_bytes(p for g in opt.param_groups
                                                         for p in g["params"])
                                          for opt in self.stage.optimizers()])
        activations = self.activations or 0
        out = {**s, "grads_bytes": grads, "activations_bytes": activations,
               "queue_bytes": self.queue_peak}
        out["peak_bytes"] = (out["params_bytes"] + grads + out["optimizer_bytes"]
                             + activations + self.queue_peak)
        out["current_bytes"] = sum(s.values()) + self.live.current + self.queued()
        self.queue_peak = 0
        return out


_NULL = contextlib.nullcontext()


class DeviceMemory:
    """The figures of one process on each device it uses, sampled once per epoch when the last
    of its stages on that device reaches the epoch's end. Each stage counts its own bytes, in
    its own thread, when it gets there: reading another stage's tensors while that stage
    trains would race with it (and can crash the interpreter)."""

    def __init__(self, stage_devices: list[torch.device]) -> None:
        """``stage_devices``: the device of each stage this process runs."""
        self.expected = {d: stage_devices.count(d) for d in stage_devices}
        self.arrived: dict[tuple[torch.device, int], list[tuple[int, int]]] = {}
        self.lock = threading.Lock()

    def epoch_end(self, device: torch.device, epoch: int, index: int,
                  current: int) -> dict | None:
        """Called by each stage at its END_EPOCH with its ``current`` bytes; the last one on
        ``device`` gets the sample, with the sum of every one's bytes."""
        with self.lock:
            key = (device, epoch)
            counted = self.arrived.setdefault(key, [])
            counted.append((index, current))
            if len(counted) < self.expected[device]:
                return None
            del self.arrived[key]
            return sample(device, sum(b for _, b in counted), sorted(i for i, _ in counted))


def sample(device: torch.device, stage_bytes: int, stages: list[int] | None = None) -> dict:
    """This process's memory on ``device`` now, and its peak: on a GPU since the last sample
    (reset), on the CPU since the process started or the last ``reset_peak_rss``. ``stages``:
    the stages of this process on ``device``; ``stage`` names the one where there is one
    (None where several share the process: no one stage stands for it)."""
    stages = stages or []
    out = {"host": socket.gethostname(), "pid": os.getpid(), "device": str(device),
           "stages": stages, "stage": stages[0] if len(stages) == 1 else None,
           "stage_bytes": stage_bytes}
    if dev.is_cuda(device):
        out.update(uuid=dev.uuid(device), **dev.allocator(device),
                   nvml_used_bytes=nvml_used(device))
        out["unattributed_bytes"] = out["allocated_bytes"] - stage_bytes
    else:
        out.update(rss_bytes=_rss(), peak_rss_bytes=peak_rss())
    return out


def peak_rss() -> int:
    """This process's own peak resident set (``VmHWM``), since it started or since the last
    ``reset_peak_rss``. Not ``ru_maxrss``: Linux carries that over from the parent into a
    spawned child (across fork and exec), so every child reports at least its parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024


def reset_peak_rss() -> bool:
    """Restart this process's peak resident set from its resident set now (Linux >= 4.0);
    False where the kernel does not allow it, and the peak then still counts from the start."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def nvml_used(device: torch.device) -> int | None:
    """Bytes in use on the whole GPU (every process, the CUDA contexts included), or None
    where NVML cannot be reached (no driver library, a restricted container)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByUUID(dev.uuid(device))
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:
        return None
