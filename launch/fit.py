"""Training from Python: ``lp.fit(net, train_set, test_set, ...)``, and ``lp.evaluate``.

``fit`` is the command line's run without the command line: it makes the same ``Config`` (the
network and the data are the objects given, not names) and hands it to the same runners, so
checkpoints, resume, the run folder, signals, the heartbeat and every failure path are the
ones the command has. In a plain process ``stages=K`` runs K stage threads (CUDA streams on a
GPU); in a script started with ``torchrun --nproc-per-node K·R`` it runs one process per stage
(and replica).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from localpipe.pipeline import process
from localpipe.pipeline.checkpoint import Finished
from localpipe.pipeline.data import dataset_batches
from localpipe.pipeline.distributed import run_distributed
from localpipe.pipeline.inprocess import run_inprocess
from localpipe.pipeline.signals import StopRequest
from localpipe.stages.config import PYTHON_DATASET, PYTHON_MODEL, Config
from localpipe.launch.evaluate import load
from localpipe.stages.localnet import LocalNet


@dataclass
class FitResult:
    test_error: float | None  # percent: the output's error on test_set after the last epoch
    history: list[dict]  # the per-epoch records (as metrics.jsonl holds them)
    run_dir: str | None  # the run folder (None: nothing was written)
    stopped: int | None = None  # the signal that stopped the run early, if one did


def fit(net: LocalNet, train_set, test_set=None, *, epochs: int, batch_size: int,
        stages: int = 1, balance: list[int] | None = None, replicas: int = 1, seed: int = 1,
        lr: float = 5e-4, save_dir: str | None = None, resume: str = "",
        threads: int = 0, device: str = "auto", checkpoint_every: int = 0,
        deterministic: bool = False, progress_bar: bool = False,
        curves: bool = True) -> FitResult:
    """Train ``net`` on ``train_set`` (any map-style dataset of (tensor, int label)) for
    ``epochs``, testing on ``test_set`` after each. Batches come from a sampler seeded from
    ``seed``, so every runner sees the same ones and, at one ``threads`` count, gives the same
    weights. ``balance``: units per stage (by default the cut that evens out measured step
    times). ``save_dir=None`` makes a run folder under ``runs/``, ``''`` writes nothing;
    ``resume``: a checkpoint folder, a run folder or "auto"; it must have been made for the
    same network (``net.signature()``). ``lr`` is the default optimizer's (a factory given to
    the ``LocalNet`` keeps its own). Raises ``ConfigError`` or ``DataError`` on bad input,
    ``StageFailed`` when a stage fails (a sample the data feed finds wrong included). When it
    returns, ``net.module`` holds the whole trained network in every process, on the CPU;
    ``history`` holds the epochs this call trained.

    The run seeds torch's, numpy's and Python's global generators from ``seed`` and sets the
    torch thread count, deterministic mode and the float32 precision of GPU matmuls and
    convolutions (full float32), as the command line does; all of them are put back as they
    were when it returns."""
    if not isinstance(net, LocalNet):
        raise TypeError(f"fit trains a LocalNet, got {type(net).__name__}: wrap your "
                        f"nn.Sequential in lp.LocalNet(module, num_classes=..., "
                        f"input_shape=...)")
    cfg = Config(model=PYTHON_MODEL, dataset=PYTHON_DATASET, network=net.signature(),
                 epochs=epochs, batch_size=batch_size, stages=stages, balance=balance,
                 replicas=replicas, seed=seed, lr=lr, lr_decay_milestones=[],
                 save_dir=save_dir, resume=resume, threads=threads, device=device,
                 checkpoint_every=checkpoint_every, deterministic=deterministic,
                 progress_bar=progress_bar, no_curves=not curves,
                 loss_sup=net.loss if net.loss in ("pred", "sim") else "predsim",
                 beta=net.beta, alpha=net.alpha).validate()
    stop = StopRequest()
    history: list[dict] = []

    def take(state: dict, records: list[dict]) -> None:
        net.load_stage_state(state)
        history.extend(records)

    data = lambda cfg: dataset_batches(train_set, test_set, cfg, net.num_classes)  # noqa: E731
    try:
        with process.kept():
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                coordinator = run_distributed(cfg, stop, net, data, take)
            else:
                with stop.installed():
                    coordinator = run_inprocess(cfg, stop, net, data)
                history = coordinator.records.history
    except Finished as done:  # every epoch was trained already: the weights it ended with
        load(done.folder, into=net)
        return FitResult(None, [], os.path.dirname(os.path.dirname(done.folder)))
    net.cpu()
    run_dir = coordinator.cfg.save_dir if coordinator else None  # rank 0 knows it
    return FitResult(history[-1]["test_error"] if history else None, history, run_dir or None,
                     stop.signum)


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int = 256) -> float:
    """The error in percent of ``model`` (a ``LocalNet`` or any module giving logits) on a
    map-style dataset of (tensor, int label), in eval mode, in plain PyTorch; the module's
    training flags are put back after."""
    if len(dataset) == 0:
        raise ValueError("evaluate needs a dataset of at least one sample")
    flags = [(m, m.training) for m in model.modules()]
    device = next(model.parameters(), torch.empty(0)).device
    wrong = 0
    try:
        model.eval()
        for start in range(0, len(dataset), batch_size):
            samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            x = torch.stack([torch.as_tensor(s[0]) for s in samples]).float().to(device)
            y = torch.tensor([int(s[1]) for s in samples], device=device)
            wrong += int((model(x).argmax(dim=1) != y).sum())
    finally:
        for m, training in flags:
            m.training = training
    return 100.0 * (wrong / len(dataset))  # as a run's records compute it, to the last bit
