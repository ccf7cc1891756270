"""localpipe's entry point: train a network with local error signals, pipelined over stages.

    torchrun launch/pipeline.py --stages 4 --recipe mnist-mlp-predsim   # 4 stages, one process
    torchrun --nproc-per-node 4 launch/pipeline.py --stages 4 ...       # one process per stage
    torchrun --nproc-per-node 8 launch/pipeline.py --stages 4 --replicas 2 ...  # each stage twice

Every failure a user can cause ends here as one line: bad input with exit code 2, a stage that
failed or a file that could not be written with 1, a stop with 128 + the signal.
"""
from __future__ import annotations

import os
import shlex
import sys

from localpipe.pipeline.channel import StageFailed
from localpipe.pipeline.checkpoint import Finished
from localpipe.pipeline.files import WriteError
from localpipe.pipeline.console import say
from localpipe.pipeline.data import INFO, DataError
from localpipe.pipeline.distributed import run_distributed
from localpipe.pipeline.inprocess import run_inprocess
from localpipe.pipeline.plan import (check_trains, footprints, make_plan, network_of,
                                     stage_memory)
from localpipe.pipeline.signals import StopRequest
from localpipe.launch.options import parse_config, program
from localpipe.stages.config import Config, ConfigError
from localpipe.stages.models import backprop_parameters



def resume_command(argv: list[str] | None, folder: str) -> str:
    """The command line that continues this run from its newest checkpoint, started the way
    this one was, and runnable from any folder: the script and every path are absolute."""
    args, skip, absolute = [], False, False
    for arg in sys.argv[1:] if argv is None else argv:
        if skip:
            skip = False
        elif arg in ("--save-dir", "--resume"):
            skip = True
        elif arg.startswith("--data-root="):
            args.append("--data-root=" + os.path.abspath(arg.split("=", 1)[1]))
        elif not arg.startswith(("--save-dir=", "--resume=")):
            args.append(os.path.abspath(arg) if absolute else arg)
        absolute = arg == "--data-root"
    args += ["--save-dir", os.path.abspath(folder), "--resume", "auto"]
    script = os.path.abspath(__file__)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        nodes = int(os.environ.get("GROUP_WORLD_SIZE", 1))
        launcher = ["torchrun", f"--nproc-per-node={os.environ.get('LOCAL_WORLD_SIZE', 1)}"]
        launcher += [f"--nnodes={nodes}", "..."] if nodes > 1 else []
        launcher.append(script)
    else:
        launcher = [program()] if program() == "localpipe" else ["python", script]
    return shlex.join(launcher + args)


def describe(cfg: Config) -> None:
    """Print the units with their parameter counts (local heads included), the mesh of stages
    and replicas, the stages with their estimated memory and what each boundary carries,
    where the network deviates from the paper's code, and last the parameter count of the
    backprop network as the paper counts it."""
    from localpipe.pipeline import device
    from localpipe.stages.residual import deviations

    network = network_of(cfg)
    check_trains(cfg, network)
    info = INFO[cfg.dataset]
    try:
        run_plan = make_plan(cfg, device.choose(cfg.device), network=network)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    counts = run_plan.params
    prints = footprints(cfg, info)
    print(f"{cfg.model} on {cfg.dataset} {info.shape}, {info.num_classes} classes, "
          f"loss {'backprop' if cfg.backprop else cfg.loss_sup}")
    if cfg.replicas > 1:
        print(f"mesh: {cfg.stages} stage(s) × {cfg.replicas} replicas = "
              f"{cfg.stages * cfg.replicas} processes (rank r runs stage r % {cfg.stages} of "
              f"replica r // {cfg.stages}); each replica trains on {cfg.replica_batch} samples "
              f"of every batch of {cfg.global_batch}, and each unit's gradients are averaged "
              f"over its {cfg.replicas} replicas before its step")
    label = max(len(f"unit {i}: {name}") for i, name in enumerate(run_plan.names))
    for i, (name, n) in enumerate(zip(run_plan.names, counts)):
        print(f"  {f'unit {i}: {name}':{label}s} {n:>12,d} parameters")
    print(f"total parameters (with local heads): {sum(counts):,d}")
    mib = lambda n: f"{n / 2**20:,.0f} MiB"  # noqa: E731
    for k, part in enumerate(run_plan.parts):
        cost = ""
        if run_plan.costs is not None:
            total = sum(run_plan.costs[i] for i in part)
            cost = (f", measured step {1000 * total:.1f} ms" if run_plan.cost_kind == "measured"
                    else f", {total:,.0f} parameters")
        memory = stage_memory(cfg, prints[part[0]:part[-1] + 1])
        print(f"stage {k}: units {part[0]}-{part[-1]}{cost}, memory about "
              f"{mib(memory.pop('total'))} at batch {cfg.replica_batch} ("
              + ", ".join(f"{name} {mib(n)}" for name, n in memory.items()) + ")")
        if k + 1 < len(run_plan.parts):
            nxt = prints[part[-1] + 1]
            print(f"  -> stage {k + 1} gets " + ", ".join(
                f"{name} {'x'.join(map(str, shape[1:])) or 'labels'}"
                for name, shape in nxt.carries) + f": {mib(nxt.inbound)} a batch")
    for line in deviations(cfg, network.specs):
        print(f"deviation from the paper's code: {line}")
    print(f"backprop parameters: {backprop_parameters(cfg, info.shape, info.num_classes):,}")


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
        if cfg is None:  # --recipe list
            return 0
        if cfg.describe:  # once under torchrun: rank 0's cut is the one its run would use
            if os.environ.get("RANK", "0") == "0":
                describe(cfg)
            return 0
        stop = StopRequest()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            coordinator = run_distributed(cfg, stop)  # handles signals once joined
        else:
            with stop.installed():
                coordinator = run_inprocess(cfg, stop)
        if stop.signum is None:
            return 0
        if coordinator is not None and coordinator.manifest:
            say(f"stopped; the checkpoint {coordinator.manifest} continues with: "
                f"{resume_command(argv, coordinator.cfg.save_dir)}")
        return 128 + stop.signum
    except Finished as done:  # --resume of a run that trained every epoch asked for
        print(done, flush=True)
        return 0
    except (ConfigError, DataError) as exc:
        say(f"error: {exc}")
        return 2
    except (StageFailed, WriteError) as exc:
        say(f"{'' if isinstance(exc, StageFailed) else 'error: '}{exc}")
        return 1
    except KeyboardInterrupt:
        say("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
