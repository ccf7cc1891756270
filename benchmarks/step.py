"""What one training step costs beyond its arithmetic: dispatcher ops, host reads, and time
against a plain PyTorch loop of the same math.

    python benchmarks/step.py                      # the MNIST MLP recipe's step, 1 thread
    python benchmarks/step.py --model vgg8b --feat-mult 0.25 --steps 10
    python benchmarks/step.py --device cuda --model vgg8b --dim-in-decoder 1024  # + kernels

A GPU waits on Python when a step launches many more kernels than its arithmetic needs, or
reads a tensor's value on the host (``aten::_local_scalar_dense``: ``bool(t)``, ``t.item()``)
and so waits for every kernel queued before it. Both are counted here on the CPU, where the
dispatcher sees every op a GPU would launch, with a ``TorchDispatchMode`` around one training
step of one stage holding the whole network (``set_position``, ``train_step``, the update):
the forward, each unit's local heads and loss, the backward, the optimizer step, the meters.
The plain loop is the same math written by hand for the MLP (linear → BN → leaky ReLU →
dropout per block, sim and pred heads, the output layer, fused Adam per unit, no meters), the
floor a trainer can aim for. The ratio of step times is measured side by side, alternating the
two in one process, and is a benchmark, never a timed test.

With ``--device cuda`` every network is timed, and the step also runs under
``torch.profiler``: the kernels it launches (every GPU activity: kernels, copies, memsets),
their summed time on the device (the step's pure GPU compute), and the step's time (measured
without the profiler, which slows the host) over it: how far the host keeps the GPU waiting.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from localpipe.stages.config import Config
from localpipe.stages.models import build_stage
from localpipe.stages.stage import Stage

HOST_READ = torch.ops.aten._local_scalar_dense.default


def _is_view(func) -> bool:
    """An op that returns an alias of its input (view, reshape, t, ...): no kernel runs."""
    return any(r.alias_info is not None and not r.alias_info.is_write
               for r in func._schema.returns)


class OpCount(TorchDispatchMode):
    """Counts the non-view ops the dispatcher runs, and the host reads among them."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not _is_view(func) and func.namespace != "profiler":
            self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def host_reads(self) -> int:
        return self.ops[HOST_READ.overloadpacket.__name__]


def mlp_config(**overrides) -> Config:
    """The MNIST MLP recipe's network (3 × 1024, predsim, dropout 0.1), batch 128."""
    fields = dict(model="mlp", dataset="synthetic", num_layers=3, num_hidden=1024,
                  loss_sup="predsim", dropout=0.1, batch_size=128, threads=1,
                  nonlin="leakyrelu")
    return Config(**{**fields, **overrides}).validate()


def localpipe_step(cfg: Config, shape: tuple[int, ...], classes: int = 10,
                   device: str = "cpu") -> tuple[Stage, Callable[[Tensor, Tensor, int], Tensor]]:
    """One stage holding the whole network, and a step as the worker runs it (giving the
    network's detached output)."""
    stage = build_stage(cfg, shape, classes, device=device)
    stage.epoch_steps = 100  # any length: a warm-up or the cosine sets the rate per batch
    stage.train()

    def step(x: Tensor, y: Tensor, i: int) -> Tensor:
        stage.set_position(1, i)
        out, update = stage.train_step(x, y)
        update()
        return out
    return stage, step


class _PlainBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, classes: int) -> None:
        super().__init__()
        self.layer, self.bn = nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out)
        self.sim, self.pred = nn.Linear(n_out, n_out, bias=False), nn.Linear(n_out, classes)


