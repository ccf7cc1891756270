"""Data-parallel replicas (pipeline × data): what keeps the R copies of a stage one model.

Replica r of stage k trains on shard r of every global batch. After each unit's local backward
its gradients and its batch-norm running statistics go into one bucket, summed over the
stage's R replicas and divided by R, and only then does its optimizer step: every replica
takes the same step, so all of them keep the same weights, and their buffers are the average
of theirs (not replica 0's broadcast: the statistics then reflect every shard). The sum starts
right after the backward and is waited for after the next unit's forward, so the two overlap.
A finiteness flag leads the bucket: under --on-nan skip one replica's non-finite loss makes
every replica skip that update.

Each replica's feed (on the stage-0 rank of that replica) makes the same stream of batches and
markers and keeps its shard; the feeds agree before every batch whether a stop request has come
(one small all-reduce over them), so every replica stops after the same batch, and the stages'
collectives always pair up.
"""
from __future__ import annotations

from typing import Callable, NoReturn

import torch
import torch.distributed as dist
from torch import Tensor


LostPeer = Callable[[int | None, BaseException], NoReturn]  # Rank.lost_link: names who


class ReplicaGroup:
    """The replicas of one stage, as ``stages.blocks.Replicas``: sums over their process
    group, NCCL on GPUs of their own, else gloo (through host memory). A sum that breaks
    (a replica died) goes to ``lost``, which names the replica that caused it."""

    def __init__(self, group: dist.ProcessGroup, count: int, host: bool, lost: LostPeer) -> None:
        self.group, self.count, self.host, self.lost = group, count, host, lost

    def sum(self, flat: Tensor) -> Callable[[], Tensor]:
        buffer = flat.to("cpu") if self.host else flat
        try:
            work = dist.all_reduce(buffer, group=self.group, async_op=True)
        except Exception as exc:
            self.lost(None, exc)

        def wait() -> Tensor:
            try:
                work.wait()
            except Exception as exc:
                self.lost(None, exc)
            return buffer.to(flat.device) if self.host else buffer
        return wait


class FeedAgreement:
    """The feeds of the R replicas (one per stage-0 rank): whether any of them has seen a stop
    request, agreed before every batch."""

    def __init__(self, group: dist.ProcessGroup, lost: LostPeer) -> None:
        self.group, self.lost = group, lost

    def __call__(self, stopping: bool) -> bool:
        flag = torch.tensor([int(stopping)])
        try:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        except Exception as exc:
            self.lost(None, exc)
        return bool(flag.item())


def shard(t: Tensor, replica: int, replicas: int) -> Tensor:
    """Replica ``replica``'s contiguous share of a batch (sizes differ by at most one)."""
    return t if replicas == 1 else t.tensor_split(replicas)[replica]
