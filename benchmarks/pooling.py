"""How a ViT's heads read its tokens, measured: the training error of a short MNIST run for
each --token-pool, in backprop and in local predsim.

    python benchmarks/pooling.py --data-root ../shared/data        # under a minute on 2 cores

Each run trains one stage holding the whole network (``step.localpipe_step``, as
``--stages 1`` does) on random MNIST batches of 128 (a seeded draw with replacement from the
training set, the same draws in every run) for --batches batches at a constant learning rate,
and reports the output's training error over the last 50: the early learning that decides how
a head design compares, not an accuracy to quote. ``stages/vit.py`` and the README's Vision
Transformers section give the figures this printed.
"""
from __future__ import annotations

import argparse
import sys

import torch

from localpipe.pipeline.data import load_batches
from localpipe.stages.config import Config
from localpipe.benchmarks.step import localpipe_step


def last_error(cfg: Config, x: torch.Tensor, y: torch.Tensor, batches: int) -> float:
    """The training error (percent) of the last 50 of ``batches`` batches."""
    _, step = localpipe_step(cfg, tuple(x.shape[1:]))
    gen = torch.Generator().manual_seed(0)
    wrong: list[float] = []
    for i in range(batches):
        idx = torch.randint(len(y), (cfg.batch_size,), generator=gen)
        out = step(x[idx], y[idx], i)
        wrong.append((out.argmax(1) != y[idx]).float().mean().item())
    tail = wrong[-50:]
    return 100.0 * sum(tail) / len(tail)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/pooling.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default="data")
    p.add_argument("--batches", type=int, default=300)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-hidden", type=int, default=64)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args(argv)
    data = Config(dataset="MNIST", data_root=args.data_root, batch_size=60000, epochs=1,
                  save_dir="").validate()
    x, y = next(iter(load_batches(data)[0].epoch(1, 0, torch.device("cpu"))))
    print(f"vit depth {args.num_layers} width {args.num_hidden} heads {args.num_heads} patch 7, "
          f"MNIST, batch 128, Adam {args.lr:g}: training error of the last 50 of "
          f"{args.batches} batches")
    for pool in ("class", "map"):
        for mode, options in (("backprop", {"backprop": True}), ("local predsim", {})):
            cfg = Config(model="vit", dataset="MNIST", num_layers=args.num_layers,
                         num_hidden=args.num_hidden, num_heads=args.num_heads, lr=args.lr,
                         token_pool=pool, **options).validate()
            print(f"  --token-pool {pool:5s} {mode:13s} "
                  f"{last_error(cfg, x, y, args.batches):5.1f} %", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
