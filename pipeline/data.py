"""Datasets, the §6 preprocessing, and deterministic batches.

Images are kept as one uint8 tensor per split and turned into normalised, augmented float
batches on the fly, on whole batches at once, on the device that trains on them (a GPU holds
its own copy of the split). Every random choice (order, crop, flip, cutout, the
classes-per-batch sampler) comes from a CPU generator seeded from (seed, epoch[, step]), so a
batch depends only on where it sits in the run: the same in every runner, on every device and
after a resume.
"""
from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from collections import deque
from functools import reduce
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from localpipe.pipeline import device as dev
from localpipe.stages.config import Config, derive_seed
from localpipe.stages.registry import DATASETS, register_dataset


class DataError(RuntimeError):
    """A dataset that cannot be read or fetched; reported as one line with exit code 2."""


@dataclass(frozen=True)
class DatasetInfo:
    shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int = 0  # random crop to the same size after zero padding (0: none)
    flip: bool = False


@dataclass(frozen=True)
class Dataset:
    """A registered dataset: its shape, classes and §6 preprocessing, and its loader
    ``load(name, root, train, download) -> (uint8 images N×C×H×W, int64 labels N)``."""

    info: DatasetInfo
    load: Callable[[str, str, bool, bool], tuple[Tensor, Tensor]]


class _Infos(Mapping):
    """Each registered dataset's ``DatasetInfo``, by name."""

    def __getitem__(self, name: str) -> DatasetInfo:
        return DATASETS[name].info

    def __iter__(self) -> Iterator[str]:
        return iter(DATASETS)

    def __len__(self) -> int:
        return len(DATASETS.names())


INFO: Mapping[str, DatasetInfo] = _Infos()


