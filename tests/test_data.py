"""Datasets, §6 preprocessing and the batch stream, with generated data for the sets that are
not on this machine."""
import struct
from collections import Counter

import numpy as np
import pytest
import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

from localpipe.launch.pipeline import main
from localpipe.pipeline.data import (INFO, Batches, DataError, DatasetBatches, class_batches,
                                     cutout, load_split, random_crop, random_flip)
from localpipe.stages.config import Config, derive_seed

from conftest import metrics


def test_cutout_zeroes_a_clipped_square_on_every_channel():
    x = torch.ones(1, 3, 10, 10)
    gen = torch.Generator().manual_seed(0)
    out = cutout(x, holes=1, length=4, gen=gen)
    gen = torch.Generator().manual_seed(0)
    cy, cx = torch.randint(0, 10, (1, 1, 1), generator=gen), torch.randint(0, 10, (1, 1, 1),
                                                                           generator=gen)
    cy, cx = cy.item(), cx.item()
    expected = torch.ones(10, 10)
    expected[max(cy - 2, 0):cy + 2, max(cx - 2, 0):cx + 2] = 0  # [c - L//2, c + L//2)
    for c in range(3):
        assert torch.equal(out[0, c], expected)


def test_random_crop_is_a_shift_with_zero_padding():
    x = torch.arange(16.0).view(1, 1, 4, 4) + 1
    gen = torch.Generator().manual_seed(3)
    out = random_crop(x, 2, gen)
    dy, dx = torch.randint(0, 5, (1, 2), generator=torch.Generator().manual_seed(3))[0].tolist()
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    assert torch.equal(out, padded[:, :, dy:dy + 4, dx:dx + 4])


def test_batches_are_normalised_reproducible_and_keep_the_partial_batch():
    cfg = Config(dataset="synthetic", batch_size=100, seed=5)
    images, labels = load_split(cfg, train=True)
    batches = Batches(images, labels, INFO["synthetic"], cfg, train=True)
    assert len(batches) == 21 and len(batches.order(1)[-1]) == 48
    first = list(batches.epoch(1))
    again = list(batches.epoch(1))
    assert len(first) == len(again) == 21
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    resumed = list(batches.epoch(1, start=7))
    assert len(resumed) == 14 and all(torch.equal(a[0], b[0]) for a, b in zip(first[7:], resumed))
    assert not torch.equal(first[0][1], next(batches.epoch(2))[1]), "epochs reshuffle"
    test = Batches(*load_split(cfg, train=False), INFO["synthetic"], cfg, train=False)
    x, _ = next(test.epoch(1))
    raw = test.images[:100].float() / 255
    assert torch.allclose(x, (raw - 0.5) / 0.25)


@pytest.mark.parametrize("classes", [10, 20])
def test_classes_per_batch_sampler_keeps_n_classes_and_uses_every_sample_once(classes):
    labels = np.repeat(np.arange(100), 500)  # CIFAR-100's shape
    batches = class_batches(labels, 128, classes, np.random.default_rng(0))
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(labels)))
    distinct = [len(set(labels[b].tolist())) for b in batches[:100]]
    # the scan for missing classes is bounded (classes·10 samples), so a rare batch falls short
    assert max(distinct) == classes and np.mean(distinct) > classes - 0.5, distinct


def _write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(
        struct.pack(">I", d) for d in array.shape)
    with open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name,folder", [("FashionMNIST", "FashionMNIST"),
                                         ("KuzushijiMNIST", "KMNIST")])
def test_mnist_like_sets_load_from_generated_idx_files(tmp_path, name, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("t10k", 20)):
        _write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, (n,)))
    cfg = Config(dataset=name, data_root=str(tmp_path), download=False)
    images, labels = load_split(cfg, train=True)
    assert images.shape == (60, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60,) and labels.dtype == torch.int64


class _Fake:
    """Stands in for a torchvision class with generated arrays in its own layout."""

    def __init__(self, root, download=False, train=True, split=None, *, layout, classes):
        n = {"extra": 30, "test": 20}.get(split, 40 if (train and split != "test") else 20)
        c, h = layout
        rng = np.random.default_rng(len(str(split)) + train)
        labels = rng.integers(0, classes, n)
        if split is None:  # CIFAR: HWC arrays, a list of targets
            self.data, self.targets = rng.integers(0, 256, (n, h, h, c), dtype=np.uint8), \
                labels.tolist()
        else:  # SVHN, STL10: CHW arrays, .labels
            self.data, self.labels = rng.integers(0, 256, (n, c, h, h), dtype=np.uint8), labels


