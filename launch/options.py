"""The command line of a run: every option with its help and default, and the recipes.

The options of the paper's ``train.py`` keep their names and defaults (§1 of the method spec),
so its commands run unchanged; localpipe's own follow in a group of their own. ``--recipe NAME``
sets the options of one of the paper's 86 recipes first, and whatever the command line says
explicitly wins over it.
"""
from __future__ import annotations

import argparse
import os
import sys

from localpipe.launch.recipes import RECIPES, listing
from localpipe.stages.config import DATASETS, MODELS, Config

EXAMPLES = """examples:
  %(prog)s --recipe mnist-mlp-predsim --data-root ../shared/data
      the paper's MNIST MLP recipe, every stage in this process
  torchrun launch/pipeline.py --stages 4 --recipe mnist-mlp-predsim
      the same as four stages, one thread each (one process)
  torchrun --nproc-per-node 4 launch/pipeline.py --stages 4 --recipe cifar10-vgg8b-predsim
      four stages, one process each (one GPU each where there are four)
  torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \
      launch/pipeline.py --stages 4 --replicas 2 --recipe cifar10-vgg8b-predsim
      on each of two machines: every stage twice, each replica on half of every batch
  %(prog)s --recipe list
      every recipe, with the paper's test error
  %(prog)s --save-dir runs/my-run --resume auto
      continue a run from its newest checkpoint
  %(prog)s --recipe cifar10-vgg11b-predsim --stages 4 --describe
      the network, its parameter counts and the cut into stages, then exit
"""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        """One line and exit code 2, like every other bad input."""
        self.exit(2, f"localpipe: error: {message}\n")


