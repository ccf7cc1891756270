"""Measuring one training mode on one network: steady-state throughput, where each stage's
time goes, and memory. Every mode trains the same network on the same random batches at the
same batch size and precision, within the same total thread budget.

Local modes run localpipe's own stage code (``pipeline.runner.run_threads`` and
``serve_rank``); the backprop pipelines run ``torch.distributed.pipelining``.
"""
from __future__ import annotations

import os
import platform
import resource
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from pipeline.data import INFO
from pipeline.runner import run_threads, serve_rank, stage_devices
from pipeline.transport import Kind, Message
from stages import partition
from stages.config import Config
from stages.models import build_stage, plan


@dataclass(frozen=True)
class Setup:
    """What every mode shares. ``threads`` is the whole budget C: a mode with K workers gives
    each C // K threads."""

    cfg: Config  # the local-learning network and optimizer (model, widths, batch size, …)
    threads: int
    warmup: int  # batches before timing starts
    steps: int  # batches per timed repeat
    repeats: int
    device: str = "cpu"  # "cuda": single-GPU modes on streams; process modes need K GPUs

    def rank_device(self, rank: int = 0) -> torch.device:
        return torch.device("cuda", rank) if self.device == "cuda" else torch.device("cpu")

    @property
    def shape(self) -> tuple[int, int, int]:
        return INFO[self.cfg.dataset].shape

    @property
    def classes(self) -> int:
        return INFO[self.cfg.dataset].num_classes

    @property
    def backprop_cfg(self) -> Config:
        return replace(self.cfg, backprop=True, no_detach=False, bio=False)

    def groups(self) -> list[tuple[int, int]]:
        """(index, batches) of the warm-up group (index 0) and of each timed repeat."""
        return [(r, self.warmup if r == 0 else self.steps) for r in range(self.repeats + 1)]

    def batch(self, rank: int = 0) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(0)
        device = self.rank_device(rank)
        return (torch.randn((self.cfg.batch_size, *self.shape), generator=gen).to(device),
                torch.randint(self.classes, (self.cfg.batch_size,), generator=gen).to(device))


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version()}


# --------------------------------------------------------------------------- memory
class LiveBytes:
    """Peak bytes of activations held for backward, counted through autograd's saved-tensor
    hooks (each storage once, parameters left out). Added to ``static_bytes`` this is the
    CPU's stand-in for CUDA's ``max_memory_allocated``: live tensor bytes, not RSS."""

    def __init__(self, params) -> None:
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.refs: dict[int, int] = {}
        self.current = self.peak = 0

    def pack(self, t: Tensor):
        key = t.untyped_storage().data_ptr()
        if key in self.skip:
            return t
        if not self.refs.get(key):
            self.current += t.untyped_storage().nbytes()
            self.peak = max(self.peak, self.current)
        self.refs[key] = self.refs.get(key, 0) + 1
        return _Held(t, key, self)

    @staticmethod
    def unpack(held):
        return held if isinstance(held, Tensor) else held.tensor

    def release(self, key: int, nbytes: int) -> None:
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


def static_bytes(module: nn.Module, optimizers) -> int:
    """Parameters, their gradients and the optimizer states: what a stage holds at all times."""
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    states = sum(v.numel() * v.element_size() for opt in optimizers
                 for s in opt.state.values() for v in s.values() if isinstance(v, Tensor))
    return 2 * params + states


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_memory(device: torch.device) -> dict:
    """On a GPU: the allocator's peak and NVML's used bytes for the whole device."""
    if device.type != "cuda":
        return {}
    from pipeline.metrics import nvml_used

    return {"cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(device),
            "nvml_used_bytes": nvml_used(device)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summary(rates: list[float]) -> dict:
    return {"samples_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
            "repeats": rates}


# --------------------------------------------------------------------------- one device
def sequential(setup: Setup, backprop: bool, threads: int) -> dict:
    """All units on one worker: localpipe's --stages 1 loop, or global backprop."""
    torch.set_num_threads(threads)
    cfg = setup.backprop_cfg if backprop else setup.cfg
    device = setup.rank_device()
    stage = build_stage(cfg, setup.shape, setup.classes, device=device)
    stage.train()
    x, y = setup.batch()
    meter = LiveBytes(stage.parameters())
    rates = []
    for r, n in setup.groups():
        sync(device)
        start = time.perf_counter()
        for _ in range(n):
            with meter.hooks():
                _, update = stage.train_step(x, y)
            update()
        sync(device)
        if r > 0:
            rates.append(n * cfg.batch_size / (time.perf_counter() - start))
    live = static_bytes(stage, stage.optimizers()) + meter.peak
    return {**summary(rates), "threads": threads, "stages": [{"live_bytes": live}],
            "peak_rss_bytes": [peak_rss()], **device_memory(device)}


def unit_costs(setup: Setup, threads: int) -> list[float]:
    """Seconds of each local unit's full step alone (forward, heads, backward, optimizer)."""
    torch.set_num_threads(threads)
    stage = build_stage(setup.cfg, setup.shape, setup.classes, device=setup.rank_device())
    return partition.measure_costs(stage, setup.shape, setup.classes, setup.cfg)


class BackpropPart(nn.Module):
    """Units of a backprop network as one differentiable module, for torch's pipelining."""

    def __init__(self, stage) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, x: Tensor) -> Tensor:
        for block in self.stage.blocks.values():
            x = block.handoff(block.features(x))
        return x if self.stage.output is None else self.stage.output(x)