@pytest.mark.parametrize("name,model,classes,size,train_n", [
    ("CIFAR10", "vgg8b", 10, 32, 40), ("CIFAR100", "mlp", 100, 32, 40),
    ("SVHN", "vgg8b", 10, 32, 70),   # train + extra
    ("STL10", "vgg8b", 10, 96, 40),  # 96 px: the 7x7/2 first conv
])
def test_colour_datasets_train_end_to_end(tmp_path, monkeypatch, name, model, classes, size,
                                          train_n):
    cls_name = {"CIFAR10": "CIFAR10", "CIFAR100": "CIFAR100", "SVHN": "SVHN", "STL10": "STL10"}
    fake = type(name, (_Fake,), {"split_list": torchvision.datasets.SVHN.split_list,
                                 "base_folder": "fake",
                                 "__init__": lambda self, root, download=False, **kw:
                                 _Fake.__init__(self, root, download, layout=(3, size),
                                                classes=classes, **kw)})
    monkeypatch.setattr(torchvision.datasets, cls_name[name], fake)
    cfg = Config(dataset=name)
    images, labels = load_split(cfg, train=True)
    assert images.shape == (train_n, 3, size, size) and int(labels.max()) < classes
    save = tmp_path / "run"
    assert main(["--no-curves", "--dataset", name, "--model", model, "--feat-mult", "0.125",
                 "--num-hidden",
                 "32", "--batch-size", "16", "--epochs", "1", "--cutout", "--length", "8",
                 "--save-dir", str(save), "--threads", "1"]) == 0
    record = metrics(save)[0]
    assert record["train_samples"] == train_n and record["test_samples"] == 20
    assert record["test_error"] is not None


# --------------------------------------- the per-image path batches were made with, verbatim
def old_random_crop(x, padding, gen):
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=gen).tolist()
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])


def old_random_flip(x, gen):
    flip = torch.rand(x.size(0), generator=gen) < 0.5
    x[flip] = x[flip].flip(-1)
    return x


def old_cutout(x, holes, length, gen):
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n, holes, 1), generator=gen)
    cx = torch.randint(0, w, (n, holes, 1), generator=gen)
    rows = torch.arange(h).view(1, 1, h)
    cols = torch.arange(w).view(1, 1, w)
    in_rows = ((rows >= cy - length // 2) & (rows < cy + length // 2)).float()  # N×holes×H
    in_cols = ((cols >= cx - length // 2) & (cols < cx + length // 2)).float()  # N×holes×W
    mask = torch.bmm(in_rows.transpose(1, 2), in_cols) > 0  # N×H×W
    return x.masked_fill(mask.unsqueeze(1), 0.0)


def old_make(self, idx, epoch, step):
    x = self.images[idx].float().div_(255)
    if self.train:
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "augment", epoch, step))
        if self.info.crop_padding:
            x = old_random_crop(x, self.info.crop_padding, gen)
        if self.info.flip:
            x = old_random_flip(x, gen)
        x = (x - self.mean) / self.std
        if self.cfg.cutout:
            x = old_cutout(x, self.cfg.n_holes, self.cfg.length, gen)
        return x
    return (x - self.mean) / self.std


def old_epoch(self, epoch):
    for step, idx in enumerate(self.order(epoch)):
        yield old_make(self, idx, epoch, step), self.labels[idx]


def _batches(name: str, n: int, batch: int, train: bool, seed: int, **options) -> Batches:
    """``n`` random uint8 images of ``name``'s shape, as its Batches with ``options``."""
    info = INFO[name]
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *info.shape), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, info.num_classes, (n,), generator=gen)
    cfg = Config(dataset=name, batch_size=batch, seed=seed, **options)
    return Batches(images, labels, info, cfg, train=train)


SHAPES = [((1, 28, 28), 2), ((3, 32, 32), 4)]  # MNIST's crop, CIFAR's crop (and flip)


@pytest.mark.parametrize("shape,padding", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 7, 128, 129])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_augmentations_equal_the_per_image_ones(shape, padding, n, seed):
    """The same draws from the generator, in the same order, applied to the same pixels: the
    generator ends in the same state and every result is the same bits."""
    x = torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed + 100))
    for new, old, args in ((random_crop, old_random_crop, (padding,)),
                           (random_flip, old_random_flip, ()),
                           (cutout, old_cutout, (1, 16)), (cutout, old_cutout, (3, 5))):
        gen, ref = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        got, expected = new(x.clone(), *args, gen), old(x.clone(), *args, ref)
        assert torch.equal(got, expected), (new.__name__, args)
        assert torch.equal(gen.get_state(), ref.get_state()), (new.__name__, args)
    uint8 = (x * 255).to(torch.uint8)  # a batch is cropped and flipped before its conversion
    for new, old, args in ((random_crop, old_random_crop, (padding,)),
                           (random_flip, old_random_flip, ())):
        got = new(uint8, *args, torch.Generator().manual_seed(seed)).float().div_(255)
        expected = old(uint8.float().div_(255), *args, torch.Generator().manual_seed(seed))
        assert torch.equal(got, expected), new.__name__


@pytest.mark.parametrize("name", ["MNIST", "FashionMNIST", "CIFAR10"])  # crop; crop + flip
@pytest.mark.parametrize("n,batch", [(130, 128), (101, 33), (5, 1)])
@pytest.mark.parametrize("options", [{}, {"cutout": True, "length": 14},
                                     {"cutout": True, "n_holes": 3, "length": 7}])
