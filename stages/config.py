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


INT_MAX = 2**31 - 1  # every count must fit the C int of the kernels and libraries below
MAX_SECONDS = 1e9  # timeouts beyond ~30 years overflow the backends' clocks


class ConfigError(ValueError):
    """An invalid option or combination of options; reported as one line with exit code 2."""


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
# block type and blocks per stage of the paper code's ResNets; the Wide ResNets are
# wresnet<depth>-<widen factor>[a] (residual-spec.md §1.1)
RESNET_CONFIGS: dict[str, tuple[str, tuple[int, ...]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)), "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}
WRN_MODELS = tuple(f"wresnet{d}-{k}{a}" for d, k in ((10, 8), (16, 4), (16, 8), (28, 10),
                                                     (40, 10)) for a in ("", "a"))
RESIDUAL_MODELS = (*RESNET_CONFIGS, *WRN_MODELS)
MODELS = ("mlp", *VGG_CONFIGS, *RESIDUAL_MODELS)
DATASETS = ("MNIST", "FashionMNIST", "KuzushijiMNIST", "CIFAR10", "CIFAR100", "SVHN", "STL10",
            "synthetic")
# what a run's args.json says when lp.fit trained it: a network and datasets given in Python,
# which a command line cannot rebuild (the runners refuse them without the objects)
PYTHON_MODEL, PYTHON_DATASET = "localnet", "custom"


@dataclass
class Config:
    """Every option of a run. Defaults are the paper's, except ``save_dir``."""

    model: str = "vgg8b"
    dataset: str = "CIFAR10"
    batch_size: int = 128
    num_layers: int = 1
    num_hidden: int = 1024
    dim_in_decoder: int = 4096
    feat_mult: float = 1.0
    epochs: int = 400
    classes_per_batch: int = 0
    classes_per_batch_until_epoch: int = 0
    lr: float = 5e-4
    lr_decay_milestones: list[int] = field(default_factory=lambda: [200, 300, 350, 375])
    lr_decay_fact: float = 0.25
    optim: str = "adam"
    momentum: float = 0.0
    weight_decay: float = 0.0
    alpha: float = 0.0
    beta: float = 0.99
    dropout: float = 0.0
    loss_sup: str = "predsim"
    loss_unsup: str = "none"
    nonlin: str = "relu"
    no_similarity_std: bool = False
    no_cuda: bool = False
    backprop: bool = False
    no_batch_norm: bool = False
    no_detach: bool = False
    pre_act: bool = False
    seed: int = 1
    save_dir: str | None = None  # None: a folder of its own under runs/
    resume: str = ""
    progress_bar: bool = False
    no_print_stats: bool = False
    bio: bool = False
    target_proj_size: int = 128
    cutout: bool = False
    n_holes: int = 1
    length: int = 16
    # localpipe
    recipe: str = ""
    stages: int = 1
    replicas: int = 1
    per_replica_batch: bool = False
    balance: list[int] | None = None
    queue_depth: int = 2
    data_root: str = "data"
    download: bool = True
    val_split: int = 0
    max_steps: int = 0
    limit_train: int = 0
    limit_test: int = 0
    describe: bool = False
    device: str = "auto"
    threads: int = 0
    comm_timeout: float = 300.0
    heartbeat_timeout: float = 10.0
    deterministic: bool = False
    log_every: int = 50
    no_curves: bool = False
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    on_nan: str = "stop"

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

    def lr_at(self, epoch: int) -> float:
        """Learning rate of a 1-based epoch: decayed once per milestone m with m <= epoch - 1."""
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

        need(self.model in (*MODELS, PYTHON_MODEL),
             f"unknown model {self.model!r}; choose from {', '.join(MODELS)}")
        need(self.dataset in (*DATASETS, PYTHON_DATASET),
             f"unknown dataset {self.dataset!r}; choose from {', '.join(DATASETS)}")
        for name, value in self.to_dict().items():  # before any comparison below
            flag = f"--{name.replace('_', '-')}"
            if isinstance(value, float):
                need(math.isfinite(value), f"{flag} must be a finite number, got {value}")
            elif isinstance(value, int) and not isinstance(value, bool):
                need(abs(value) <= INT_MAX or name == "seed",
                     f"{flag} must be at most {INT_MAX:,}, got {value}")
        for name in ("batch_size", "num_hidden", "dim_in_decoder", "epochs", "target_proj_size",
                     "n_holes", "length", "stages", "replicas", "queue_depth"):
            need(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be positive, "
                                          f"got {getattr(self, name)}")
        for name in ("num_layers", "classes_per_batch", "classes_per_batch_until_epoch",
                     "max_steps", "limit_train", "limit_test", "threads", "momentum",
                     "weight_decay", "checkpoint_every", "keep_checkpoints", "seed",
                     "log_every", "val_split"):
            need(getattr(self, name) >= 0, f"--{name.replace('_', '-')} must not be negative, "
                                           f"got {getattr(self, name)}")
        need(self.seed < 2**63, f"--seed must be below 2**63, got {self.seed}")
        need(all(0 <= m <= INT_MAX for m in self.lr_decay_milestones),
             "--lr-decay-milestones must be epochs (whole numbers from 0)")
        need(self.feat_mult > 0, f"--feat-mult must be positive, got {self.feat_mult}")
        need(self.lr > 0, f"--lr must be positive, got {self.lr}")
        need(self.lr_decay_fact > 0, f"--lr-decay-fact must be positive, got {self.lr_decay_fact}")
        need(0.0 <= self.beta <= 1.0, f"--beta must lie in [0, 1], got {self.beta}")
        need(0.0 <= self.alpha <= 1.0, f"--alpha must lie in [0, 1], got {self.alpha}")
        need(0.0 <= self.dropout < 1.0, f"--dropout must lie in [0, 1), got {self.dropout}")
        for name in ("comm_timeout", "heartbeat_timeout"):
            value = getattr(self, name)
            need(0 < value <= MAX_SECONDS, f"--{name.replace('_', '-')} must lie in "
                                           f"(0, {MAX_SECONDS:g}] seconds, got {value}")
        need(self.model == "mlp" or int(64 * self.feat_mult) >= 1,
             f"--feat-mult {self.feat_mult} leaves a conv layer with no channels")
        need(self.optim in ("adam", "amsgrad", "sgd"), f"unknown --optim {self.optim!r}")
        need(self.loss_sup in ("pred", "sim", "predsim"), f"unknown --loss-sup {self.loss_sup!r}")
        need(self.loss_unsup in ("none", "sim", "recon"),
             f"unknown --loss-unsup {self.loss_unsup!r}")
        need(self.nonlin in ("relu", "leakyrelu"), f"unknown --nonlin {self.nonlin!r}")
        need(self.device in ("auto", "cpu", "cuda"), f"unknown --device {self.device!r}")
        need(self.on_nan in ("stop", "skip"), f"unknown --on-nan {self.on_nan!r}")
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
