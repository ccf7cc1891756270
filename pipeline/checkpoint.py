"""Checkpoint files: one per stage, then a manifest written last, every write atomic; and the
start point of a run that resumes from one.

A checkpoint folder (``checkpoints/step-NNNNNNNNN``, named by training batches done) is complete
exactly when its ``manifest.json`` exists, so a run killed while saving leaves the previous
checkpoint as the newest usable one. The manifest records its format, each stage file's size
and SHA-256, the position to continue from, and the run's options. Stage files hold tensors
and plain containers only and are read with ``weights_only=True``: loading one runs no code.

A checkpoint is portable: its tensors are saved on the CPU and restored onto whatever devices
the resumed run uses, cut into any number of stages, and dropout masks are drawn from
(seed, unit, epoch, step), so there is no generator state to carry across device types.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from typing import BinaryIO

import torch
from torch import Tensor

from localpipe.pipeline.files import atomic_write
from localpipe.stages.config import ConfigError, defaults, global_batch, resumed_fields

# 2: no dropout generator states (masks are keyed by position), weights_only files;
# 3: a list of optimizers per unit (a residual block's last unit also steps its shortcut's)
FORMAT = 3
PAUSE_ENV = "LOCALPIPE_TEST_SAVE_PAUSE"  # test hook "SECONDS[@STAGE]": stall before a rename


BEFORE_EVAL = "-before-eval"  # the suffix of a checkpoint whose epoch is still to be evaluated


def checkpoint_dir(save_dir: str, steps: int, evaluate: bool = False) -> str:
    """``checkpoints/step-NNNNNNNNN``, named by training batches done; a checkpoint taken
    before an epoch's evaluation gets a name of its own, so that the one taken after the same
    batches (once evaluated) never writes over it."""
    name = f"step-{steps:09d}" + (BEFORE_EVAL if evaluate else "")
    return os.path.join(save_dir, "checkpoints", name)


def age(name: str) -> tuple[int, int]:
    """Sorts checkpoint folders from oldest to newest."""
    steps = name.removeprefix("step-").removesuffix(BEFORE_EVAL)
    return (int(steps) if steps.isdigit() else -1, 0 if name.endswith(BEFORE_EVAL) else 1)


class _Hashing:
    """A file that counts and hashes what goes through it, so that nothing is held twice,
    and keeps the OS's error of a failed write: torch's writer hides it behind its own
    ("unexpected pos"), and the user needs the reason (no space, a read-only disk)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            written = self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise
        self.sha.update(data)
        self.bytes += len(data)
        return written

    def flush(self) -> None:
        self.f.flush()


def save_torch(obj, path: str, pause: float = 0.0) -> dict:
    """Atomically save ``obj``, streamed to disk; return its size and SHA-256. A failed write
    is a WriteError naming ``path`` and the OS's reason."""
    hashed: list[_Hashing] = []

    def write(f: BinaryIO) -> None:
        hashed.append(_Hashing(f))
        try:
            torch.save(obj, hashed[0])
        except RuntimeError:
            if hashed[0].error is not None:
                raise hashed[0].error from None
            raise
    atomic_write(path, write, pause)
    return {"bytes": hashed[0].bytes, "sha256": hashed[0].sha.hexdigest()}


def save_stage(save_dir: str, steps: int, evaluate: bool, stage: int, state: dict,
               pause: float = 0.0) -> dict:
    """Write one stage's state; return its entry for the manifest."""
    path = os.path.join(checkpoint_dir(save_dir, steps, evaluate), f"stage-{stage}.pt")
    entry = {"file": os.path.basename(path), **save_torch(state, path, pause)}
    return {**entry, "saved_at": time.time()}