def test_batches_are_the_bits_of_the_per_image_path_on_the_host_and_on_a_device(
        name, n, batch, options):
    """Every batch of two epochs, training and test, against the per-image path: made on the
    host, and on a device (the CPU here) from the split's copy held there."""
    for seed in (0, 7):
        for train in (True, False):
            batches = _batches(name, n, batch, train, seed, **options)
            for epoch in (1, 2):
                expected = list(old_epoch(batches, epoch))
                assert len(expected) == len(batches)
                host = list(batches.epoch(epoch))
                held = list(batches.epoch(epoch, device=torch.device("cpu")))
                for made in (host, held):
                    assert len(made) == len(expected)
                    for (x, y), (ex, ey) in zip(made, expected):
                        assert torch.equal(x, ex) and torch.equal(y, ey)


class DeviceHazards(TorchDispatchMode):
    """Counts what would make a batch built on a GPU wait for it, or differ from the host's:
    reads of values on the host (``.item()``, ``bool()``: ``_local_scalar_dense``,
    ``is_nonzero``; ``nonzero``; indexing by a boolean mask, whose size depends on the values;
    ``.tolist()`` bypasses the dispatcher, so it is counted by a patch), and divisions by a
    scalar not on the device, which a GPU computes as x · (1/scalar): other bits."""

    READS = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.nonzero")

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        masks = name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
            i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
        scalar = name in ("aten.div", "aten.div_") and not (
            isinstance(args[1], torch.Tensor) and args[1].device == args[0].device)
        if name in self.READS or masks:
            self.seen[name] += 1
        if scalar:
            self.seen["division by a host scalar"] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("train", [True, False])
def test_making_a_batch_never_waits_for_the_device_nor_divides_by_a_host_scalar(monkeypatch,
                                                                                train):
    """Batches are built with none of the operators that would wait for a GPU or change its
    bits, on the CPU and on the meta device, which holds no values at all."""
    batches = _batches("CIFAR10", 100, 33, train, 0, cutout=True, n_holes=2, length=8)
    tolist = torch.Tensor.tolist

    def counted(t):
        mode.seen["tolist"] += 1
        return tolist(t)
    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    with DeviceHazards() as mode:
        old = list(old_epoch(batches, 1))
    assert mode.seen["division by a host scalar"], "the counter must see the old path's"
    if train:  # its crop's offsets and its flip's mask
        assert mode.seen["tolist"] and mode.seen["aten.index_put_"], mode.seen
    for device in ("cpu", "meta"):
        with DeviceHazards() as mode:
            made = list(batches.epoch(1, device=torch.device(device)))
        assert not mode.seen, (device, mode.seen)
        assert [(x.device.type, x.shape, y.shape) for x, y in made] == \
            [(device, x.shape, y.shape) for x, y in old]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(old, batches.epoch(1)))


def test_dataset_batches_are_stacked_into_float32_as_before():
    """Samples given in Python are stacked straight into float32 (pinned for a GPU), with the
    values and the errors of stacking first and converting after."""
    cfg = Config(batch_size=4, seed=3)
    samples = [(torch.rand(1, 3, 3, dtype=torch.float64), i % 3) for i in range(10)]
    batches = DatasetBatches(samples, cfg, True, num_classes=3)
    for idx, (x, y) in zip(batches.order(1), batches.epoch(1)):
        expected = torch.stack([samples[i][0] for i in idx.tolist()]).float()
        assert x.dtype == torch.float32 and torch.equal(x, expected)
        assert torch.equal(y, torch.tensor([samples[i][1] for i in idx.tolist()]))
    with pytest.raises(DataError, match="holds torch.uint8 samples"):
        batches.collate([(torch.zeros(2, dtype=torch.uint8), 0)] * 2, 1, 0)
    half = [(torch.ones(2, dtype=torch.float16), 0), (torch.ones(2, dtype=torch.int64), 1)]
    assert torch.equal(batches.collate(half, 1, 0)[0], torch.ones(2, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_batches_made_on_a_gpu_are_the_host_bits_without_a_host_wait():
    """On a GPU: the same bits as on the host, made with no synchronisation at all (CUDA's
    sync debug mode raises on one), and dataset batches collated into pinned memory."""
    gpu = torch.device("cuda")
    batches = _batches("CIFAR10", 300, 128, True, 0, cutout=True, n_holes=2, length=8)
    batches.on(gpu)  # the one copy of the split, before the batches are watched
    torch.cuda.set_sync_debug_mode("error")
    try:
        made = list(batches.epoch(1, device=gpu))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for (x, y), (ex, ey) in zip(made, batches.epoch(1)):
        assert x.device.type == "cuda" and torch.equal(x.cpu(), ex) and torch.equal(y.cpu(), ey)
    samples = DatasetBatches([(torch.rand(3), 0)] * 4, Config(batch_size=2), True, 2)
    assert next(samples.epoch(1, device=gpu))[0].is_pinned()
