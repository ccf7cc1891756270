"""Any network of the user's, trained with local losses: ``LocalNet(nn.Sequential, ...)``.

Every child of the ``nn.Sequential`` but the last is a *local block*: it trains on its own
output with its own loss through a head of its own and its own optimizer, on a detached input,
so no error crosses from one block to the next. The last child is the output layer, trained
with cross-entropy (times 1 − β under ``predsim``, as the paper's output layer). The heads are
built from each block's output shape, found by one forward in eval mode of a batch of 2 with
no gradients, which changes nothing of the user's ``state_dict``.

A ``LocalNet`` is a network as the runners see it (stages/network.py): each child becomes one
unit (``UserUnit``), with the same protocol as the paper's blocks, so the in-process and the
torchrun runners, checkpoints, resume and every failure path serve it unchanged.

Randomness: a block's random ops draw from a generator keyed by (seed, block, epoch, step,
replica), handed to them by ``KeyedRandom``, so every runner draws the same masks. Covered:
``nn.Dropout``/``Dropout1d``/``Dropout2d``/``Dropout3d`` (``F.dropout*``) and the torch calls
that take a ``generator`` (``torch.rand``, ``randn``, ``randint``, ``randperm``,
``bernoulli``, ``multinomial``, ``normal`` and the in-place ``Tensor.bernoulli_``,
``uniform_``, ``normal_``, ``random_``, ``exponential_``, ...: ``_RANDOM`` below). Not covered,
drawing from torch's global generator (so that runners differ): random ops inside C++ kernels
(``F.rrelu``, ``F.alpha_dropout``, the ``dropout_p`` of ``F.scaled_dot_product_attention``),
and covered ops called from inside another function torch lets modes override, such as the
attention dropout of ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` (a mode
sees the outer call only). Give such blocks ``dropout=0`` and put ``nn.Dropout`` beside them.
"""
from __future__ import annotations

import copy
import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from localpipe.stages import losses
from localpipe.stages.blocks import (FALinear, Skips, Unit, Update, keep_buffers,
                                     make_optimizer, pred_pooling)
from localpipe.stages.config import Config, derive_seed
from localpipe.stages.registry import LOSSES, register_loss
from localpipe.stages.stage import Stage

LossFn = Callable[[Tensor, Tensor, nn.Module], Tensor]  # (block output, labels, head) -> loss
Heads = Callable[[int, tuple[int, ...]], nn.Module]  # (block index, output shape) -> head
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


# --------------------------------------------------------------------------------- heads
class LocalHead(nn.Module):
    """The paper's local heads for a block's output of any shape: ``predict`` (pooled to at
    most ``dim_in_decoder`` features, then a zero-initialised linear layer) and ``similar``
    (a 3×3 convolution for a C×H×W map, a linear layer otherwise), each where asked for.
    A T×D output (tokens) is averaged over its T positions first. ``bio`` makes the §5 heads:
    ``predict`` through feedback alignment onto a ``code_size`` random code of the labels
    (``label_proj``, fixed), and ``similar`` the pooled output itself (no learned head)."""

    def __init__(self, shape: tuple[int, ...], num_classes: int, pred: bool = True,
                 sim: bool = True, dim_in_decoder: int = 4096, bio: bool = False,
                 code_size: int = 128) -> None:
        super().__init__()
        self.num_classes, self.is_map = num_classes, len(shape) == 3
        self.tokens = len(shape) == 2
        width = shape[-1] if self.tokens else math.prod(shape)
        self.pool: nn.Module = nn.Identity()
        if self.is_map:
            channels, height, width_ = shape
            if height == width_:
                pooling = pred_pooling(channels, height, dim_in_decoder)
                self.pool = pooling.module()
                width = pooling.dim
            else:
                self.pool, width = nn.AdaptiveAvgPool2d(1), channels
        self.pred: nn.Module | None = None
        if pred and bio:
            self.pred = FALinear(width, code_size)
        elif pred:
            self.pred = nn.Linear(width, num_classes)
            nn.init.zeros_(self.pred.weight)
        if bio:
            bound = 1.0 / math.sqrt(num_classes)
            self.register_buffer("label_proj", torch.empty(code_size, num_classes)
                                 .uniform_(-bound, bound))
        features = shape[0] if self.is_map else shape[-1] if self.tokens else math.prod(shape)
        self.sim = None
        if sim and not bio:
            self.sim = (nn.Conv2d(features, features, 3, 1, 1, bias=False) if self.is_map
                        else nn.Linear(features, features, bias=False))

    def _flat(self, h: Tensor) -> Tensor:
        return h.mean(dim=1) if self.tokens else h.flatten(1)

    def pooled(self, h: Tensor) -> Tensor:
        """A block's output as the pred head takes it (pooled maps, averaged tokens)."""
        return self.pool(h) if self.is_map else self._flat(h)

    def predict(self, h: Tensor) -> Tensor:
        """Class logits (a code's logits for ``bio``) from a block's output."""
        return self.pred(self.pooled(h).flatten(1))

    def similar(self, h: Tensor) -> Tensor:
        """What the similarity-matching loss compares, from a block's output."""
        if self.sim is None:  # bio: the pooled output itself
            return self.pooled(h)
        return self.sim(h if self.is_map else self._flat(h))


