"""A stage: a contiguous run of units that one worker trains, and also the whole network.

``train_step`` follows §4.3 inside the stage (each unit forwards, then updates, before the next
one) except for the last unit, whose update is returned instead of run: the caller hands the
output on first, so the next stage never waits for this one's backward. With one stage holding
every unit this is exactly the paper's sequential loop; ``--backprop`` and ``--no-detach`` take
one global step instead (§4.4, §4.5) and are only valid for that single stage.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from localpipe.stages.blocks import (Meter, Replicas, Skips, Unit, Update, keep_buffers,
                                     load_optimizer, make_optimizer)
from localpipe.stages.config import Config


def own_labels(y: Tensor) -> Tensor:
    """``y`` as a tensor object of this stage's own (the same memory): the label targets its
    units share are kept on it (stages/losses.py), made on this stage's stream and read there
    alone; the stage before on the same GPU, on a stream of its own, keeps its own."""
    return y.detach()


class Stage(nn.Module):
    def __init__(self, units: list[Unit], cfg: Config, device: torch.device) -> None:
        super().__init__()
        indices = [u.index for u in units]
        if indices != list(range(indices[0], indices[0] + len(indices))):
            raise ValueError(f"a stage needs contiguous units, got {indices}")
        self.cfg = cfg
        self.blocks = nn.ModuleDict({str(u.index): u for u in units if not u.is_output})
        outputs = [u for u in units if u.is_output]
        self.output = outputs[0] if outputs else None
        self.units: list[Unit] = units
        self.to(device)
        for unit in units:
            unit.make_optimizer()
        self.optimizer = make_optimizer(self.parameters(), cfg, [
            p for u in units for p in u.no_decay()]) if cfg.backprop else None
        # training batches an epoch, which the learning rate of a batch depends on where it is
        # set per batch (Config.lr_at); the runner that builds the stage knows it
        self.epoch_steps = 0
        # what a test hook does to each training batch's input (pipeline/faults.py)
        self.inject: Callable[[Tensor], Tensor] | None = None

    def replicate(self, replica: int, replicas: Replicas | None) -> None:
        """Make this stage replica ``replica`` of ``replicas``: its dropout masks are its own,
        and every update is averaged over them (pipeline/replicas.py)."""
        for unit in self.units:
            unit.replica, unit.replicas = replica, replicas

    @property
    def replica(self) -> int:
        return self.units[0].replica

    @property
    def replicas(self) -> Replicas | None:
        return self.units[0].replicas

    @property
    def indices(self) -> list[int]:
        return [u.index for u in self.units]

    def set_position(self, epoch: int, step: int) -> None:
        """The batch about to be trained: its learning rate (from the batch's own position, not
        the wall clock's) and its dropout masks."""
        lr = self.cfg.lr_at(epoch, step, self.epoch_steps)
        for unit in self.units:
            unit.set_lr(lr)
            unit.position = (epoch, step)
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr

    def optimizers(self) -> list[torch.optim.Optimizer]:
        found = [opt for u in self.units for opt in u.optimizers]
        return found + ([self.optimizer] if self.optimizer is not None else [])

    def train_step(self, x: Tensor, y: Tensor,
                   skips: Skips | None = None) -> tuple[Tensor, Update]:
        """Train on one batch; return the detached output and the last unit's pending update.
        ``skips`` holds the batch's skip tensors that came with it; on return it holds those
        that go on with the output (stashed here, popped by a later stage). With replicas, a
        unit's update is finished only after the next unit's forward, so that its exchange
        with the other replicas overlaps that forward (it changes nothing that forward reads)."""
        skips = {} if skips is None else skips
        y = own_labels(y)
        if self.inject is not None:
            x = self.inject(x)
        if not self.cfg.local:
            return self._global_step(x, y, skips)
        pending: Update | None = None
        for unit in self.units[:-1]:
            x, update = unit.train_step(x, y, skips)
            if pending is not None:
                pending.finish()
            update.begin()
            pending = update
        out, last = self.units[-1].train_step(x, y, skips)
        if pending is not None:
            pending.finish()
        return out, last

    def _global_step(self, x: Tensor, y: Tensor, skips: Skips) -> tuple[Tensor, Update]:
        """One end-to-end step: CE through every block (plus, with --no-detach, every local
        loss with its gradient flowing on into the earlier blocks)."""
        assert self.output is not None and self.indices[0] == 0, "global modes need one stage"
        kept = keep_buffers(self, self.cfg)
        total = x.new_zeros(())
        for block in self.blocks.values():
            x, h, seen = block.run(x, skips, losses=self.cfg.no_detach)
            if self.cfg.no_detach:
                total = total + block.local_loss(h, seen, y)
        logits = self.output(x)
        total = total + self.output.loss(logits, y)
        return logits.detach(), Update(total, torch.isfinite(total.detach()), self.optimizers(),
                                       kept, self, self.replicas)

    @torch.no_grad()
    def eval_step(self, x: Tensor, y: Tensor, phase: str = "test",
                  skips: Skips | None = None) -> Tensor:
        """Evaluate one batch, recording into each unit's ``phase`` meters ("val" or "test");
        ``skips`` as in ``train_step``."""
        skips = {} if skips is None else skips
        y = own_labels(y)
        for unit in self.units:
            unit.phase = phase
            x = unit.eval_step(x, y, skips)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """The stage as one differentiable function (logits when it ends with the output
        layer); as any module, under ``torch.no_grad()`` for plain inference."""
        skips: Skips = {}
        # as in evaluation: with --no-batch-norm a residual unit's output depends on whether
        # it forms its local-loss input (quirk 14)
        stats = not self.cfg.no_print_stats and not self.cfg.backprop
        for block in self.blocks.values():
            x = block.run(x, skips, losses=stats)[0]
        return x if self.output is None else self.output(x)

    def take_meters(self, epoch_done: bool = True) -> dict[int, dict[str, dict]]:
        """Each unit's train and test averages since the last call, by unit index. Training
        meters of an epoch not done (cut by --max-steps) keep their sums, so that its
        checkpoint carries them and the resumed epoch counts every batch."""
        return {u.index: {phase: m.take(reset=epoch_done or phase != "train")
                          for phase, m in u.meters.items()} for u in self.units}

    def checkpoint_state(self) -> dict:
        """Everything to continue exactly: weights, buffers, optimizer moments, and the epoch's
        training meters (test meters only live through one evaluation, which a resumed run
        does again from its start), summed over the replicas: every replica takes part."""
        meters = [u.meters["train"].state() for u in self.units]
        if self.replicas is not None:
            meters = self._summed(meters)
        return {
            "units": {u.index: {"state": u.state_dict(),
                                "optimizers": [opt.state_dict() for opt in u.optimizers],
                                "meters": m}
                      for u, m in zip(self.units, meters)},
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
        }

    def _summed(self, meters: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """``meters`` added up over the replicas. Every replica sends the same schema (each
        key's value and whether it has one), whatever it has recorded: after a resume only
        replica 0 holds the restored sums, and the collective must match on every replica."""
        keys = Meter.SUMS
        device = next(self.parameters()).device  # NCCL sums device tensors only
        flat = torch.tensor([[float(k in m), float(m[k]) if k in m else 0.0]
                             for m in meters for k in keys], dtype=torch.float64)
        total = self.replicas.sum([flat.to(device).view(-1)])()
        total = total.cpu().view(len(meters), len(keys), 2)
        return [{k: total[i, j, 1].clone() for j, k in enumerate(keys) if total[i, j, 0] > 0}
                for i in range(len(meters))]

    def load_checkpoint_state(self, state: dict) -> None:
        """Restore what ``checkpoint_state`` saved, for the units of this stage; the saved
        meters, summed over the replicas, go to replica 0 alone."""
        for unit in self.units:
            saved = state["units"][unit.index]
            unit.load_state_dict(saved["state"])
            for optimizer, opt_state in zip(unit.optimizers, saved["optimizers"], strict=True):
                load_optimizer(optimizer, opt_state)
            if self.replica == 0:
                unit.meters["train"].load(saved["meters"], next(self.parameters()).device)
        if self.optimizer is not None:
            load_optimizer(self.optimizer, state["optimizer"])