# ---------------------------------------------------------------------------------- loading
def load_split(cfg: Config, train: bool) -> tuple[Tensor, Tensor]:
    """(uint8 images N×C×H×W, int64 labels N) of one split, limited by --limit-train/test;
    a split whose images and labels disagree (counts, shapes, classes) is a DataError."""
    images, labels = DATASETS[cfg.dataset].load(cfg.dataset, cfg.data_root, train,
                                                cfg.download)
    split = f"{cfg.dataset}'s {'training' if train else 'test'} split"
    info = INFO[cfg.dataset]
    if len(images) != len(labels):
        raise DataError(f"{split} in {os.path.abspath(cfg.data_root)} has {len(images):,} "
                        f"images but {len(labels):,} labels")
    if tuple(images.shape[1:]) != info.shape:
        raise DataError(f"{split} has images of shape {tuple(images.shape[1:])}, expected "
                        f"{info.shape}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= info.num_classes):
        raise DataError(f"{split} has labels outside 0..{info.num_classes - 1}")
    limit = cfg.limit_train if train else cfg.limit_test
    if limit:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def _open(cls, name: str, root: str, expected: str, download: bool, **kwargs):
    """Open a torchvision dataset, fetching it if absent; one clear line if that fails."""
    try:
        return cls(root, download=download, **kwargs)
    except Exception as exc:  # URLError, RuntimeError, OSError: "not here, not fetched"
        why = (str(exc).splitlines() or [type(exc).__name__])[0] if download \
            else "--no-download is set"
        raise DataError(f"{name} is not in {os.path.abspath(root)} (expected {expected}) "
                        f"and could not be downloaded: {why}") from None


def _mnist_like(name: str, root: str, train: bool, download: bool) -> tuple[Tensor, Tensor]:
    """MNIST and its kin, read in place from the .gz files where they are (a read-only copy
    is enough), else through torchvision."""
    import torchvision.datasets as tvd
    cls = {"MNIST": tvd.MNIST, "FashionMNIST": tvd.FashionMNIST,
           "KuzushijiMNIST": tvd.KMNIST}[name]
    prefix = "train" if train else "t10k"
    files = [_idx_path(os.path.join(root, cls.__name__, "raw"), f"{prefix}-{kind}")
             for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    if all(files):
        images, labels = (torch.from_numpy(read_idx(f)) for f in files)
        return images.unsqueeze(1).contiguous(), labels.long()
    ds = _open(cls, name, root, f"{root}/{cls.__name__}/raw: "
               + ", ".join(f for f, _ in cls.resources), download, train=train)
    return ds.data.unsqueeze(1).contiguous(), ds.targets.long()


def _cifar(name: str, root: str, train: bool, download: bool) -> tuple[Tensor, Tensor]:
    import torchvision.datasets as tvd
    cls = tvd.CIFAR10 if name == "CIFAR10" else tvd.CIFAR100
    ds = _open(cls, name, root, f"{root}/{cls.base_folder}", download, train=train)
    return (torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(),
            torch.tensor(ds.targets).long())


def _svhn(name: str, root: str, train: bool, download: bool) -> tuple[Tensor, Tensor]:
    """SVHN's training split is train + extra (§6.1)."""
    import torchvision.datasets as tvd
    folder = os.path.join(root, "SVHN")
    sets = [_open(tvd.SVHN, name, folder, f"{folder}/{tvd.SVHN.split_list[s][1]}", download,
                  split=s) for s in (["train", "extra"] if train else ["test"])]
    return (torch.cat([torch.from_numpy(s.data) for s in sets]).contiguous(),
            torch.cat([torch.from_numpy(s.labels.astype(np.int64)) for s in sets]).long())


def _stl10(name: str, root: str, train: bool, download: bool) -> tuple[Tensor, Tensor]:
    import torchvision.datasets as tvd
    folder = os.path.join(root, "STL10")
    ds = _open(tvd.STL10, name, folder, f"{folder}/{tvd.STL10.base_folder}", download,
               split="train" if train else "test")
    return (torch.from_numpy(ds.data).contiguous(),
            torch.from_numpy(ds.labels.astype(np.int64)).long())


def _idx_path(folder: str, stem: str) -> str | None:
    for path in (os.path.join(folder, stem), os.path.join(folder, stem + ".gz")):
        if os.path.exists(path):
            return path
    return None


def read_idx(path: str) -> np.ndarray:
    """An IDX file of unsigned bytes (the MNIST format), gzipped or not; a file that is not
    one, or is cut short, is a DataError naming it."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
        if len(data) < 4 or data[:3] != b"\0\0\x08" or not 1 <= data[3] <= 4:
            raise ValueError("no IDX header of unsigned bytes")
        ndim = data[3]
        dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
        expected = 4 + 4 * ndim + math.prod(dims)
        if len(data) != expected:
            raise ValueError(f"{len(data):,} bytes where its header announces {expected:,}")
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()
    except (OSError, EOFError, ValueError, struct.error, zlib.error) as exc:
        raise DataError(f"{path} is not a readable IDX file: "
                        f"{(str(exc).splitlines() or [type(exc).__name__])[0]}") from None


def synthetic(name: str, root: str, train: bool, download: bool) -> tuple[Tensor, Tensor]:
    """A small learnable task that needs no files: 10 classes of smooth random 28×28 patterns
    with pixel noise and a random shift. Fixed (seed 0): the same task in every run."""
    gen = torch.Generator().manual_seed(0)
    protos = torch.nn.functional.interpolate(torch.rand(10, 1, 7, 7, generator=gen), size=28,
                                             mode="bilinear", align_corners=False)
    if not train:
        gen.manual_seed(1)
    n = 2048 if train else 512
    labels = torch.randint(10, (n,), generator=gen)
    images = protos[labels] + 0.35 * torch.randn(n, 1, 28, 28, generator=gen)
    shifts = torch.randint(-2, 3, (n, 2), generator=gen)
    for i, (dy, dx) in enumerate(shifts.tolist()):
        images[i] = images[i].roll((dy, dx), dims=(1, 2))
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels


register_dataset("MNIST", entry=Dataset(
    DatasetInfo((1, 28, 28), 10, (0.1307,), (0.3081,), crop_padding=2), _mnist_like))
register_dataset("FashionMNIST", entry=Dataset(
    DatasetInfo((1, 28, 28), 10, (0.286,), (0.353,), crop_padding=2, flip=True), _mnist_like))
register_dataset("KuzushijiMNIST", entry=Dataset(
    DatasetInfo((1, 28, 28), 10, (0.1904,), (0.3475,)), _mnist_like))
register_dataset("CIFAR10", entry=Dataset(
    DatasetInfo((3, 32, 32), 10, (0.424, 0.415, 0.384), (0.283, 0.278, 0.284), crop_padding=4,
                flip=True), _cifar))
register_dataset("CIFAR100", entry=Dataset(
    DatasetInfo((3, 32, 32), 100, (0.438, 0.418, 0.377), (0.300, 0.287, 0.294),
                crop_padding=4, flip=True), _cifar))
register_dataset("SVHN", entry=Dataset(
    DatasetInfo((3, 32, 32), 10, (0.431, 0.430, 0.446), (0.197, 0.198, 0.199)), _svhn))
register_dataset("STL10", entry=Dataset(
    DatasetInfo((3, 96, 96), 10, (0.447, 0.440, 0.407), (0.260, 0.257, 0.271)), _stl10))
register_dataset("synthetic", entry=Dataset(DatasetInfo((1, 28, 28), 10, (0.5,), (0.25,)),
                                            synthetic))


def load_batches(cfg: Config) -> tuple["Batches", "Batches", "Batches | None"]:
    """The training, test and (with --val-split N) validation batches of --dataset. The N
    validation samples are held out of the training split by a permutation seeded from
    --seed alone, so every runner and every resume holds out the same ones."""
    info = INFO[cfg.dataset]
    images, labels = load_split(cfg, True)
    val = None
    if cfg.val_split:
        if cfg.val_split > len(labels) - MIN_TRAIN_BATCH:
            raise DataError(f"--val-split {cfg.val_split} leaves fewer than {MIN_TRAIN_BATCH} "
                            f"of the {len(labels)} training samples to train on")
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "val-split"))
        order = torch.randperm(len(labels), generator=gen)
        held, kept = order[:cfg.val_split].sort().values, order[cfg.val_split:].sort().values
        val = Batches(images[held], labels[held], info, cfg, train=False)
        images, labels = images[kept], labels[kept]
    train = Batches(images, labels, info, cfg, train=True)
    if len(train) == 0:
        raise DataError(f"{cfg.dataset}'s training split has {len(train.labels)} sample(s); "
                        f"training needs at least {MIN_TRAIN_BATCH * cfg.replicas}"
                        + (f" ({MIN_TRAIN_BATCH} per replica)" if cfg.replicas > 1 else ""))
    return train, Batches(*load_split(cfg, False), info, cfg, train=False), val


# ---------------------------------------------------------------------------------- batches
MIN_TRAIN_BATCH = 2  # batch norm cannot train on one sample
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Resident:
    """A split's uint8 images, labels and normalisation on one device: the white level 255
    (a tensor there, as a GPU computes x / a host scalar as x · (1/scalar), other bits),
    then the 1×C×1×1 mean and std."""

    images: Tensor
    labels: Tensor
    white: Tensor
    mean: Tensor
    std: Tensor


class Batches:
    """The batches of one split for a given epoch, reproducible from (seed, epoch, step).

    Batches are global batches (``cfg.global_batch``), which R replicas share. The last partial
    batch is kept, except a training batch that leaves some replica's shard fewer than 2
    samples, on which batch norm cannot train: it is dropped (``dropped`` samples an epoch),
    the same way on every runner and every replica."""

    def __init__(self, images: Tensor, labels: Tensor, info: DatasetInfo, cfg: Config,
                 train: bool) -> None:
        self.images, self.labels, self.info = images, labels, info
        self.mean = torch.tensor(info.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(info.std).view(1, -1, 1, 1)
        self.resident: dict[torch.device, Resident] = {}
        self._count(len(labels), cfg, train)

    def on(self, device: torch.device) -> Resident:
        """The split on ``device``, copied there on first use and kept: a GPU makes every batch
        from its own copy, with no host batch and no pinned staging copy per batch."""
        device = torch.device(device)
        if device not in self.resident:
            self.resident[device] = Resident(*(t.to(device) for t in (
                self.images, self.labels, torch.tensor(255.0), self.mean, self.std)))
        return self.resident[device]

    def _count(self, count: int, cfg: Config, train: bool) -> None:
        self.count, self.cfg, self.train = count, cfg, train
        short = count % cfg.global_batch
        self.dropped = short if train and 0 < short < MIN_TRAIN_BATCH * cfg.replicas else 0

    def __len__(self) -> int:
        return math.ceil((self.count - self.dropped) / self.cfg.global_batch)

    def order(self, epoch: int) -> list[Tensor]:
        """Index tensors of the epoch's batches."""
        cfg, n, size = self.cfg, self.count, self.cfg.global_batch
        if not self.train:
            return list(torch.arange(n).split(size)) if n else []
        if cfg.classes_per_batch and (cfg.classes_per_batch_until_epoch == 0
                                      or epoch <= cfg.classes_per_batch_until_epoch):
            rng = np.random.default_rng(derive_seed(cfg.seed, "sampler", epoch))
            batches = [torch.from_numpy(b) for b in class_batches(
                self.labels.numpy(), size, cfg.classes_per_batch, rng)]
        else:
            gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "order", epoch))
            batches = list(torch.randperm(n, generator=gen).split(size))
        return batches[:len(self)]  # a last batch too small to share is dropped

    def epoch(self, epoch: int, start: int = 0,
              device: torch.device = CPU) -> Iterator[tuple[Tensor, Tensor]]:
        """(x, y) for batches ``start``, ``start + 1``, … of ``epoch`` (1-based), made on
        ``device``."""
        here = self.on(device)
        for step, idx in enumerate(self.order(epoch)[start:], start):
            idx = to_device(idx, here.images.device)
            yield self.make(here, idx, epoch, step), here.labels.index_select(0, idx)

    def make(self, here: Resident, idx: Tensor, epoch: int, step: int) -> Tensor:
        """Images ``idx`` of ``here``, made on its device: picked, cropped and flipped as uint8
        (a quarter of the bytes), then normalised and cut out. Every step is exact, so the
        bits are those of the same steps in float32, on any device."""
        x = here.images.index_select(0, idx)  # whole images: 7x faster than images[idx] on a CPU
        if self.train:
            gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "augment", epoch, step))
            if self.info.crop_padding:
                x = random_crop(x, self.info.crop_padding, gen)
            if self.info.flip:
                x = random_flip(x, gen)
        x = x.float().div_(here.white).sub_(here.mean).div_(here.std)
        if self.train and self.cfg.cutout:
            x = cutout(x, self.cfg.n_holes, self.cfg.length, gen)
        return x


