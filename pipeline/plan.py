"""The plan of a run: the network's units and their cut into stages, agreed before training.

``static_plan`` is cheap and checks --stages and --balance against the network, before anything
is set up. Without --balance, ``make_plan`` times each unit's whole training step on a
throwaway copy of the network and picks the contiguous cut whose slowest stage is fastest;
where the copy does not fit in memory, parameter counts stand in for times.
"""
from __future__ import annotations

import resource
import time
from dataclasses import dataclass

import torch

from pipeline import device as dev
from pipeline.data import INFO, DatasetInfo
from stages import partition
from stages.config import Config, ConfigError
from stages.models import UnitSpec, build_stage, build_unit, plan


@dataclass
class Plan:
    """The network and its cut: what every process must agree on before training."""

    info: DatasetInfo
    specs: list[UnitSpec]
    parts: list[list[int]]  # unit indices of each stage
    costs: list[float] | None = None  # per unit, in seconds ("measured") or parameters
    cost_kind: str = "given"


def static_plan(cfg: Config) -> Plan:
    """The units, and the cut where nothing needs measuring (--balance, one stage; else no
    parts yet). Checks the options against the network, the data and this machine: cheap,
    before any setup."""
    info = INFO[cfg.dataset]
    specs = plan(cfg, info.shape, info.num_classes)
    partition.check_stages(len(specs), cfg.stages)
    check_feasible(cfg, info, specs)
    if cfg.balance is not None:
        return Plan(info, specs, partition.split(cfg.balance, len(specs)))
    return Plan(info, specs, [list(range(len(specs)))] if cfg.stages == 1 else [])


def check_feasible(cfg: Config, info: DatasetInfo, specs: list[UnitSpec]) -> None:
    """Refuse values that provably cannot run: more classes per batch than the data has, more
    cutout holes than pixels, more threads than this machine can start, and a unit (the whole
    network with one stage) whose weights, gradients and optimizer state exceed the memory of
    the device it would train on."""
    channels, height, width = info.shape
    if cfg.classes_per_batch > info.num_classes:
        raise ConfigError(f"--classes-per-batch {cfg.classes_per_batch} is more than the "
                          f"{info.num_classes} classes of {cfg.dataset}")
    if cfg.cutout and cfg.n_holes > height * width:
        raise ConfigError(f"--n-holes {cfg.n_holes} is more than the {height * width} pixels "
                          f"of a {cfg.dataset} image")
    limit = thread_limit()
    if cfg.threads > limit:
        raise ConfigError(f"--threads {cfg.threads} is more than the {limit:,} threads this "
                          f"machine can start")
    try:
        memory, where = dev.memory(dev.choose(cfg.device))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    with torch.device("meta"):
        sizes = [sum(p.numel() for p in build_unit(s, cfg, info.num_classes).parameters())
                 for s in specs]
    per_parameter = 4 * (2 + {"adam": 2, "amsgrad": 3}.get(cfg.optim, cfg.momentum > 0))
    need = per_parameter * (sum(sizes) if cfg.stages == 1 else max(sizes))
    if need > memory:
        what = "the network" if cfg.stages == 1 else f"unit {sizes.index(max(sizes))}"
        raise ConfigError(f"{what} needs {need / 2**30:,.1f} GiB for its weights, gradients "
                          f"and optimizer state, more than the {memory / 2**30:,.1f} GiB of "
                          f"{where}")


def thread_limit() -> int:
    """The most threads this machine lets a process start (the kernel's and the user's limit)."""
    limits = []
    try:
        with open("/proc/sys/kernel/threads-max") as f:
            limits.append(int(f.read()))
    except (OSError, ValueError):
        pass
    soft = resource.getrlimit(resource.RLIMIT_NPROC)[0]
    if soft != resource.RLIM_INFINITY:
        limits.append(soft)
    return min(limits, default=2**31 - 1)


def measure_costs(stage, in_shape: tuple[int, int, int], num_classes: int, cfg: Config,
                  repeats: int = 3) -> list[float]:
    """Median seconds of each unit's full training step on random batches of the run's size.

    ``stage`` must be a throwaway copy holding every unit: measuring trains it.
    """
    device = next(stage.parameters()).device
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn((cfg.batch_size, *in_shape), generator=gen).to(device)
    y = torch.randint(num_classes, (cfg.batch_size,), generator=gen).to(device)
    times: list[list[float]] = [[] for _ in stage.units]
    stage.train()
    for r in range(repeats + 1):  # the first round warms up caches and allocators
        x = x0
        for i, unit in enumerate(stage.units):
            dev.synchronize(device)
            start = time.perf_counter()
            x, update = unit.train_step(x, y)
            update()
            dev.synchronize(device)
            if r > 0:
                times[i].append(time.perf_counter() - start)
    for unit in stage.units:
        for meter in unit.meters.values():
            meter.take()
    return [sorted(t)[len(t) // 2] for t in times]


def make_plan(cfg: Config, device: torch.device) -> Plan:
    """Plan the units and choose the cut: --balance if given, else the best one for each
    unit's measured step time, or for its parameter count where a full copy of the network
    cannot be trained on ``device`` (out of memory) to measure it. The copy is freed, and the
    device's allocator peak restarted, before training begins."""
    static = static_plan(cfg)
    if static.parts:
        return static
    info = static.info
    try:
        costs = measure_costs(
            build_stage(cfg, info.shape, info.num_classes, device=device), info.shape,
            info.num_classes, cfg)
        kind = "measured"
    except torch.OutOfMemoryError:
        with torch.device("meta"):
            costs = partition.parameter_costs(build_stage(cfg, info.shape, info.num_classes,
                                                          device="meta"))
        kind = "parameters"
    dev.release(device)
    balance = partition.best_balance(costs, cfg.stages)
    return Plan(info, static.specs, partition.split(balance, len(costs)), costs, kind)
