"""The plan of a run: the network's units and their cut into stages, agreed before training.

``static_plan`` is cheap and checks --stages and --balance against the network, before anything
is set up. Without --balance, ``make_plan`` times each unit's whole training step on a
throwaway copy of the network and picks the contiguous cut whose slowest stage is fastest;
where the copy does not fit in memory, parameter counts stand in for times.
"""
from __future__ import annotations

import resource
import time
import warnings
from dataclasses import dataclass, replace

import torch

from localpipe.pipeline import device as dev
from localpipe.pipeline.data import INFO, DatasetInfo
from localpipe.stages import partition
from localpipe.stages.config import PYTHON_MODEL, Config, ConfigError
from localpipe.stages.models import Zoo, build_unit, plan
from localpipe.stages.network import Network
from localpipe.stages.stage import own_labels


@dataclass
class Plan:
    """The network's units and their cut: what every process must agree on before training."""

    names: list[str]  # one per unit
    parts: list[list[int]]  # unit indices of each stage
    params: list[int]  # each unit's parameter count, local heads included
    costs: list[float] | None = None  # per unit, in seconds ("measured") or parameters
    cost_kind: str = "given"
    budget: int | None = None  # bytes each stage's device has, when the cut had to fit it


def network_of(cfg: Config) -> Zoo:
    """The paper's network that ``cfg`` names, for inputs of its dataset."""
    if cfg.model == PYTHON_MODEL:
        raise ConfigError(f"--model {PYTHON_MODEL} is a network defined in Python "
                          f"(lp.LocalNet): train or continue it with lp.fit")
    info = INFO[cfg.dataset]
    return Zoo(cfg, info.shape, info.num_classes)


def static_plan(cfg: Config, network: Network | None = None) -> Plan:
    """The units, and the cut where nothing needs measuring (--balance, one stage; else no
    parts yet). Checks the options against the network, the data and this machine: cheap,
    before any setup. ``network``: the paper's ``cfg.model`` unless given."""
    network = network or network_of(cfg)
    names = network.names()
    partition.check_stages(len(names), cfg.stages)
    params = check_feasible(cfg, network)
    if cfg.balance is not None:
        return Plan(names, partition.split(cfg.balance, len(names)), params)
    return Plan(names, [list(range(len(names)))] if cfg.stages == 1 else [], params)


def check_feasible(cfg: Config, network: Network) -> list[int]:
    """Refuse values that provably cannot run: more classes per batch than the data has, more
    cutout holes than pixels, more threads than this machine can start, and a unit (the whole
    network with one stage) whose weights, gradients and optimizer state exceed the memory of
    the device it would train on. Returns each unit's parameter count."""
    height, width = network.shape[-2:]
    if cfg.classes_per_batch > network.num_classes:
        raise ConfigError(f"--classes-per-batch {cfg.classes_per_batch} is more than the "
                          f"{network.num_classes} classes of {cfg.dataset}")
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
    sizes = network.parameter_counts()
    per_parameter = 4 * (2 + optimizer_states(cfg))
    need = per_parameter * (sum(sizes) if cfg.stages == 1 else max(sizes))
    if need > memory:
        what = "the network" if cfg.stages == 1 else f"unit {sizes.index(max(sizes))}"
        raise ConfigError(f"{what} needs {need / 2**30:,.1f} GiB for its weights, gradients "
                          f"and optimizer state, more than the {memory / 2**30:,.1f} GiB of "
                          f"{where}")
    return sizes


def optimizer_states(cfg: Config) -> int:
    """Tensors of a weight's size that its optimizer keeps: Adam's and AdamW's two moments,
    AMSGrad's third, SGD's momentum buffer where it has momentum."""
    return {"adam": 2, "adamw": 2, "amsgrad": 3}.get(cfg.optim, int(cfg.momentum > 0))


