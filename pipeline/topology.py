"""Who is who in a torchrun job, and the process groups that join them.

The job is a grid of ranks, pipeline × data: rank r runs stage ``r % K`` of replica ``r // K``,
so the ranks of one pipeline are neighbours in rank order (on one node under
``--nproc-per-node K``, a whole pipeline per node). ``stage_of``, ``replica_of`` and
``rank_of`` are the only places that map between the two. Every group is created here,
collectively and in the same order on every rank:

- the default group (gloo, on the CPU), made by the runner: the plan, stage reports, the end;
- per link (stage k and k + 1 of one replica), a gloo group for message headers, which also
  carries payloads on the host path;
- per link, an NCCL group for payloads, when every rank of the job has a GPU of its own;
- with R > 1, per stage, the group of its R replicas for their gradient sums (NCCL or gloo, as
  the payloads), and a gloo group of the R feeds (the stage-0 ranks) for their agreement.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from localpipe.pipeline import device as dev
from localpipe.pipeline.control import LONG  # link waits are bounded by the control plane
from localpipe.pipeline.replicas import FeedAgreement, LostPeer, ReplicaGroup
from localpipe.pipeline.transport import HostPayload, Link, NcclPayload


@dataclass(frozen=True)
class Topology:
    rank: int
    stages: int
    replicas: int = 1

    @property
    def world(self) -> int:
        return self.stages * self.replicas

    def stage_of(self, rank: int) -> int:
        return rank % self.stages

    def replica_of(self, rank: int) -> int:
        return rank // self.stages

    @property
    def stage(self) -> int:
        return self.stage_of(self.rank)

    @property
    def replica(self) -> int:
        return self.replica_of(self.rank)

    def rank_of(self, stage: int, replica: int = 0) -> int:
        return replica * self.stages + stage

    def name(self, rank: int) -> str:
        """How messages name a rank: by the stage it runs."""
        replica = self.replica_of(rank)
        return f"stage {self.stage_of(rank)}" + (f" (replica {replica})" if replica else "")

    def names(self) -> list[str]:
        return [self.name(r) for r in range(self.world)]


@dataclass
class Wiring:
    """This rank's share of the groups: its links to the stages before and after it in its
    pipeline, and with R > 1 its stage's replicas and (on a stage-0 rank) the feeds' agreement."""

    inbound: Link | None = None
    outbound: Link | None = None
    replicas: ReplicaGroup | None = None
    agreement: FeedAgreement | None = None


def connect(topo: Topology, device: torch.device, shared_gpu: bool, comm_timeout: float,
            lost: LostPeer) -> Wiring:
    """Create every group and return this rank's share. NCCL carries payloads and gradient
    sums only if every rank has a GPU of its own, which the ranks agree on first. A replica
    sum that breaks goes to ``lost``."""
    direct = torch.tensor([int(dev.is_cuda(device) and not shared_gpu)])
    dist.all_reduce(direct, op=dist.ReduceOp.MIN)
    nccl = bool(direct.item())
    timeout = timedelta(seconds=comm_timeout)
    wiring = Wiring()
    for replica in range(topo.replicas):
        for k in range(topo.stages - 1):
            a, b = topo.rank_of(k, replica), topo.rank_of(k + 1, replica)
            headers = dist.new_group([a, b], backend="gloo", timeout=LONG)
            payloads = dist.new_group([a, b], backend="nccl", device_id=device,
                                      timeout=timeout) if nccl else None
            if topo.rank in (a, b):
                peer = b if topo.rank == a else a
                payload = NcclPayload(payloads, peer, device, topo.replicas > 1) if nccl \
                    else HostPayload(headers, peer, device)
                link = Link(peer, headers, payload)
                if topo.rank == a:
                    wiring.outbound = link
                else:
                    wiring.inbound = link
    if topo.replicas == 1:
        return wiring
    # a sum waits for the slowest replica: bounded by --comm-timeout over NCCL (its watchdog,
    # as for payloads), by the control plane over gloo
    for k in range(topo.stages):
        ranks = [topo.rank_of(k, r) for r in range(topo.replicas)]
        group = dist.new_group(ranks, backend="nccl", device_id=device, timeout=timeout) \
            if nccl else dist.new_group(ranks, backend="gloo", timeout=LONG)
        if topo.stage == k:
            wiring.replicas = ReplicaGroup(group, topo.replicas, not nccl, lost)
    feeds = dist.new_group([topo.rank_of(0, r) for r in range(topo.replicas)], backend="gloo",
                           timeout=LONG)
    if topo.stage == 0:
        wiring.agreement = FeedAgreement(feeds, lost)
    return wiring
