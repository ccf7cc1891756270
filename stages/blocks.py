"""Local-loss blocks (spec §2.1–2.2, §5) and the output layer: the units a stage is made of.

Every unit owns its parameters, its optimizer, its dropout generator and its loss meters, and
trains itself in two halves: ``train_step`` runs the forward and returns the detached output to
hand on together with an ``update`` closure that runs the local backward and optimizer step.
A pipeline hands the output on between the two halves; the output is therefore always the one
computed with the weights from before this batch's update (§4.3), whichever way it is run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from localpipe.stages import losses
from localpipe.stages.config import Config, derive_seed

# The skip tensors of one batch in flight, by name: a unit that starts a residual block stashes
# its input here, the block's last unit pops it (stages/residual.py). It travels with the batch.
Skips = dict[str, Tensor]


class NonFiniteLoss(FloatingPointError):
    """A local (or global) loss came out NaN or infinite under ``--on-nan stop``."""


def keep_buffers(module: nn.Module, cfg: Config) -> list[tuple[Tensor, Tensor]]:
    """Copies of ``module``'s buffers (batch-norm statistics and counters), taken before a
    forward under --on-nan skip: a skipped batch must leave every tensor as it was, and batch
    norm updates its statistics in the forward, before the loss can be checked."""
    if cfg.on_nan != "skip":
        return []
    return [(b, b.clone()) for b in module.buffers()]


class Replicas(Protocol):
    """The data-parallel replicas of a stage, as its units see them (pipeline/replicas.py):
    ``sum`` starts adding ``pieces`` (1-D tensors of one dtype, laid end to end) up over the
    ``count`` replicas and returns the wait that gives the flat sum."""

    count: int

    def sum(self, pieces: list[Tensor]) -> Callable[[], Tensor]: ...


def moving_buffers(module: nn.Module) -> list[Tensor]:
    """The buffers a training forward changes (batch-norm running statistics), which replicas
    average so that every replica holds the same model."""
    return [b for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for b in (m.running_mean, m.running_var) if b is not None]


class Update:
    """A batch's pending update: backward of ``loss``, then each optimizer's step in order,
    decided on the device: a non-finite loss (``finite`` False) skips every step and, under
    --on-nan skip, puts the ``kept`` buffers back, with no host read (fused optimizers take
    the flag as ``found_inf``; see ``step``). --on-nan stop is noticed by the worker at its
    next look at the losses (pipeline/worker.py: ``LossWatch``), never by this update.

    With ``replicas`` it comes in two halves, so that the exchange overlaps the next unit's
    forward: ``begin`` runs the backward and starts summing one bucket over the replicas (a
    finiteness flag, the gradients, the batch-norm statistics of ``module``); ``finish`` waits
    for it, and then either every replica steps on the averaged gradients and takes the averaged
    buffers, or, if any replica's loss was not finite, every one skips. Without replicas
    ``begin`` does it all. Calling the update runs both halves."""

    def __init__(self, loss: Tensor, finite: Tensor, optimizers: list[torch.optim.Optimizer],
                 kept: list[tuple[Tensor, Tensor]], module: nn.Module,
                 replicas: Replicas | None = None) -> None:
        """``finite``: whether ``loss`` is (a 0-dim bool tensor); ``module`` holds the
        buffers the replicas average."""
        self.loss, self.finite, self.optimizers, self.kept = loss, finite, optimizers, kept
        self.module, self.replicas = module, replicas
        self._wait: Callable[[], Tensor] | None = None
        # where each piece of the averaged bucket goes back (None: a parameter without a
        # gradient, which has none on any replica), and its size
        self._targets: list[tuple[Tensor | None, int]] = []

    def __call__(self) -> None:
        self.begin()
        self.finish()

    def begin(self) -> None:
        self.loss.backward()  # non-finite gradients are never stepped on (see step)
        if self.replicas is None:
            self._apply(self.finite)
            return
        params = [p for opt in self.optimizers for group in opt.param_groups
                  for p in group["params"]]
        buffers = moving_buffers(self.module)
        self._targets = [(p.grad, p.numel()) for p in params] + [(b, b.numel()) for b in buffers]
        sent = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        self._wait = self.replicas.sum([self.finite.view(1).to(self.loss.dtype)]
                                       + [t.reshape(-1) for t in sent + buffers])

    def finish(self) -> None:
        if self._wait is None:
            return
        bucket, self._wait = self._wait(), None
        targets, self._targets = self._targets, []
        agreed = bucket[0] == self.replicas.count  # every replica's loss was finite
        mean = bucket[1:].div_(self.replicas.count)
        pieces = [(t, v.view_as(t)) for (t, _), v in
                  zip(targets, mean.split([n for _, n in targets])) if t is not None]
        torch._foreach_copy_([t for t, _ in pieces], [v for _, v in pieces])
        self._apply(agreed)

    def _apply(self, ok: Tensor) -> None:
        for buffer, saved in self.kept:
            buffer.copy_(torch.where(ok, buffer, saved))
        found_inf = ok.logical_not().to(torch.float32)
        for optimizer in self.optimizers:
            step(optimizer, found_inf)
            optimizer.zero_grad(set_to_none=True)


def step(optimizer: torch.optim.Optimizer, found_inf: Tensor) -> None:
    """``optimizer.step()`` unless ``found_inf`` (a 0-dim float32 tensor) is 1, when nothing
    changes at all. A fused optimizer decides on the device: it skips the step where its
    ``found_inf`` is 1 and takes its step count back. Any other (the user's own, or where no
    fused kernel exists) reads the flag on the host, the one host read left in a step."""
    if all(group.get("fused") for group in optimizer.param_groups):
        optimizer.found_inf = found_inf
        try:
            optimizer.step()
        finally:  # the flag is this step's: a later step of the user's own must not see it
            del optimizer.found_inf
    elif not bool(found_inf):
        optimizer.step()


@dataclass(frozen=True)
class PredPooling:
    """AvgPool2d that shrinks a C×S×S map to at most ``dim-in-decoder`` features (§3.2)."""

    kernel: tuple[int, int]
    padding: tuple[int, int]
    out: tuple[int, int]
    dim: int

    def module(self) -> nn.Module:
        """The pooling as a layer: AvgPool2d, or Identity where the map fits as it is."""
        if self.kernel == (1, 1):
            return nn.Identity()
        return nn.AvgPool2d(self.kernel, self.kernel, self.padding)


def pred_pooling(channels: int, size: int, dim_in_decoder: int) -> PredPooling:
    """The paper's pooling rule: double the kernel height, then width, until C·oh·ow fits."""
    kh = kw = 1
    oh = ow = size
    while channels * oh * ow > dim_in_decoder and kh < size:
        kh *= 2
        oh = math.ceil(size / kh)
        if channels * oh * ow > dim_in_decoder:
            kw *= 2
            ow = math.ceil(size / kw)
    padding = (kh * (oh - size // kh) // 2, kw * (ow - size // kw) // 2)
    return PredPooling((kh, kw), padding, (oh, ow), channels * oh * ow)


class Meter:
    """Running sums of one unit's losses and errors, kept on the device in one float64 vector
    that a batch adds to in three ops and no host read; ``take`` reads and resets it once per
    epoch. A batch whose loss is NaN or infinite (kept going by --on-nan skip) is counted
    apart, not averaged in: the vector sums the finite batches' values, examples and count,
    and the batches added are counted on the host, so the non-finite ones are the rest."""

    KEYS = ("loss", "loss_sim", "loss_pred", "errors")
    SUMS = (*KEYS, "n", "nonfinite")  # every sum a meter may hold, as ``state`` names them

    def __init__(self) -> None:
        self.keys: tuple[str, ...] = ()  # the KEYS recorded, in the vector's order
        self.sums: Tensor | None = None  # sums of self.keys, examples, finite batches
        self.batches = 0  # batches added (and non-finite ones restored from a checkpoint)
        self._weights: dict[tuple[int, torch.device], Tensor] = {}

    def add(self, n: int, finite: Tensor | None = None, **values: Tensor) -> None:
        """A batch of ``n`` examples: its ``values`` (``loss`` and any other of KEYS, 0-dim
        tensors; ``errors`` a count, the others per-example means) and whether its loss is
        ``finite`` (a 0-dim bool tensor), where the caller has it."""
        finite = torch.isfinite(values["loss"].detach()) if finite is None else finite
        values = {k: v for k, v in values.items() if k in self.KEYS}  # what take() reports
        if not set(values) <= set(self.keys):  # a unit records the same keys each batch:
            self._relayout(tuple(values), finite.device)  # once, at the start
        zero = None if len(values) == len(self.keys) else finite.new_zeros((), dtype=torch.float)
        parts = [values[k].detach() if k in values else zero for k in self.keys]
        if parts[0].dtype not in (torch.float32, torch.float64):  # a count stays exact
            parts = [p.float() for p in parts]
        batch = torch.where(finite, torch.stack(parts + [finite, finite]), 0.0)
        if self.sums is None:
            self.sums = torch.zeros(len(self.keys) + 2, dtype=torch.float64, device=finite.device)
        self.sums.addcmul_(batch, self._weight(n, finite.device))  # in float64
        self.batches += 1

    def _weight(self, n: int, device: torch.device) -> Tensor:
        """What each value counts for: a per-example mean ``n`` times, a count once, the
        finite flag ``n`` examples and one batch; made once per batch size."""
        if (n, device) not in self._weights:
            self._weights[(n, device)] = torch.tensor(
                [1.0 if k == "errors" else n for k in self.keys] + [n, 1.0],
                dtype=torch.float64, device=device)
        return self._weights[(n, device)]

    def _relayout(self, keys: tuple[str, ...], device: torch.device) -> None:
        old = self.state()
        self.load(old, device, tuple(k for k in self.KEYS if k in keys or k in old))

    def _named(self) -> dict[str, float]:
        """The sums by name, on the host, as SUMS names them."""
        if self.sums is None:
            return {}
        *values, n, finite = self.sums.tolist()
        return {**dict(zip(self.keys, values)), "n": n, "nonfinite": self.batches - finite}

    def take(self, reset: bool = True) -> dict[str, float | int | None]:
        """Per-example averages (errors in percent); None for a quantity never recorded.
        ``reset=False`` keeps the sums (an epoch cut short goes on after a resume)."""
        sums = self._named()
        n = int(sums.get("n", 0))
        out: dict[str, float | int | None] = {"n": n, "nonfinite": int(sums.get("nonfinite", 0))}
        for key in self.KEYS:
            value = None if key not in sums or n == 0 else sums[key] / n
            out["error" if key == "errors" else key] = (
                None if value is None else 100.0 * value if key == "errors" else value)
        if reset:
            self.sums, self.batches = None, 0
        return out

    def state(self) -> dict:
        """The sums by name (those recorded, with n and nonfinite), on the host: the format
        checkpoints have always held."""
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in self._named().items()}

    def load(self, state: dict, device: torch.device, keys: tuple[str, ...] = ()) -> None:
        """Sums as ``state`` holds them (and zero for the other ``keys``), on ``device``."""
        self.keys = tuple(k for k in self.KEYS if k in state or k in keys)
        self._weights = {}
        self.sums, self.batches = None, 0
        if state:
            self.batches = int(state.get("nonfinite", 0))
            self.sums = torch.tensor([float(state[k]) if k in state else 0.0 for k in self.keys]
                                     + [float(state.get("n", 0)), 0.0],
                                     dtype=torch.float64, device=device)


def make_optimizer(params, cfg: Config,
                   no_decay: Iterable[Tensor] = ()) -> torch.optim.Optimizer:
    """A unit's optimizer, fused where torch has a fused kernel for the parameters' device
    (one kernel for the whole unit; it also skips a non-finite step on the device: ``step``),
    else the multi-tensor (foreach) form. Fused Adam rounds a little differently from the
    for-loop form (about 1e-7 relatively), so weights differ from those the for-loop form
    gave in the last bits; the state is the same, so checkpoints of either resume. SGD with
    momentum starts from zero momentum buffers, which is what its first step would make of
    them, so that a skipped first step leaves nothing uninitialised. AdamW leaves biases,
    norms and ``no_decay`` undecayed (``decay_groups``)."""
    params = [p for p in params if p.requires_grad]
    devices = {p.device.type for p in params}
    fused = devices and devices <= set(_get_fused_kernels_supported_devices())
    fast = {"fused": True} if fused else {"foreach": True}
    if cfg.optim == "sgd":
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay, **fast)
        _start_momentum(optimizer)
        return optimizer
    if cfg.optim == "adamw":  # the decay off the gradient, so that Adam's scaling leaves it be
        return torch.optim.AdamW(decay_groups(params, no_decay), lr=cfg.lr,
                                 weight_decay=cfg.weight_decay, **fast)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                            amsgrad=cfg.optim == "amsgrad", **fast)


