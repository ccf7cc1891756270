"""A run's life, the same under both runners: ``prepare`` it (every check, the data, the cut
into stages and the run folder: nothing is written before all of them pass), ``build`` a
process's stages (restored from the checkpoint, if any), then serve them; serving is what the
runners do differently (``inprocess.run_threads``: threads joined by channels;
``distributed.serve``: torchrun processes joined by a transport). The test hook
(pipeline/faults.py) is applied here, and nowhere else."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch

from localpipe.pipeline import runs
from localpipe.pipeline.checkpoint import Finished, Start, load_units, start_point
from localpipe.pipeline.console import say
from localpipe.pipeline.faults import Fault
from localpipe.pipeline.message import Message
from localpipe.pipeline.plan import Plan, check_trains, make_plan
from localpipe.stages.config import Config, ConfigError
from localpipe.stages.network import Network
from localpipe.stages.stage import Stage

Data = Callable[[Config], tuple]  # cfg -> the (train, test, val) batches, as load_batches


@dataclass
class Prepared:
    cfg: Config  # with the run's folder
    start: Start  # where training begins
    plan: Plan  # the units and their cut
    batches: tuple | None  # (train, test, val), where this process feeds stage 0
    epoch_steps: int  # training batches an epoch (the learning rate is set per batch)


def prepare(cfg: Config, network: Network, static: Plan, data: Data, device: torch.device,
            own_devices: bool, store=None) -> Prepared:
    """Check the options against the network (``static``: the runner's ``static_plan``, made
    before any setup), the checkpoint to resume, the data and the run folder; cut the network
    into stages (timing its units on ``device`` unless --balance says); only then claim the
    folder. Raises ConfigError or DataError before any write. ``store``: torchrun's, where a
    restarted job must write where it wrote before."""
    check_trains(cfg, network)
    earlier = runs.job_folder(store)
    new = cfg.save_dir is None and earlier is None
    cfg = replace(cfg, save_dir=runs.choose(cfg, earlier))
    try:
        start, finished = start_point(cfg, len(static.names)), None
    except Finished as exc:  # every epoch trained already: said once every check has passed
        start, finished = exc.start, exc
    batches = data(cfg)
    if start.folder is not None:
        check_fits(start, network, cfg)
    if not new:
        runs.check(cfg.save_dir, bool(cfg.resume), start.folder, cfg.force_unlock)
    if finished is not None:
        raise finished
    plan = make_plan(cfg, device, own_devices, static, network)
    cfg = replace(cfg, save_dir=runs.claim(cfg.save_dir, cfg, start, new))
    runs.remember(store, cfg.save_dir)
    epoch_steps = len(batches[0])
    warm_up(cfg, epoch_steps)
    if cfg.save_dir:  # where to look, said before the first epoch's long silence
        mesh = f" × {cfg.replicas} replicas" if cfg.replicas > 1 else ""
        print(f"run folder: {cfg.save_dir} ({epoch_steps} training batches an epoch, "
              f"{len(plan.parts)} stage(s){mesh})", flush=True)
    return Prepared(cfg, start, plan, batches, epoch_steps)


def warm_up(cfg: Config, epoch_steps: int) -> None:
    """Say so where the warm-up spans the whole run (a recipe's warm-up, counted in batches of
    the whole dataset, in a run shortened by --limit-train or --epochs): the learning rate then
    never reaches --lr, which is no error but is seldom meant."""
    total = cfg.epochs * epoch_steps
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    if cfg.warmup_steps >= total:
        say(f"note: the warm-up of {cfg.warmup_steps:,} batches (--warmup-steps) spans the "
            f"whole run of {total:,}: the learning rate never reaches --lr {cfg.lr:g}")


def check_fits(start: Start, network: Network, cfg: Config) -> None:
    """The checkpoint's tensors against the network's, name by name and shape by shape,
    before the run folder is claimed: a checkpoint of another network (whose files are whole,
    so their hashes hold) is refused in one line, and the run's records stay as they were."""
    expected = network.state_shapes(cfg)
    saved = load_units(start.folder, start.manifest, list(range(len(expected))))["units"]
    for index, shapes in enumerate(expected):
        got = {k: tuple(v.shape) for k, v in saved[index]["state"].items()}
        missing, extra = sorted(shapes.keys() - got.keys()), sorted(got.keys() - shapes.keys())
        wrong = [k for k in shapes.keys() & got.keys() if shapes[k] != got[k]]
        if missing or extra or wrong:
            what = (f"{wrong[0]} is {'x'.join(map(str, got[wrong[0]]))} there, "
                    f"{'x'.join(map(str, shapes[wrong[0]]))} here" if wrong else
                    f"it lacks {missing[0]}" if missing else f"it has {extra[0]} too")
            raise ConfigError(f"cannot resume: checkpoint {start.folder} does not fit this "
                              f"network: unit {index}: {what}")


def build(ready: Prepared, network: Network, stage: int, device: torch.device,
          fault: Fault | None = None) -> Stage:
    """Stage ``stage`` of the prepared run on ``device``, as the checkpoint left it, with the
    test hook ``fault`` where it acts in this stage."""
    built = network.build(ready.cfg, ready.plan.parts[stage], device)
    built.epoch_steps = ready.epoch_steps
    ready.start.restore(built)
    if fault is not None and fault.stage == stage:
        built.inject = fault.stage_hook(stage, ready.start.steps)
    return built


def hooked(messages: Iterator[Message], ready: Prepared, fault: Fault | None,
           stop) -> Iterator[Message]:
    """The feed's ``messages`` with the test hook ``fault`` where it acts in the feed."""
    if fault is None or fault.stage not in ("feed", "eval"):
        return messages
    return fault.feed(messages, ready.start.steps, stop)
