"""The run folder: where a run writes, and the rules that keep two runs from mixing.

Without --save-dir a run gets a folder of its own, ``runs/<dataset>-<model>-<loss>-<time>``, and
``runs/latest`` points to the newest; --save-dir names the folder itself ('' saves nothing).
A folder that already holds a run is refused unless the run resumes (``--resume auto``), so a
second run never overwrites a first. Rank 0 holds a lock in the folder while it writes there;
a lock left by a process that no longer runs on this host, or by an earlier attempt of the same
torchrun job, is taken over with a notice. A torchrun job keeps its folder in the rendezvous
store, so that its restarts write where its first attempt did. Nothing is written before every
check has passed: ``claim`` is the first write of a run.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time

from localpipe.pipeline import checkpoint
from localpipe.pipeline.files import WriteError, atomic_write
from localpipe.pipeline.console import say
from localpipe.pipeline.control import boot_id, host_id, process_alive, start_time
from localpipe.stages.config import Config, ConfigError

ROOT = "runs"
LOCK = "run.lock"
FOLDER_KEY = "localpipe/run-folder"  # a torchrun job's folder, in its rendezvous store
RECORDS = ("args.json", "metrics.jsonl", "checkpoints", "model.pt")


def default_name(cfg: Config) -> str:
    loss = "backprop" if cfg.backprop else cfg.loss_sup + ("-bio" if cfg.bio else "")
    return f"{cfg.dataset}-{cfg.model}-{loss}-{time.strftime('%Y%m%d-%H%M%S')}"


def choose(cfg: Config, earlier: str | None = None) -> str:
    """The folder of this run ('' when nothing is saved): --save-dir (runs/latest means the
    run it points to), else ``earlier`` (the folder this torchrun job chose on an earlier
    attempt), else a new one under runs/, whose name ``claim`` may still change."""
    if cfg.save_dir is not None:
        folder = cfg.save_dir
        return os.path.join(os.path.dirname(folder), os.readlink(folder)) \
            if os.path.islink(folder) else folder
    return earlier or os.path.join(ROOT, default_name(cfg))


def check(folder: str, resuming: bool, checkpoint_folder: str | None = None,
          force: bool = False) -> None:
    """Refuse a folder that holds another run (unless resuming it, from its own checkpoint)
    or that a process of another job may still be writing (its lock; ``force``: taken over
    all the same). Writes nothing."""
    if not folder:
        return
    _check_records(folder, resuming, checkpoint_folder)
    _refuse_live_owner(folder, force)


def _refuse_live_owner(folder: str, force: bool = False) -> dict | None:
    """The owner of ``folder``'s lock (None if there is none); refused if it may still run,
    unless ``force``."""
    owner = lock_owner(folder)
    running = None if owner is None else _running(owner)
    if owner is None or force or running is False:
        return owner
    host = owner.get("host", "?").split("/")[0]
    if running:
        raise ConfigError(f"--save-dir {folder} is in use by process {owner.get('pid')} on "
                          f"{host} since {owner.get('since')}; wait for it or choose another "
                          f"--save-dir")
    raise ConfigError(f"--save-dir {folder} is locked by process {owner.get('pid')} on {host} "
                      f"since {owner.get('since')}, which this machine cannot see (another "
                      f"host, or another container); if that run is over, take the lock over "
                      f"with --force-unlock (were it still running, the two runs would mix "
                      f"their files)")


def _check_records(folder: str, resuming: bool, checkpoint_folder: str | None = None) -> None:
    """A run's records may only be continued by that run: a checkpoint of another run
    (outside ``folder``) would mix two runs in one folder."""
    held = [name for name in RECORDS if os.path.exists(os.path.join(folder, name))]
    if held and not resuming:
        raise ConfigError(f"--save-dir {folder} already holds a run ({', '.join(held)}); add "
                          f"--resume auto to continue it, or choose another --save-dir")
    if held and checkpoint_folder and not _inside(checkpoint_folder, folder):
        raise ConfigError(f"--save-dir {folder} holds a run of its own and --resume "
                          f"{checkpoint_folder} is another run's checkpoint; continue that run "
                          f"in its own folder, or start from it in a new --save-dir")


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def lock_owner(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, LOCK)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _running(owner: dict) -> bool | None:
    """Whether a lock's owner still runs: False when provably not (an earlier attempt of this
    very torchrun job; on this host and PID namespace, its process gone or its pid taken by a
    later one; on this machine before its last boot), True when it does, None when this
    process cannot tell (another host or PID namespace of the same boot)."""
    job = os.environ.get("TORCHELASTIC_RUN_ID")
    if job and owner.get("job") == job:
        return False
    same_machine = owner.get("host", "").split("/")[0] == socket.gethostname()
    if same_machine and owner.get("boot") and owner.get("boot") != boot_id():
        return False
    if owner.get("host") != host_id():
        return None
    pid = int(owner.get("pid", 0))
    started = owner.get("start")
    return process_alive(pid) and (started is None or start_time(pid) == started)


def claim(folder: str, cfg: Config, start: checkpoint.Start, new: bool) -> str:
    """Take the folder for this run, after every check passed, and return it. A ``new``
    folder (a default name) is created exclusively, with a suffix if another run took the name
    meanwhile; the lock is created exclusively too (a dead process's is taken over, with a
    notice), and the folder checked again under it. Then args.json, metrics.jsonl and
    steps.jsonl (on resume, the records of what the checkpoint holds; a fresh run starts them
    empty), and runs/latest if the folder is under runs/."""
    if not folder:
        return folder
    try:
        folder = _create(folder) if new else folder
        os.makedirs(folder, exist_ok=True)
        _lock(folder, cfg.force_unlock)
    except OSError as exc:
        raise ConfigError(f"cannot write to --save-dir {folder}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    try:
        _check_records(folder, bool(cfg.resume), start.folder)  # again, now that it is ours
        _branch(folder, start)
        _unfinish(folder, start)
        for name, kept in (("metrics.jsonl", lambda r: r.get("epoch", 0) < start.epoch),
                           ("steps.jsonl", lambda r: r.get("steps", 0) <= start.steps)):
            records = [r for r in _records(folder, name) if start.folder and kept(r)]
            atomic_write(os.path.join(folder, name), lambda f: f.write(
                "".join(json.dumps(r) + "\n" for r in records).encode()))
        args = json.dumps({**cfg.to_dict(), "save_dir": folder}, indent=1)
        atomic_write(os.path.join(folder, "args.json"), lambda f: f.write(args.encode()))
        if os.path.dirname(os.path.normpath(folder)) == ROOT:
            _point_latest(folder)
    except BaseException as exc:
        release(folder)
        if isinstance(exc, WriteError):
            raise ConfigError(f"cannot write to --save-dir {folder}: {exc}") from None
        raise
    return folder


def _branch(folder: str, start: checkpoint.Start) -> None:
    """Resuming an older checkpoint of this very folder (going back) starts a new branch of
    its history. The later checkpoints, ``model.pt``, the curves, the TensorBoard events and the
    whole records belong to the abandoned branch: they are moved (records copied, to be cut at
    the branch point) to ``abandoned/<time>/``, so that the new branch's checkpoint rotation
    never takes them for newer ones and deletes its own, ``--resume auto`` never continues the
    abandoned branch, and neither curves.png nor TensorBoard shows its future (the sidecar
    draws and writes them again from the cut records)."""
    root = os.path.join(folder, "checkpoints")
    if not start.folder or os.path.realpath(os.path.dirname(start.folder)) \
            != os.path.realpath(root):
        return
    mine = checkpoint.age(os.path.basename(start.folder))
    later = sorted(n for n in os.listdir(root) if checkpoint.age(n) > mine
                   and os.path.exists(os.path.join(root, n, "manifest.json")))
    if not later:
        return
    aside = os.path.join(folder, "abandoned", time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(os.path.join(aside, "checkpoints"))
    for name in later:
        os.rename(os.path.join(root, name), os.path.join(aside, "checkpoints", name))
    for name in ("metrics.jsonl", "steps.jsonl", "model.pt", "curves.png", "tensorboard"):
        if os.path.lexists(os.path.join(folder, name)):
            (shutil.copy2 if name.endswith(".jsonl") else os.rename)(
                os.path.join(folder, name), os.path.join(aside, name))
    say(f"going back to {start.folder}: a new branch of this run; the {len(later)} later "
        f"checkpoint(s), their records, curves and model.pt are kept in {aside}")


def _unfinish(folder: str, start: checkpoint.Start) -> None:
    """A finished run continued (more epochs) is no longer finished: its ``model.pt``, the
    model at the end of the epochs it had, is renamed for that epoch, so that nothing (the
    evaluation, ``lp.load``) takes it for the continued run's, which writes its own when it
    finishes and leaves checkpoints while it runs."""
    model = os.path.join(folder, "model.pt")
    if not start.folder or not os.path.exists(model):
        return
    # where it finished: after a whole epoch, or inside one where --max-steps ended it
    name, when = ((f"model-epoch{start.epoch - 1}.pt", f"after epoch {start.epoch - 1}")
                  if start.step == 0 and not start.evaluate else
                  (f"model-epoch{start.epoch}-step{start.step}.pt",
                   f"after batch {start.step} of epoch {start.epoch}"))
    kept = os.path.join(folder, name)
    os.replace(model, kept)
    say(f"continuing a finished run: its model.pt ({when}) is now {kept}")


def _create(folder: str) -> str:
    """Make a new run folder, adding -2, -3, ... to a name another run has taken."""
    os.makedirs(os.path.dirname(folder) or ".", exist_ok=True)
    for n in range(1, 1000):
        name = folder if n == 1 else f"{folder}-{n}"
        try:
            os.mkdir(name)
            return name
        except FileExistsError:
            continue
    raise ConfigError(f"cannot find a free name for a run folder like {folder}")


def _lock(folder: str, force: bool = False) -> None:
    """Create the lock exclusively; a lock whose owner no longer runs (or, with ``force``,
    any) is moved aside first (by one taker only: a rename succeeds once). The lock says who
    holds it, so that a later start can prove it dead: host and PID namespace, boot, pid and
    the process's start time."""
    path = os.path.join(folder, LOCK)
    me = json.dumps({"host": host_id(), "boot": boot_id(), "pid": os.getpid(),
                     "start": start_time(os.getpid()),
                     "job": os.environ.get("TORCHELASTIC_RUN_ID"),
                     "since": time.strftime("%Y-%m-%d %H:%M:%S")})
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _refuse_live_owner(folder, force)
            try:
                os.rename(path, f"{path}.stale-{os.getpid()}")
            except FileNotFoundError:
                continue  # another taker moved it first
            os.unlink(f"{path}.stale-{os.getpid()}")
            if owner is not None:
                why = "as --force-unlock says" if force and _running(owner) is not False \
                    else "which no longer runs"
                say(f"taking over the lock of process {owner.get('pid')} on "
                    f"{owner.get('host', '?').split('/')[0]}, {why}")
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return
    raise ConfigError(f"cannot take the lock of --save-dir {folder}")