class DatasetBatches(Batches):
    """The batches of a map-style dataset of (tensor, int label) given in Python (``lp.fit``),
    in the same seeded order as ``Batches``; samples are taken as they are (floating point
    ones as float32, no other preprocessing), and read batch by batch, never all at once."""

    def __init__(self, dataset, cfg: Config, train: bool, num_classes: int) -> None:
        self.dataset, self.num_classes = dataset, num_classes
        self.split = "training" if train else "test"
        self._count(len(dataset), cfg, train)

    def epoch(self, epoch: int, start: int = 0,
              device: torch.device = CPU) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches on the host, stacked straight into pinned memory when bound for a GPU."""
        for step, idx in enumerate(self.order(epoch)[start:], start):
            yield self.collate([self.dataset[i] for i in idx.tolist()], epoch, step,
                               pinned=dev.is_cuda(device))

    def collate(self, samples: list, epoch: int, step: int,
                pinned: bool = False) -> tuple[Tensor, Tensor]:
        """One batch, or a DataError saying which sample of which batch is wrong: a label
        outside 0..classes - 1 would train silently on nothing (its one-hot row is empty).
        The samples are stacked into float32 at once, ``pinned`` for a copy to a GPU: one host
        copy per batch, from blocks torch's pinned allocator reuses once their copy is done."""
        where = f"the {self.split} set's batch {step + 1} of epoch {epoch}"
        xs = [torch.as_tensor(s[0]) for s in samples]
        dtype = reduce(torch.promote_types, (t.dtype for t in xs))  # as torch.stack's
        if not dtype.is_floating_point:
            raise DataError(f"{where} holds {dtype} samples; LocalNet trains on floating "
                            f"point ones (scale them, e.g. with transforms.ToTensor())")
        x = torch.stack(xs, out=torch.empty((len(xs), *xs[0].shape), pin_memory=pinned))
        y = torch.as_tensor([s[1] for s in samples])
        if y.is_floating_point() or y.dtype == torch.bool:
            raise DataError(f"{where} holds {y.dtype} labels; labels are class indices")
        if int(y.min()) < 0 or int(y.max()) >= self.num_classes:
            raise DataError(f"{where} has labels outside 0..{self.num_classes - 1} "
                            f"({int(y.min())}..{int(y.max())})")
        return x, y.long()


