"""The local losses of the method (spec §3): similarity matching, prediction, their mix, and the
unsupervised and bio-plausible variants. Pure functions of tensors; no modules, and no state
but a batch's label targets, kept on its label tensor (``_per_batch``)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

NORM_EPS = 1e-8


def similarity_matrix(x: Tensor, std_reduction: bool = True) -> Tensor:
    """Cosine similarity of the rows of a batch, S(X) in §3.1.

    A 4-D map with more than 3 channels and more than one row is first reduced to the unbiased
    spatial standard deviation of each channel; anything else is flattened. Rows are centred on
    their own mean, divided by (1e-8 + their norm) and the product is clamped to [-1, 1].
    """
    if x.dim() == 4 and std_reduction and x.size(1) > 3 and x.size(2) > 1:
        x = x.flatten(2).std(dim=2)
    else:
        x = x.flatten(1)
    xc = x - x.mean(dim=1, keepdim=True)
    xn = xc / (NORM_EPS + xc.norm(dim=1, keepdim=True))
    return (xn @ xn.t()).clamp(-1.0, 1.0)


def _per_batch(y: Tensor, key: tuple, make: Callable[[], Tensor]) -> Tensor:
    """``make()``, kept on the label tensor ``y`` itself: every unit of a stage trains on the
    same ``y`` object (a stage's own: ``stages.stage.own_labels``), so a target made from the
    labels (the one-hot rows, the label similarity) is made once per batch and stage, not
    once per unit. It lives and dies with the batch; no other state holds it. The targets are
    shared: a loss must not change them in place."""
    made = y.__dict__.setdefault("_localpipe_targets", {})
    if key not in made:
        made[key] = make()
    return made[key]


def one_hot(y: Tensor, num_classes: int) -> Tensor:
    """Float one-hot rows, by comparison: no scatter and no host sync on a GPU."""
    return _per_batch(y, ("one_hot", num_classes), lambda: (
        y.unsqueeze(1) == torch.arange(num_classes, device=y.device)).float())


def label_similarity(y: Tensor, num_classes: int) -> Tensor:
    """Target of the sim loss: 1 for a same-class pair, -1/(C-1) otherwise (detached)."""
    return _per_batch(y, ("similarity", num_classes),
                      lambda: similarity_matrix(one_hot(y, num_classes)).detach())


def sim_loss(hs: Tensor, target: Tensor, std_reduction: bool = True) -> Tensor:
    """Mean squared error between S(hs) and a target similarity matrix, over all N² entries."""
    return F.mse_loss(similarity_matrix(hs, std_reduction), target)


def pred_loss(logits: Tensor, y: Tensor, smoothing: float = 0.0) -> Tensor:
    """Cross-entropy, written with a one-hot mask instead of ``F.cross_entropy``: the same
    gradients bit for bit, and deterministic on a GPU (CUDA's ``nll_loss`` is not, and refuses
    to run under ``torch.use_deterministic_algorithms``). ``smoothing`` ε > 0 takes the
    targets 1 − ε + ε/C and ε/C (``F.cross_entropy``'s ``label_smoothing``)."""
    return -(F.log_softmax(logits, dim=1) * targets(y, logits.size(1), smoothing)).sum(
        dim=1).mean()


def targets(y: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """The cross-entropy's target rows: one-hot, or smoothed by ε (made once per batch)."""
    if not smoothing:
        return one_hot(y, num_classes)
    return _per_batch(y, ("smoothed", num_classes, smoothing), lambda: (
        one_hot(y, num_classes) * (1.0 - smoothing) + smoothing / num_classes))


def bio_target(proj_weight: Tensor, y: Tensor) -> Tensor:
    """The fixed random code of each label: column y of the projection P, shape (N, proj)."""
    return proj_weight[:, y].t()


def bio_pred_loss(logits: Tensor, code: Tensor) -> Tensor:
    """BCE-with-logits against the sign pattern of the label's random code (§5)."""
    return F.binary_cross_entropy_with_logits(logits, (code > 0).float())


def sup_weights(loss_sup: str, beta: float) -> tuple[float, float]:
    """(weight of the pred term, weight of the sim term) of the supervised local loss (§3.3)."""
    return {"pred": (1.0, 0.0), "sim": (0.0, 1.0), "predsim": (1.0 - beta, beta)}[loss_sup]


def mix_unsup(sup: Tensor, unsup: Tensor | float, alpha: float) -> Tensor:
    """Block loss = α·L_unsup + (1−α)·L_sup (§3.4); ``sup`` itself where there is no
    unsupervised loss and α is 0 (the same value, two ops fewer each way)."""
    if alpha == 0 and not isinstance(unsup, Tensor):
        return sup
    return alpha * unsup + (1.0 - alpha) * sup


def output_loss_scale(loss_sup: str, beta: float, backprop: bool) -> float:
    """The global CE is scaled by (1−β) in local predsim mode (§3.5, quirk 7)."""
    return 1.0 - beta if loss_sup == "predsim" and not backprop else 1.0


def errors(logits: Tensor, y: Tensor) -> Tensor:
    """Number of wrong argmax predictions, as a tensor (no device sync)."""
    return (logits.argmax(dim=1) != y).sum()


def feedback_alignment(x: Tensor, weight: Tensor, bias: Tensor, feedback: Tensor) -> Tensor:
    """x·Wᵀ + b whose backward sends g·B to the input instead of g·W (§5)."""
    return _FeedbackAlignment.apply(x, weight, bias, feedback)


class _FeedbackAlignment(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, feedback: Tensor) -> Tensor:
        ctx.save_for_backward(x, feedback)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, feedback = ctx.saved_tensors
        grad_x = grad @ feedback if ctx.needs_input_grad[0] else None
        grad_w = grad.t() @ x if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None