def job_folder(store) -> str | None:
    """The folder an earlier attempt of this torchrun job chose (``store``: the job's
    rendezvous store, which lives as long as the job; None outside torchrun)."""
    return store.get(FOLDER_KEY).decode() if store is not None and store.check([FOLDER_KEY]) \
        else None


def remember(store, folder: str) -> None:
    if store is not None:
        store.set(FOLDER_KEY, folder)


def release(folder: str) -> None:
    """Give the folder's lock back (the run is over, finished or stopped)."""
    if folder:
        try:
            os.unlink(os.path.join(folder, LOCK))
        except OSError:
            pass


def _records(folder: str, name: str) -> list[dict]:
    """The records of a JSON-lines file; a line cut short (a full disk, a kill) is left out."""
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                say(f"leaving out an unreadable line of {path}")
    return out


def _point_latest(folder: str) -> None:
    root = os.path.dirname(folder)
    latest = os.path.join(root, "latest")
    if os.path.lexists(latest) and not os.path.islink(latest):
        say(f"{latest} is not the link localpipe keeps there; left as it is")
        return
    tmp = os.path.join(root, f".latest-{os.getpid()}")
    os.symlink(os.path.basename(folder), tmp)
    os.replace(tmp, latest)


def write_provenance(folder: str, devices: list[str], parts: list[list[int]]) -> None:
    """``provenance.json`` beside ``args.json``: what made this run."""
    if folder:
        text = json.dumps(provenance(devices, parts), indent=1)
        atomic_write(os.path.join(folder, "provenance.json"),
                                lambda f: f.write(text.encode()))


def git_state() -> tuple[str | None, bool | None]:
    """The checkout's commit and whether its files differ from it (None and None where git
    cannot run; the commit None outside a repository: an installed wheel, a copy of files)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", here, "status", "--porcelain"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, dirty


def provenance(devices: list[str], parts: list[list[int]]) -> dict:
    """What made this run: the command, the code's commit, the package versions, the devices,
    the float32 precision of GPU matmuls and convolutions, and the stage topology."""
    import numpy
    import torch
    import torchvision

    from localpipe.pipeline import device as dev
    from localpipe.pipeline import process

    commit, dirty = git_state()
    return {"command": [sys.executable, *sys.argv], "cwd": os.getcwd(),
            "git_commit": commit, "git_dirty": dirty, "host": socket.gethostname(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": numpy.__version__,
            **dev.gpus(), "matmul_precision": process.precision(), "devices": devices,
            "world_size": int(os.environ.get("WORLD_SIZE", 1)), "stages": parts,
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