# the registered local losses: (block output, labels, head, beta) -> (loss, its records)
@register_loss("pred")
def pred_loss(h: Tensor, y: Tensor, head: LocalHead, beta: float) -> tuple[Tensor, dict]:
    logits = head.predict(h)
    return losses.pred_loss(logits, y), {"errors": losses.errors(logits, y)}


@register_loss("sim")
def sim_loss(h: Tensor, y: Tensor, head: LocalHead, beta: float) -> tuple[Tensor, dict]:
    return losses.sim_loss(head.similar(h), losses.label_similarity(y, head.num_classes)), {}


@register_loss("predsim")
def predsim_loss(h: Tensor, y: Tensor, head: LocalHead, beta: float) -> tuple[Tensor, dict]:
    """(1 − β)·pred + β·sim (§3.3), each term recorded apart."""
    pred, stats = pred_loss(h, y, head, beta)
    sim = sim_loss(h, y, head, beta)[0]
    w_pred, w_sim = losses.sup_weights("predsim", beta)
    return w_pred * pred + w_sim * sim, {**stats, "loss_pred": w_pred * pred,
                                         "loss_sim": w_sim * sim}


@register_loss("bio-pred")
def bio_pred_loss(h: Tensor, y: Tensor, head: LocalHead, beta: float) -> tuple[Tensor, dict]:
    """§5: the label's fixed random code, predicted through feedback alignment."""
    return losses.bio_pred_loss(head.predict(h), losses.bio_target(head.label_proj, y)), {}


@register_loss("bio-sim")
def bio_sim_loss(h: Tensor, y: Tensor, head: LocalHead, beta: float) -> tuple[Tensor, dict]:
    """§5: the pooled output's similarities against those of the labels' codes."""
    code = losses.bio_target(head.label_proj, y)
    return losses.sim_loss(head.similar(h), losses.similarity_matrix(code).detach()), {}


@register_loss("bio-predsim")
def bio_predsim_loss(h: Tensor, y: Tensor, head: LocalHead,
                     beta: float) -> tuple[Tensor, dict]:
    pred, sim = bio_pred_loss(h, y, head, beta)[0], bio_sim_loss(h, y, head, beta)[0]
    w_pred, w_sim = losses.sup_weights("predsim", beta)
    return w_pred * pred + w_sim * sim, {"loss_pred": w_pred * pred, "loss_sim": w_sim * sim}


# ---------------------------------------------------------------------------- randomness
# torch calls that draw random numbers and take a ``generator``
_RANDOM = {torch.rand, torch.randn, torch.randint, torch.randperm, torch.bernoulli,
           torch.multinomial, torch.normal, torch.poisson, torch.rand_like, torch.randn_like,
           torch.randint_like, Tensor.bernoulli, Tensor.bernoulli_, Tensor.multinomial,
           Tensor.uniform_, Tensor.normal_, Tensor.random_, Tensor.exponential_,
           Tensor.cauchy_, Tensor.log_normal_, Tensor.geometric_}
# dropout, by whether it drops whole channels
_DROPOUT = {F.dropout: False, torch.dropout: False, F.dropout1d: True, F.dropout2d: True,
            F.dropout3d: True}


