"""The plan of a run: the network's units and their cut into stages, agreed before training.

``static_plan`` is cheap and checks --stages and --balance against the network, before anything
is set up. Without --balance, ``make_plan`` times each unit's whole training step on a
throwaway copy of the network and picks the contiguous cut whose slowest stage is fastest;
where the copy does not fit in memory, parameter counts stand in for times.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline import device as dev
from pipeline.data import INFO, DatasetInfo
from stages import partition
from stages.config import Config
from stages.models import UnitSpec, build_stage, plan


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
    parts yet). Checks --stages and --balance against the network: cheap, before any setup."""
    info = INFO[cfg.dataset]
    specs = plan(cfg, info.shape, info.num_classes)
    partition.check_stages(len(specs), cfg.stages)
    if cfg.balance is not None:
        return Plan(info, specs, partition.split(cfg.balance, len(specs)))
    return Plan(info, specs, [list(range(len(specs)))] if cfg.stages == 1 else [])


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
        costs = partition.measure_costs(
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
