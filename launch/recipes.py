"""The paper's 86 recipes (§8.2 of the method spec) by name, each with its test error (§8.1),
and localpipe's own 12 for Vision Transformers, which the paper has none of.

A name reads ``<dataset>-<model>[-x<feat-mult>]-<variant>[-cutout]``, for example
``mnist-mlp-predsim`` or ``cifar10-vgg11b-x3-predsim-cutout``; the variants are ``global``
(``--backprop``), ``pred``, ``sim``, ``predsim`` and, for CIFAR-10, ``pred-bio``, ``sim-bio`` and
``predsim-bio``. ``--recipe NAME`` sets every option the recipe sets; options given on the
command line win.

The ViT recipes (``mnist-vit-*``, ``cifar10-vit-tiny-*``, ``cifar100-vit-small-*``) train
from scratch with DeiT's ingredients at batch 128: AdamW (weight decay 0.05, none on biases,
norms and embeddings), a linear warm-up (one epoch on MNIST, five on CIFAR at batch 128) then
cosine decay to 0, label smoothing 0.1, and the datasets' usual random crop (and flip, for
CIFAR); lr 1e-3 (MNIST) and 5e-4 (CIFAR), as small-data ViTs are trained, above DeiT's
5e-4 × 128/512. They are this project's, not the paper's, and have no published error to
compare with.
"""
from __future__ import annotations

from dataclasses import dataclass

from localpipe.stages.config import Config



@dataclass(frozen=True)
class Group:
    """One row of §8.2: a network on a dataset, in one or more variants."""

    dataset: str
    model: str
    feat_mult: float
    variants: tuple[str, ...]
    dropout: float
    lr: float
    epochs: int
    milestones: tuple[int, ...] | None  # None: the paper's default
    dim_in_decoder: int | None = None  # for pred and predsim (and cutout); None: default 4096
    extra: tuple[tuple[str, object], ...] = ()  # options every variant of the row sets
    sim_extra: tuple[tuple[str, object], ...] = ()  # options only sim and predsim set
    errors: tuple[float | None, ...] = ()  # §8.1 test error per variant, in order


ALL = ("global", "pred", "sim", "predsim")
M100, M200 = (50, 75, 89, 94), (100, 150, 175, 188)
MLP3 = (("num_layers", 3),)
CLASSES = (("classes_per_batch", 20), ("classes_per_batch_until_epoch", 200))
GROUPS = [
    Group("MNIST", "mlp", 1, ALL, 0.1, 5e-4, 100, M100, None, MLP3,
          errors=(0.75, 0.68, 0.80, 0.62)),
    Group("MNIST", "vgg8b", 1, ALL, 0.2, 5e-4, 100, M100, 1024, errors=(0.26, 0.40, 0.65, 0.31)),
    Group("MNIST", "vgg8b", 1, ("predsim-cutout",), 0.2, 5e-4, 100, M100, 1024,
          (("cutout", True), ("length", 14)), errors=(0.26,)),
    Group("FashionMNIST", "mlp", 1, ALL, 0.025, 5e-4, 200, M200, None, MLP3,
          errors=(8.37, 8.60, 9.70, 8.54)),
    Group("FashionMNIST", "vgg8b", 1, ALL, 0.1, 5e-4, 200, M200, 1024,
          errors=(4.53, 5.66, 5.12, 4.65)),
    Group("FashionMNIST", "vgg8b", 2, ALL, 0.2, 3e-4, 200, M200, errors=(4.55, 5.11, 4.92, 4.33)),
    Group("FashionMNIST", "vgg8b", 2, ("predsim-cutout",), 0.2, 3e-4, 200, M200, None,
          (("cutout", True), ("length", 14)), errors=(4.14,)),
    Group("KuzushijiMNIST", "mlp", 1, ALL, 0.2, 5e-4, 100, M100, None, MLP3,
          errors=(5.99, 7.26, 9.80, 7.33)),
    Group("KuzushijiMNIST", "vgg8b", 1, ALL, 0.3, 5e-4, 100, M100, 1024,
          errors=(1.53, 2.22, 2.19, 1.36)),
    Group("KuzushijiMNIST", "vgg8b", 1, ("predsim-cutout",), 0.15, 5e-4, 100, M100, 1024,
          (("cutout", True), ("length", 14)), errors=(0.99,)),
    Group("CIFAR10", "mlp", 1, ALL, 0.1, 5e-4, 400, None, None,
          MLP3 + (("num_hidden", 3000),), errors=(33.56, 32.33, 33.48, 30.93)),
    Group("CIFAR10", "vgg8b", 1, ALL, 0.2, 5e-4, 400, None, 2048,
          errors=(5.99, 8.40, 7.16, 5.58)),
    Group("CIFAR10", "vgg11b", 1, ALL, 0.2, 5e-4, 400, None, 2048,
          errors=(5.56, 8.39, 6.70, 5.30)),
    Group("CIFAR10", "vgg11b", 2, ALL, 0.25, 3e-4, 400, None, errors=(4.91, 7.30, 6.66, 4.42)),
    Group("CIFAR10", "vgg11b", 3, ALL, 0.3, 3e-4, 400, None, errors=(5.02, 7.37, 9.34, 3.97)),
    Group("CIFAR10", "vgg11b", 3, ("predsim-cutout",), 0.3, 3e-4, 400, None, None,
          (("cutout", True), ("length", 16)), errors=(3.60,)),
    Group("CIFAR10", "vgg8b", 1, ("pred-bio", "sim-bio"), 0.05, 5e-4, 400, None, None,
          (("num_layers", 1), ("bio", True)), errors=(None, None)),
    Group("CIFAR10", "vgg8b", 1, ("predsim-bio",), 0.05, 5e-4, 400, None, None,
          (("num_layers", 1), ("bio", True), ("beta", 0.01)), errors=(None,)),
    Group("CIFAR10", "vgg8b", 2, ("predsim-bio",), 0.1, 3e-4, 400, None, None,
          (("num_layers", 1), ("bio", True), ("beta", 0.01)), errors=(None,)),
    Group("CIFAR100", "mlp", 1, ALL, 0.025, 5e-4, 400, None, None,
          MLP3 + (("num_hidden", 3000),), CLASSES, errors=(62.57, 58.87, 62.46, 56.88)),
    Group("CIFAR100", "vgg8b", 1, ALL, 0.05, 5e-4, 400, None, None, (), CLASSES,
          errors=(26.24, 29.32, 32.64, 24.07)),
    Group("CIFAR100", "vgg11b", 1, ALL, 0.05, 5e-4, 400, None, None, (), CLASSES,
          errors=(25.18, 29.58, 30.82, 24.05)),
    Group("CIFAR100", "vgg11b", 2, ALL, 0.1, 3e-4, 400, None, None, (), CLASSES,
          errors=(23.44, 26.91, 28.03, 21.20)),
    Group("CIFAR100", "vgg11b", 3, ALL, 0.15, 3e-4, 400, None, None, (), CLASSES,
          errors=(23.69, 25.90, 28.01, 20.13)),
    Group("SVHN", "vgg8b", 1, ALL, 0.3, 3e-4, 100, M100, 2048, errors=(2.29, 2.12, 1.89, 1.74)),
    Group("SVHN", "vgg8b", 1, ("predsim-cutout",), 0.15, 3e-4, 100, M100, 2048,
          (("cutout", True), ("length", 16)), errors=(1.65,)),
    Group("STL10", "vgg8b", 1, ALL, 0.1, 5e-4, 400, None, 2048,
          errors=(33.08, 26.83, 23.15, 20.51)),
    Group("STL10", "vgg8b", 1, ("predsim-cutout",), 0.1, 5e-4, 400, None, 2048,
          (("cutout", True), ("length", 48)), errors=(19.25,)),
]