def plain_step(cfg: Config, shape: tuple[int, ...], classes: int = 10, device: str = "cpu"
               ) -> Callable[[Tensor, Tensor, int], None]:
    """The MLP's local step written by hand: the floor of ops for the same math."""
    torch.manual_seed(0)
    width, beta, p = cfg.num_hidden, cfg.beta, cfg.dropout
    sizes = [shape[0] * shape[1] * shape[2]] + [width] * cfg.num_layers
    blocks = [_PlainBlock(a, b, classes).to(device) for a, b in zip(sizes, sizes[1:])]
    out = nn.Linear(width, classes).to(device)
    opts = [torch.optim.Adam(m.parameters(), lr=cfg.lr, fused=True) for m in blocks + [out]]
    gen = torch.Generator(device)

    def sim(t: Tensor) -> Tensor:
        t = t - t.mean(1, keepdim=True)
        t = t / (1e-8 + t.norm(dim=1, keepdim=True))
        return (t @ t.t()).clamp(-1, 1)

    def step(x: Tensor, y: Tensor, i: int) -> None:
        target = sim(F.one_hot(y, classes).float())
        h = x.flatten(1)
        for block, opt in zip(blocks, opts):
            a = F.leaky_relu(block.bn(block.layer(h)), 0.01)
            loss = (1 - beta) * F.cross_entropy(block.pred(a), y) + \
                beta * F.mse_loss(sim(block.sim(a)), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            gen.manual_seed(i)
            h = a.detach() * torch.empty_like(a).bernoulli_(1 - p, generator=gen).div_(1 - p)
        loss = (1 - beta) * F.cross_entropy(out(h), y)
        loss.backward()
        opts[-1].step()
        opts[-1].zero_grad(set_to_none=True)
    return step


def count(step: Callable[[Tensor, Tensor, int], None], x: Tensor, y: Tensor) -> OpCount:
    """The ops of one step, after two warm-up steps (lazy state: optimizer moments)."""
    for i in range(2):
        step(x, y, i)
    with OpCount() as counter:
        step(x, y, 2)
    return counter


def _finish(x: Tensor) -> None:
    """Wait for the work queued on ``x``'s device (a GPU's kernels run after the call)."""
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def time_side_by_side(steps: dict[str, Callable], x: Tensor, y: Tensor, n: int,
                      rounds: int) -> dict[str, float]:
    """Median seconds per step of each, measured in alternating rounds of ``n`` steps."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for name, step in steps.items():
        for i in range(3):
            step(x, y, i)
    for _ in range(rounds):
        for name, step in steps.items():
            _finish(x)
            start = time.perf_counter()
            for i in range(n):
                step(x, y, i)
            _finish(x)
            times[name].append((time.perf_counter() - start) / n)
    return {name: statistics.median(t) for name, t in times.items()}


def gpu_profile(step: Callable[[Tensor, Tensor, int], None], x: Tensor, y: Tensor, n: int,
                step_s: float) -> dict[str, float]:
    """Per step on a GPU, over ``n`` steps profiled after warm-up: the GPU activities launched
    (kernels, copies, memsets; not the profiler's annotations) and their summed device time,
    against ``step_s``, the step's time measured without the profiler (which slows the host).
    ``step_over_device`` near 1: the GPU never waits for the host."""
    from torch.profiler import ProfilerActivity, profile

    for i in range(3):
        step(x, y, i)
    _finish(x)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(n):
            step(x, y, i)
        _finish(x)
    gpu = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
           and not e.is_user_annotation]
    device_s = sum(e.device_time_total for e in gpu) / 1e6 / n
    return {"kernels": len(gpu) / n, "device_ms": 1e3 * device_s, "step_ms": 1e3 * step_s,
            "step_over_device": step_s / device_s if device_s else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/step.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mlp", help="mlp (with the plain loop beside it) or a "
                   "conv net, counted alone (and timed on a GPU)")
    p.add_argument("--feat-mult", type=float, default=1.0, help="a conv net's width factor")
    p.add_argument("--batch-size", type=int, default=128, help="samples a step")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--steps", type=int, default=20, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (the median is kept)")
    p.add_argument("--dim-in-decoder", type=int, default=Config().dim_in_decoder,
                   help="largest input of a conv block's pred head (the paper's MNIST vgg8b: 1024)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda adds the kernels per step and their device time (torch.profiler)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = mlp_config(batch_size=args.batch_size, threads=args.threads) if args.model == "mlp" \
        else Config(model=args.model, dataset="synthetic", feat_mult=args.feat_mult,
                    dim_in_decoder=args.dim_in_decoder, batch_size=args.batch_size,
                    threads=args.threads).validate()
    shape = (1, 28, 28)
    x = torch.randn(args.batch_size, *shape, device=args.device)
    y = torch.arange(args.batch_size, device=args.device) % 10
    _, ours = localpipe_step(cfg, shape, device=args.device)
    counted = count(ours, x, y)
    result = {"model": args.model, "batch_size": args.batch_size, "threads": args.threads,
              "device": args.device, "ops": counted.total, "host_reads": counted.host_reads,
              "top_ops": dict(counted.ops.most_common(12))}
    steps = {"localpipe": ours}
    if args.model == "mlp":
        steps["plain"] = plain = plain_step(cfg, shape, device=args.device)
        result["plain_ops"] = count(plain, x, y).total
    if args.model == "mlp" or args.device == "cuda":  # a conv net's CPU step is slow to time
        seconds = time_side_by_side(steps, x, y, args.steps, args.rounds)
        result["localpipe_ms"] = 1e3 * seconds["localpipe"]
    if args.model == "mlp":
        result.update(plain_ms=1e3 * seconds["plain"],
                      ratio=seconds["localpipe"] / seconds["plain"])
    if args.device == "cuda":
        result["samples_per_s"] = args.batch_size / seconds["localpipe"]
        result["profile"] = {name: gpu_profile(step, x, y, args.steps, seconds[name])
                             for name, step in steps.items()}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
