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


# Options that change the network or its training, so a checkpoint made with other values
# cannot be continued. The rest (epochs, stages, balance, paths, logging) may change freely.
MODEL_ARGS = ("model", "dataset", "num_layers", "num_hidden", "dim_in_decoder", "feat_mult",
              "loss_sup", "loss_unsup", "bio", "backprop", "no_detach", "no_batch_norm",
              "target_proj_size", "optim", "nonlin", "seed", "batch_size", "dropout", "alpha",
              "beta", "lr", "lr_decay_milestones", "lr_decay_fact", "momentum", "weight_decay",
              "no_similarity_std", "cutout", "n_holes", "length", "classes_per_batch",
              "classes_per_batch_until_epoch", "limit_train")


def find_checkpoint(resume: str, save_dir: str) -> str | None:
    """The checkpoint folder named by --resume: a folder with a manifest, a save dir (its
    newest complete checkpoint), or "auto" (the newest in --save-dir, None if there is none)."""
    if os.path.exists(os.path.join(resume, "manifest.json")):
        return resume
    root = save_dir if resume == "auto" else resume
    folder = os.path.join(root, "checkpoints")
    done = sorted(d for d in (os.listdir(folder) if os.path.isdir(folder) else [])
                  if os.path.exists(os.path.join(folder, d, "manifest.json")))
    if done:
        return os.path.join(folder, done[-1])
    if resume == "auto":
        return None
    raise ValueError(f"--resume {resume}: no complete checkpoint there (no manifest.json)")


def read_manifest(folder: str, args: dict) -> dict:
    """The manifest of ``folder``, refused if its run trained a different network."""
    with open(os.path.join(folder, "manifest.json")) as f:
        manifest = json.load(f)
    for key in MODEL_ARGS:
        if manifest["args"].get(key) != args.get(key):
            raise ValueError(f"checkpoint {folder} was made with --{key.replace('_', '-')} "
                             f"{manifest['args'].get(key)}, this run has {args.get(key)}")
    return manifest


def load_units(folder: str, manifest: dict, indices: list[int]) -> dict:
    """The saved state of the units ``indices``, whichever stage files they were saved in."""
    units, optimizer = {}, None
    for entry in manifest["files"]:
        if not set(entry["units"]) & set(indices):
            continue
        path = os.path.join(folder, entry["file"])
        if os.path.getsize(path) != entry["bytes"]:
            raise ValueError(f"checkpoint file {path} is truncated or corrupt")
        state = torch.load(path, map_location="cpu", weights_only=False)
        units.update({i: s for i, s in state["units"].items() if i in indices})
        optimizer = optimizer or state["optimizer"]
    return {"units": units, "optimizer": optimizer}
