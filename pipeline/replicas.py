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

from localpipe.pipeline.transport import NCCL_LOCK


LostPeer = Callable[[int | None, BaseException], NoReturn]  # Rank.lost_link: names who


class ReplicaGroup:
    """The replicas of one stage, as ``stages.blocks.Replicas``: sums over their process
    group, NCCL on GPUs of their own, else gloo (through host memory). A sum that breaks
    (a replica died) goes to ``lost``, which names the replica that caused it.

    Each bucket is laid into a buffer of its size kept from the first batch (and a host one
    for gloo), so a step allocates nothing; a stage has one sum in flight at a time, so one
    buffer per size is enough. An NCCL sum is issued under the process's NCCL lock
    (pipeline/transport.py), like every other NCCL call, so that no two threads issue NCCL
    work at once."""

    def __init__(self, group: dist.ProcessGroup, count: int, host: bool, lost: LostPeer) -> None:
        self.group, self.count, self.host, self.lost = group, count, host, lost
        self.buffers: dict[tuple[int, torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}

    def sum(self, pieces: list[Tensor]) -> Callable[[], Tensor]:
        size = sum(p.numel() for p in pieces)
        key = (size, pieces[0].dtype, pieces[0].device)
        if key not in self.buffers:
            flat = torch.empty(size, dtype=key[1], device=key[2])
            self.buffers[key] = flat, torch.empty(size, dtype=key[1]) if self.host else flat
        flat, sent = self.buffers[key]
        torch.cat(pieces, out=flat)
        if self.host:
            sent.copy_(flat)
        try:
            if self.host:
                work = dist.all_reduce(sent, group=self.group, async_op=True)
            else:
                with NCCL_LOCK:
                    work = dist.all_reduce(sent, group=self.group, async_op=True)
        except Exception as exc:
            self.lost(None, exc)

        def wait() -> Tensor:
            try:
                work.wait()
            except Exception as exc:
                self.lost(None, exc)
            return flat.copy_(sent) if self.host else flat
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