def backprop_unit_costs(setup: Setup, threads: int, repeats: int = 3) -> list[float]:
    """Seconds of each backprop unit's forward, backward (given its output grad) and optimizer
    step alone: the same work as ``unit_costs`` without the local heads."""
    torch.set_num_threads(threads)
    cfg = setup.backprop_cfg
    x, y = setup.batch()
    device = setup.rank_device()
    parts = [BackpropPart(build_stage(cfg, setup.shape, setup.classes, [i], device))
             for i in range(len(plan(cfg, setup.shape, setup.classes)))]
    times: list[list[float]] = [[] for _ in parts]
    for r in range(repeats + 1):
        h = x
        for i, part in enumerate(parts):
            inp = h.detach().requires_grad_(i > 0)
            sync(device)
            start = time.perf_counter()
            out = part(inp)
            if i == len(parts) - 1:
                nn.functional.cross_entropy(out, y).backward()
            else:
                out.backward(torch.ones_like(out))
            part.stage.optimizer.step()
            part.stage.optimizer.zero_grad(set_to_none=True)
            sync(device)
            if r > 0:
                times[i].append(time.perf_counter() - start)
            h = out.detach()
    return [statistics.median(t) for t in times]


# --------------------------------------------------------------------------- local pipelines
def _messages(setup: Setup):
    """Warm-up batches, then each repeat's timed batches, each group closed by a marker."""
    x, y = setup.batch()  # on stage 0's device already, as in the sequential modes
    for r, n in setup.groups():
        for step in range(n):
            yield Message(Kind.TRAIN, 1, step, x, y)
        yield Message(Kind.END_EPOCH, r, n)
    yield Message(Kind.STOP, 0, 0)


def _collect(setup: Setup, reports: list[dict]) -> dict:
    """Throughput per repeat from the stages' wall-clock stamps, and each stage's time split."""
    k = max(r["stage"] for r in reports) + 1
    marks = [[r for r in reports if r["kind"] == "end_epoch" and r["epoch"] == i]
             for i in range(1, setup.repeats + 1)]
    rates = [setup.steps * setup.cfg.batch_size /
             (max(r["timing"]["train_end"] for r in m) - min(r["timing"]["train_start"]
                                                           for r in m)) for m in marks]
    per_stage = []
    for s in range(k):
        t = [r["timing"] for m in marks for r in m if r["stage"] == s]
        total = sum(x["busy_s"] + x["recv_wait_s"] + x["send_wait_s"] for x in t)
        per_stage.append({key: sum(x[f"{key}_s"] for x in t) / total
                          for key in ("busy", "recv_wait", "send_wait")})
    return {**summary(rates), "stages": per_stage}


def _wrap(stage, meter: LiveBytes) -> None:
    """Count the activations a stage saves for backward (benchmark only)."""
    step = stage.train_step

    def counted(x, y):
        with meter.hooks():
            return step(x, y)
    stage.train_step = counted


