"""Networks as ordered lists of units (local blocks, then the output layer), spec §2.3–2.4.

A network is first *planned* (one ``UnitSpec`` per unit, cheap and deterministic) and then any
subset of units is *built*, each from its own seed (seed, "init", index). A process therefore
builds only its own stage, and the weights never depend on which process built what.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Protocol

import torch

from localpipe.stages.blocks import LocalBlock, OutputLayer, Unit
from localpipe.stages.config import Config, derive_seed
from localpipe.stages.registry import MODELS, register_model
from localpipe.stages.stage import Stage

VGG_CONFIGS: dict[str, list[int | str]] = {
    "vgg6a": [128, "M", 256, "M", 512, "M", 512],
    "vgg6b": [128, "M", 256, "M", 512, "M", 512, "M"],
    "vgg8": [64, "M", 128, "M", 256, "M", 512, "M", 512, "M"],
    "vgg8a": [128, 256, "M", 256, 512, "M", 512, "M", 512],
    "vgg8b": [128, 256, "M", 256, 512, "M", 512, "M", 512, "M"],
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg11b": [128, 128, 128, 256, "M", 256, 512, "M", 512, 512, "M", 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


@dataclass(frozen=True)
class UnitSpec:
    """Everything needed to build one unit. ``conv`` is (kernel, stride, padding) or None."""

    index: int
    kind: str  # "conv", "linear" or "output"
    n_in: int
    n_out: int
    conv: tuple[int, int, int] | None = None
    size: int = 1
    max_pool: bool = False
    zero_init: bool = False

    def build(self, cfg: Config, num_classes: int) -> Unit:
        if self.kind == "output":
            return OutputLayer(self.index, cfg, self.n_in, self.n_out, self.zero_init)
        return LocalBlock(self.index, cfg, num_classes, self.n_in, self.n_out, self.conv,
                          self.size, self.max_pool)

    def describe(self) -> str:
        if self.kind == "conv":
            k, s, p = self.conv
            pool = ", maxpool 2" if self.max_pool else ""
            return f"conv {self.n_in}->{self.n_out} {k}x{k}/{s} @{self.size}x{self.size}{pool}"
        return f"{self.kind} {self.n_in}->{self.n_out}"


class Spec(Protocol):
    """One unit of a network, planned: what builds it, and a line that says what it is."""

    index: int

    def build(self, cfg: Config, num_classes: int) -> Unit: ...

    def describe(self) -> str: ...


def plan(cfg: Config, in_shape: tuple[int, int, int], num_classes: int) -> list[Spec]:
    """The units of ``cfg.model`` (a registered network) for inputs of shape (C, H, W), in
    forward order."""
    return MODELS[cfg.model](cfg, in_shape, num_classes)


@register_model("mlp", *VGG_CONFIGS)
def plan_vgg(cfg: Config, in_shape: tuple[int, int, int], num_classes: int) -> list[UnitSpec]:
    """The MLP (no convs) and the VGG family: conv units, then --num-layers linear ones, then
    the output layer (§2.3)."""
    channels, size, _ = in_shape
    specs: list[UnitSpec] = []
    if cfg.model == "mlp":
        width = channels * size * size
    else:
        scale = 1
        for item in VGG_CONFIGS[cfg.model]:
            if item == "M":
                last = specs[-1]
                specs[-1] = UnitSpec(last.index, "conv", last.n_in, last.n_out, last.conv,
                                     last.size, max_pool=True)
                scale *= 2
                continue
            out = int(item * cfg.feat_mult)
            conv = (3, 1, 1)
            if not specs and size > 64:  # STL-10 and larger: a 7x7/2 first layer (§2.4)
                conv, scale = (7, 2, 3), 2
            specs.append(UnitSpec(len(specs), "conv", channels, out, conv, size // scale))
            channels = out
        width = channels * (size // scale) ** 2
    for _ in range(cfg.num_layers):
        specs.append(UnitSpec(len(specs), "linear", width, cfg.num_hidden))
        width = cfg.num_hidden
    # The classifier is zero-initialised in local modes, except VGG's plain one (quirk 10).
    zero = not cfg.backprop and (cfg.model == "mlp" or cfg.num_layers > 0)
    specs.append(UnitSpec(len(specs), "output", width, num_classes, zero_init=zero))
    return specs


def build_unit(spec: Spec, cfg: Config, num_classes: int) -> Unit:
    """Build one unit with its weights drawn from its own seed, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "init", spec.index))
        return spec.build(cfg, num_classes)


def build_stage(cfg: Config, in_shape: tuple[int, int, int], num_classes: int,
                indices: list[int] | None = None,
                device: torch.device | str = "cpu") -> Stage:
    """Build the units ``indices`` (all of them by default) as one stage on ``device``."""
    specs = plan(cfg, in_shape, num_classes)
    chosen = specs if indices is None else [specs[i] for i in indices]
    return Stage([build_unit(s, cfg, num_classes) for s in chosen], cfg, torch.device(device))


def build_model(cfg: Config, in_shape: tuple[int, int, int], num_classes: int) -> Stage:
    """The whole network as an ordinary module: ``model(x)`` gives logits in eval mode and
    ``load_state_dict`` takes any ``model.pt`` this project writes."""
    return build_stage(cfg, in_shape, num_classes)


class Zoo:
    """The paper's network ``cfg.model`` for inputs of ``shape``, as a runner sees it
    (stages/network.py): built afresh, unit by unit, from its seeds."""

    def __init__(self, cfg: Config, shape: tuple[int, int, int], num_classes: int) -> None:
        self.cfg, self.shape, self.num_classes = cfg, shape, num_classes
        self.specs = plan(cfg, shape, num_classes)

    def names(self) -> list[str]:
        return [s.describe() for s in self.specs]

    def parameter_counts(self) -> list[int]:
        # an input too small for the network gives layers of no features here, which
        # pipeline.plan.check_trains refuses in one line: no warning on the way
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [count_parameters([build_unit(s, self.cfg, self.num_classes)])
                    for s in self.specs]

    def state_shapes(self, cfg: Config) -> list[dict[str, tuple[int, ...]]]:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [{k: tuple(v.shape) for k, v in
                     build_unit(s, cfg, self.num_classes).state_dict().items()}
                    for s in plan(cfg, self.shape, self.num_classes)]

    def build(self, cfg: Config, indices: list[int] | None, device: torch.device | str,
              throwaway: bool = False) -> Stage:
        return build_stage(cfg, self.shape, self.num_classes, indices, device)


def count_parameters(units: list[Unit] | Stage) -> int:
    modules = units.units if isinstance(units, Stage) else units
    return sum(p.numel() for u in modules for p in u.parameters())


def backprop_parameters(cfg: Config, in_shape: tuple[int, int, int], num_classes: int) -> int:
    """Parameters of the network without local heads, as the paper counts them (§2.4)."""
    bp = Config(**{**cfg.to_dict(), "backprop": True, "no_detach": False, "bio": False})
    with torch.device("meta"):
        units = [build_unit(s, bp, num_classes) for s in plan(bp, in_shape, num_classes)]
    return count_parameters(units)
