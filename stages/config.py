"""The one configuration object of a run, passed down to every stage, worker and runner.

Field names follow the paper's ``train.py`` options (dashes become underscores) so that its
recipes carry over unchanged; the fields below ``# localpipe`` are this project's own.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from dataclasses import dataclass, field
from typing import Callable

from localpipe.stages.registry import DATASETS, MODELS


INT_MAX = 2**31 - 1  # every count must fit the C int of the kernels and libraries below
MAX_SECONDS = 1e9  # timeouts beyond ~30 years overflow the backends' clocks


class ConfigError(ValueError):
    """An invalid option or combination of options; reported as one line with exit code 2."""


# what a run's args.json says when lp.fit trained it: a network and datasets given in Python,
# which a command line cannot rebuild (the runners refuse them without the objects)
PYTHON_MODEL, PYTHON_DATASET = "localnet", "custom"
PYTHON_ONLY = (PYTHON_MODEL, PYTHON_DATASET)


def option(default, help: str, *, metavar: str | None = None, choices: tuple = (),
           check: str | None = None, within: tuple[str, Callable[[float], bool]] | None = None,
           part: str = "run", resume: bool | None = None, flag: str | None = None,
           aliases: tuple[str, ...] = (), noun: str | None = None, cli: bool = True):
    """One option, described once: its default and ``help`` (the command line's), and what
    validation, the command line and the resume check read from it. ``choices``: the values
    allowed, or a function giving them (a registry's names, looked up when asked); argparse
    offers them, unless a ``metavar`` stands in for them in ``help`` ("{choices}" there);
    ``check``: "positive" or "nonneg"; ``within``: (the interval as said, its test). ``part``:
    what the option defines, "model", "training" or "run"; ``resume``: whether a checkpoint
    must have been made with the same value (by default: model and training options do).
    ``flag``: the command line's spelling where it is not --the-name (``--no-download`` sets
    ``download`` False); ``noun``: how an unknown value is named ("model" for --model);
    ``cli`` False keeps it off the command line (set by ``lp.fit`` alone)."""
    meta = {"help": help, "metavar": metavar, "choices": choices, "check": check,
            "within": within, "part": part, "flag": flag, "aliases": aliases, "noun": noun,
            "cli": cli,
            "resume": part in ("model", "training") if resume is None else resume}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


UNIT = ("[0, 1]", lambda v: 0.0 <= v <= 1.0)
SECONDS = (f"(0, {MAX_SECONDS:g}] seconds", lambda v: 0 < v <= MAX_SECONDS)


@dataclass
class Config:
    """Every option of a run, each described once (``option``): the command line, validation
    and the resume check are read off these fields. Defaults are the paper's, except
    ``save_dir``. The paper's options come first, then localpipe's own (from ``recipe``)."""

    model: str = option("vgg8b", "network: {choices}", metavar="NAME",
                        choices=lambda: (*MODELS, PYTHON_MODEL), part="model", noun="model")
    dataset: str = option("CIFAR10", "dataset: {choices}", metavar="NAME",
                          choices=lambda: (*DATASETS, PYTHON_DATASET), part="model",
                          noun="dataset")
    batch_size: int = option(128, "training and test batch size", metavar="N",
                             check="positive", part="training", resume=False)
    num_layers: int = option(1, "hidden FC layers: the whole mlp; after a VGG's convs (0: one "
                             "plain Linear); none in the residual networks; the generic vit's "
                             "depth", metavar="N",
                             check="nonneg", part="model")
    num_hidden: int = option(1024, "width of every hidden FC layer; the generic vit's width",
                             metavar="N",
                             check="positive", part="model")
    dim_in_decoder: int = option(4096, "largest input of a conv block's pred head (average "
                                 "pooling brings it down; a ViT's heads: of its patch map)",
                                 metavar="N", check="positive", part="model")
    feat_mult: float = option(1.0, "multiplies every conv width (not the Wide ResNets', as in "
                              "the paper's code)", metavar="X", check="positive", part="model")
    epochs: int = option(400, "epochs to train", metavar="N", check="positive",
                         part="training", resume=False)
    classes_per_batch: int = option(0, "if > 0, batches hold this many classes (§6.3)",
                                    metavar="N", check="nonneg", part="training")
    classes_per_batch_until_epoch: int = option(0, "plain shuffling after epoch E (0: never)",
                                                metavar="E", check="nonneg", part="training")
    lr: float = option(5e-4, "initial learning rate of every optimizer", check="positive",
                       part="training")
    lr_decay_milestones: list[int] = option([200, 300, 350, 375], "epochs after which the "
                                            "learning rate is multiplied by --lr-decay-fact",
                                            metavar="E", part="training")
    lr_decay_fact: float = option(0.25, "learning rate factor at each milestone", metavar="X",
                                  check="positive", part="training")
    optim: str = option("adam", "optimizer (adamw: decoupled weight decay, as ViTs are "
                        "trained)", choices=("adam", "amsgrad", "adamw", "sgd"),
                        part="training")
    momentum: float = option(0.0, "SGD momentum", metavar="X", check="nonneg", part="training")
    weight_decay: float = option(0.0, "weight decay of every optimizer (L2 in the gradient; "
                                 "decoupled in adamw, and there not of biases, norms, "
                                 "position embeddings and the class token)", metavar="X",
                                 check="nonneg", part="training")
    alpha: float = option(0.0, "weight of the unsupervised local loss (α·unsup + (1−α)·sup)",
                          metavar="X", within=UNIT, part="model")
    beta: float = option(0.99, "weight of sim in predsim ((1−β)·pred + β·sim)", metavar="X",
                         within=UNIT, part="model")
    dropout: float = option(0.0, "dropout after every hidden nonlinearity (none in ViTs)",
                            metavar="P",
                            within=("[0, 1)", lambda v: 0.0 <= v < 1.0), part="model")
    loss_sup: str = option("predsim", "supervised local loss", choices=("pred", "sim",
                                                                        "predsim"),
                           part="model")
    loss_unsup: str = option("none", "unsupervised local loss", choices=("none", "sim",
                                                                         "recon"),
                             part="model")
    nonlin: str = option("relu", "nonlinearity", choices=("relu", "leakyrelu"), part="model")
    no_similarity_std: bool = option(False, "flatten conv maps in S(X) instead of taking "
                                     "per-channel spatial std", part="model")
    no_cuda: bool = option(False, "train on the CPU (the same as --device cpu)")
    backprop: bool = option(False, "global backprop: no local heads", part="model")
    no_batch_norm: bool = option(False, "blocks without batch norm", part="model")
    no_detach: bool = option(False, "local losses plus the end-to-end gradient (cannot be "
                             "pipelined)", part="model")
    pre_act: bool = option(False, "pre-activation Basic blocks and a bare stem (ResNet only; "
                           "Bottleneck blocks keep post-activation, as in the paper's code)",
                           part="model")
    seed: int = option(1, "seed of every random stream", check="nonneg", part="training")
    save_dir: str | None = option(None, "the run's folder; none: a new one under runs/ ('' "
                                  "saves nothing)", metavar="DIR")
    resume: str = option("", "continue from a checkpoint folder, a run folder's newest "
                         "checkpoint, or 'auto': --save-dir's newest (under torchrun "
                         "--max-restarts without --save-dir, the job's own folder), or a fresh "
                         "start if there is none", metavar="PATH")
    progress_bar: bool = option(False, "a progress bar with the overall ETA even when stderr "
                                "is not a terminal (on a terminal it is always shown)")
    no_print_stats: bool = option(False, "skip the local heads at test time (no per-block "
                                  "test figures)")
    bio: bool = option(False, "backprop-free local heads (§5)", part="model")
    target_proj_size: int = option(128, "size of the random label code in --bio", metavar="N",
                                   check="positive", part="model")
    cutout: bool = option(False, "Cutout augmentation (§6.2)", part="training")
    n_holes: int = option(1, "Cutout holes per image", metavar="N", check="positive",
                          part="training", aliases=("--n_holes",))
    length: int = option(16, "Cutout square side", metavar="PX", check="positive",
                         part="training")
    # localpipe
    recipe: str = option("", "set the options of a recipe: the paper's 86, localpipe's 12 for "
                         "ViTs ('list' prints them); options given beside it win",
                         metavar="NAME")
    lr_schedule: str = option("step", "step: times --lr-decay-fact after each of "
                              "--lr-decay-milestones; cosine: half a cosine from --lr down to "
                              "0 over the training batches of all --epochs after the warm-up, "
                              "set per batch",
                              choices=("step", "cosine"), part="training")
    warmup_steps: int = option(0, "raise the learning rate linearly from --lr/N to --lr over "
                               "the first N training batches, then follow --lr-schedule",
                               metavar="N", check="nonneg", part="training")
    label_smoothing: float = option(0.0, "label smoothing ε of every cross-entropy in "
                                    "training (targets 1 − ε + ε/C and ε/C); test losses stay "
                                    "plain", metavar="X",
                                    within=("[0, 1)", lambda v: 0.0 <= v < 1.0),
                                    part="training")
    num_heads: int = option(4, "attention heads of every block of the generic vit (the "
                            "vit-tiny, -small, -base sizes fix theirs)", metavar="N",
                            check="positive", part="model")
    patch_size: int = option(0, "side of a ViT's square patches; 0: 7 for 28x28 inputs, 4 for "
                             "32x32, 8 up to 96x96, 16 beyond", metavar="PX", check="nonneg",
                             part="model")
    token_pool: str = option("map", "what a ViT's heads (local and output) read: map, the "
                             "class token beside the patch tokens' map, pooled so that the "
                             "two give at most --dim-in-decoder features (at least twice the "
                             "width), as the paper pools a conv block's; class: the class "
                             "token alone (DeiT's head)",
                             choices=("map", "class"), part="model")
    stages: int = option(1, "pipeline stages: threads of this process, or processes under "
                         "torchrun", metavar="K", check="positive")
    replicas: int = option(1, "data-parallel replicas of every stage (torchrun with K·R "
                           "processes): each trains on its shard of every batch, and each "
                           "unit's gradients are averaged over them", metavar="R",
                           check="positive")
    per_replica_batch: bool = option(False, "--batch-size is each replica's batch (the global "
                                     "batch is R times it), so that each similarity matrix "
                                     "spans the paper's batch; off: --batch-size is split")
    balance: list[int] | None = option(None, "units per stage, e.g. 2,3,2; none: the cut whose "
                                       "slowest stage is fastest, from each unit's measured "
                                       "step time", metavar="N,N,...")
    queue_depth: int = option(2, "batches in flight between two neighbouring stages",
                              metavar="Q", check="positive")
    data_root: str = option("data", "where the datasets are (torchvision's layout), or are "
                            "downloaded to", metavar="DIR")
    download: bool = option(True, "stop at once when a dataset is missing instead of "
                            "downloading it", flag="--no-download")
    val_split: int = option(0, "hold N training samples out (seeded) and report their error "
                            "every epoch; 0 keeps the paper's protocol", metavar="N",
                            check="nonneg", part="training")
    max_steps: int = option(0, "stop training after N batches, then evaluate and record the "
                            "epoch's part (0: no limit); a resumed run finishes that epoch and "
                            "records it whole", metavar="N", check="nonneg")
    limit_train: int = option(0, "use the first N training samples (0: all)", metavar="N",
                              check="nonneg", part="training")
    limit_test: int = option(0, "use the first N test samples (0: all)", metavar="N",
                             check="nonneg")
    describe: bool = option(False, "print the network, its parameter counts and its stages, "
                            "then exit")
    device: str = option("auto", "auto: a GPU when one is visible", choices=("auto", "cpu",
                                                                             "cuda"))
    threads: int = option(0, "torch threads per process (0: the cores shared out between the "
                          "stages)", metavar="N", check="nonneg")
    deterministic: bool = option(False, "deterministic kernels, so that a GPU run repeats bit "
                                 "for bit")
    tf32: bool = option(False, "TF32 tensor cores for float32 matmuls and convolutions on a "
                        "GPU (faster; 10-bit mantissas); off: full float32 for both")
    log_every: int = option(50, "a record of every unit's loss every N training batches, in "
                            "steps.jsonl and TensorBoard (0: none)", metavar="N",
                            check="nonneg")
    no_curves: bool = option(False, "no curves.png and no TensorBoard files (a process beside "
                             "the run draws and writes them; leave it out of many short "
                             "runs)")
    checkpoint_every: int = option(0, "checkpoint every N training batches too (0: at epoch "
                                   "ends only)", metavar="N", check="nonneg")
    force_unlock: bool = option(False, "take over --save-dir's lock even where its holder "
                                "cannot be proven gone (another host or container): only for "
                                "a run known to be over, since two live runs would mix their "
                                "files")
    keep_checkpoints: int = option(3, "keep the newest N checkpoints (0: all)", metavar="N",
                                   check="nonneg")
    network: str = option("", "a network given in Python, as lp.fit describes it (its "
                          "children, output shapes, loss and heads), so that a checkpoint "
                          "resumes only into the same one", part="model", cli=False)
    on_nan: str = option("stop", "a NaN or infinite loss stops the run, or that batch's update "
                         "is skipped", choices=("stop", "skip"))
    comm_timeout: float = option(300.0, "seconds a stage may wait for a neighbour, or spend "
                                 "on one batch, before the run stops (the last resort: dead "
                                 "and frozen ranks are named sooner)", metavar="S",
                                 within=SECONDS)
    heartbeat_timeout: float = option(10.0, "under torchrun, seconds without a heartbeat after "
                                      "which a rank counts as frozen", metavar="S",
                                      within=SECONDS)

    @property
    def local(self) -> bool:
        """True when blocks are trained by their own losses on detached inputs (pipelineable)."""
        return not (self.backprop or self.no_detach)

    @property
    def global_batch(self) -> int:
        """Samples per training step over all replicas: the batch the data is cut into."""
        return global_batch(self.batch_size, self.replicas, self.per_replica_batch)

    @property
    def replica_batch(self) -> int:
        """Samples one replica trains on per step (its shard of a full global batch)."""
        return self.global_batch // self.replicas

    def lr_at(self, epoch: int, step: int = 0, epoch_steps: int = 0) -> float:
        """Learning rate of training batch ``step`` (0-based) of 1-based ``epoch``, an epoch
        having ``epoch_steps`` batches: a function of the batch's position alone, so that every
        runner and a resumed run set the same one. The ``step`` schedule decays once per
        milestone m <= epoch - 1; ``cosine`` is half a cosine from --lr to 0 over epochs ×
        epoch_steps batches; either comes after the linear warm-up of --warmup-steps (the
        warm-up and the cosine need ``epoch_steps``)."""
        if (self.warmup_steps or self.lr_schedule == "cosine") and epoch_steps <= 0:
            raise ValueError("a warm-up or the cosine schedule sets the learning rate per "
                             "batch: it needs the batches an epoch (Stage.epoch_steps)")
        done = (epoch - 1) * epoch_steps + step  # batches trained before this one
        if done < self.warmup_steps:
            return self.lr * (done + 1) / self.warmup_steps
        if self.lr_schedule == "cosine":
            span = max(1, self.epochs * epoch_steps - self.warmup_steps)
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (done - self.warmup_steps)
                                                                 / span)))
        passed = sum(1 for m in self.lr_decay_milestones if m <= epoch - 1)
        return self.lr * self.lr_decay_fact ** passed

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "Config":
        """Raise ConfigError on the first invalid value; return self for chaining. The paths
        are normalised here, once, so that every later join and comparison sees one form."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        for name in ("save_dir", "resume", "data_root"):
            value = getattr(self, name)
            if value and value != "auto":  # None, '' and --resume auto are no paths
                setattr(self, name, user_path(value))

        for f in dataclasses.fields(self):  # what each option's own description says
            value, meta, flag = getattr(self, f.name), f.metadata, cli_flag(f)
            if meta["choices"]:
                need(value in choices_of(f), f"unknown {meta['noun'] or flag} {value!r}; "
                                             f"choose from {', '.join(offered(f))}")
            if isinstance(value, float):  # before any comparison below
                need(math.isfinite(value), f"{flag} must be a finite number, got {value}")
            elif isinstance(value, int) and not isinstance(value, bool):
                need(abs(value) <= INT_MAX or f.name == "seed",
                     f"{flag} must be at most {INT_MAX:,}, got {value}")
        for f in dataclasses.fields(self):
            value, meta, flag = getattr(self, f.name), f.metadata, cli_flag(f)
            if meta["check"] == "positive":
                need(value > 0, f"{flag} must be positive, got {value}")
            elif meta["check"] == "nonneg":
                need(value >= 0, f"{flag} must not be negative, got {value}")
            if meta["within"] is not None:
                said, ok = meta["within"]
                need(ok(value), f"{flag} must lie in {said}, got {value}")
        need(self.seed < 2**63, f"--seed must be below 2**63, got {self.seed}")
        need(all(0 <= m <= INT_MAX for m in self.lr_decay_milestones),
             "--lr-decay-milestones must be epochs (whole numbers from 0)")
        need(self.model == "mlp" or int(64 * self.feat_mult) >= 1,
             f"--feat-mult {self.feat_mult} leaves a conv layer with no channels")
        need(not (self.backprop and self.no_detach),
             "--backprop and --no-detach exclude each other")
        need(not (self.bio and self.backprop), "--bio has no meaning with --backprop")
        need(self.local or self.stages == 1,
             f"--{'backprop' if self.backprop else 'no-detach'} sends gradients between blocks "
             f"and cannot be pipelined; use --stages 1")
        need(self.per_replica_batch or self.batch_size % self.replicas == 0,
             f"--batch-size {self.batch_size} does not split evenly into {self.replicas} "
             f"replicas; use a multiple of {self.replicas}, or --per-replica-batch to train "
             f"each replica on --batch-size samples")
        need(self.replicas == 1 or self.replica_batch >= 2,
             f"--batch-size {self.batch_size} leaves {self.replica_batch} sample(s) per replica; "
             f"batch norm needs at least 2")
        if self.balance is not None:
            need(len(self.balance) == self.stages,
                 f"--balance has {len(self.balance)} entries but --stages is {self.stages}")
            need(all(b > 0 for b in self.balance), "--balance entries must be positive")
        return self


def cli_flag(f: dataclasses.Field) -> str:
    """The command line's spelling of an option (what messages about it say)."""
    return f.metadata.get("flag") or f"--{f.name.replace('_', '-')}"


def choices_of(f: dataclasses.Field) -> tuple:
    """The values an option allows (none: any)."""
    choices = f.metadata["choices"]
    return tuple(choices() if callable(choices) else choices)


def offered(f: dataclasses.Field) -> tuple:
    """The values a command line offers: a network or dataset given in Python is no name."""
    return tuple(c for c in choices_of(f) if c not in PYTHON_ONLY)


def defaults() -> dict:
    """Every option's default (what an older checkpoint, made before an option existed,
    was made with)."""
    return Config().to_dict()


def resumed_fields() -> tuple[str, ...]:
    """The options a checkpoint must have been made with to be continued: what defines the
    model and its training (a position counts global batches: --batch-size is checked as
    that, with --per-replica-batch and --replicas); the rest may change."""
    return tuple(f.name for f in dataclasses.fields(Config) if f.metadata["resume"])


def user_path(path: str) -> str:
    """A path as a user types it (``~``, a trailing slash as tab completion adds it, ``.`` and
    ``..``) in the one form localpipe joins and compares."""
    return os.path.normpath(os.path.expanduser(path))


def global_batch(batch_size: int, replicas: int, per_replica_batch: bool) -> int:
    """--batch-size is the global batch, or with --per-replica-batch each replica's."""
    return batch_size * (replicas if per_replica_batch else 1)


def derive_seed(seed: int, *keys: object) -> int:
    """A stable 63-bit seed for one random stream, e.g. (seed, "init", block index).

    Python's ``hash`` is salted per process for strings, so a digest is used instead: every
    process of a pipeline derives the same stream for the same keys.
    """
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