def check_trains(cfg: Config, network: Network) -> None:
    """One training forward of every unit of the paper's network on the meta device (shapes
    only) at one replica's batch: an input that its poolings shrink to nothing, or a batch too
    small for batch norm, is one line here rather than a failed stage later."""
    if not isinstance(network, Zoo):
        return  # a network given in Python was probed when it was wrapped

    def forward(shape: tuple[int, ...]) -> None:
        est = replace(cfg, dropout=0.0)  # no masks on the meta device
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a layer of no features, on the way to the error
            x = torch.empty((cfg.replica_batch, *shape))
            y = torch.zeros(cfg.replica_batch, dtype=torch.long)
            skips: dict = {}
            specs = plan(est, shape, network.num_classes)
            for spec in specs:
                unit = build_unit(spec, est, network.num_classes)
                unit.train()
                if cfg.local:
                    unit.make_optimizer()
                    x, _ = unit.train_step(x, y, skips)
                elif spec is specs[-1]:  # the global modes: one forward, as Stage runs it
                    x = unit(x)
                else:
                    x = unit.run(x, skips, losses=cfg.no_detach)[0]

    try:
        forward(network.shape)
    except ValueError as exc:
        if "more than 1 value per channel" not in str(exc):
            raise
        raise ConfigError(f"--batch-size {cfg.batch_size} leaves batch norm "
                          f"{cfg.replica_batch} sample a batch; it needs at least 2 (or "
                          f"--no-batch-norm)") from None
    except RuntimeError as exc:
        if "too small" not in str(exc):
            raise
        channels, side = network.shape[0], network.shape[-1]
        smallest = next((s for s in (2 ** k for k in range(12)) if s > side
                         and _trains(forward, (channels, s, s))), None)
        need = f"; it takes inputs of at least {smallest}×{smallest}" if smallest else ""
        raise ConfigError(f"--model {cfg.model} shrinks {cfg.dataset}'s {side}×{side} inputs "
                          f"to nothing{need}") from None


def _trains(forward, shape: tuple[int, ...]) -> bool:
    try:
        forward(shape)
    except (RuntimeError, ValueError):
        return False
    return True


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


@dataclass(frozen=True)
class Footprint:
    """One unit's memory in training, in bytes: weights, optimizer state, the activations
    autograd keeps for its backward (its weights apart), and the messages that reach it and
    leave it (x, y and the skips in flight), at one replica's batch size."""

    weights: int
    state: int
    saved: int
    inbound: int
    outbound: int
    carries: tuple[tuple[str, tuple[int, ...]], ...]  # name and shape of each inbound tensor


def footprints(cfg: Config, info: DatasetInfo) -> list[Footprint]:
    """Each unit's footprint, from one training step on the meta device: shapes only, so it
    costs neither memory nor time (dropout is left out: its masks cannot be drawn there)."""
    est = replace(cfg, dropout=0.0)
    state_per_weight = optimizer_states(cfg)
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    with torch.device("meta"):
        units = [build_unit(s, est, info.num_classes)
                 for s in plan(est, info.shape, info.num_classes)]
        x = torch.empty((cfg.replica_batch, *info.shape))
        y = torch.zeros(cfg.replica_batch, dtype=torch.long)
    skips: dict = {}
    out = []
    message = lambda: nbytes(x) + nbytes(y) + sum(map(nbytes, skips.values()))  # noqa: E731
    for unit in units:
        inbound = message()
        carries = tuple((name, tuple(t.shape)) for name, t in {"x": x, "y": y, **skips}.items())
        storages: dict[int, int] = {}
        weights = {p.untyped_storage()._cdata for p in unit.parameters()}

        def pack(t: torch.Tensor) -> torch.Tensor:
            key = t.untyped_storage()._cdata
            if key not in weights:
                storages[key] = t.untyped_storage().nbytes()
            return t

        unit.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if cfg.local:
                unit.make_optimizer()
                x, _ = unit.train_step(x, y, skips)
            else:
                x = unit(x) if unit is units[-1] else unit.run(x, skips, losses=False)[0]
        size = sum(map(nbytes, unit.parameters()))
        out.append(Footprint(size, size * state_per_weight, sum(storages.values()), inbound,
                             message(), carries))
    return out