class Help(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, written for people: on/off, none, lists."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is argparse.SUPPRESS:  # --help itself
            return text
        return f"{text} (default: {_shown(action)})"


def _shown(action: argparse.Action) -> str:
    value = action.default
    if isinstance(action, argparse._StoreFalseAction):
        return "off"  # a --no-X flag: X happens unless the flag is given
    if value is None or value == [] or value == "":
        return "none"
    if value is False:
        return "off"
    if isinstance(value, list):
        return " ".join(map(str, value))
    return str(value)


def program() -> str:
    """The name the user typed: ``localpipe`` for the installed command, else the script."""
    name = os.path.basename(sys.argv[0] or "")
    return "localpipe" if name == "localpipe" else "launch/pipeline.py"


def build_parser() -> Parser:
    d = Config()
    p = Parser(prog=program(), formatter_class=Help, epilog=EXAMPLES,
               description="Train a network with local error signals (Nøkland & Eidnes, 2019), "
                           "pipelined over stages: threads of one process, or torchrun "
                           "processes.")
    a = p.add_argument_group("the paper's options (train.py)").add_argument
    a("--model", default=d.model, metavar="NAME", help=f"network: {', '.join(MODELS)}")
    a("--dataset", default=d.dataset, metavar="NAME", help=f"dataset: {', '.join(DATASETS)}")
    a("--batch-size", type=int, default=d.batch_size, metavar="N",
      help="training and test batch size")
    a("--num-layers", type=int, default=d.num_layers, metavar="N",
      help="hidden FC layers: the whole mlp; after a VGG's convs (0: one plain Linear); "
           "none in the residual networks")
    a("--num-hidden", type=int, default=d.num_hidden, metavar="N",
      help="width of every hidden FC layer")
    a("--dim-in-decoder", type=int, default=d.dim_in_decoder, metavar="N",
      help="largest input of a conv block's pred head (average pooling brings it down)")
    a("--feat-mult", type=float, default=d.feat_mult, metavar="X",
      help="multiplies every conv width (not the Wide ResNets', as in the paper's code)")
    a("--epochs", type=int, default=d.epochs, metavar="N", help="epochs to train")
    a("--classes-per-batch", type=int, default=d.classes_per_batch, metavar="N",
      help="if > 0, batches hold this many classes (§6.3)")
    a("--classes-per-batch-until-epoch", type=int, default=d.classes_per_batch_until_epoch,
      metavar="E", help="plain shuffling after epoch E (0: never)")
    a("--lr", type=float, default=d.lr, help="initial learning rate of every optimizer")
    a("--lr-decay-milestones", type=int, nargs="*", default=d.lr_decay_milestones,
      metavar="E", help="epochs after which the learning rate is multiplied by --lr-decay-fact")
    a("--lr-decay-fact", type=float, default=d.lr_decay_fact, metavar="X",
      help="learning rate factor at each milestone")
    a("--optim", default=d.optim, choices=["adam", "amsgrad", "sgd"], help="optimizer")
    a("--momentum", type=float, default=d.momentum, metavar="X", help="SGD momentum")
    a("--weight-decay", type=float, default=d.weight_decay, metavar="X",
      help="L2 weight decay of every optimizer")
    a("--alpha", type=float, default=d.alpha, metavar="X",
      help="weight of the unsupervised local loss (α·unsup + (1−α)·sup)")
    a("--beta", type=float, default=d.beta, metavar="X",
      help="weight of sim in predsim ((1−β)·pred + β·sim)")
    a("--dropout", type=float, default=d.dropout, metavar="P",
      help="dropout after every hidden nonlinearity")
    a("--loss-sup", default=d.loss_sup, choices=["pred", "sim", "predsim"],
      help="supervised local loss")
    a("--loss-unsup", default=d.loss_unsup, choices=["none", "sim", "recon"],
      help="unsupervised local loss")
    a("--nonlin", default=d.nonlin, choices=["relu", "leakyrelu"], help="nonlinearity")
    a("--no-similarity-std", action="store_true",
      help="flatten conv maps in S(X) instead of taking per-channel spatial std")
    a("--no-cuda", action="store_true", help="train on the CPU (the same as --device cpu)")
    a("--backprop", action="store_true", help="global backprop: no local heads")
    a("--no-batch-norm", action="store_true", help="blocks without batch norm")
    a("--no-detach", action="store_true",
      help="local losses plus the end-to-end gradient (cannot be pipelined)")
    a("--pre-act", action="store_true",
      help="pre-activation Basic blocks and a bare stem (ResNet only; Bottleneck blocks keep "
           "post-activation, as in the paper's code)")
    a("--seed", type=int, default=d.seed, help="seed of every random stream")
    a("--save-dir", default=d.save_dir, metavar="DIR",
      help="the run's folder; none: a new one under runs/ ('' saves nothing)")
    a("--resume", default=d.resume, metavar="PATH",
      help="continue from a checkpoint folder, a run folder's newest checkpoint, or 'auto': "
           "--save-dir's newest (under torchrun --max-restarts without --save-dir, the job's "
           "own folder), or a fresh start if there is none")
    a("--progress-bar", action="store_true",
      help="a progress bar with the overall ETA even when stderr is not a terminal (on a "
           "terminal it is always shown)")
    a("--no-print-stats", action="store_true",
      help="skip the local heads at test time (no per-block test figures)")
    a("--bio", action="store_true", help="backprop-free local heads (§5)")
    a("--target-proj-size", type=int, default=d.target_proj_size, metavar="N",
      help="size of the random label code in --bio")
    a("--cutout", action="store_true", help="Cutout augmentation (§6.2)")
    a("--n-holes", "--n_holes", dest="n_holes", type=int, default=d.n_holes, metavar="N",
      help="Cutout holes per image")
    a("--length", type=int, default=d.length, metavar="PX", help="Cutout square side")
    g = p.add_argument_group("localpipe's options").add_argument
    g("--recipe", default=d.recipe, metavar="NAME",
      help="set the options of one of the paper's 86 recipes ('list' prints them); options "
           "given beside it win")
    g("--stages", type=int, default=d.stages, metavar="K",
      help="pipeline stages: threads of this process, or processes under torchrun")
    g("--replicas", type=int, default=d.replicas, metavar="R",
      help="data-parallel replicas of every stage (torchrun with K·R processes): each trains "
           "on its shard of every batch, and each unit's gradients are averaged over them")
    g("--per-replica-batch", action="store_true",
      help="--batch-size is each replica's batch (the global batch is R times it), so that "
           "each similarity matrix spans the paper's batch; off: --batch-size is split")
    g("--balance", type=_int_list, default=None, metavar="N,N,...",
      help="units per stage, e.g. 2,3,2; none: the cut whose slowest stage is fastest, from "
           "each unit's measured step time")
    g("--queue-depth", type=int, default=d.queue_depth, metavar="Q",
      help="batches in flight between two neighbouring stages")
    g("--data-root", default=d.data_root, metavar="DIR",
      help="where the datasets are (torchvision's layout), or are downloaded to")
    g("--no-download", dest="download", action="store_false",
      help="stop at once when a dataset is missing instead of downloading it")
    g("--val-split", type=int, default=d.val_split, metavar="N",
      help="hold N training samples out (seeded) and report their error every epoch; 0 "
           "keeps the paper's protocol")
    g("--max-steps", type=int, default=d.max_steps, metavar="N",
      help="stop training after N batches (0: no limit)")
    g("--limit-train", type=int, default=d.limit_train, metavar="N",
      help="use the first N training samples (0: all)")
    g("--limit-test", type=int, default=d.limit_test, metavar="N",
      help="use the first N test samples (0: all)")
    g("--describe", action="store_true",
      help="print the network, its parameter counts and its stages, then exit")
    g("--device", default=d.device, choices=["auto", "cpu", "cuda"],
      help="auto: a GPU when one is visible")
    g("--threads", type=int, default=d.threads, metavar="N",
      help="torch threads per process (0: the cores shared out between the stages)")
    g("--deterministic", action="store_true",
      help="deterministic kernels, so that a GPU run repeats bit for bit")
    g("--log-every", type=int, default=d.log_every, metavar="N",
      help="a record of every unit's loss every N training batches, in steps.jsonl and "
           "TensorBoard (0: none)")
    g("--no-curves", action="store_true",
      help="no curves.png and no TensorBoard files (a process beside the run draws and writes "
           "them; leave it out of many short runs)")
    g("--checkpoint-every", type=int, default=d.checkpoint_every, metavar="N",
      help="checkpoint every N training batches too (0: at epoch ends only)")
    g("--keep-checkpoints", type=int, default=d.keep_checkpoints, metavar="N",
      help="keep the newest N checkpoints (0: all)")
    g("--on-nan", default=d.on_nan, choices=["stop", "skip"],
      help="a NaN or infinite loss stops the run, or that batch's update is skipped")
    g("--comm-timeout", type=float, default=d.comm_timeout, metavar="S",
      help="seconds a stage may wait for a neighbour, or spend on one batch, before the run "
           "stops (the last resort: dead and frozen ranks are named sooner)")
    g("--heartbeat-timeout", type=float, default=d.heartbeat_timeout, metavar="S",
      help="under torchrun, seconds without a heartbeat after which a rank counts as frozen")
    return p


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 2,3,2, got {text!r}") from None


def parse_config(argv: list[str] | None = None) -> Config | None:
    """The run's Config: a recipe's options, then the command line's. None when the command
    only asked for the recipe list, which it has printed."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    if args["recipe"] == "list":
        print(listing())
        return None
    if args["recipe"]:
        if args["recipe"] not in RECIPES:
            parser.error(f"unknown recipe {args['recipe']!r}; --recipe list shows all 86")
        parser.set_defaults(**RECIPES[args["recipe"]].options)
        args = vars(parser.parse_args(argv))
    if args.pop("no_cuda"):
        args["device"] = "cpu"
    return Config(**args, no_cuda=args["device"] == "cpu").validate()
