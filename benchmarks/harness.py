"""Measuring one training mode on one network: steady-state throughput, where each stage's
time goes, and memory. Every mode trains the same network on the same random batches at the
same batch size and precision, within the same total thread budget.

Local modes run localpipe's own stage code (``pipeline.inprocess.run_threads`` and
``pipeline.distributed.serve``), cut at any unit: a residual block's skip tensor travels to the
next stage in the batch's message. The backprop pipelines run ``torch.distributed.pipelining``,
whose stages are ``Stage.forward``s: each starts with no skip tensors, so they are cut only
between whole residual blocks (``block_groups``) and timed per such group.
With replicas (``local_processes(..., replicas=R)``) the K·R processes are the torchrun
runner's own grid (``pipeline.topology``), each replica's stage 0 feeding its shard of every
batch; ``allreduce_seconds`` times gloo all-reduces for the model on paper of replicas at
scale (benchmarks/run.py). Every mode is timed the same way (``timed``): each timed group from
its first batch entering any rank to its last update finished on any rank. Memory is counted the
way a run counts it (``pipeline.memory.StageMemory``: the activations on the first, untimed,
batch only), and each mode starts from an emptied allocator with its peaks reset.
"""
from __future__ import annotations

import os
import platform
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from localpipe.pipeline import device as dev
from localpipe.pipeline import memory
from localpipe.pipeline.data import INFO
from localpipe.pipeline.distributed import join, serve
from localpipe.pipeline.inprocess import run_threads
from localpipe.pipeline.message import Kind, Message
from localpipe.pipeline.plan import footprints, measure_costs
from localpipe.pipeline.replicas import shard
from localpipe.pipeline.topology import Topology
from localpipe.stages.config import Config
from localpipe.stages.models import build_stage


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
    peak = ("each process's own peak resident set (VmHWM), reset at the start of each mode"
            if memory.reset_peak_rss() else
            "each process's own peak resident set (VmHWM) since it started: this kernel "
            "cannot reset it, so a mode run in the benchmark's own process counts the earlier "
            "ones")
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "gpu": (dev.gpus()["gpus"] or [None])[0],
            "python": platform.python_version(), "peak_rss": peak}


# --------------------------------------------------------------------------- memory
def fresh(device: torch.device) -> None:
    """Before a mode: nothing an earlier one held counts in its peaks, neither the GPU
    allocator's cache and peak nor this process's peak resident set."""
    dev.release(device)
    memory.reset_peak_rss()


def device_figures(device: torch.device) -> list[dict]:
    """After a mode on one process: its peak on ``device`` since ``fresh`` (and NVML's view
    of the GPU, or the peak resident set on the CPU)."""
    return [memory.sample(device, 0)]


Span = tuple[float, float]  # one rank's wall clock (time.time) at the start and end of a group


def timed(spans: list[list[Span]], samples: int) -> dict:
    """The one definition of throughput, shared by every mode: a timed group of ``samples``
    lasts from its first batch entering on any rank to its last update finished on any rank
    (max end - min start over ``spans``, each group's spans of every rank), so no rank's
    work falls outside it; the median, min and max over the groups, and the spans."""
    seconds = [max(end for _, end in group) - min(start for start, _ in group)
               for group in spans]
    rates = [samples / s for s in seconds]
    return {"samples_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
            "repeats": rates, "group_seconds": seconds, "spans": spans}


# --------------------------------------------------------------------------- one device
def sequential(setup: Setup, backprop: bool, threads: int) -> dict:
    """All units on one worker: localpipe's --stages 1 loop, or global backprop."""
    torch.set_num_threads(threads)
    cfg = setup.backprop_cfg if backprop else setup.cfg
    device = setup.rank_device()
    fresh(device)
    stage = build_stage(cfg, setup.shape, setup.classes, device=device)
    stage.train()
    x, y = setup.batch()
    mem = memory.StageMemory(stage)
    spans = []
    for r, n in setup.groups():
        dev.synchronize(device)
        start = time.time()
        for _ in range(n):
            with mem.watching():  # the first warm-up batch only
                _, update = stage.train_step(x, y)
            update()
            mem.after_step()
        dev.synchronize(device)
        if r > 0:
            spans.append([(start, time.time())])
    return {**timed(spans, setup.steps * cfg.batch_size), "threads": threads,
            "stages": [{"live_bytes": mem.take()["peak_bytes"]}],
            "devices": device_figures(device)}


