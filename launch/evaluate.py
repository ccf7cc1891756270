"""Load a run's model, and evaluate it: the test error and each block's local-head error.

    from localpipe.launch.evaluate import load
    model, cfg, transform = load("runs/latest")        # a run folder, or a checkpoint folder
    with torch.no_grad():
        logits = model(transform(images))              # uint8 N×C×H×W images, as the dataset

    python launch/evaluate.py runs/latest              # prints, and writes evaluation.json

The model is the whole network in eval mode, built from the run's own options, so a wrong
guess at its configuration cannot happen; ``transform`` normalises images the way the run saw
them. The evaluation streams the test split through the same code as a run's own test pass,
so it reproduces the run's last test error exactly (at the same --threads).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import sys
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn

from localpipe.pipeline import checkpoint
from localpipe.pipeline.console import say
from localpipe.pipeline.data import (INFO, Batches, DataError, DatasetInfo, load_batches,
                                     load_split)
from localpipe.launch.options import Parser, program
from localpipe.pipeline import device as dev
from localpipe.pipeline.files import WriteError, atomic_write
from localpipe.stages.config import PYTHON_MODEL, Config, ConfigError
from localpipe.stages.localnet import LocalNet, module_state
from localpipe.stages.models import build_model, plan
from localpipe.stages.stage import Stage


class Loaded(NamedTuple):
    model: Stage  # the whole network, in eval mode: model(x) gives logits
    cfg: Config  # the options the run was trained with
    transform: Callable[[Tensor], Tensor]  # images as stored (uint8) -> the model's inputs


class Normalize:
    """Scale to [0, 1] (uint8 images) and normalise with the dataset's mean and std (§6.1)."""

    def __init__(self, info: DatasetInfo) -> None:
        self.mean = torch.tensor(info.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(info.std).view(1, -1, 1, 1)

    def __call__(self, images: Tensor) -> Tensor:
        x = images.float()
        if images.dtype == torch.uint8:  # by a tensor, as training's batches: a GPU divides by
            x = x.div_(torch.tensor(255.0, device=x.device))  # a number as x · (1/255)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


def load(path: str, device: str | torch.device = "cpu",
         into: nn.Sequential | LocalNet | None = None):
    """The model of a finished run (its ``model.pt``), or of a checkpoint folder (or, for a
    run without ``model.pt``, of its newest checkpoint), with its config and input transform.

    ``into``: for a run of ``lp.fit``, a fresh copy of the ``nn.Sequential`` it trained (a
    checkpoint holds weights, not code), or a ``LocalNet`` around one (its heads are loaded
    too); its weights are loaded and it is returned, in eval mode."""
    folder = checkpoint.find_checkpoint(path, path) \
        if not os.path.exists(os.path.join(path, "model.pt")) else None
    if folder is not None:
        with open(os.path.join(folder, "manifest.json")) as f:
            manifest = json.load(f)
        cfg = config_from(manifest["args"])
        state = None
    else:
        with open(os.path.join(path, "args.json")) as f:
            cfg = config_from(json.load(f))
        model_pt = os.path.join(path, "model.pt")
        try:
            state = torch.load(model_pt, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:
            raise ValueError(f"{model_pt} is truncated or not a model file of localpipe's "
                             f"({type(exc).__name__})") from None
    if (cfg.model == PYTHON_MODEL) != (into is not None):
        raise ConfigError(f"{path} holds a network defined in Python: load it with "
                          f"into=<a fresh copy of its nn.Sequential>" if into is None else
                          f"{path} holds the paper's {cfg.model}, not a network of yours: "
                          f"load it without into=")
    if into is not None:
        module = into.module if isinstance(into, LocalNet) else into
        if state is None:
            manifest = checkpoint.read_manifest(folder, cfg.to_dict())
            units = checkpoint.load_units(folder, manifest, list(range(len(module))))["units"]
            state = {f"{'output' if i == len(module) - 1 else f'blocks.{i}'}.{k}": v
                     for i, unit in units.items() for k, v in unit["state"].items()}
        if isinstance(into, LocalNet):
            into.load_stage_state(state)
        else:
            into.load_state_dict(module_state(state, into))
        return into.to(device).eval()
    info = INFO[cfg.dataset]
    model = build_model(cfg, info.shape, info.num_classes)
    try:
        if state is None:
            manifest = checkpoint.read_manifest(folder, cfg.to_dict())
            model.load_checkpoint_state(checkpoint.load_units(folder, manifest, model.indices))
        else:
            model.load_state_dict(state)
    except RuntimeError as exc:  # another width, missing or extra tensors
        lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        raise ValueError(f"the weights in {path} do not fit the {cfg.model} its options "
                         f"describe: {(lines or ['?'])[0][:200]}") from None
    return Loaded(model.to(device).eval(), cfg, Normalize(info))


def config_from(args: dict) -> Config:
    """The Config of a run's saved options (options a later localpipe added keep defaults)."""
    known = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in args.items() if k in known})


