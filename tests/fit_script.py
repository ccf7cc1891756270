"""A network of a user's own (not one of the built-ins) and its MNIST subset, shared by
tests/test_localnet.py and the torchrun script it starts:

    torchrun --nproc-per-node 2 tests/fit_script.py DATA_ROOT OUT_DIR

trains it with two stages, one process each, and writes each process's ``net.module``
weights and result to OUT_DIR/rank-R.pt."""
from __future__ import annotations

import os
import sys
from collections import OrderedDict

import torch
from torch import nn
from torch.utils.data import Subset
from torchvision import datasets, transforms

import localpipe as lp

TRAIN, TEST, BATCH = 3000, 1000, 64


def network() -> nn.Sequential:
    """Convolutions with batch norm, pooling, dropout, a linear output: three local blocks,
    named as a user names them (an OrderedDict), so that every key is the user's own."""
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        conv1=nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                            nn.MaxPool2d(2)),
        conv2=nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                            nn.Dropout2d(0.1), nn.MaxPool2d(2)),
        fc=nn.Sequential(nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.BatchNorm1d(128),
                         nn.ReLU(), nn.Dropout(0.2)),
        out=nn.Linear(128, 10)))


def mnist(root: str) -> tuple[Subset, Subset]:
    """The first TRAIN training and TEST test images, normalised (torchvision unpacks the
    .gz files found in ROOT/MNIST/raw the first time; nothing is downloaded where they are)."""
    t = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    return (Subset(datasets.MNIST(root, train=True, transform=t, download=True), range(TRAIN)),
            Subset(datasets.MNIST(root, train=False, transform=t, download=True), range(TEST)))


if __name__ == "__main__":
    root, out = sys.argv[1:3]
    train, test = mnist(root)
    net = lp.LocalNet(network(), num_classes=10, input_shape=(1, 28, 28))
    result = lp.fit(net, train, test, epochs=1, batch_size=BATCH, stages=2, threads=1,
                    save_dir="")
    torch.save({"state": net.module.state_dict(), "test_error": result.test_error,
                "epochs": len(result.history)},
               os.path.join(out, f"rank-{os.environ['RANK']}.pt"))