class BucketSizes:
    """A stage's replicas (``stages.blocks.Replicas``) of one member: every update packs and
    unpacks its bucket as with R replicas, and the size of each is recorded."""

    count = 1

    def __init__(self) -> None:
        self.numels: list[int] = []

    def sum(self, pieces: list[Tensor]) -> Callable[[], Tensor]:
        flat = torch.cat(pieces)
        self.numels.append(flat.numel())
        return lambda: flat


def unit_costs(setup: Setup, threads: int, replicas: int = 1) -> tuple[list[float], list[int]]:
    """Seconds of each local unit's full step alone (forward, heads, backward, optimizer) at
    one replica's batch (the batch over ``replicas``), and the bytes of each unit's bucket that
    replicas sum (float32: its gradients, batch-norm statistics and a flag; none with one
    replica). With replicas the step includes packing and unpacking the bucket, not its
    exchange."""
    torch.set_num_threads(threads)
    cfg = replace(setup.cfg, replicas=replicas)
    stage = build_stage(cfg, setup.shape, setup.classes, device=setup.rank_device())
    buckets = BucketSizes()
    if replicas > 1:
        stage.replicate(0, buckets)
    costs = measure_costs(stage, setup.shape, setup.classes, cfg)
    return costs, [4 * n for n in buckets.numels[:len(costs)]]


class BackpropPart(nn.Module):
    """Units of a backprop network as one differentiable module, for torch's pipelining."""

    def __init__(self, stage) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, x: Tensor) -> Tensor:
        return self.stage(x)


def block_groups(setup: Setup) -> list[list[int]]:
    """The backprop network's units in the smallest contiguous groups that a backprop stage can
    hold. Such a stage is one ``Stage.forward``, which starts with no skip tensors and
    differentiates through all it holds, so it must hold every residual block whole: the unit
    that stashes the block's input and the one that pops it. Found for any family from what
    each unit receives in the backprop network's step on the meta device
    (``pipeline.plan.footprints``): a unit that gets no skip tensor, only x and y, starts a
    group. Every unit alone for an MLP, a VGG or a ViT; a ResNet's stem, each block and the
    head."""
    groups: list[list[int]] = []
    for index, unit in enumerate(footprints(setup.backprop_cfg, INFO[setup.cfg.dataset])):
        if {name for name, _ in unit.carries} <= {"x", "y"}:
            groups.append([])
        groups[-1].append(index)
    return groups


def backprop_costs(setup: Setup, threads: int, groups: list[list[int]],
                   repeats: int = 3) -> list[float]:
    """Seconds of each group's (``block_groups``) forward, backward (given its output grad) and
    optimizer step alone: the same work as ``unit_costs`` without the local heads, per group,
    since a unit inside a residual block cannot run without the rest of its block."""
    torch.set_num_threads(threads)
    cfg = setup.backprop_cfg
    x, y = setup.batch()
    device = setup.rank_device()
    parts = [BackpropPart(build_stage(cfg, setup.shape, setup.classes, group, device))
             for group in groups]
    times: list[list[float]] = [[] for _ in parts]
    for r in range(repeats + 1):
        h = x
        for i, part in enumerate(parts):
            inp = h.detach().requires_grad_(i > 0)
            dev.synchronize(device)
            start = time.perf_counter()
            out = part(inp)
            if i == len(parts) - 1:
                nn.functional.cross_entropy(out, y).backward()
            else:
                out.backward(torch.ones_like(out))
            part.stage.optimizer.step()
            part.stage.optimizer.zero_grad(set_to_none=True)
            dev.synchronize(device)
            if r > 0:
                times[i].append(time.perf_counter() - start)
            h = out.detach()
    return [statistics.median(t) for t in times]


