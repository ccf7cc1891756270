"""Checkpoint files: one per stage, then a manifest written last, every write atomic.

A checkpoint directory is complete exactly when its ``manifest.json`` exists, so a run killed
while saving leaves the previous checkpoint as the newest usable one.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch


def checkpoint_dir(save_dir: str, epoch: int) -> str:
    return os.path.join(save_dir, "checkpoints", f"epoch-{epoch:04d}")


def atomic_write(path: str, write) -> int:
    """Write through ``write(file)`` to a temporary file, fsync, rename; return the size."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return os.path.getsize(path)


def save_torch(obj, path: str) -> int:
    return atomic_write(path, lambda f: torch.save(obj, f))


def save_stage(save_dir: str, epoch: int, stage: int, state: dict) -> dict:
    """Write one stage's state; return its entry for the manifest."""
    path = os.path.join(checkpoint_dir(save_dir, epoch), f"stage-{stage}.pt")
    return {"file": os.path.basename(path), "bytes": save_torch(state, path)}


def write_manifest(save_dir: str, epoch: int, step: int, args: dict, files: list[dict]) -> str:
    path = os.path.join(checkpoint_dir(save_dir, epoch), "manifest.json")
    text = json.dumps({"epoch": epoch, "step": step, "args": args, "files": files}, indent=1)
    atomic_write(path, lambda f: f.write(text.encode()))
    return path
