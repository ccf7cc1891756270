"""Residual networks (ResNet-18 to 152, Wide ResNets) as units: the paper code's ``--model resnet*``
and ``wresnet*`` (``residual-spec.md``).

A unit is one conv with its own BNs, heads and optimizer, so a cut can fall anywhere, inside a
block too. A block's first unit *stashes* its input under the block's skip name; the block's last
unit *pops* it, adds the shortcut and owns the shortcut's parameters and private optimizer,
stepped right after its own (§3.3). Between the two the stashed tensor travels with the batch,
in the stage or in the message to the next stage, like torchgpipe's skip connections: the block
input x exactly as handed on, detached, never computed on upstream of its consumer (§8).

Where the paper's code crashes ([X] quirks 1-4, 17, 18), the unit is sized from the maps it
really sees: ``deviations`` lists each such place for ``--describe`` and the README.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from localpipe.stages.blocks import LocalBlock, OutputLayer, Skips, make_optimizer
from localpipe.stages.config import Config
from localpipe.stages.registry import register_model

# block type and blocks per stage of the paper code's ResNets; the Wide ResNets are
# wresnet<depth>-<widen factor>[a] (residual-spec.md §1.1)
RESNETS: dict[str, tuple[str, tuple[int, ...]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)), "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}
WRN_MODELS = tuple(f"wresnet{d}-{k}{a}" for d, k in ((10, 8), (16, 4), (16, 8), (28, 10),
                                                     (40, 10)) for a in ("", "a"))
RESIDUAL_MODELS = (*RESNETS, *WRN_MODELS)


@dataclass(frozen=True)
class ResidualSpec:
    """One conv unit of a residual network (§2.1). ``mode`` is "post" (A), "pre" (B) or "bare"
    (C); ``dropout`` is Dropout2d's p where the mode puts it, ``input_dropout`` the plain WRN's
    element-wise dropout on the unit's input; ``stash``/``pop`` name the block's skip; a
    ``shortcut`` ("identity", "conv-bn" for ResNet, "conv-bias" for WRN) belongs to the unit
    that pops. ``declared`` is the map side the paper's code sizes the pred head for."""

    index: int
    name: str
    mode: str
    n_in: int
    n_out: int
    kernel: int
    stride: int
    bias: bool
    in_size: int
    size: int
    declared: int
    dropout: float = 0.0
    input_dropout: float = 0.0
    stash: str | None = None
    pop: str | None = None
    shortcut: str | None = None
    shortcut_in: int = 0
    shortcut_stride: int = 1
    kind: str = "res"

    @property
    def conv(self) -> tuple[int, int, int]:
        return self.kernel, self.stride, self.kernel // 2

    def build(self, cfg: Config, num_classes: int) -> "ResidualUnit":
        return ResidualUnit(self, cfg, num_classes)

    def describe(self) -> str:
        k, s = self.kernel, self.stride
        text = (f"{self.name} {self.mode} {k}x{k}/{s} {self.n_in}->{self.n_out} "
                f"@{self.in_size}->{self.size}")
        if self.pop:
            text += f" +{self.shortcut}"
        return text


@dataclass(frozen=True)
class HeadSpec:
    """The output unit: [final BN, ReLU], pooling to ``pool_out``², flatten, Linear."""

    index: int
    n_in: int  # channels of the last map
    n_out: int  # classes
    side: int  # side of the last map
    pool: str  # "avg" or "max"
    pool_out: int
    fixed: int  # the paper code's fixed pooling window: the head works only for this side × k
    paper_linear: int  # the input width of the paper code's Linear
    final_bn: bool
    zero_init: bool
    kind: str = "output"

    def build(self, cfg: Config, num_classes: int) -> "ResidualHead":
        return ResidualHead(self, cfg)

    def describe(self) -> str:
        bn = "bn, relu, " if self.final_bn else ""
        return (f"head {bn}{self.pool}pool {self.side}->{self.pool_out}, "
                f"linear {self.n_in * self.pool_out ** 2}->{self.n_out}")


