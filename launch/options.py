"""The command line of a run: every option with its help and default, and the recipes.

The options of the paper's ``train.py`` keep their names and defaults (§1 of the method spec),
so its commands run unchanged; localpipe's own follow in a group of their own. ``--recipe NAME``
sets the options of one of the recipes (the paper's 86, localpipe's 12 for ViTs) first, and
whatever the command line says explicitly wins over it.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from localpipe.launch.recipes import RECIPES, listing
from localpipe.stages.config import Config, cli_flag, offered

EXAMPLES = """examples:
  %(prog)s --recipe mnist-mlp-predsim --data-root ../shared/data
      the paper's MNIST MLP recipe, every stage in this process
  torchrun launch/pipeline.py --stages 4 --recipe mnist-mlp-predsim
      the same as four stages, one thread each (one process)
  torchrun --nproc-per-node 4 launch/pipeline.py --stages 4 --recipe cifar10-vgg8b-predsim
      four stages, one process each (one GPU each where there are four)
  torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
      launch/pipeline.py --stages 4 --replicas 2 --recipe cifar10-vgg8b-predsim
      on each of two machines: every stage twice, each replica on half of every batch
  %(prog)s --recipe list
      every recipe, with the paper's test error
  %(prog)s --recipe mnist-mlp-predsim --save-dir runs/my-run --resume auto
      continue a run from its newest checkpoint (with the options it was started with)
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


def program(script: str = "launch/pipeline.py", command: str = "localpipe") -> str:
    """The name the user typed: the installed ``command``, else the ``script``."""
    name = os.path.basename(sys.argv[0] or "")
    return command if name == command else script


def build_parser() -> Parser:
    """Every option of ``Config``, from its own description (``stages/config.option``): the
    paper's ``train.py`` options in one group, localpipe's own (from ``--recipe`` on) in
    another, in the order the config lists them."""
    p = Parser(prog=program(), formatter_class=Help, epilog=EXAMPLES,
               description="Train a network with local error signals (Nøkland & Eidnes, 2019), "
                           "pipelined over stages: threads of one process, or torchrun "
                           "processes.")
    group = p.add_argument_group("the paper's options (train.py)")
    for f in dataclasses.fields(Config):
        if f.name == "recipe":
            group = p.add_argument_group("localpipe's options")
        if not f.metadata["cli"]:
            continue
        group.add_argument(cli_flag(f), *f.metadata["aliases"], dest=f.name,
                           help=f.metadata["help"].replace("{choices}", ", ".join(offered(f))),
                           **_kind(f))
    return p


def _kind(f: dataclasses.Field) -> dict:
    """How argparse reads an option, from its type: a bool is a flag (``--no-X`` for one that
    is on by default), a list of ints takes several values (the cut, one comma-separated)."""
    meta = f.metadata
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if f.type == "bool":
        return {"action": "store_false" if default else "store_true"}
    kind = {"default": default, "metavar": meta["metavar"]}
    if meta["choices"] and meta["metavar"] is None:  # else its help lists them
        kind["choices"] = list(offered(f))
    if f.type == "list[int]":
        return {**kind, "type": int, "nargs": "*"}
    if f.type == "list[int] | None":
        return {**kind, "type": _int_list}
    return {**kind, "type": {"int": int, "float": float}.get(f.type, str)}


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
    if args["recipe"] == "" and any(a == "--recipe" or a.startswith("--recipe=")
                                    for a in (sys.argv[1:] if argv is None else argv)):
        parser.error(f"--recipe needs a name; --recipe list shows all {len(RECIPES)}")
    if args["recipe"] == "list":
        print(listing())
        return None
    if args["recipe"]:
        if args["recipe"] not in RECIPES:
            parser.error(f"unknown recipe {args['recipe']!r}; --recipe list shows all "
                         f"{len(RECIPES)}")
        parser.set_defaults(**RECIPES[args["recipe"]].options)
        args = vars(parser.parse_args(argv))
    if args.pop("no_cuda"):
        args["device"] = "cpu"
    return Config(**args, no_cuda=args["device"] == "cpu").validate()