class KeyedRandom(TorchFunctionMode):
    """Inside a block's training forward, hands ``generator`` (one per device, seeded from the
    block's key) to every covered random op, and draws dropout masks from it. A mode is the
    calling thread's own, so stage threads never share one."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed, self.generators = seed, {}

    def generator(self, device: torch.device) -> torch.Generator:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda" is the current GPU: one
            device = torch.device("cuda", torch.cuda.current_device())  # generator, not two
        if device not in self.generators:
            self.generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self.generators[device]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DROPOUT:
            return self._dropout(_DROPOUT[func], *args, **kwargs)
        if func in _RANDOM and kwargs.get("generator") is None:
            tensor = next((a for a in args if isinstance(a, Tensor)), None)
            device = tensor.device if tensor is not None else kwargs.get("device") or "cpu"
            kwargs = {**kwargs, "generator": self.generator(device)}
        return func(*args, **kwargs)

    def _dropout(self, channels: bool, input: Tensor, p: float = 0.5, training: bool = True,
                 inplace: bool = False, train: bool | None = None) -> Tensor:
        """As torch's: p = 1 zeroes everything; channel dropout of an unbatched input (one
        dimension fewer than its batched form, as torch guesses it) drops its rows."""
        training = training if train is None else train  # torch.dropout's name for it
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        if not training or p == 0:
            return input
        if p == 1:
            return input.mul_(0) if inplace else input * 0
        batched = input.dim() > 2 or not channels  # torch takes a 2-D input as (C, L)
        keep = (2 if batched else 1) if channels else input.dim()
        shape = input.shape[:keep] + (1,) * (input.dim() - keep)
        mask = torch.empty(shape, device=input.device, dtype=input.dtype)
        mask.bernoulli_(1.0 - p, generator=self.generator(input.device)).div_(1.0 - p)
        return input.mul_(mask) if inplace else input * mask


# --------------------------------------------------------------------------------- units
class UserUnit(Unit):
    """One child of a user's network as a unit: the child itself (``body``, the same object),
    its head, its loss and its optimizer. The last child is the output layer."""

    def __init__(self, index: int, cfg: Config, body: nn.Module, head: nn.Module | None,
                 loss, optimizer: OptimizerFactory | None, output_scale: float | None,
                 alpha: float = 0.0) -> None:
        """``loss``: a registered loss's function (returning the loss and its records) or the
        user's callable (returning the loss); ``output_scale`` set makes this the output layer,
        trained by that multiple of the cross-entropy. ``alpha`` > 0 mixes in the
        unsupervised similarity matching of output and input (§3.4)."""
        super().__init__(index, cfg)
        self.body, self.head, self.loss_fn, self.optimizer = body, head, loss, optimizer
        self.is_output, self.scale, self.alpha = output_scale is not None, output_scale, alpha

    def make_optimizer(self) -> None:
        params = [p for p in self.parameters() if p.requires_grad]
        self.optimizers = [self.optimizer(params) if self.optimizer is not None
                           else make_optimizer(params, self.cfg)]

    def set_lr(self, lr: float) -> None:
        if self.optimizer is None:  # the user's own optimizer keeps its own learning rate
            super().set_lr(lr)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)

    def run(self, x: Tensor, skips: Skips, losses: bool) -> tuple[Tensor, Tensor, Tensor]:
        """As ``LocalBlock.run``, for ``Stage.logits``: the output is the block's own."""
        out = self.body(x)
        return out, out, x

    def local_loss(self, out: Tensor, y: Tensor, x: Tensor) -> Tensor:
        """This unit's loss of a batch (``x`` its input), recorded in the current meter."""
        if self.is_output:
            return self.record(self.scale * losses.pred_loss(out, y, self.smoothing), y,
                               errors=losses.errors(out, y))
        got = self.loss_fn(out, y, self.head)
        loss, stats = got if isinstance(got, tuple) else (got, {})
        if self.alpha:
            unsup = losses.sim_loss(self.head.similar(out), losses.similarity_matrix(x).detach())
            loss = losses.mix_unsup(loss, unsup, self.alpha)
        return self.record(loss, y, **stats)

    def train_step(self, x: Tensor, y: Tensor,
                   skips: Skips | None = None) -> tuple[Tensor, Update]:
        kept = keep_buffers(self, self.cfg)
        with KeyedRandom(self.mask_seed()):
            out = self.body(x)
        return out.detach(), self.step_closure(self.local_loss(out, y, x), kept)

    @torch.no_grad()
    def eval_step(self, x: Tensor, y: Tensor, skips: Skips | None = None) -> Tensor:
        out = self.body(x)
        if self.is_output or not self.cfg.no_print_stats:
            self.local_loss(out, y, x)
        return out


