"""The run folder: where a run writes, and the rules that keep two runs from mixing.

Without --save-dir a run gets a folder of its own, ``runs/<dataset>-<model>-<loss>-<time>``, and
``runs/latest`` points to the newest; --save-dir names the folder itself ('' saves nothing).
A folder that already holds a run is refused unless the run resumes (``--resume auto``), so a
second run never overwrites a first. Rank 0 holds a lock in the folder while it writes there;
a lock left by a process that no longer runs on this host is taken over with a notice. Nothing
is written before every check has passed: ``claim`` is the first write of a run.
"""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time

from pipeline import checkpoint
from pipeline.files import WriteError, atomic_write
from pipeline.console import say
from pipeline.control import host_id, process_alive
from stages.config import Config, ConfigError

ROOT = "runs"
LOCK = "run.lock"
RECORDS = ("args.json", "metrics.jsonl", "checkpoints", "model.pt")


def default_name(cfg: Config) -> str:
    loss = "backprop" if cfg.backprop else cfg.loss_sup + ("-bio" if cfg.bio else "")
    return f"{cfg.dataset}-{cfg.model}-{loss}-{time.strftime('%Y%m%d-%H%M%S')}"


def choose(cfg: Config, earlier: str | None = None) -> str:
    """The folder of this run ('' when nothing is saved). Without --save-dir: ``earlier`` (the
    folder an earlier attempt of this torchrun job chose), else a new folder under runs/, or
    with --resume auto the one runs/latest points to."""
    if cfg.save_dir is not None:  # runs/latest means the run it points to
        folder = cfg.save_dir
        return os.path.join(os.path.dirname(folder), os.readlink(folder)) \
            if os.path.islink(folder) else folder
    if earlier:
        return earlier
    latest = os.path.join(ROOT, "latest")
    if cfg.resume == "auto" and os.path.isdir(latest):
        return os.path.join(ROOT, os.readlink(latest))
    return os.path.join(ROOT, default_name(cfg))


def check(folder: str, resuming: bool) -> None:
    """Refuse a folder that holds another run (unless resuming it) or that a live process of
    another job is writing (its lock). Writes nothing."""
    if not folder:
        return
    held = [name for name in RECORDS if os.path.exists(os.path.join(folder, name))]
    if held and not resuming:
        raise ConfigError(f"--save-dir {folder} already holds a run ({', '.join(held)}); add "
                          f"--resume auto to continue it, or choose another --save-dir")
    owner = lock_owner(folder)
    if owner is not None and _running(owner):
        raise ConfigError(f"--save-dir {folder} is in use by process {owner['pid']} on "
                          f"{owner['host'].split('/')[0]} since {owner['since']}; wait for it "
                          f"or choose another --save-dir")


def lock_owner(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, LOCK)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _running(owner: dict) -> bool:
    """Whether a lock's owner may still run: certainly not if it was on this host and is gone."""
    return owner.get("host") != host_id() or process_alive(int(owner.get("pid", 0)))


def claim(folder: str, cfg: Config, start: checkpoint.Start) -> None:
    """Take the folder for this run, after every check passed: the lock (taking over a dead
    process's, with a notice), args.json, metrics.jsonl and steps.jsonl (on resume, the records
    of what the checkpoint holds; a fresh run starts them empty); runs/latest if it is under
    runs/."""
    if not folder:
        return
    try:
        os.makedirs(folder, exist_ok=True)
        owner = lock_owner(folder)
        if owner is not None:
            say(f"taking over the lock of process {owner['pid']} on "
                f"{owner['host'].split('/')[0]}, which no longer runs")
        me = {"host": host_id(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write(os.path.join(folder, LOCK),
                                lambda f: f.write(json.dumps(me).encode()))
        atomic_write(os.path.join(folder, "args.json"),
                                lambda f: f.write(json.dumps(cfg.to_dict(), indent=1).encode()))
        for name, kept in (("metrics.jsonl", lambda r: r.get("epoch", 0) < start.epoch),
                           ("steps.jsonl", lambda r: r.get("steps", 0) <= start.steps)):
            records = [r for r in _records(folder, name) if start.folder and kept(r)]
            atomic_write(os.path.join(folder, name), lambda f: f.write(
                "".join(json.dumps(r) + "\n" for r in records).encode()))
        if os.path.dirname(os.path.normpath(folder)) == ROOT:
            _point_latest(folder)
    except (OSError, WriteError) as exc:
        raise ConfigError(f"cannot write to --save-dir {folder}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None


def release(folder: str) -> None:
    """Give the folder's lock back (the run is over, finished or stopped)."""
    if folder:
        try:
            os.unlink(os.path.join(folder, LOCK))
        except OSError:
            pass


def _records(folder: str, name: str) -> list[dict]:
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _point_latest(folder: str) -> None:
    root = os.path.dirname(folder)
    tmp = os.path.join(root, f".latest-{os.getpid()}")
    os.symlink(os.path.basename(folder), tmp)
    os.replace(tmp, os.path.join(root, "latest"))


def write_provenance(folder: str, devices: list[str], parts: list[list[int]]) -> None:
    """``provenance.json`` beside ``args.json``: what made this run."""
    if folder:
        text = json.dumps(provenance(devices, parts), indent=1)
        atomic_write(os.path.join(folder, "provenance.json"),
                                lambda f: f.write(text.encode()))


def provenance(devices: list[str], parts: list[list[int]]) -> dict:
    """What made this run: the command, the code's commit, the package versions, the devices
    and the stage topology."""
    import numpy
    import torch
    import torchvision

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", here, "status", "--porcelain"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"command": [sys.executable, *sys.argv], "cwd": os.getcwd(),
            "git_commit": commit, "git_dirty": dirty, "host": socket.gethostname(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": numpy.__version__,
            "cuda": torch.version.cuda, "devices": devices,
            "gpus": [torch.cuda.get_device_name(k) for k in range(torch.cuda.device_count())],
            "world_size": int(os.environ.get("WORLD_SIZE", 1)), "stages": parts,
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