# --------------------------------------------------------------------------- local pipelines
def _messages(setup: Setup, rank: int = 0, replica: int = 0, replicas: int = 1):
    """Warm-up batches, then each repeat's timed batches, each group closed by a marker: the
    shard of every batch that replica ``replica`` of ``replicas`` trains on, made on the
    device of ``rank``, the stage 0 it feeds (as in the sequential modes)."""
    x, y = setup.batch(rank)
    x, y = shard(x, replica, replicas), shard(y, replica, replicas)
    for r, n in setup.groups():
        for step in range(n):
            yield Message(Kind.TRAIN, 1, step, tensors={"x": x, "y": y}).depart()
        yield Message(Kind.END_EPOCH, r, n)
    yield Message(Kind.STOP, 0, 0)


def _collect(setup: Setup, reports: list[dict]) -> dict:
    """Throughput per repeat from the wall-clock stamps of every stage (and replica): its first
    training batch taken in, its last update done; each stage's time split and own bytes, and
    every process's device figures."""
    k = max(r["stage"] for r in reports) + 1
    marks = [[r for r in reports if r["kind"] == "end_epoch" and r["epoch"] == i]
             for i in range(1, setup.repeats + 1)]
    spans = [[(r["timing"]["train_start"], r["timing"]["train_end"]) for r in m] for m in marks]
    ends = [r for r in reports if r["kind"] == "end_epoch"]
    per_stage = []
    for s in range(k):
        t = [r["timing"] for m in marks for r in m if r["stage"] == s]
        total = sum(x["busy_s"] + x["recv_wait_s"] + x["send_wait_s"] for x in t)
        split = {key: sum(x[f"{key}_s"] for x in t) / total
                 for key in ("busy", "recv_wait", "send_wait")}
        split["live_bytes"] = max(r["memory"]["peak_bytes"] for r in ends if r["stage"] == s)
        per_stage.append(split)
    samples = [r["device_memory"] for r in ends if r.get("device_memory")]
    peaks: dict[tuple, dict] = {}  # the largest figures of each process and device
    for d in samples:
        key = (d["host"], d["pid"], d["device"])
        if key not in peaks or _peak(d) > _peak(peaks[key]):
            peaks[key] = d
    return {**timed(spans, setup.steps * setup.cfg.batch_size), "stages": per_stage,
            "devices": list(peaks.values())}


def _peak(sample: dict) -> int:
    return sample.get("peak_allocated_bytes", sample.get("peak_rss_bytes", 0))


