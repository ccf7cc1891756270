"""Rank 0's bookkeeping: a record per epoch and per logged batch, a manifest per checkpoint,
``model.pt`` at the end of a run that finished (a stopped run leaves its checkpoint instead).
Stage reports come in any order; a record or manifest is written once all K·R of its kind are
in (every stage of every replica), so no stage ever waits for it. Files come from replica 0;
the replicas' measurements are merged."""
from __future__ import annotations

import os

from localpipe.pipeline import checkpoint
from localpipe.pipeline.data import Batches
from localpipe.pipeline.metrics import epoch_record, merge_replicas, step_record
from localpipe.pipeline.plan import Plan
from localpipe.pipeline.records import Records
from localpipe.stages.config import Config


class Coordinator:
    def __init__(self, cfg: Config, run_plan: Plan, train: Batches) -> None:
        self.cfg, self.plan = cfg, run_plan
        self.train_batches, self.dropped = len(train), train.dropped
        self.save_dir = cfg.save_dir or None
        self.unit_names = run_plan.names
        self.records = Records(self.save_dir, cfg.backprop, curves=not cfg.no_curves)
        self.pending: dict[tuple, dict[int, dict]] = {}
        self.last_step: dict | None = None
        self.manifest: str | None = None  # the newest complete checkpoint

    def handle(self, report: dict) -> None:
        key = (report["kind"], report.get("epoch"), report.get("step"))
        by_rank = self.pending.setdefault(key, {})
        by_rank[report["stage"], report["replica"]] = report
        if len(by_rank) < len(self.plan.parts) * self.cfg.replicas:
            return
        del self.pending[key]
        kind, epoch, step = key
        if kind == "final":
            check_replicas_agree(by_rank.values())
        got = merge_replicas(list(by_rank.values()))
        if kind == "log":
            lr = self.cfg.lr_at(epoch, step, self.train_batches)
            self.last_step = step_record(lr, self.cfg.global_batch, got, self.last_step)
            self.records.step(self.last_step)
            return
        evaluate = got[0].get("evaluate", False)
        if kind == "end_epoch":
            lrs = (self.cfg.lr_at(epoch, 0, self.train_batches),  # step: batches trained
                   self.cfg.lr_at(epoch, max(step - 1, 0), self.train_batches))
            self.records.epoch(epoch_record(epoch, lrs, got, self.unit_names, self.dropped))
            if step == self.train_batches:  # a whole epoch: go on with the next one
                epoch, step = epoch + 1, 0
        if kind != "final":
            if self.save_dir:  # every stage has saved its file: complete the checkpoint
                self.manifest = checkpoint.write_manifest(
                    self.save_dir, got[0]["steps"], (epoch, step, evaluate), self.cfg.to_dict(),
                    [{"stage": r["stage"], "units": r["units"], **f} for r in got
                     for f in r["files"]], self.cfg.keep_checkpoints)
            return
        if self.save_dir and not got[0]["stopped"]:  # a stopped run leaves its checkpoint
            state = {k: v for r in got for k, v in r["state"].items()}
            checkpoint.save_torch(state, os.path.join(self.save_dir, "model.pt"))
        self.records.close()


def check_replicas_agree(finals) -> None:
    """Every replica of a stage must end with the same state; one that does not is a bug
    worth stopping for, since model.pt would stand for one replica only."""
    digests: dict[int, set[str]] = {}
    for r in finals:
        digests.setdefault(r["stage"], set()).add(r["digest"])
    differ = [k for k, d in sorted(digests.items()) if len(d) > 1]
    if differ:
        raise RuntimeError(f"the replicas of stage {differ[0]} ended with different weights")