def decay_groups(params: list[Tensor], no_decay: Iterable[Tensor]) -> list[dict]:
    """AdamW's parameter groups as DeiT and timm make them: weight decay for the weights of
    linear and conv layers, none for biases and norms (one dimension) nor for ``no_decay``
    (position embeddings, class tokens), which decay would pull towards zero for nothing."""
    exempt = {id(p) for p in no_decay}
    keep = [p.ndim <= 1 or id(p) in exempt for p in params]
    groups = [{"params": [p for p, k in zip(params, keep) if not k]},
              {"params": [p for p, k in zip(params, keep) if k], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _start_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Zero momentum buffers for SGD with momentum where it has none yet (see
    ``make_optimizer``)."""
    if not isinstance(optimizer, torch.optim.SGD):
        return
    for group in optimizer.param_groups:
        if group["momentum"]:
            for p in group["params"]:
                optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))


def load_optimizer(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, keeping the optimizer's own form: torch takes
    the saved groups' ``fused`` and ``foreach`` along, so a checkpoint of the for-loop form
    would resume in it (with a host read a step) and a fused one would see its step counts
    left on the host. The state itself is the same in every form."""
    forms = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, form in zip(optimizer.param_groups, forms):
        group.update(form)
        if not group.get("fused"):
            continue
        for p in group["params"]:  # where the fused kernels read it
            saved = optimizer.state.get(p, {})
            if torch.is_tensor(saved.get("step")):
                saved["step"] = saved["step"].to(device=p.device, dtype=torch.float32)
    _start_momentum(optimizer)  # a checkpoint from before the first step has no buffers


class Unit(nn.Module):
    """What blocks and the output layer share: an index in the network, an optimizer, meters,
    and dropout masks drawn from (seed, index, epoch, step): a batch's masks depend only on
    where it sits in the run, never on run order, device count or a restart."""

    is_output = False  # the network's last unit, trained by the global cross-entropy

    def __init__(self, index: int, cfg: Config) -> None:
        super().__init__()
        self.index = index
        self.cfg = cfg
        self.optimizers: list[torch.optim.Optimizer] = []  # stepped in this order
        self.meters = {"train": Meter(), "val": Meter(), "test": Meter()}
        self.phase = "test"  # which meter an evaluation records into: "val" or "test"
        self.position = (0, 0)  # (epoch, step) of the batch being trained
        self.last_loss: Tensor | None = None  # the local loss of the latest batch, on device
        self.last_finite: Tensor | None = None  # whether it is finite, on device
        self.replica = 0  # which data-parallel replica of the unit this is
        self.replicas: Replicas | None = None  # all of them, when there are several
        self._dropout_gen: torch.Generator | None = None

    def make_optimizer(self) -> None:
        """Give the unit its private optimizer (not in --backprop, where the stage holds one)."""
        if not self.cfg.backprop:
            self.optimizers = [make_optimizer(self.parameters(), self.cfg, self.no_decay())]

    def no_decay(self) -> list[Tensor]:
        """Parameters AdamW must not decay beyond the biases and norms it leaves out anyway
        (``decay_groups``)."""
        return []

    @property
    def smoothing(self) -> float:
        """The label smoothing of this unit's cross-entropies: --label-smoothing in training,
        none in evaluation, so that test losses stay comparable."""
        return self.cfg.label_smoothing if self.training else 0.0

    @property
    def meter(self) -> Meter:
        return self.meters["train" if self.training else self.phase]

    def set_lr(self, lr: float) -> None:
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr

    def dropout_generator(self, device: torch.device) -> torch.Generator:
        """The generator of this unit's masks for the current batch, seeded from its position
        (a generator of the activation's device: the masks differ between device types) and,
        beyond the first, its replica. Reseeded at each call: a unit draws one mask per batch."""
        if self._dropout_gen is None or self._dropout_gen.device != device:
            self._dropout_gen = torch.Generator(device=device)
        self._dropout_gen.manual_seed(self.mask_seed())
        return self._dropout_gen

    def mask_seed(self) -> int:
        """The seed of this unit's random draws for the current batch: (seed, unit, epoch,
        step) and, beyond the first, its replica."""
        replica = ("replica", self.replica) if self.replica else ()
        return derive_seed(self.cfg.seed, "dropout", self.index, *self.position, *replica)

    def record(self, loss: Tensor, y: Tensor, **stats: Tensor) -> Tensor:
        """``loss`` of a batch with labels ``y``, and its parts ``stats``, into the current
        meter; kept as the unit's latest loss (for steps.jsonl and the worker's look for
        non-finite losses) with whether it is finite. Returns ``loss``."""
        self.last_loss = loss.detach()
        self.last_finite = torch.isfinite(self.last_loss)
        self.meter.add(y.size(0), self.last_finite, loss=loss, **stats)
        return loss

    def step_closure(self, loss: Tensor, kept: list[tuple[Tensor, Tensor]]) -> Update:
        """The update of this batch (``loss`` the one just recorded); ``kept`` are the
        buffers to put back if it is skipped."""
        assert self.optimizers
        return Update(loss, self.last_finite, self.optimizers, kept, self, self.replicas)


class LocalBlock(Unit):
    """conv|linear → BN → φ gives h; the output handed on is dropout(h), then the VGG max-pool.

    The local loss is computed from h before dropout (§2.1, quirk 1) with a sim head, a pred head
    (average-pooled for conv blocks), or both; ``--bio`` swaps them for §5's fixed random label
    codes and a feedback-alignment pred head.
    """

    def __init__(self, index: int, cfg: Config, num_classes: int, n_in: int, n_out: int,
                 conv: tuple[int, int, int] | None = None, size: int = 1,
                 max_pool: bool = False, bias: bool = True, bn: bool = True,
                 in_size: int | None = None, recon_first: bool = False,
                 pool_size: int | None = None) -> None:
        """``conv`` is (kernel, stride, padding) for a conv block, None for a linear one;
        ``size`` is the spatial size of h for a conv block, ``in_size`` that of its input (by
        default size × stride). ``bn`` False leaves out the BN (as --no-batch-norm does);
        ``recon_first`` gives the first unit a recon decoder too (residual stems, §5.4);
        ``pool_size`` is the side the pred pooling is sized for (by default ``size``)."""
        super().__init__(index, cfg)
        self.num_classes = num_classes
        self.is_conv = conv is not None
        if conv is not None:
            k, s, p = conv
            self.layer: nn.Module = nn.Conv2d(n_in, n_out, k, s, p, bias=bias)
        else:
            self.layer = nn.Linear(n_in, n_out, bias=bias)
        norm = nn.BatchNorm2d if self.is_conv else nn.BatchNorm1d
        self.bn = None if cfg.no_batch_norm or not bn else norm(n_out)
        self.max_pool = nn.MaxPool2d(2, 2) if max_pool else None
        self.p = cfg.dropout
        self.w_pred, self.w_sim = losses.sup_weights(cfg.loss_sup, cfg.beta)
        if cfg.backprop:
            self.sim_head = self.pred_pool = self.pred_head = self.recon_head = None
            return

        uses_sim = self.w_sim > 0 or cfg.loss_unsup == "sim"
        self.sim_head = None
        if uses_sim and not cfg.bio:
            self.sim_head = (nn.Conv2d(n_out, n_out, 3, 1, 1, bias=False) if self.is_conv
                             else nn.Linear(n_out, n_out, bias=False))
        self.pred_pool = None
        dim = n_out
        if self.is_conv and (self.w_pred > 0 or cfg.bio):
            pooling = pred_pooling(n_out, size if pool_size is None else pool_size,
                                   cfg.dim_in_decoder)
            dim = pooling.dim
            self.pred_pool = pooling.module()
        self.pred_head: nn.Module | None = None
        if self.w_pred > 0:
            self.pred_head = (FALinear(dim, cfg.target_proj_size) if cfg.bio
                              else nn.Linear(dim, num_classes))
            if not cfg.bio:
                nn.init.zeros_(self.pred_head.weight)
        if cfg.bio:
            bound = 1.0 / math.sqrt(num_classes)
            self.register_buffer("label_proj", torch.empty(cfg.target_proj_size, num_classes)
                                 .uniform_(-bound, bound))
        self.recon_head = None
        if cfg.loss_unsup == "recon" and (index > 0 or recon_first):
            if conv is not None:  # output_padding: back to the input's side for any stride
                k, s, p = conv
                extra = (size * s if in_size is None else in_size) - ((size - 1) * s - 2 * p + k)
                self.recon_head: nn.Module | None = nn.ConvTranspose2d(
                    n_out, n_in, k, s, p, output_padding=extra)
            else:
                self.recon_head = nn.Linear(n_out, n_in)

    def features(self, x: Tensor) -> Tensor:
        """h = φ(BN(layer(x))), the tensor the local losses see."""
        h = self.layer(x if self.is_conv else x.flatten(1))
        if self.bn is not None:
            h = self.bn(h)
        return self.nonlin(h, inplace=True)

    def nonlin(self, x: Tensor, inplace: bool = False) -> Tensor:
        if self.cfg.nonlin == "leakyrelu":
            return F.leaky_relu(x, 0.01, inplace=inplace)
        return F.relu(x, inplace=inplace)

    def drop(self, t: Tensor, p: float, channels: bool = True) -> Tensor:
        """Dropout in training: of whole channels (Dropout2d) for a map, else element-wise,
        with this batch's masks (one draw per unit and batch)."""
        if not self.training or p == 0:
            return t
        shape = t.shape[:2] + (1,) * (t.dim() - 2) if channels else t.shape
        mask = torch.empty(shape, device=t.device, dtype=t.dtype)
        mask.bernoulli_(1.0 - p, generator=self.dropout_generator(t.device))
        return t * mask.div_(1.0 - p)

    def handoff(self, h: Tensor) -> Tensor:
        """The output for the next unit: dropout (whole channels for conv), then max-pool."""
        h = self.drop(h, self.p)
        return h if self.max_pool is None else self.max_pool(h)

    def run(self, x: Tensor, skips: Skips, losses: bool,
            keep_graph: bool = True) -> tuple[Tensor, Tensor | None, Tensor]:
        """The unit's forward: (the output handed on, h for the local losses or None where
        ``losses`` is off and the unit need not form it, the input the unsupervised losses
        compare with). ``keep_graph`` False builds no graph past h (local training: the
        output is detached anyway); the global modes keep it. ``skips`` is the batch's."""
        h = self.features(x)
        if keep_graph:
            return self.handoff(h), h, x
        with torch.no_grad():
            return self.handoff(h.detach()), h, x

    def local_loss(self, h: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """α·L_unsup + (1−α)·L_sup of this block, recorded in the current meter."""
        cfg = self.cfg
        std = not cfg.no_similarity_std
        x = x if self.is_conv else x.flatten(1)
        stats: dict[str, Tensor] = {}
        terms: list[Tensor] = []
        pooled = h if self.pred_pool is None else self.pred_pool(h)
        if cfg.bio:
            code = losses.bio_target(self.label_proj, y)
            hs = pooled
            sim_target = losses.similarity_matrix(code).detach()
        else:
            hs = self.sim_head(h) if self.sim_head is not None else None
            sim_target = losses.label_similarity(y, self.num_classes) if self.w_sim > 0 else None
        if self.w_pred > 0:
            logits = self.pred_head(pooled.flatten(1))
            if cfg.bio:
                loss_pred = self.w_pred * losses.bio_pred_loss(logits, code)
            else:
                loss_pred = self.w_pred * losses.pred_loss(logits, y, self.smoothing)
                stats["errors"] = losses.errors(logits, y)
            stats["loss_pred"] = loss_pred
            terms.append(loss_pred)
        if self.w_sim > 0:
            loss_sim = self.w_sim * losses.sim_loss(hs, sim_target, std)
            stats["loss_sim"] = loss_sim
            terms.append(loss_sim)
        sup = sum(terms[1:], terms[0]) if terms else h.new_zeros(())
        unsup: Tensor | float = 0.0
        if cfg.loss_unsup == "sim":
            unsup = losses.sim_loss(hs, losses.similarity_matrix(x, std).detach(), std)
        elif self.recon_head is not None:
            unsup = F.mse_loss(self.nonlin(self.recon_head(h)), x.detach())
        return self.record(losses.mix_unsup(sup, unsup, cfg.alpha), y, **stats)

    def train_step(self, x: Tensor, y: Tensor,
                   skips: Skips | None = None) -> tuple[Tensor, Update]:
        kept = keep_buffers(self, self.cfg)
        out, h, seen = self.run(x, {} if skips is None else skips, losses=True,
                                keep_graph=False)
        return out.detach(), self.step_closure(self.local_loss(h, seen, y), kept)

    @torch.no_grad()
    def eval_step(self, x: Tensor, y: Tensor, skips: Skips | None = None) -> Tensor:
        stats = not self.cfg.no_print_stats and not self.cfg.backprop
        out, h, seen = self.run(x, {} if skips is None else skips, losses=stats)
        if stats:
            self.local_loss(h, seen, y)
        return out


class OutputLayer(Unit):
    """The final Linear, trained by the global CE (times (1−β) in predsim, §3.5). In local modes
    it is just one more local unit: its input is detached and its weight starts at zero."""

    is_output = True

    def __init__(self, index: int, cfg: Config, n_in: int, num_classes: int,
                 zero_init: bool) -> None:
        super().__init__(index, cfg)
        self.linear = nn.Linear(n_in, num_classes)
        if zero_init:
            nn.init.zeros_(self.linear.weight)
        self.scale = losses.output_loss_scale(cfg.loss_sup, cfg.beta, cfg.backprop)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(1))

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """Scaled CE, recorded in the current meter with the error count."""
        return self.record(self.scale * losses.pred_loss(logits, y, self.smoothing), y,
                           errors=losses.errors(logits, y))

    def train_step(self, x: Tensor, y: Tensor,
                   skips: Skips | None = None) -> tuple[Tensor, Update]:
        kept = keep_buffers(self, self.cfg)  # a head's BN (Wide ResNets) moves in the forward
        logits = self(x)
        return logits.detach(), self.step_closure(self.loss(logits, y), kept)

    @torch.no_grad()
    def eval_step(self, x: Tensor, y: Tensor, skips: Skips | None = None) -> Tensor:
        logits = self(x)
        self.loss(logits, y)
        return logits


class FALinear(nn.Module):
    """Linear layer trained with feedback alignment: a fixed random B carries the error back."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(n_in)
        self.weight = nn.Parameter(torch.zeros(n_out, n_in))
        self.bias = nn.Parameter(torch.zeros(n_out))
        self.register_buffer("feedback", torch.empty(n_out, n_in).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        return losses.feedback_alignment(x, self.weight, self.bias, self.feedback)