# ------------------------------------------------------------------------------- network
class LocalNet(nn.Module):
    """A user's ``nn.Sequential`` trained with local losses: ``net.module`` is that very
    network (trained in place), ``net.heads`` the local heads beside it, one per block.

    ``loss``: a registered name (``"pred"``, ``"sim"``, ``"predsim"`` with ``beta``, §5's
    ``"bio-pred"``, ``"bio-sim"``, ``"bio-predsim"`` with feedback-alignment heads; more
    with ``stages.registry.register_loss``) or a
    callable ``loss(h, y, head) -> Tensor`` of a block's output, the labels and that block's
    head. ``heads(index, out_shape) -> nn.Module`` replaces the default ``LocalHead``.
    ``optimizer(params) -> Optimizer`` replaces each unit's default (Adam, lr from
    ``fit``, 5e-4 by default, as the paper). ``alpha`` > 0 mixes the unsupervised
    similarity matching of each block's output with its input into its loss
    (α·unsup + (1 − α)·loss, §3.4). ``seed`` draws the default heads' weights.
    """

    def __init__(self, module: nn.Sequential, *, num_classes: int,
                 input_shape: tuple[int, ...], loss: str | LossFn = "predsim",
                 beta: float = 0.99, heads: Heads | None = None,
                 optimizer: OptimizerFactory | None = None, dim_in_decoder: int = 4096,
                 alpha: float = 0.0, seed: int = 1) -> None:
        super().__init__()
        if not isinstance(module, nn.Sequential) or len(module) < 2:
            raise ValueError("LocalNet needs an nn.Sequential of at least two children: "
                             "local blocks, then the output layer")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int of at least 2, got {num_classes!r}")
        if not isinstance(input_shape, (tuple, list)) or not all(
                isinstance(d, int) and d > 0 for d in input_shape):
            raise ValueError(f"input_shape is one sample's shape, a tuple of positive ints "
                             f"such as (1, 28, 28), got {input_shape!r}")
        if isinstance(loss, str) and loss not in LOSSES:
            raise ValueError(f"unknown local loss {loss!r}; choose from "
                             f"{', '.join(LOSSES.names())}, or pass a callable "
                             f"loss(h, y, head)")
        for name, value in (("beta", beta), ("alpha", alpha)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        self.module, self.num_classes = module, num_classes
        self.shape, self.loss, self.beta, self.alpha = tuple(input_shape), loss, beta, alpha
        self.optimizer = optimizer
        try:
            self.out_shapes = probe(module, self.shape)
        except Exception as exc:
            raise ValueError(f"the network cannot take a sample of input_shape {self.shape} "
                             f"(one sample's shape, no batch dimension): "
                             f"{type(exc).__name__}: {exc}") from None
        if self.out_shapes[-1] != (num_classes,):
            raise ValueError(f"the last child must give {num_classes} logits a sample, "
                             f"not {self.out_shapes[-1]}")
        name = loss if isinstance(loss, str) else ""
        bio = name.startswith("bio-")
        pred = not name.endswith("-sim") and name != "sim"  # a callable may use either
        sim = not name.endswith("pred") or alpha > 0
        built = []
        for i, shape in enumerate(self.out_shapes[:-1]):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(seed, "head", i))
                built.append(heads(i, shape) if heads is not None else
                             LocalHead(shape, num_classes, pred, sim, dim_in_decoder, bio))
        self.heads = nn.ModuleList(built)
        need = ("predict", "similar") if isinstance(loss, str) else ()
        for i, head in enumerate(self.heads):
            missing = [m for m in need if not callable(getattr(head, m, None))]
            if missing:
                raise ValueError(f"head {i} has no {' or '.join(m + '(h)' for m in missing)}, "
                                 f"which the registered loss {loss!r} calls; derive it from "
                                 f"lp.LocalHead, or pass a callable loss")
        last = list(module)[-1]
        if not any(p.requires_grad for p in last.parameters()):
            raise ValueError("the last child, the output layer, has no parameters to train; "
                             "end the network with its classifier (its logits, no softmax)")
        self._described = (heads, optimizer, dim_in_decoder)

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)

    def signature(self) -> str:
        """What a checkpoint must have been made for: the children, their output shapes and
        every choice of loss, heads and optimizer (a callable by its qualified name)."""
        heads, optimizer, dim = self._described
        name = lambda f: "default" if f is None else getattr(f, "__qualname__",  # noqa: E731
                                                               type(f).__name__)
        loss = self.loss if isinstance(self.loss, str) else name(self.loss)
        return (f"LocalNet[{'; '.join(self.names())}] loss={loss} beta={self.beta} "
                f"alpha={self.alpha} dim_in_decoder={dim} heads={name(heads)} "
                f"optimizer={name(optimizer)}")

    # the network as the runners see it (stages/network.py)
    def names(self) -> list[str]:
        shapes = ["x".join(map(str, s)) for s in self.out_shapes]
        return [f"{name} {type(child).__name__} -> {shape}"
                for (name, child), shape in zip(self.module._modules.items(), shapes)]

    def parameter_counts(self) -> list[int]:
        heads = [*self.heads, None]
        return [sum(p.numel() for m in (child, head) if m is not None for p in m.parameters())
                for child, head in zip(self.module, heads)]

    def state_shapes(self, cfg: Config) -> list[dict[str, tuple[int, ...]]]:
        return [{k: tuple(v.shape) for k, v in self.unit(i, cfg).state_dict().items()}
                for i in range(len(self.module))]

    def build(self, cfg: Config, indices: list[int] | None, device: torch.device | str,
              throwaway: bool = False) -> Stage:
        indices = list(range(len(self.module))) if indices is None else indices
        units = [self.unit(i, cfg) for i in indices]
        return Stage(copy.deepcopy(units) if throwaway else units, cfg, torch.device(device))

    def unit(self, index: int, cfg: Config) -> UserUnit:
        last = index == len(self.module) - 1
        loss = (functools.partial(LOSSES[self.loss], beta=self.beta)
                if isinstance(self.loss, str) else self.loss)
        predsim = self.loss in ("predsim", "bio-predsim")  # the output's CE scaled, §3.5
        scale = (1.0 - self.beta if predsim else 1.0) if last else None
        return UserUnit(index, cfg, self.module[index], None if last else self.heads[index],
                        loss, self.optimizer, scale, self.alpha)

    def load_stage_state(self, state: dict[str, Tensor]) -> None:
        """Take every unit's weights from stage state dicts (``blocks.{i}.body.*``,
        ``blocks.{i}.head.*``, ``output.body.*``: a gathered run or a ``model.pt``)."""
        self.load_state_dict(own_keys(state, self.module))


