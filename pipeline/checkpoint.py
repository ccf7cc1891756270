"""Checkpoint files: one per stage, then a manifest written last, every write atomic.

A checkpoint folder (``checkpoints/step-NNNNNNNNN``, named by training batches done) is complete
exactly when its ``manifest.json`` exists, so a run killed while saving leaves the previous
checkpoint as the newest usable one. The manifest records each stage file's size and SHA-256,
the position to continue from, and the run's options.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import time

import torch

PAUSE_ENV = "LOCALPIPE_TEST_SAVE_PAUSE"  # test hook: seconds to stall before a rename


def checkpoint_dir(save_dir: str, steps: int) -> str:
    return os.path.join(save_dir, "checkpoints", f"step-{steps:09d}")


def atomic_write(path: str, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename over it."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        time.sleep(float(os.environ.get(PAUSE_ENV, 0)))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_torch(obj, path: str) -> dict:
    """Atomically save ``obj``; return its size and SHA-256."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    atomic_write(path, data)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def save_stage(save_dir: str, steps: int, stage: int, state: dict) -> dict:
    """Write one stage's state; return its entry for the manifest."""
    path = os.path.join(checkpoint_dir(save_dir, steps), f"stage-{stage}.pt")
    return {"file": os.path.basename(path), **save_torch(state, path)}


def write_manifest(save_dir: str, steps: int, position: tuple[int, int], args: dict,
                   files: list[dict], keep: int) -> str:
    """Complete the checkpoint after ``steps`` batches; then keep only the newest ``keep``
    complete checkpoints (0 keeps all) and drop incomplete older ones."""
    folder = checkpoint_dir(save_dir, steps)
    text = json.dumps({"epoch": position[0], "step": position[1], "steps": steps, "args": args,
                       "files": files}, indent=1)
    atomic_write(os.path.join(folder, "manifest.json"), text.encode())
    root = os.path.dirname(folder)
    names = sorted(os.listdir(root))
    complete = [n for n in names if os.path.exists(os.path.join(root, n, "manifest.json"))]
    doomed = [n for n in names if n < os.path.basename(folder) and n not in complete]
    if keep:
        doomed += complete[:-keep]
    for name in doomed:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return folder


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
    """The manifest of ``folder``, refused if its run trained a different network or if a
    stage file is missing, truncated or altered."""
    with open(os.path.join(folder, "manifest.json")) as f:
        manifest = json.load(f)
    for key in MODEL_ARGS:
        if manifest["args"].get(key) != args.get(key):
            raise ValueError(f"checkpoint {folder} was made with --{key.replace('_', '-')} "
                             f"{manifest['args'].get(key)}, this run has {args.get(key)}")
    for entry in manifest["files"]:
        path = os.path.join(folder, entry["file"])
        with open(path, "rb") as f:
            data = f.read()
        if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ValueError(f"checkpoint file {path} is truncated or corrupt")
    return manifest


def load_units(folder: str, manifest: dict, indices: list[int]) -> dict:
    """The saved state of the units ``indices``, whichever stage files they were saved in."""
    units, optimizer = {}, None
    for entry in manifest["files"]:
        if not set(entry["units"]) & set(indices):
            continue
        state = torch.load(os.path.join(folder, entry["file"]), map_location="cpu",
                           weights_only=False)
        units.update({i: s for i, s in state["units"].items() if i in indices})
        optimizer = optimizer or state["optimizer"]
    return {"units": units, "optimizer": optimizer}