@register_model(*RESNETS)
def plan_resnet(cfg: Config, in_shape: tuple[int, int, int], num_classes: int) -> list:
    block, counts = RESNETS[cfg.model]
    channels, side, _ = in_shape
    width = lambda c: int(cfg.feat_mult * c)  # noqa: E731
    basic_mode = "pre" if cfg.pre_act and block == "basic" else "post"
    stem_mode = "bare" if cfg.pre_act else "post"
    specs: list = [ResidualSpec(0, "conv1", stem_mode, channels, width(64), 3, 1, False, side,
                                side, side, dropout=0.0 if cfg.pre_act else cfg.dropout)]
    planes_in = width(64)
    for stage, (base, blocks, first_stride) in enumerate(zip((64, 128, 256, 512), counts,
                                                              (1, 2, 2, 2))):
        planes = width(base)
        for b in range(blocks):
            s = first_stride if b == 0 else 1
            out_side = math.ceil(side / s)
            name, skip = f"layer{stage + 1}.{b}", f"skip/{len(specs)}"
            out = planes if block == "basic" else 4 * planes
            shortcut = "conv-bn" if s != 1 or planes_in != out else "identity"
            if block == "basic":  # both units declare the block's input side (quirk 1)
                units = [(planes_in, planes, 3, s, side, out_side, side),
                         (planes, planes, 3, 1, out_side, out_side, side)]
                mode = basic_mode
            else:  # the stride on the 3x3 conv; units 2, 3 declare side // s (quirk 2)
                units = [(planes_in, planes, 1, 1, side, side, side),
                         (planes, planes, 3, s, side, out_side, side // s),
                         (planes, out, 1, 1, out_side, out_side, side // s)]
                mode = "post"
            for u, (n_in, n_out, k, stride, s_in, s_out, declared) in enumerate(units):
                last = u == len(units) - 1
                specs.append(ResidualSpec(
                    len(specs), f"{name}.conv{u + 1}", mode, n_in, n_out, k, stride, False, s_in,
                    s_out, declared, cfg.dropout, stash=skip if u == 0 else None,
                    pop=skip if last else None, shortcut=shortcut if last else None,
                    shortcut_in=planes_in if last else 0, shortcut_stride=s))
            planes_in, side = out, out_side
    expansion = 1 if block == "basic" else 4
    specs.append(HeadSpec(len(specs), planes_in, num_classes, side, "avg", 1, 4,
                          int(cfg.feat_mult * 512 * expansion), False,
                          zero_init=not cfg.backprop))
    return specs


@register_model(*WRN_MODELS)
def plan_wide_resnet(cfg: Config, in_shape: tuple[int, int, int], num_classes: int) -> list:
    depth, k, adapted = _wrn_shape(cfg.model)
    n = (depth - 4) // 6
    channels, side, _ = in_shape
    stem = 16 * k if adapted else 16
    specs: list = [ResidualSpec(0, "conv1", "bare", channels, stem, 3, 1, True, side, side, 32)]
    planes_in = stem
    p_unit, p_between = (cfg.dropout, 0.0) if adapted else (0.0, cfg.dropout)
    for stage, (planes, first_stride) in enumerate(zip((16 * k, 32 * k, 64 * k), (1, 2, 2))):
        for b in range(n):
            s = first_stride if b == 0 else 1
            out_side = math.ceil(side / s)
            name, skip = f"layer{stage + 1}.{b}", f"skip/{len(specs)}"
            shortcut = "conv-bias" if s != 1 or planes_in != planes else "identity"
            specs.append(ResidualSpec(len(specs), f"{name}.conv1", "pre", planes_in, planes, 3,
                                      1, True, side, side, side, p_unit, stash=skip))
            specs.append(ResidualSpec(len(specs), f"{name}.conv2", "pre", planes, planes, 3, s,
                                      True, side, out_side, out_side, p_unit, p_between,
                                      pop=skip, shortcut=shortcut, shortcut_in=planes_in,
                                      shortcut_stride=s))
            planes_in, side = planes, out_side
    pool, pool_out, fixed = ("max", 4, 2) if adapted else ("avg", 1, 8)
    specs.append(HeadSpec(len(specs), planes_in, num_classes, side, pool, pool_out, fixed,
                          planes_in * pool_out ** 2, True, zero_init=not cfg.backprop))
    return specs


def _wrn_shape(model: str) -> tuple[int, int, bool]:
    depth, k, adapted = re.fullmatch(r"wresnet(\d+)-(\d+)(a?)", model).groups()
    return int(depth), int(k), adapted == "a"


def deviations(cfg: Config, specs: list) -> list[str]:
    """Where this network differs from the paper's code, which crashes there (§7 [X])."""
    out = []
    heads = not cfg.backprop and cfg.loss_sup != "sim"  # pred heads (bio sim runs there)
    for s in specs:
        if isinstance(s, ResidualSpec) and heads and s.declared != s.size:
            out.append(f"unit {s.index} ({s.name}): pred head sized for its {s.size}x{s.size} map; "
                       f"the paper's code sizes it for {s.declared}x{s.declared} and crashes")
        if (isinstance(s, ResidualSpec) and cfg.loss_unsup == "recon" and not cfg.backprop
                and 2 * s.size - 1 != s.in_size and s.stride > 1):
            out.append(f"unit {s.index} ({s.name}): recon decoder gives back the "
                       f"{s.in_size}x{s.in_size} input; the paper's code gives "
                       f"{2 * s.size - 1}x{2 * s.size - 1} and crashes")
        if isinstance(s, HeadSpec):
            if s.side != s.pool_out * s.fixed:
                out.append(f"head: {s.pool} pooling adapts the {s.side}x{s.side} map to "
                           f"{s.pool_out}x{s.pool_out}; the paper's fixed {s.fixed}x{s.fixed} "
                           f"window crashes here")
            if s.paper_linear != s.n_in * s.pool_out ** 2:
                out.append(f"head: linear sized for the {s.n_in} channels it gets; the paper's "
                           f"code sizes it for {s.paper_linear} and crashes (--feat-mult "
                           f"{cfg.feat_mult:g})")
    return out


class ResidualUnit(LocalBlock):
    """One conv unit of a residual block in mode A (post), B (pre) or C (bare), §2.2; the last
    unit of a block also owns the shortcut (§3), with its own optimizer."""

    def __init__(self, spec: ResidualSpec, cfg: Config, num_classes: int) -> None:
        has_bn = not cfg.no_batch_norm and not (spec.mode == "pre" and cfg.backprop)
        # bio sim pools h for the sim loss alone, with the paper's declared size, and runs
        # there; a pred head needs the real one (where they differ the paper's code crashes)
        bio_sim = cfg.bio and cfg.loss_sup == "sim"
        super().__init__(spec.index, cfg, num_classes, spec.n_in, spec.n_out, spec.conv,
                         spec.size, bias=spec.bias, bn=has_bn, in_size=spec.in_size,
                         recon_first=True, pool_size=spec.declared if bio_sim else spec.size)
        self.spec = spec
        self.p = spec.dropout
        self.pre_bn = (nn.BatchNorm2d(spec.n_in) if spec.mode == "pre" and not cfg.no_batch_norm
                       else None)
        self.shortcut: nn.Module | None = None
        if spec.shortcut in ("conv-bn", "conv-bias"):
            conv = nn.Conv2d(spec.shortcut_in, spec.n_out, 1, spec.shortcut_stride,
                             bias=spec.shortcut == "conv-bias")
            self.shortcut = (nn.Sequential(conv, nn.BatchNorm2d(spec.n_out))
                             if spec.shortcut == "conv-bn" else nn.Sequential(conv))

    def make_optimizer(self) -> None:
        """The unit's optimizer, then the shortcut's own (§3.2): stepped in that order."""
        if self.cfg.backprop:
            return
        shortcut = set() if self.shortcut is None else set(self.shortcut.parameters())
        self.optimizers = [make_optimizer([p for p in self.parameters() if p not in shortcut],
                                          self.cfg)]
        if self.shortcut is not None:
            self.optimizers.append(make_optimizer(self.shortcut.parameters(), self.cfg))

    def run(self, x: Tensor, skips: Skips, losses: bool,
            keep_graph: bool = True) -> tuple[Tensor, Tensor | None, Tensor]:
        """§2.2's three orders; a block's first unit stashes its input in ``skips``, the
        block's last unit pops it into the shortcut."""
        spec = self.spec
        if spec.stash:
            skips[spec.stash] = x
        sc = None
        if spec.pop:
            sc = skips.pop(spec.pop)
            if self.shortcut is not None:
                sc = self.shortcut(sc)
        if spec.input_dropout > 0:  # plain WRN: element-wise, between the block's units
            x = self.drop(x, spec.input_dropout, channels=False)
        if spec.mode == "post":
            z = self.layer(x)
            if self.bn is not None:
                z = self.bn(z)
            if sc is not None:
                z = z + sc
            h = self.nonlin(z, inplace=True)  # z is this unit's own: conv, BN or sum output
            if keep_graph:
                out = self.drop(h, self.p)
            else:
                with torch.no_grad():
                    out = self.drop(h.detach(), self.p)
            return out, h, x
        seen = x
        if spec.mode == "pre":
            u = self.nonlin(x if self.pre_bn is None else self.pre_bn(x),
                            inplace=self.pre_bn is not None)
            if self.pre_bn is None and spec.stash:
                skips[spec.stash] = u  # quirk 14: the paper's in-place φ reaches the shortcut
            seen = u = self.drop(u, self.p)
            z = self.layer(u)
        else:
            z = self.layer(x)
        if sc is not None:
            z = z + sc
        if not losses:
            return z, None, seen
        if self.bn is None:  # quirk 14: the loss path's in-place φ also changes what goes on
            h = self.nonlin(z)
            return h, h, seen
        return z, self.nonlin(self.bn(z), inplace=True), seen


def head_pool(spec: HeadSpec) -> nn.Module:
    """The head's pooling of its ``side``² map to ``pool_out``². Adaptive max pooling has no
    deterministic CUDA backward (--deterministic --backprop would throw), so where ``side`` is
    a multiple of ``pool_out`` it is the plain max pooling with the same windows (the same
    values and gradients). Adaptive average pooling to 1×1 is ATen's mean over the map
    already, with a deterministic backward."""
    if spec.pool == "avg":
        return nn.AdaptiveAvgPool2d(spec.pool_out)
    if spec.side % spec.pool_out == 0:
        return nn.MaxPool2d(spec.side // spec.pool_out)
    return nn.AdaptiveMaxPool2d(spec.pool_out)


class ResidualHead(OutputLayer):
    """[final BN (momentum 0.9), plain ReLU], pooling, Linear (§4). The pooling adapts to the
    map it gets, so every input size works with the paper's Linear; the final BN's affine
    parameters stay frozen outside --backprop (quirk 8)."""

    def __init__(self, spec: HeadSpec, cfg: Config) -> None:
        super().__init__(spec.index, cfg, spec.n_in * spec.pool_out ** 2, spec.n_out,
                         spec.zero_init)
        layers: list[nn.Module] = []
        if spec.final_bn:
            bn = nn.BatchNorm2d(spec.n_in, momentum=0.9)
            bn.requires_grad_(cfg.backprop)
            layers += [bn, nn.ReLU()]
        layers.append(head_pool(spec))
        self.head = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.head(x).flatten(1))