def local_threads(setup: Setup, parts: list[list[int]]) -> dict:
    """localpipe's in-process runner: one thread per stage, C // K torch threads each (on a
    GPU: one CUDA stream per stage, neighbours grouped when there are fewer GPUs than stages)."""
    torch.set_num_threads(max(1, setup.threads // len(parts)))
    cfg = replace(setup.cfg, stages=len(parts), save_dir="")
    devices = dev.stage_devices(len(parts), setup.rank_device())
    for d in set(devices):
        fresh(d)
    stages = [build_stage(cfg, setup.shape, setup.classes, part, d)
              for part, d in zip(parts, devices)]
    reports: list[dict] = []
    run_threads(cfg, stages, devices, _messages(setup), reports.append)
    return _collect(setup, reports)


def _spawn(fn, setup: Setup, k: int, *args) -> dict:
    """Run ``fn(rank, k, setup, store, *args)`` in K fresh processes sharing a TCP store;
    rank 0's result is written to a file read back here."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        mp.spawn(_process_main, args=(k, port, fn, setup, out, *args), nprocs=k, join=True)
        return torch.load(out, weights_only=False)


def _process_main(rank: int, k: int, port: int, fn, setup: Setup, out: str, *args) -> None:
    torch.set_num_threads(max(1, setup.threads // k))
    dev.bind(setup.rank_device(rank))  # else gather_object stages every rank's tensors on GPU 0
    store = dist.TCPStore("127.0.0.1", port, k, rank == 0, timedelta(seconds=300))
    result = fn(rank, k, setup, store, *args)
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


def local_processes(setup: Setup, parts: list[list[int]], replicas: int = 1) -> dict:
    """localpipe's multi-process runner: one process per stage and replica, joined as under
    torchrun (rank r runs stage r % K of replica r // K)."""
    return _spawn(_local_rank, setup, len(parts) * replicas, parts, replicas)


def _local_rank(rank: int, world: int, setup: Setup, store, parts: list[list[int]],
                replicas: int) -> dict | None:
    topo = Topology(rank, len(parts), replicas)
    cfg = replace(setup.cfg, stages=topo.stages, replicas=replicas, save_dir="")
    device = setup.rank_device(rank)
    fresh(device)
    me = join(cfg, store, topo, device, False, 1)
    stage = build_stage(cfg, setup.shape, setup.classes, parts[topo.stage], device)
    stage.replicate(topo.replica, me.links.replicas)
    reports: list[dict] = []
    serve(me, stage, None if topo.stage else _messages(setup, rank, topo.replica, replicas),
          reports.append)
    me.control.finish()
    return _collect(setup, reports) if rank == 0 else None


def allreduce_seconds(setup: Setup, sizes: list[int], processes: int = 2,
                      repeats: int = 5) -> list[float]:
    """Median seconds of a gloo all-reduce (sum) of ``sizes`` bytes of float32 over
    ``processes`` processes of this machine: the host path a stage's replicas take."""
    return _spawn(_allreduce_rank, setup, processes, sizes, repeats)


def _allreduce_rank(rank: int, world: int, setup: Setup, store, sizes: list[int],
                    repeats: int) -> list[float] | None:
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    medians = []
    for size in sizes:
        t = torch.ones(size // 4)
        seconds = []
        for i in range(repeats + 1):  # the first one warms gloo's buffers up
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(t)
            if i:
                seconds.append(time.perf_counter() - start)
        medians.append(statistics.median(seconds))
    return medians if rank == 0 else None


# --------------------------------------------------------------------------- backprop pipelines
def backprop_pipeline(setup: Setup, parts: list[list[int]], schedule: str,
                      microbatches: int) -> dict:
    """``torch.distributed.pipelining`` with ScheduleGPipe or Schedule1F1B, K processes."""
    return _spawn(_pipelining_rank, setup, len(parts), parts, schedule, microbatches)


def _pipelining_rank(rank: int, k: int, setup: Setup, store, parts: list[list[int]],
                     schedule: str, microbatches: int) -> dict | None:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    device = setup.rank_device(rank)
    fresh(device)
    dist.init_process_group("nccl" if setup.device == "cuda" else "gloo", store=store,
                            rank=rank, world_size=k, device_id=device
                            if setup.device == "cuda" else None)
    cfg = setup.backprop_cfg
    module = BackpropPart(build_stage(cfg, setup.shape, setup.classes, parts[rank], device))
    module.train()
    optimizer = module.stage.optimizer
    pipe_stage = PipelineStage(module, rank, k, device)
    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
    sched = cls(pipe_stage, n_microbatches=microbatches, loss_fn=nn.functional.cross_entropy)
    x, y = setup.batch(rank)
    mem = memory.StageMemory(module.stage)
    spans = []
    for r, n in setup.groups():
        dist.barrier()  # no group starts on one rank while another still works on the last
        start = time.time()
        for _ in range(n):
            with mem.watching():  # the first warm-up step only
                if rank == 0:
                    sched.step(x)
                elif rank == k - 1:
                    sched.step(target=y)
                else:
                    sched.step()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            mem.after_step()
        dev.synchronize(device)
        if r > 0:
            spans.append((start, time.time()))
    mine = {"spans": spans, "live_bytes": mem.take()["peak_bytes"],
            "devices": device_figures(device)}
    gathered = [None] * k if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    dist.barrier()  # no rank tears down while another still has work in flight
    if rank != 0:
        return None
    return {**timed([list(group) for group in zip(*(g["spans"] for g in gathered))],
                    setup.steps * setup.cfg.batch_size), "microbatches": microbatches,
            "stages": [{"live_bytes": g["live_bytes"]} for g in gathered],
            "devices": [d for g in gathered for d in g["devices"]]}
