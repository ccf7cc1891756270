"""Who is who in a torchrun job, and the process groups that join them.

The job is a grid of ranks, pipeline × data: rank r runs stage ``r % K`` of replica ``r // K``,
so the ranks of one pipeline are neighbours in rank order (today there is one replica; the
data-parallel replicas of every stage slot in here). ``stage_of`` and ``rank_of`` are the only
places that map between the two. Every group is created here, collectively and in the same
order on every rank:

- the default group (gloo, on the CPU), made by the runner: the plan, stage reports, the end;
- per link (stage k and k + 1 of one replica), a gloo group for message headers, which also
  carries payloads on the host path;
- per link, an NCCL group for payloads, when every rank of the job has a GPU of its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from pipeline import device as dev
from pipeline.control import LONG  # link waits are bounded by the control plane
from pipeline.transport import HostPayload, Link, NcclPayload


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

    def rank_of(self, stage: int, replica: int = 0) -> int:
        return replica * self.stages + stage

    def name(self, rank: int) -> str:
        """How messages name a rank: by the stage it runs."""
        replica = rank // self.stages
        return f"stage {self.stage_of(rank)}" + (f" (replica {replica})" if replica else "")

    def names(self) -> list[str]:
        return [self.name(r) for r in range(self.world)]


def connect(topo: Topology, device: torch.device, shared_gpu: bool,
            comm_timeout: float) -> tuple[Link | None, Link | None]:
    """Create every link's groups and return this rank's (inbound, outbound) links. NCCL
    carries payloads only if every rank has a GPU of its own, which the ranks agree on first."""
    direct = torch.tensor([int(dev.is_cuda(device) and not shared_gpu)])
    dist.all_reduce(direct, op=dist.ReduceOp.MIN)
    nccl = bool(direct.item())
    inbound = outbound = None
    for replica in range(topo.replicas):
        for k in range(topo.stages - 1):
            a, b = topo.rank_of(k, replica), topo.rank_of(k + 1, replica)
            headers = dist.new_group([a, b], backend="gloo", timeout=LONG)
            payloads = dist.new_group([a, b], backend="nccl", device_id=device,
                                      timeout=timedelta(seconds=comm_timeout)) if nccl else None
            if topo.rank in (a, b):
                peer = b if topo.rank == a else a
                payload = NcclPayload(payloads, peer, device) if nccl \
                    else HostPayload(headers, peer, device)
                link = Link(peer, headers, payload)
                if topo.rank == a:
                    outbound = link
                else:
                    inbound = link
    return inbound, outbound
