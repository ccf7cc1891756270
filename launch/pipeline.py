"""localpipe's entry point: train a network with local error signals, pipelined over stages.

    python launch/pipeline.py --model mlp --dataset MNIST ...            # all stages in-process
    torchrun --nproc-per-node 4 launch/pipeline.py --stages 4 ...        # one process per stage

The options are the paper's ``train.py`` options with the same names and defaults, so its
recipes run unchanged; localpipe's own options follow them in ``--help``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script, this folder comes first on sys.path and this very file would shadow the
    # ``pipeline`` package: put the project root there instead.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from pipeline.channel import StageFailed  # noqa: E402
from pipeline.checkpoint import WriteError  # noqa: E402
from pipeline.console import say  # noqa: E402
from pipeline.data import INFO, DataError  # noqa: E402
from pipeline.distributed import run_distributed  # noqa: E402
from pipeline.inprocess import run_inprocess  # noqa: E402
from pipeline.plan import make_plan  # noqa: E402
from pipeline.signals import StopRequest  # noqa: E402
from pipeline.worker import Fault  # noqa: E402
from stages.config import DATASETS, MODELS, Config, ConfigError  # noqa: E402
from stages.models import backprop_parameters, build_unit  # noqa: E402

FAULT_ENV = "LOCALPIPE_INJECT_FAULT"  # "STAGE:STEP[:raise|kill|nan]", a test hook


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        """One line and exit code 2, like every other bad input."""
        self.exit(2, f"localpipe: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    d = Config()
    p = Parser(prog="launch/pipeline.py", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", default=d.model, help=f"network ({', '.join(MODELS)})")
    a("--dataset", default=d.dataset, help=f"dataset ({', '.join(DATASETS)})")
    a("--batch-size", type=int, default=d.batch_size, help="training and test batch size")
    a("--num-layers", type=int, default=d.num_layers,
      help="hidden FC layers (the whole mlp; VGG's classifier, 0 = one Linear)")
    a("--num-hidden", type=int, default=d.num_hidden, help="width of every hidden FC layer")
    a("--dim-in-decoder", type=int, default=d.dim_in_decoder,
      help="upper bound on the pooled input size of a conv pred head")
    a("--feat-mult", type=float, default=d.feat_mult, help="multiplies every conv width")
    a("--epochs", type=int, default=d.epochs)
    a("--classes-per-batch", type=int, default=d.classes_per_batch,
      help="if >0, batches hold about this many classes")
    a("--classes-per-batch-until-epoch", type=int, default=d.classes_per_batch_until_epoch,
      help="plain shuffling after this epoch (0: never)")
    a("--lr", type=float, default=d.lr)
    a("--lr-decay-milestones", type=int, nargs="*", default=d.lr_decay_milestones)
    a("--lr-decay-fact", type=float, default=d.lr_decay_fact)
    a("--optim", default=d.optim, choices=["adam", "amsgrad", "sgd"])
    a("--momentum", type=float, default=d.momentum, help="SGD momentum")
    a("--weight-decay", type=float, default=d.weight_decay)
    a("--alpha", type=float, default=d.alpha, help="weight of the unsupervised local loss")
    a("--beta", type=float, default=d.beta, help="weight of sim inside predsim")
    a("--dropout", type=float, default=d.dropout)
    a("--loss-sup", default=d.loss_sup, choices=["pred", "sim", "predsim"])
    a("--loss-unsup", default=d.loss_unsup, choices=["none", "sim", "recon"])
    a("--nonlin", default=d.nonlin, choices=["relu", "leakyrelu"])
    a("--no-similarity-std", action="store_true", help="flatten conv maps in S(X)")
    a("--no-cuda", action="store_true", help="run on the CPU (same as --device cpu)")
    a("--backprop", action="store_true", help="global backprop, no local heads")
    a("--no-batch-norm", action="store_true")
    a("--no-detach", action="store_true", help="local losses plus the end-to-end gradient")
    a("--pre-act", action="store_true", help="accepted for compatibility (ResNet only)")
    a("--seed", type=int, default=d.seed)
    a("--save-dir", default=d.save_dir, help="outputs go here ('' saves nothing)")
    a("--resume", default=d.resume,
      help="continue from a checkpoint folder, a save dir's newest checkpoint, or 'auto'")
    a("--progress-bar", action="store_true")
    a("--no-print-stats", action="store_true", help="skip the local heads at test time")
    a("--bio", action="store_true", help="backprop-free local heads (§5)")
    a("--target-proj-size", type=int, default=d.target_proj_size)
    a("--cutout", action="store_true")
    a("--n_holes", type=int, default=d.n_holes)
    a("--length", type=int, default=d.length)
    g = p.add_argument_group("localpipe").add_argument
    g("--stages", type=int, default=d.stages, help="pipeline stages (processes under torchrun)")
    g("--balance", type=_int_list, default=None,
      help="units per stage, e.g. 2,3,2 (default: the measured best cut)")
    g("--queue-depth", type=int, default=d.queue_depth, help="batches in flight between stages")
    g("--data-root", default=d.data_root)
    g("--no-download", dest="download", action="store_false",
      help="fail at once when a dataset is missing instead of downloading it")
    g("--max-steps", type=int, default=d.max_steps, help="stop after N training batches")
    g("--limit-train", type=int, default=d.limit_train, help="use the first N training samples")
    g("--limit-test", type=int, default=d.limit_test, help="use the first N test samples")
    g("--describe", action="store_true", help="print the network and its stages, then exit")
    g("--device", default=d.device, choices=["auto", "cpu", "cuda"])
    g("--threads", type=int, default=d.threads, help="torch threads per process (0: auto)")
    g("--comm-timeout", type=float, default=d.comm_timeout,
      help="seconds a stage may wait for a neighbour, or spend on one batch, before the run "
           "is stopped (the last resort: dead and frozen ranks are named sooner)")
    g("--heartbeat-timeout", type=float, default=d.heartbeat_timeout,
      help="under torchrun, seconds without a heartbeat after which a rank counts as frozen")
    g("--deterministic", action="store_true",
      help="deterministic kernels (torch.use_deterministic_algorithms), so a GPU run repeats "
           "bit for bit")
    g("--checkpoint-every", type=int, default=d.checkpoint_every,
      help="also checkpoint every N training batches (0: at epoch ends only)")
    g("--keep-checkpoints", type=int, default=d.keep_checkpoints,
      help="keep only the newest N checkpoints (0: all)")
    g("--on-nan", default=d.on_nan, choices=["stop", "skip"],
      help="on a NaN/inf loss: stop the run, or skip that batch's update")
    return p


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 2,3,2, got {text!r}") from None


def parse_config(argv: list[str] | None = None) -> Config:
    args = vars(build_parser().parse_args(argv))
    if args.pop("no_cuda"):
        args["device"] = "cpu"
    return Config(**args, no_cuda=args["device"] == "cpu").validate()


def describe(cfg: Config) -> None:
    """Print the units with their parameter counts (local heads included), the stages, and
    last the parameter count of the backprop network as the paper counts it."""
    import torch

    from pipeline import device

    info = INFO[cfg.dataset]
    try:
        run_plan = make_plan(cfg, device.choose(cfg.device))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    with torch.device("meta"):
        counts = [sum(p.numel() for p in build_unit(s, cfg, info.num_classes).parameters())
                  for s in run_plan.specs]
    print(f"{cfg.model} on {cfg.dataset} {info.shape}, {info.num_classes} classes, "
          f"loss {'backprop' if cfg.backprop else cfg.loss_sup}")
    for spec, n in zip(run_plan.specs, counts):
        print(f"  unit {spec.index}: {spec.describe():48s} {n:>12,d} parameters")
    print(f"total parameters (with local heads): {sum(counts):,d}")
    for k, part in enumerate(run_plan.parts):
        cost = ""
        if run_plan.costs is not None:
            total = sum(run_plan.costs[i] for i in part)
            cost = (f", measured step {1000 * total:.1f} ms" if run_plan.cost_kind == "measured"
                    else f", {total:,.0f} parameters")
        print(f"stage {k}: units {part[0]}-{part[-1]}{cost}")
    print(f"backprop parameters: {backprop_parameters(cfg, info.shape, info.num_classes)}")


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
        if cfg.describe:
            describe(cfg)
            return 0
        fault = Fault.parse(os.environ.get(FAULT_ENV))
        stop = StopRequest()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            run_distributed(cfg, stop, fault)  # handles signals once the job is joined
        else:
            with stop.installed():
                run_inprocess(cfg, stop, fault)
        return 0 if stop.signum is None else 128 + stop.signum
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