# localpipe's own: (dataset, model, its size options, epochs, lr, warm-up batches)
VIT_GROUPS = [
    ("MNIST", "vit", (("num_layers", 6), ("num_hidden", 128), ("num_heads", 4),
                      ("patch_size", 7)), 30, 1e-3, 469),
    ("CIFAR10", "vit-tiny", (("patch_size", 4),), 200, 5e-4, 1955),
    ("CIFAR100", "vit-small", (("patch_size", 4),), 200, 5e-4, 1955),
]
VIT_TRAINING = {"optim": "adamw", "weight_decay": 0.05, "lr_schedule": "cosine",
                "label_smoothing": 0.1, "dropout": 0.0, "batch_size": 128}


@dataclass(frozen=True)
class Recipe:
    name: str
    options: dict  # Config field -> value
    paper_error: float | None  # test error % in the paper's README, if it gives one


def _options(group: Group, variant: str) -> dict:
    """Every option a variant of ``group`` sets (the others keep the paper's defaults)."""
    loss = variant.split("-")[0]
    options = {"dataset": group.dataset, "model": group.model, "feat_mult": float(group.feat_mult),
               "dropout": group.dropout, "lr": group.lr, "epochs": group.epochs,
               "lr_decay_milestones": list(group.milestones or Config().lr_decay_milestones),
               # global and pred use relu, sim and predsim leakyrelu (the bio rows too)
               "nonlin": "relu" if loss in ("global", "pred") else "leakyrelu"}
    if loss == "global":
        options["backprop"] = True
    else:
        options["loss_sup"] = loss
    if group.dim_in_decoder and loss in ("pred", "predsim"):
        options["dim_in_decoder"] = group.dim_in_decoder
    options.update(group.extra)
    if loss in ("sim", "predsim"):
        options.update(group.sim_extra)
    return options


def _name(group: Group, variant: str) -> str:
    scale = "" if group.feat_mult == 1 else f"-x{group.feat_mult:g}"
    return f"{group.dataset.lower()}-{group.model}{scale}-{variant}"


def _vit(dataset: str, model: str, size: tuple, epochs: int, lr: float, warmup: int,
         variant: str) -> Recipe:
    loss = {"backprop": True} if variant == "global" else {"loss_sup": variant}
    return Recipe(f"{dataset.lower()}-{model}-{variant}",
                  {"dataset": dataset, "model": model, **dict(size), **VIT_TRAINING,
                   "epochs": epochs, "lr": lr, "warmup_steps": warmup, **loss}, None)


RECIPES: dict[str, Recipe] = {
    _name(g, v): Recipe(_name(g, v), _options(g, v), e)
    for g in GROUPS for v, e in zip(g.variants, g.errors)}
PAPER = len(RECIPES)
RECIPES.update({r.name: r for r in (_vit(*g, v) for g in VIT_GROUPS for v in ALL)})


def listing() -> str:
    """Every recipe with the paper's test error, for ``--recipe list``."""
    width = max(map(len, RECIPES))
    lines = [f"{'recipe':{width}s}  paper test error", f"{'-' * width}  ----------------"]
    for i, recipe in enumerate(RECIPES.values()):
        error = ("localpipe's own" if i >= PAPER else "-" if recipe.paper_error is None
                 else f"{recipe.paper_error:.2f} %")
        lines.append(f"{recipe.name:{width}s}  {error}")
    lines.append(f"{len(RECIPES)} recipes: the paper's {PAPER} (method spec §8.2; errors from "
                 f"§8.1, none given for the bio rows) and localpipe's {len(RECIPES) - PAPER} "
                 f"for ViTs (no published error). Options given beside --recipe win.")
    return "\n".join(lines)
