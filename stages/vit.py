"""Vision Transformers (the DeiT layout) as units, each transformer block a local block.

The layout is DeiT's (and timm's ``VisionTransformer``): non-overlapping patches embedded by a
strided convolution, a class token, learned position embeddings, pre-norm blocks
(x + attention(LN(x)), then x + MLP(LN(x)), MLP ratio 4, GELU), qkv with bias, LayerNorm ε
1e-6, and a head of a final LayerNorm, the pooled tokens and a Linear. ``vit-tiny``,
``vit-small`` and ``vit-base`` are DeiT's sizes (width 192/384/768, 3/6/12 heads, depth 12);
the generic ``vit`` is sized by --num-layers (depth), --num-hidden (width), --num-heads and
--patch-size.

Units: the patch embedding (with the class token and the position embeddings) joined to the
first block, one unit per further block, and the output head. A block hands its token map on
as it is; its local head reads the same map, as the output head reads the last one:

- Pooling (``TokenPool``, --token-pool): a LayerNorm (the residual stream's scale grows with
  depth; the head sees it on one scale), then with ``map`` the class token beside the patch
  tokens laid out on their grid and average-pooled by the paper's rule for a conv block's pred
  head (§3.2), the two at most --dim-in-decoder features (at least twice the width: a 1×1
  map), or with ``class`` the class token alone
  (DeiT's head, whose parameter counts the tests check). ``map`` is the default because it
  keeps where each patch is: a local head that averages the tokens, or reads an early block's
  class token, sees a bag of patches. Measured on MNIST (depth 4, width 64, 4 heads, patch 7,
  Adam 1e-3, batch 128, training error of the last 50 of 300 batches, ``benchmarks/pooling.py``):
  ``class`` 24.2 % (backprop) and 42.0 % (local predsim), ``map`` 7.5 % and 10.5 %.
- pred: the pooled features → a Linear, zero-initialised as the paper's pred heads.
- sim: the similarity matrix of the pooled features through a Linear (no bias, width out), as
  the paper's sim head does for a linear block, against the labels' similarity matrix.
- predsim: (1 − β)·pred + β·sim, as for every family; --backprop and --no-detach as for the
  others (the local heads then absent, or trained with the gradient flowing on).

Initialisation: torch's defaults, with qkv as ``nn.MultiheadAttention`` starts it (Xavier
uniform, zero bias), the position embeddings N(0, 0.02²) and the class token N(0, 1e-12), as
timm. Not timm's truncated normal of std 0.02 for every Linear, which is sized for DeiT's widths:
at width 64 (depth 4, MNIST, batch 128, Adam 1e-3, backprop, the class-token head) it left the
last 50 of 300 batches at 59 % training error, these choices at 24 % (``benchmarks/pooling.py``,
its class/backprop row), and a plain ``nn.TransformerEncoder`` of the same size at 21 % (the
first and last from a one-off script on this project's 2-core machine).

Attention goes through ``F.scaled_dot_product_attention``. There is no dropout, attention
dropout or stochastic depth: each would have to draw from the position-keyed generators, so
that every runner and a resume draw alike, and the attention kernel's own dropout draws from
torch's global generator; they are left out rather than drawn differently by each runner.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from localpipe.stages import losses
from localpipe.stages.blocks import (OutputLayer, Skips, Unit, Update, keep_buffers,
                                     pred_pooling)
from localpipe.stages.config import Config, ConfigError, defaults
from localpipe.stages.registry import register_model

# DeiT's sizes: width, heads, depth
SIZES: dict[str, tuple[int, int, int]] = {
    "vit-tiny": (192, 3, 12), "vit-small": (384, 6, 12), "vit-base": (768, 12, 12)}
VIT_MODELS = ("vit", *SIZES)
MLP_RATIO = 4
LN_EPS = 1e-6


def patch_side(cfg: Config, side: int) -> int:
    """--patch-size, or where it is 0 the side that gives 16 to 144 patches of common inputs:
    7 for 28×28 (MNIST), 4 for 32×32 (CIFAR, SVHN), 8 up to 96×96 (STL-10), 16 beyond."""
    if cfg.patch_size:
        return cfg.patch_size
    return 7 if side == 28 else 4 if side <= 32 else 8 if side <= 96 else 16


class PatchEmbed(nn.Module):
    """Image → tokens: patches through a strided convolution, the class token in front, plus
    the learned position embeddings."""

    def __init__(self, channels: int, side: int, patch: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, width, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, (side // patch) ** 2 + 1, width))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.proj(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(tokens.size(0), -1, -1)
        return torch.cat([cls, tokens], dim=1) + self.pos_embed


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        # as nn.MultiheadAttention starts its projection (see the module docstring on init)
        nn.init.xavier_uniform_(self.qkv.weight)
        nn.init.zeros_(self.qkv.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """A pre-norm transformer block."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=LN_EPS)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = nn.Sequential(nn.Linear(width, MLP_RATIO * width), nn.GELU(),
                                 nn.Linear(MLP_RATIO * width, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenPool(nn.Module):
    """A token map as a head reads it: LayerNorm, then the class token alone (``class``) or
    beside the patch tokens' grid average-pooled to at most ``dim_in_decoder`` − width
    features, a 1×1 map at least (``map``); the module docstring says why. ``features`` is the
    width of what it gives."""

    def __init__(self, width: int, grid: int, how: str, dim_in_decoder: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=LN_EPS)
        self.grid, self.map = grid, how == "map"
        self.pool: nn.Module = nn.Identity()
        self.features = width
        if self.map:
            pooling = pred_pooling(width, grid, max(dim_in_decoder - width, width))
            self.pool = pooling.module()
            self.features += pooling.dim

    def forward(self, h: Tensor) -> Tensor:
        h = self.norm(h)
        if not self.map:
            return h[:, 0]
        patches = h[:, 1:].transpose(1, 2).reshape(h.size(0), h.size(2), self.grid, self.grid)
        return torch.cat([h[:, 0], self.pool(patches).flatten(1)], dim=1)


class TokenHead(nn.Module):
    """A block's local head (the module docstring says why each part is there)."""

    def __init__(self, width: int, grid: int, num_classes: int, pred: bool, sim: bool,
                 cfg: Config) -> None:
        super().__init__()
        self.pooled = TokenPool(width, grid, cfg.token_pool, cfg.dim_in_decoder)
        features = self.pooled.features
        self.pred = nn.Linear(features, num_classes) if pred else None
        if self.pred is not None:
            nn.init.zeros_(self.pred.weight)
        self.sim = nn.Linear(features, width, bias=False) if sim else None


class TokenBlock(Unit):
    """One transformer block as a local unit (the first with the patch embedding before it)."""

    def __init__(self, index: int, cfg: Config, num_classes: int, width: int, heads: int,
                 grid: int, embed: tuple[int, int, int] | None) -> None:
        """``grid``: patches a side; ``embed`` is (channels, side, patch) of the images for the
        first block, else None."""
        super().__init__(index, cfg)
        self.num_classes = num_classes
        self.embed = None if embed is None else PatchEmbed(*embed, width)
        self.block = Block(width, heads)
        self.w_pred, self.w_sim = losses.sup_weights(cfg.loss_sup, cfg.beta)
        uses_sim = self.w_sim > 0 or cfg.loss_unsup == "sim"
        self.head = None if cfg.backprop else TokenHead(width, grid, num_classes,
                                                       self.w_pred > 0, uses_sim, cfg)

    def no_decay(self) -> list[Tensor]:
        return [] if self.embed is None else [self.embed.pos_embed, self.embed.cls_token]

    def features(self, x: Tensor) -> Tensor:
        return self.block(x if self.embed is None else self.embed(x))

    def run(self, x: Tensor, skips: Skips, losses: bool,
            keep_graph: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """As ``LocalBlock.run``: the token map is both what goes on and what the head reads."""
        h = self.features(x)
        return h, h, x

    def local_loss(self, h: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """α·L_unsup + (1−α)·L_sup of this block, recorded in the current meter."""
        cfg, head = self.cfg, self.head
        pooled = head.pooled(h)
        stats: dict[str, Tensor] = {}
        terms: list[Tensor] = []
        if self.w_pred > 0:
            logits = head.pred(pooled)
            stats["loss_pred"] = self.w_pred * losses.pred_loss(logits, y, self.smoothing)
            stats["errors"] = losses.errors(logits, y)
            terms.append(stats["loss_pred"])
        hs = head.sim(pooled) if head.sim is not None else None
        if self.w_sim > 0:
            target = losses.label_similarity(y, self.num_classes)
            stats["loss_sim"] = self.w_sim * losses.sim_loss(hs, target)
            terms.append(stats["loss_sim"])
        sup = sum(terms[1:], terms[0])
        unsup: Tensor | float = 0.0
        if cfg.loss_unsup == "sim":  # against the input's own similarities (tokens averaged)
            seen = x.mean(dim=1) if x.dim() == 3 else x
            unsup = losses.sim_loss(hs, losses.similarity_matrix(seen).detach())
        return self.record(losses.mix_unsup(sup, unsup, cfg.alpha), y, **stats)

    def train_step(self, x: Tensor, y: Tensor,
                   skips: Skips | None = None) -> tuple[Tensor, Update]:
        kept = keep_buffers(self, self.cfg)
        h = self.features(x)
        return h.detach(), self.step_closure(self.local_loss(h, x, y), kept)

    @torch.no_grad()
    def eval_step(self, x: Tensor, y: Tensor, skips: Skips | None = None) -> Tensor:
        h = self.features(x)
        if not self.cfg.no_print_stats and not self.cfg.backprop:
            self.local_loss(h, x, y)
        return h


class ViTHead(OutputLayer):
    """The output layer: the final LayerNorm and pooling (``TokenPool``), a Linear."""

    def __init__(self, index: int, cfg: Config, width: int, grid: int,
                 num_classes: int) -> None:
        pool = TokenPool(width, grid, cfg.token_pool, cfg.dim_in_decoder)
        super().__init__(index, cfg, pool.features, num_classes, zero_init=False)
        self.pool = pool

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.pool(x))


@dataclass(frozen=True)
class ViTSpec:
    """One unit of a ViT: a block (``embed`` set for the first) or the output head."""

    index: int
    kind: str  # "block" or "output"
    width: int
    heads: int
    tokens: int
    embed: tuple[int, int, int] | None = None
    pool: str = "map"  # --token-pool, for the description

    @property
    def grid(self) -> int:
        return math.isqrt(self.tokens - 1)

    def build(self, cfg: Config, num_classes: int) -> Unit:
        if self.kind == "output":
            return ViTHead(self.index, cfg, self.width, self.grid, num_classes)
        return TokenBlock(self.index, cfg, num_classes, self.width, self.heads, self.grid,
                          self.embed)

    def describe(self) -> str:
        if self.kind == "output":
            return f"output LN, {'class token' if self.pool == 'class' else 'token map'}, linear"
        embed = ""
        if self.embed is not None:
            channels, side, patch = self.embed
            embed = f"patches {patch}x{patch} of {channels}x{side}x{side}, "
        return (f"{embed}{self.tokens} tokens x {self.width}, {self.heads} heads, "
                f"mlp {MLP_RATIO * self.width}")


@register_model(*VIT_MODELS)
def plan_vit(cfg: Config, in_shape: tuple[int, int, int], num_classes: int) -> list[ViTSpec]:
    """A ViT's units for square inputs of shape (C, H, W)."""
    width, heads, depth = SIZES.get(cfg.model, (cfg.num_hidden, cfg.num_heads, cfg.num_layers))
    channels, side, other = in_shape
    patch = patch_side(cfg, side)
    where = f"--model {cfg.model}"
    if side != other or side % patch:
        raise ConfigError(f"{where}: --patch-size {patch} does not tile {side}x{other} inputs; "
                          f"choose a divisor of {side}")
    if width % heads:
        raise ConfigError(f"{where}: width {width} does not split into {heads} heads; make "
                          f"--num-hidden a multiple of --num-heads")
    if depth < 1:
        raise ConfigError(f"{where}: a ViT needs at least one block (--num-layers)")
    for name in ("bio", "no_batch_norm", "pre_act"):
        if getattr(cfg, name):
            raise ConfigError(f"{where}: --{name.replace('_', '-')} is not defined for ViTs")
    if cfg.dropout:
        raise ConfigError(f"{where}: ViT blocks have no dropout (nor attention dropout or "
                          f"stochastic depth); leave --dropout at 0")
    ignored = {"feat_mult": "a ViT is sized by --num-hidden, --num-heads and --num-layers",
               "nonlin": "ViT blocks use GELU"}
    if cfg.model in SIZES:
        ignored.update(dict.fromkeys(("num_hidden", "num_heads", "num_layers"),
                       f"{where} is {depth} blocks of width {width} with {heads} heads "
                       f"(--model vit takes sizes)"))
    unset = defaults()
    for name, why in ignored.items():
        value = getattr(cfg, name)
        if value != unset[name]:
            shown = f"{value:g}" if isinstance(value, float) else value
            raise ConfigError(f"{where}: --{name.replace('_', '-')} {shown} would be ignored: "
                              f"{why}")
    if cfg.loss_unsup == "recon":
        raise ConfigError(f"{where}: --loss-unsup recon needs a decoder, which ViT blocks "
                          f"lack; use sim or none")
    tokens = (side // patch) ** 2 + 1
    specs = [ViTSpec(i, "block", width, heads, tokens, (channels, side, patch) if i == 0 else None)
             for i in range(depth)]
    return specs + [ViTSpec(depth, "output", width, heads, tokens, pool=cfg.token_pool)]
