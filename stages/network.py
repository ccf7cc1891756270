"""What a runner needs of a network, whoever defined it: the paper's models (``models.Zoo``)
or a user's own ``nn.Sequential`` (``localnet.LocalNet``). A network is a row of units; a
runner cuts it into contiguous stages and builds each stage where it runs."""
from __future__ import annotations

from typing import Protocol

import torch

from localpipe.stages.config import Config
from localpipe.stages.stage import Stage


class Network(Protocol):
    shape: tuple[int, ...]  # one input sample's shape
    num_classes: int

    def names(self) -> list[str]:
        """One line per unit, for the records and --describe."""

    def parameter_counts(self) -> list[int]:
        """Each unit's parameter count, local heads included (cheap: nothing is trained)."""

    def state_shapes(self, cfg: Config) -> list[dict[str, tuple[int, ...]]]:
        """Each unit's ``state_dict``, as names and shapes (what a checkpoint must hold)."""

    def build(self, cfg: Config, indices: list[int] | None, device: torch.device | str,
              throwaway: bool = False) -> Stage:
        """Units ``indices`` (all by default) as one stage on ``device``. A ``throwaway`` stage
        may be trained to time its units and must leave the network as it was."""
