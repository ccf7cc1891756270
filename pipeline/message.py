"""What travels between stages: a kind, a position in the run, and named tensors.

A batch carries its activations ``x`` and labels ``y``, plus the named skip tensors a stage
hands its successor (a residual block's input on its way to the block's last unit): the same
path carries them all, in-process or between processes.
Markers carry no tensors: every batch sent before a marker has gone through a stage by the time
the marker does, which is what makes checkpoints consistent without draining the pipeline.

Between processes a message is a fixed header of five integers, then (for a batch) the JSON
list of its tensors' names, dtypes and shapes, then the tensors themselves. JSON, never pickle:
a receiver only ever allocates the tensors it is told about.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from enum import IntEnum

import torch
from torch import Tensor

from localpipe.pipeline import device as dev


class Kind(IntEnum):
    TRAIN = 0
    EVAL = 1
    END_EPOCH = 2  # every batch of the epoch, train and test, has gone before it
    STOP = 3
    CHECKPOINT = 4  # save now; (epoch, step) is where training continues
    VALID = 5  # a batch of the held-out validation split (--val-split)


@dataclass
class Message:
    kind: Kind
    epoch: int
    step: int  # batch index within the epoch's train or test pass
    # CHECKPOINT: the epoch's evaluation is still to do; STOP: the run stops before its end
    flag: bool = False
    tensors: dict[str, Tensor] = field(default_factory=dict)
    ready: dev.Event | None = None  # on a GPU: the tensors are ready once it has fired

    @property
    def x(self) -> Tensor:
        return self.tensors["x"]

    @property
    def y(self) -> Tensor:
        return self.tensors["y"]

    def skips(self) -> dict[str, Tensor]:
        """The named tensors other than ``x`` and ``y``: skip connections in flight."""
        return {k: t for k, t in self.tensors.items() if k not in ("x", "y")}

    def handing_on(self, x: Tensor, skips: dict[str, Tensor]) -> "Message":
        """This batch as the next stage gets it: the output, the labels and the skips."""
        return replace(self, tensors={"x": x, "y": self.y, **skips}, ready=None)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def depart(self) -> "Message":
        """Stamp the message with the producing stream's progress before handing it on."""
        return replace(self, ready=dev.depart(self.tensors))

    def arrive(self, device: torch.device) -> "Message":
        """The message with its tensors usable on this thread's stream of ``device``."""
        if not self.tensors:
            return self
        return replace(self, tensors=dev.arrive(self.tensors, self.ready, device), ready=None)


# ------------------------------------------------------------------------------ wire format
HEADER_LEN = 5  # kind, epoch, step, flag, length of the tensor list in bytes
TensorSpec = tuple[str, torch.dtype, list[int]]  # a tensor a header announces: name, dtype, shape
DTYPES = {str(t): t for t in (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                              torch.int64, torch.int32, torch.uint8, torch.bool)}


def encode(msg: Message) -> tuple[Tensor, Tensor | None]:
    """The header and, for a message with tensors, the JSON list describing them."""
    spec = None
    if msg.tensors:
        text = json.dumps([[name, str(t.dtype), list(t.shape)] for name, t in msg.tensors.items()])
        spec = torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)
    length = 0 if spec is None else spec.numel()
    return torch.tensor([int(msg.kind), msg.epoch, msg.step, int(msg.flag), length],
                        dtype=torch.int64), spec


def decode(header: Tensor) -> tuple[Message, int]:
    """The message a header announces (no tensors yet) and the length of its tensor list."""
    kind, epoch, step, flag, length = header.tolist()
    return Message(Kind(kind), epoch, step, bool(flag)), length


def decode_spec(spec: Tensor) -> list[TensorSpec]:
    """(name, dtype, shape) of each tensor that follows; refuses dtypes it does not know."""
    out = []
    for name, dtype, shape in json.loads(spec.numpy().tobytes().decode()):
        if dtype not in DTYPES:
            raise ValueError(f"a message announced a tensor of unknown dtype {dtype}")
        out.append((name, DTYPES[dtype], [int(d) for d in shape]))
    return out
