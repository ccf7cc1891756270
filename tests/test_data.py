"""Datasets, §6 preprocessing and the batch stream, with generated data for the sets that are
not on this machine."""
import struct

import numpy as np
import pytest
import torch
import torchvision

from localpipe.launch.pipeline import main
from localpipe.pipeline.data import INFO, Batches, class_batches, cutout, load_split, random_crop
from localpipe.stages.config import Config

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
