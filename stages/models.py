"""Networks as ordered lists of units (local blocks, then the output layer), spec §2.3–2.4.

A network is first *planned* (one ``UnitSpec`` per unit, cheap and deterministic) and then any
subset of units is *built*, each from its own seed (seed, "init", index). A process therefore
builds only its own stage, and the weights never depend on which process built what.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from localpipe.stages import residual
from localpipe.stages.blocks import LocalBlock, OutputLayer, Unit
from localpipe.stages.config import RESIDUAL_MODELS, VGG_CONFIGS, Config, derive_seed
from localpipe.stages.stage import Stage


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

    def describe(self) -> str:
        if self.kind == "conv":
            k, s, p = self.conv
            pool = ", maxpool 2" if self.max_pool else ""
            return f"conv {self.n_in}->{self.n_out} {k}x{k}/{s} @{self.size}x{self.size}{pool}"
        return f"{self.kind} {self.n_in}->{self.n_out}"


Spec = UnitSpec | residual.ResidualSpec | residual.HeadSpec  # one unit of any network


def plan(cfg: Config, in_shape: tuple[int, int, int], num_classes: int) -> list[Spec]:
    """The units of ``cfg.model`` for inputs of shape (C, H, W), in forward order."""
    if cfg.model in RESIDUAL_MODELS:
        return residual.plan(cfg, in_shape, num_classes)
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
        if not isinstance(spec, UnitSpec):
            return residual.build(spec, cfg, num_classes)
        if spec.kind == "output":
            return OutputLayer(spec.index, cfg, spec.n_in, spec.n_out, spec.zero_init)
        return LocalBlock(spec.index, cfg, num_classes, spec.n_in, spec.n_out, spec.conv,
                          spec.size, spec.max_pool)


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
        with torch.device("meta"):
            return [count_parameters([build_unit(s, self.cfg, self.num_classes)])
                    for s in self.specs]

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