def local_threads(setup: Setup, parts: list[list[int]]) -> dict:
    """localpipe's in-process runner: one thread per stage, C // K torch threads each (on a
    GPU: one CUDA stream per stage, or one GPU per stage when K are visible)."""
    torch.set_num_threads(max(1, setup.threads // len(parts)))
    cfg = replace(setup.cfg, stages=len(parts), save_dir="")
    devices = stage_devices(cfg, setup.rank_device())
    stages = [build_stage(cfg, setup.shape, setup.classes, part, dev)
              for part, dev in zip(parts, devices)]
    meters = [LiveBytes(s.parameters()) for s in stages]
    for s, m in zip(stages, meters):
        _wrap(s, m)
    reports: list[dict] = []
    run_threads(cfg, stages, devices, _messages(setup), reports.append)
    result = _collect(setup, reports)
    for info, s, m in zip(result["stages"], stages, meters):
        info["live_bytes"] = static_bytes(s, s.optimizers()) + m.peak
    result["peak_rss_bytes"] = [peak_rss()]
    result.update(device_memory(devices[0]))
    return result


def _spawn(fn, setup: Setup, k: int, *args) -> dict:
    """Run ``fn(rank, k, setup, *args)`` in K fresh processes joined by gloo (NCCL with one GPU
    each on CUDA); rank 0 writes the gathered results to a file read back here."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        mp.spawn(_process_main, args=(k, port, fn, setup, out, *args), nprocs=k, join=True)
        return torch.load(out, weights_only=False)


def _process_main(rank: int, k: int, port: int, fn, setup: Setup, out: str, *args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(k))
    torch.set_num_threads(max(1, setup.threads // k))
    if setup.device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if setup.device == "cuda" else "gloo", rank=rank,
                            world_size=k)
    try:
        result = fn(rank, k, setup, *args)
        gathered = [None] * k if rank == 0 else None
        dist.gather_object(result, gathered, dst=0)
        if rank == 0:
            torch.save(gathered, out)
        dist.barrier()  # no rank tears down while another still has work in flight
    finally:
        dist.destroy_process_group()


def local_processes(setup: Setup, parts: list[list[int]]) -> dict:
    """localpipe's multi-process runner: one process per stage."""
    per_rank = _spawn(_local_rank, setup, len(parts), parts)
    result = per_rank[0]["result"]
    for info, r in zip(result["stages"], per_rank):
        info["live_bytes"] = r["live_bytes"]
    result["peak_rss_bytes"] = [r["rss"] for r in per_rank]
    return result


def _local_rank(rank: int, k: int, setup: Setup, parts: list[list[int]]) -> dict:
    cfg = replace(setup.cfg, stages=k, save_dir="")
    device = setup.rank_device(rank)
    stage = build_stage(cfg, setup.shape, setup.classes, parts[rank], device)
    meter = LiveBytes(stage.parameters())
    _wrap(stage, meter)
    links = [dist.new_group([i, i + 1]) for i in range(k - 1)]
    reports: list[dict] = []

    def broken(reason: str) -> None:
        raise RuntimeError(reason)

    serve_rank(cfg, stage, device, links, _messages(setup) if rank == 0 else None,
               reports.append, broken)
    return {"result": _collect(setup, reports) if rank == 0 else None,
            "live_bytes": static_bytes(stage, stage.optimizers()) + meter.peak,
            "rss": peak_rss()}


# --------------------------------------------------------------------------- backprop pipelines
def backprop_pipeline(setup: Setup, parts: list[list[int]], schedule: str,
                      microbatches: int) -> dict:
    """``torch.distributed.pipelining`` with ScheduleGPipe or Schedule1F1B, K processes."""
    per_rank = _spawn(_pipelining_rank, setup, len(parts), parts, schedule, microbatches)
    last = per_rank[-1]
    return {**summary(last["rates"]), "microbatches": microbatches,
            "stages": [{"live_bytes": r["live_bytes"]} for r in per_rank],
            "peak_rss_bytes": [r["rss"] for r in per_rank]}


def _pipelining_rank(rank: int, k: int, setup: Setup, parts: list[list[int]], schedule: str,
                     microbatches: int) -> dict:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    cfg = setup.backprop_cfg
    device = setup.rank_device(rank)
    module = BackpropPart(build_stage(cfg, setup.shape, setup.classes, parts[rank], device))
    module.train()
    optimizer = module.stage.optimizer
    pipe_stage = PipelineStage(module, rank, k, device)
    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
    sched = cls(pipe_stage, n_microbatches=microbatches, loss_fn=nn.functional.cross_entropy)
    x, y = setup.batch(rank)
    meter = LiveBytes(module.parameters())
    rates = []
    for r, n in setup.groups():
        dist.barrier()
        start = time.perf_counter()
        for _ in range(n):
            with meter.hooks():
                if rank == 0:
                    sched.step(x)
                elif rank == k - 1:
                    sched.step(target=y)
                else:
                    sched.step()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync(device)
        if r > 0:
            rates.append(n * cfg.batch_size / (time.perf_counter() - start))
    return {"rates": rates, "live_bytes": static_bytes(module, [optimizer]) + meter.peak,
            "rss": peak_rss()}