def dataset_batches(train_set, test_set, cfg: Config,
                    num_classes: int) -> tuple[Batches, Batches, None]:
    """``load_batches`` for datasets given in Python: no test set tests on nothing."""
    train = DatasetBatches(train_set, cfg, True, num_classes)
    if len(train) == 0:
        raise DataError(f"the training set has {len(train_set)} sample(s); training needs at "
                        f"least {MIN_TRAIN_BATCH * cfg.replicas}")
    return train, DatasetBatches(() if test_set is None else test_set, cfg, False,
                                 num_classes), None


def to_device(draws: Tensor, device: torch.device) -> Tensor:
    """Small host tensors (indices, random draws) queued to ``device`` without a host wait."""
    return draws.to(device, non_blocking=True)


def random_crop(x: Tensor, padding: int, gen: torch.Generator) -> Tensor:
    """Per-image crop of the original size from the zero-padded image (torchvision's rule):
    each image's window at its offset among its sliding windows, all taken by one gather.
    Offsets come from ``gen`` (a CPU generator) whatever the device of ``x``."""
    n, _, h, w = x.shape
    offsets = to_device(torch.randint(0, 2 * padding + 1, (n, 2), generator=gen), x.device)
    windows = torch.nn.functional.pad(x, (padding,) * 4).unfold(2, h, 1).unfold(3, w, 1)
    return windows[torch.arange(n, device=x.device), :, offsets[:, 0], offsets[:, 1]]