def module_state(state: dict[str, Tensor], module: nn.Sequential) -> dict[str, Tensor]:
    """A stage state dict's weights of the user's network alone, under its own keys (each
    child's name, ``0`` … or the names an ``OrderedDict`` gave): what a fresh copy of
    ``module`` loads."""
    return {k[len("module."):]: v for k, v in own_keys(state, module).items()
            if k.startswith("module.")}


def own_keys(state: dict[str, Tensor], module: nn.Sequential) -> dict[str, Tensor]:
    """A stage state dict's keys (by unit index) as a ``LocalNet`` around ``module`` has them
    (``module.{child name}.*``, ``heads.{i}.*``)."""
    names = list(module._modules)
    out = {}
    for key, value in state.items():
        if key.startswith("output.body."):
            out[f"module.{names[-1]}.{key[len('output.body.'):]}"] = value
            continue
        _, index, part, rest = key.split(".", 3)
        out[f"module.{names[int(index)]}.{rest}" if part == "body"
            else f"heads.{index}.{rest}"] = value
    return out


def probe(module: nn.Sequential, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Each child's output shape for one sample: a batch of 2 zeros through the network in
    eval mode with no gradients (no running statistic moves), the training flags put back."""
    flags = [(m, m.training) for m in module.modules()]
    param = next(module.parameters(), None)
    x = torch.zeros((2, *shape), device=None if param is None else param.device)
    shapes = []
    try:
        module.eval()
        with torch.no_grad():
            for child in module:
                x = child(x)
                shapes.append(tuple(x.shape[1:]))
    finally:
        for m, training in flags:
            m.training = training
    return shapes