def stage_memory(cfg: Config, units: list[Footprint]) -> dict[str, int]:
    """The estimated peak of a stage holding ``units``: one unit's gradients and activations
    live at a time in local modes (all of them in the global ones), and up to --queue-depth
    inbound messages wait beside the one in work and the one going out."""
    pick = max if cfg.local else sum
    weights = sum(u.weights for u in units)
    parts = {"weights": weights, "grads": pick(u.weights for u in units),
             "optimizer": sum(u.state for u in units),
             "activations": pick(u.saved for u in units),
             "messages": (cfg.queue_depth + 1) * units[0].inbound + units[-1].outbound}
    return {**parts, "total": sum(parts.values())}


def measure_costs(stage, in_shape: tuple[int, int, int], num_classes: int, cfg: Config,
                  repeats: int = 3, patience: float = 10.0) -> list[float]:
    """Median seconds of each unit's full training step on random batches of one replica's
    size, over ``repeats`` rounds after a warm-up, or over one where the warm-up took more than
    ``patience`` seconds (a large network on a CPU: the cut need not wait minutes).

    ``stage`` must be a throwaway copy holding every unit: measuring trains it.
    """
    device = next(stage.parameters()).device
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn((cfg.replica_batch, *in_shape), generator=gen).to(device)
    y = torch.randint(num_classes, (cfg.replica_batch,), generator=gen).to(device)
    stage.train()

    def one_round() -> list[float]:
        # a batch's own labels, as a stage takes them: the first unit makes the targets
        x, skips, seconds, labels = x0, {}, [], own_labels(y)
        for unit in stage.units:
            dev.synchronize(device)
            start = time.perf_counter()
            x, update = unit.train_step(x, labels, skips)
            update()
            dev.synchronize(device)
            seconds.append(time.perf_counter() - start)
        return seconds

    warm_up = one_round()  # caches and allocators
    rounds = [one_round() for _ in range(1 if sum(warm_up) > patience else repeats)]
    for unit in stage.units:
        for meter in unit.meters.values():
            meter.take()
    return [sorted(t)[len(t) // 2] for t in zip(*rounds)]


def make_plan(cfg: Config, device: torch.device, own_devices: bool = False,
              static: Plan | None = None, network: Network | None = None) -> Plan:
    """Plan the units and choose the cut: --balance if given, else the best one for each
    unit's measured step time, or for its parameter count where a full copy of the network
    cannot be trained on ``device`` (out of memory) to measure it. With ``own_devices`` (a
    GPU for every stage) only cuts whose every stage fits its device's memory are considered.
    The copy is freed, and the device's allocator peak restarted, before training begins.
    ``static`` is this run's ``static_plan`` where the caller has made it already. A network
    given in Python has no memory estimate: its cut only balances time."""
    network = network or network_of(cfg)
    static = static or static_plan(cfg, network)
    if static.parts:
        return static
    fits, budget = None, None
    if own_devices and isinstance(network, Zoo):  # a tenth left for the CUDA context, the
        budget = int(0.9 * dev.memory(device)[0])  # allocator's cache and fragments
        prints = footprints(cfg, INFO[cfg.dataset])
        fits = lambda a, b: stage_memory(cfg, prints[a:b])["total"] <= budget  # noqa: E731
    try:
        costs = measure_costs(network.build(cfg, None, device, throwaway=True), network.shape,
                              network.num_classes, cfg)
        kind = "measured"
    except torch.OutOfMemoryError:
        costs, kind = [float(n) for n in static.params], "parameters"
    dev.release(device)
    balance = partition.best_balance(costs, cfg.stages, fits)
    return Plan(static.names, partition.split(balance, len(costs)), static.params, costs, kind,
                budget)