def random_flip(x: Tensor, gen: torch.Generator) -> Tensor:
    """Mirror each image with probability 1/2: a select over the batch, not boolean indexing
    (which waits for a GPU to count the images)."""
    flip = to_device(torch.rand(x.size(0), generator=gen) < 0.5, x.device)
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def cutout(x: Tensor, holes: int, length: int, gen: torch.Generator) -> Tensor:
    """Zero squares [c − L//2, c + L//2) around uniform centres, clipped, on all channels (§6.2).

    A pixel is cut when some hole covers both its row and its column: the count of such holes
    is a batched product of the holes' row and column masks, never an N×holes×H×W tensor."""
    n, _, h, w = x.shape
    cy = to_device(torch.randint(0, h, (n, holes, 1), generator=gen), x.device)
    cx = to_device(torch.randint(0, w, (n, holes, 1), generator=gen), x.device)
    rows = torch.arange(h, device=x.device).view(1, 1, h)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    in_rows = ((rows >= cy - length // 2) & (rows < cy + length // 2)).float()  # N×holes×H
    in_cols = ((cols >= cx - length // 2) & (cols < cx + length // 2)).float()  # N×holes×W
    mask = torch.bmm(in_rows.transpose(1, 2), in_cols) > 0  # N×H×W
    return x.masked_fill(mask.unsqueeze(1), 0.0)


def class_batches(labels: np.ndarray, batch_size: int, classes: int,
                  rng: np.random.Generator) -> list[np.ndarray]:
    """The classes-per-batch sampler of §6.3, keeping ``classes`` classes (not a fixed 10).

    From a shuffled order, each batch takes the next ``classes`` samples, then scans ahead (at
    most classes·10 samples) for classes it lacks until it has ``classes`` distinct ones, fills
    up with the earliest remaining samples of classes it already has, and tops up with any class.
    """
    order = rng.permutation(len(labels))
    position = np.empty(len(labels), dtype=np.int64)
    position[order] = np.arange(len(labels))
    queues: dict[int, deque] = {}
    for i in order:
        queues.setdefault(int(labels[i]), deque()).append(int(i))
    used = np.zeros(len(labels), dtype=bool)
    cursor = 0
    batches = []

    def take(i: int) -> int:
        queues[int(labels[i])].popleft()
        used[i] = True
        return i

    def next_free() -> int | None:
        nonlocal cursor
        while cursor < len(order) and used[order[cursor]]:
            cursor += 1
        return None if cursor == len(order) else int(order[cursor])

    while (first := next_free()) is not None:
        batch = [take(first)]
        while len(batch) < min(classes, batch_size) and (i := next_free()) is not None:
            batch.append(take(i))
        present = {int(labels[i]) for i in batch}
        scan, scanned = cursor, 0
        while len(present) < classes and len(batch) < batch_size and scan < len(order) \
                and scanned < classes * 10:
            i = int(order[scan])
            if not used[i] and int(labels[i]) not in present:
                batch.append(take(i))
                present.add(int(labels[i]))
            scan, scanned = scan + 1, scanned + 1
        while len(batch) < batch_size:
            heads = [q[0] for c in present if (q := queues[c])]
            if not heads:
                break
            batch.append(take(min(heads, key=lambda j: position[j])))
        while len(batch) < batch_size and (i := next_free()) is not None:
            batch.append(take(i))
        batches.append(np.array(batch, dtype=np.int64))
    return batches