@torch.no_grad()
def evaluate(loaded: Loaded, split: str = "test") -> tuple[dict, Tensor]:
    """Error and loss of the output layer and of each block's local head on ``split`` ("test"
    or "val"), and the logits, in the order of the split."""
    model, cfg = loaded.model, loaded.cfg
    if split == "test":  # no need to load the training split
        batches = Batches(*load_split(cfg, False), INFO[cfg.dataset], cfg, train=False)
    else:
        batches = load_batches(cfg)[2]
        if batches is None:
            raise ConfigError("the run holds out no validation split (--val-split 0)")
    device = next(model.parameters()).device
    logits = []
    for x, y in batches.epoch(1):
        logits.append(model.eval_step(x.to(device), y.to(device), split).cpu())
    meters = {i: m[split] for i, m in model.take_meters().items()}
    out = meters.pop(max(meters))
    info = INFO[cfg.dataset]
    names = [spec.describe() for spec in plan(cfg, info.shape, info.num_classes)]
    return {"split": split, "samples": out["n"], "error": out["error"], "loss": out["loss"],
            "blocks": [{"block": i, "name": names[i], "error": m["error"], "loss": m["loss"],
                        "loss_sim": m["loss_sim"], "loss_pred": m["loss_pred"]}
                       for i, m in sorted(meters.items())]}, torch.cat(logits)


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog=program("launch/evaluate.py", "localpipe-evaluate"),
               description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a run folder or a checkpoint folder")
    p.add_argument("--split", default="test", choices=["test", "val"],
                   help="the test split, or the run's held-out validation split")
    p.add_argument("--data-root", default=None, help="where the dataset is (default: the run's)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                   help="where to evaluate (default: cpu)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (default: torch's own; a run's figures repeat exactly "
                        "at the run's --threads)")
    p.add_argument("--json", default=None,
                   help="where to write the figures (default: evaluation.json in the folder)")
    p.add_argument("--logits", default=None, help="also save the logits (a torch file) here")
    args = p.parse_args(argv)
    if args.threads < 0:
        p.error(f"--threads must not be negative, got {args.threads}")
    if not os.path.isdir(args.path):
        say(f"error: cannot evaluate {args.path}: no such folder (a run folder or a checkpoint "
            f"folder)")
        return 2
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        loaded = load(args.path, dev.choose(args.device))
        if args.data_root:
            loaded = loaded._replace(cfg=dataclasses.replace(loaded.cfg,
                                                             data_root=args.data_root))
        figures, logits = evaluate(loaded, args.split)
    except (OSError, ValueError, KeyError, DataError) as exc:  # ConfigError is a ValueError
        say(f"error: cannot evaluate {args.path}: {(str(exc).splitlines() or [''])[0]}")
        return 2
    print(f"{args.split} error {figures['error']:.3f}% on {figures['samples']} samples "
          f"(loss {figures['loss']:.4f})")
    for b in figures["blocks"]:
        if b["error"] is not None:
            print(f"  block {b['block']} {b['name']}: local-head error {b['error']:.3f}%")
    out = args.json or os.path.join(args.path, "evaluation.json")
    try:
        atomic_write(out, lambda f: f.write(json.dumps(figures, indent=1).encode()))
        print(f"written: {out}")
        if args.logits:
            checkpoint.save_torch(logits, args.logits)
    except WriteError as exc:
        say(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