def snapshot(state):
    """A copy of ``state`` on the CPU that later training steps cannot change."""
    if isinstance(state, Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return type(state)((k, snapshot(v)) for k, v in state.items())
    if isinstance(state, (list, tuple)):
        return type(state)(snapshot(v) for v in state)
    return state


def test_pause(stage: int) -> float:
    """Seconds the test hook stalls ``stage``'s writes ("2" for every stage, "2@1" for one)."""
    value = os.environ.get(PAUSE_ENV, "")
    if not value:
        return 0.0
    seconds, _, only = value.partition("@")
    return float(seconds) if not only or int(only) == stage else 0.0


class Writer:
    """Writes one stage's checkpoint files on a thread of its own, in order, and passes each
    marker's report on once its file is on disk. The stage goes on with the next batches while
    a file is written; at most one snapshot waits behind the one being written, so a slow disk
    slows the stage only when checkpoints come faster than it can take them. After a failed
    write it takes what is queued without writing it, so the stage never blocks on it, and
    ``check`` raises the failure in the stage."""

    def __init__(self, save_dir: str | None, stage: int, report) -> None:
        self.save_dir, self.stage, self.report = save_dir or None, stage, report
        self.pause = test_pause(stage)
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"checkpoint-writer-{stage}",
                                       daemon=True)
        self.thread.start()

    def submit(self, steps: int, evaluate: bool, state: dict | None, r: dict) -> None:
        """Queue ``state`` (taken now) for writing, and ``r`` to report once it is written."""
        self.check()
        self.queue.put((steps, evaluate, None if state is None else snapshot(state), r))

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue  # the run is failing: take the queue's items, write nothing more
            steps, evaluate, state, r = item
            try:
                r["files"] = [] if state is None else [
                    save_stage(self.save_dir, steps, evaluate, self.stage, state, self.pause)]
                self.report(r)
            except BaseException as exc:
                self.error = exc

    def check(self) -> None:
        """Raise the error of a write that failed (disk full, permissions), in the stage."""
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Finish every queued write, then report any error."""
        self.queue.put(None)
        self.thread.join()
        self.check()

    def abandon(self) -> None:
        """Let the thread end after its current write (the run is failing or done)."""
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            pass


def write_manifest(save_dir: str, steps: int, position: tuple[int, int, bool], args: dict,
                   files: list[dict], keep: int) -> str:
    """Complete the checkpoint after ``steps`` batches at ``position`` (epoch, step, evaluate);
    then keep only the newest ``keep`` complete checkpoints (0 keeps all) and drop incomplete
    older ones."""
    folder = checkpoint_dir(save_dir, steps, position[2])
    text = json.dumps({"format": FORMAT, "epoch": position[0], "step": position[1],
                       "evaluate": position[2], "steps": steps, "written_at": time.time(),
                       "args": args, "files": files}, indent=1)
    atomic_write(os.path.join(folder, "manifest.json"), lambda f: f.write(text.encode()))
    root = os.path.dirname(folder)
    names = sorted(os.listdir(root), key=age)
    complete = [n for n in names if os.path.exists(os.path.join(root, n, "manifest.json"))]
    doomed = [n for n in names
              if age(n) < age(os.path.basename(folder)) and n not in complete]
    if keep:
        doomed += complete[:-keep]
    for name in doomed:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return folder




def find_checkpoint(resume: str, save_dir: str) -> str | None:
    """The checkpoint folder named by --resume: a folder with a manifest, a save dir (its
    newest complete checkpoint), or "auto" (the newest in --save-dir, None if there is none)."""
    if os.path.exists(os.path.join(resume, "manifest.json")):
        return resume
    root = save_dir if resume == "auto" else resume
    folder = os.path.join(root, "checkpoints")
    done = sorted((d for d in (os.listdir(folder) if os.path.isdir(folder) else [])
                   if os.path.exists(os.path.join(folder, d, "manifest.json"))), key=age)
    if done:
        return os.path.join(folder, done[-1])
    if resume == "auto":
        return None
    raise ValueError(f"--resume {resume}: no complete checkpoint there (no manifest.json)")


def read_manifest(folder: str, args: dict) -> dict:
    """The manifest of ``folder``, checked whole before anything else is set up: refused if it
    is not a manifest, of another format, of a run that trained a different network, or if a
    stage file is missing, truncated, altered, or holds more than tensors and plain containers."""
    path = os.path.join(folder, "manifest.json")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a localpipe manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format", 1) if isinstance(manifest, dict) else "none"
        raise ValueError(f"{path} has format {found}; this localpipe reads format {FORMAT} "
                         f"only")
    problem = _manifest_problem(manifest)
    if problem:
        raise ValueError(f"{path} is not a localpipe manifest: {problem}")
    made = {**defaults(), **manifest["args"]}  # an option added since: its default
    for key in sorted(resumed_fields(), key=lambda k: k != "network"):  # the network first
        if made[key] != args.get(key) and key == "network":
            raise ValueError(f"checkpoint {folder} was made for another network: "
                             f"{made[key] or 'one of the paper'}; this run trains "
                             f"{args.get(key) or 'one of the paper'}")
        if made[key] != args.get(key):
            raise ValueError(f"checkpoint {folder} was made with --{key.replace('_', '-')} "
                             f"{made[key]}, this run has {args.get(key)}")
    then, now = (global_batch(a["batch_size"], a.get("replicas", 1),
                              a.get("per_replica_batch", False)) for a in (manifest["args"], args))
    if then != now:  # a position counts global batches: --replicas may change, not that
        raise ValueError(f"checkpoint {folder} was made with a global batch of {then} "
                         f"(--batch-size, times --replicas with --per-replica-batch), this run "
                         f"has {now}")
    if made["lr_schedule"] == "cosine" and made["epochs"] != args.get("epochs"):
        raise ValueError(f"checkpoint {folder} was made with --epochs {made['epochs']}, this "
                         f"run has {args.get('epochs')}: the cosine schedule spans the run's "
                         f"epochs, so the run continues with the same number only")
    for entry in manifest["files"]:
        path = os.path.join(folder, entry["file"])
        with open(path, "rb") as f:
            data = f.read()
        if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ValueError(f"checkpoint file {path} is truncated or corrupt")
        _check_stage_file(path, data, entry["units"])
    return manifest


def _manifest_problem(m: dict) -> str | None:
    """What makes ``m`` no manifest of this format, or None."""
    ints = ("epoch", "step", "steps")
    if not all(isinstance(m.get(k), int) and m[k] >= 0 for k in ints) or m["epoch"] < 1:
        return "epoch, step and steps must be counts"
    if not isinstance(m.get("evaluate"), bool):
        return "evaluate must be true or false"
    if not isinstance(m.get("args"), dict):
        return "args must be an object"
    files = m.get("files")
    if not isinstance(files, list) or not files:
        return "files must be a non-empty list"
    for entry in files:
        if not (isinstance(entry, dict) and isinstance(entry.get("file"), str)
                and entry["file"] == os.path.basename(entry["file"]) and entry["file"]
                and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)
                and isinstance(entry.get("units"), list) and entry["units"]
                and all(isinstance(u, int) for u in entry["units"])):
            return f"a files entry is malformed: {json.dumps(entry)[:120]}"
    return None


def _check_stage_file(path: str, data: bytes, units: list[int]) -> None:
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"checkpoint file {path} holds objects other than tensors and plain "
                         f"containers; refused, since loading it could run code") from None
    except Exception as exc:
        raise ValueError(f"checkpoint file {path} is not a localpipe stage file "
                         f"({type(exc).__name__})") from None
    saved = state.get("units") if isinstance(state, dict) else None
    if not isinstance(saved, dict) or any(
            not isinstance(saved.get(u), dict) or not {"state", "optimizers", "meters"}
            <= saved[u].keys() for u in units):
        raise ValueError(f"checkpoint file {path} does not hold the state of units {units}")


def load_units(folder: str, manifest: dict, indices: list[int]) -> dict:
    """The saved state of the units ``indices``, whichever stage files they were saved in."""
    units, optimizer = {}, None
    for entry in manifest["files"]:
        if not set(entry["units"]) & set(indices):
            continue
        state = torch.load(os.path.join(folder, entry["file"]), map_location="cpu",
                           weights_only=True)
        units.update({i: s for i, s in state["units"].items() if i in indices})
        optimizer = optimizer or state["optimizer"]
    return {"units": units, "optimizer": optimizer}


@dataclass
class Start:
    """Where training begins: batch ``step`` of ``epoch`` (1-based), after ``steps`` batches in
    all, or (``evaluate``) with the evaluation of ``epoch``, whose training is over; from
    scratch, or from the checkpoint in ``folder``."""

    folder: str | None = None
    manifest: dict | None = None
    epoch: int = 1
    step: int = 0
    steps: int = 0
    evaluate: bool = False

    def restore(self, stage) -> None:
        if self.folder is not None:
            stage.load_checkpoint_state(load_units(self.folder, self.manifest, stage.indices))


class Finished(Exception):
    """--resume names a run that has trained every epoch asked for: nothing to do (not an
    error; the checkpoint in ``folder`` is where it ended, ``start`` its position)."""

    def __init__(self, message: str, folder: str, start: "Start | None" = None) -> None:
        super().__init__(message)
        self.folder, self.start = folder, start


def start_point(cfg, units: int) -> Start:
    """Resolve --resume (a checkpoint folder, a save dir, or "auto") into a Start for a network
    of ``units`` units; a checkpoint that cannot be continued is a ConfigError, raised before
    anything else is set up."""
    if not cfg.resume:
        return Start()
    try:
        folder = find_checkpoint(cfg.resume, cfg.save_dir)
        if folder is None:
            print(f"--resume auto: no checkpoint in {cfg.save_dir}; starting afresh",
                  flush=True)
            return Start()
        manifest = read_manifest(folder, cfg.to_dict())
        saved = sorted(u for entry in manifest["files"] for u in entry["units"])
        if saved != list(range(units)):
            raise ValueError(f"checkpoint {folder} holds units {saved}, not the {units} units "
                             f"of this network")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot resume: {exc}") from None
    if manifest["epoch"] > cfg.epochs:
        more = ("a cosine schedule spans the epochs it started with, so it cannot go on"
                if cfg.lr_schedule == "cosine" else "a larger --epochs goes on")
        raise Finished(f"nothing to do: {folder} has trained {manifest['epoch'] - 1} "
                       f"epoch(s) and --epochs is {cfg.epochs} ({more})",
                       folder, _start(folder, manifest))
    return resume_from(folder)


def resume_from(folder: str | None) -> Start:
    """The Start of a checkpoint already checked (by ``start_point``, perhaps on rank 0)."""
    if folder is None:
        return Start()
    with open(os.path.join(folder, "manifest.json")) as f:
        manifest = json.load(f)
    then = "its evaluation" if manifest["evaluate"] else f"batch {manifest['step']}"
    print(f"resuming from {folder}: epoch {manifest['epoch']}, {then}", flush=True)
    return _start(folder, manifest)


def _start(folder: str, manifest: dict) -> Start:
    return Start(folder, manifest, manifest["epoch"], manifest["step"], manifest["steps"],
                 manifest["evaluate"])
