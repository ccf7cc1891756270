"""Runners wire a data feed, K workers and a coordinator together.

``run_inprocess``: one thread per stage in this process, joined by bounded channels (each stage
on its own CUDA stream, or its own GPU when K are visible; plain threads on the CPU).
``run_distributed``: one process per stage under torchrun, joined by point-to-point sends
(NCCL on GPUs, gloo on the CPU). Both run the very same ``run_stage`` and report to the same
``Coordinator`` on rank 0, which writes metrics, manifests and ``model.pt``.
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import signal
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from pipeline import checkpoint
from pipeline.data import INFO, Batches, DatasetInfo, load_split
from pipeline.metrics import Recorder
from pipeline.transport import (Abort, Channel, DistReceiver, DistSender, Kind, Message,
                                StageFailed, depart)
from pipeline.worker import Fault, run_stage
from stages import partition
from stages.config import Config, ConfigError
from stages.models import UnitSpec, build_stage, plan


@dataclass
class Plan:
    """The network and its cut: what every process must agree on before training."""

    info: DatasetInfo
    specs: list[UnitSpec]
    parts: list[list[int]]  # unit indices of each stage
    costs: list[float] | None = None  # per unit, in seconds ("measured") or parameters
    cost_kind: str = "given"


def static_plan(cfg: Config) -> Plan:
    """The units, and the cut where nothing needs measuring (--balance, one stage; else no
    parts yet). Checks --stages and --balance against the network: cheap, before any setup."""
    info = INFO[cfg.dataset]
    specs = plan(cfg, info.shape, info.num_classes)
    partition.check_stages(len(specs), cfg.stages)
    if cfg.balance is not None:
        return Plan(info, specs, partition.split(cfg.balance, len(specs)))
    return Plan(info, specs, [list(range(len(specs)))] if cfg.stages == 1 else [])


def make_plan(cfg: Config, device: torch.device) -> Plan:
    """Plan the units and choose the cut: --balance if given, else the best one for each
    unit's measured step time, or for its parameter count where a full copy of the network
    cannot be trained on ``device`` (out of memory) to measure it."""
    static = static_plan(cfg)
    if static.parts:
        return static
    info = static.info
    try:
        throwaway = build_stage(cfg, info.shape, info.num_classes, device=device)
        costs = partition.measure_costs(throwaway, info.shape, info.num_classes, cfg)
        kind = "measured"
    except torch.OutOfMemoryError:
        with torch.device("meta"):
            costs = partition.parameter_costs(build_stage(cfg, info.shape, info.num_classes,
                                                          device="meta"))
        kind = "parameters"
    balance = partition.best_balance(costs, cfg.stages)
    return Plan(info, static.specs, partition.split(balance, len(costs)), costs, kind)


@dataclass
class Start:
    """Where training begins: batch ``step`` of ``epoch`` (1-based), after ``steps`` batches in
    all; from scratch, or from the checkpoint in ``folder``."""

    folder: str | None = None
    manifest: dict | None = None
    epoch: int = 1
    step: int = 0
    steps: int = 0

    def restore(self, stage) -> None:
        if self.folder is not None:
            stage.load_checkpoint_state(
                checkpoint.load_units(self.folder, self.manifest, stage.indices))


def start_point(cfg: Config) -> Start:
    """Resolve --resume (a checkpoint folder, a save dir, or "auto") into a Start."""
    if not cfg.resume:
        return Start()
    try:
        folder = checkpoint.find_checkpoint(cfg.resume, cfg.save_dir)
        if folder is None:
            return Start()
        manifest = checkpoint.read_manifest(folder, cfg.to_dict())
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot resume: {exc}") from None
    print(f"resuming from {folder}: epoch {manifest['epoch']}, batch {manifest['step']}",
          flush=True)
    return Start(folder, manifest, manifest["epoch"], manifest["step"], manifest["steps"])


class StopRequest:
    """Set by SIGINT/SIGTERM: the feed then checkpoints where it is and stops the run."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @contextlib.contextmanager
    def installed(self):
        """Handle SIGINT and SIGTERM inside the block; the previous handlers come back after."""
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT,
                                                                      signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _handle(self, signum, _frame) -> None:
        if self.signum is not None:  # a second signal: give up at once
            raise KeyboardInterrupt
        self.signum = signum
        print(f"localpipe: {signal.Signals(signum).name} received, saving a checkpoint and "
              f"stopping", file=sys.stderr, flush=True)


def seed_everything(seed: int) -> None:
    """Seed the global generators too, for anything outside the per-purpose streams."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def default_device(cfg: Config) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and not cfg.no_cuda
                                        and torch.cuda.is_available())
    return torch.device("cuda", 0) if use_cuda else torch.device("cpu")


def feed(cfg: Config, train: Batches, test: Batches, device: torch.device, start: Start,
         stop: StopRequest) -> Iterator[Message]:
    """Stage 0's input: each epoch's training batches, its test batches and END_EPOCH, with a
    CHECKPOINT marker every --checkpoint-every batches; then STOP.

    ``--max-steps`` ends training after that many batches, still closing with an evaluation.
    A stop request ends it at once, after a checkpoint."""
    from tqdm import tqdm

    steps = start.steps
    for epoch in range(start.epoch, cfg.epochs + 1):
        if cfg.max_steps and steps >= cfg.max_steps:
            break
        first = start.step if epoch == start.epoch else 0
        bar = tqdm(total=len(train), initial=first, desc=f"epoch {epoch}", leave=False,
                   disable=not cfg.progress_bar, file=sys.stderr)
        for step, (x, y) in enumerate(train.epoch(epoch, first), first):
            yield _to_device(Message(Kind.TRAIN, epoch, step, x, y), device)
            bar.update()
            steps += 1
            if stop.signum is not None:
                yield Message(Kind.CHECKPOINT, epoch, step + 1)
                yield Message(Kind.STOP, 0, 0)
                return
            if steps == cfg.max_steps:
                break
            if cfg.checkpoint_every and steps % cfg.checkpoint_every == 0 \
                    and step + 1 < len(train):  # an epoch's end checkpoints anyway
                yield Message(Kind.CHECKPOINT, epoch, step + 1)
        bar.close()
        fed = step + 1
        for step, (x, y) in enumerate(test.epoch(epoch)):
            yield _to_device(Message(Kind.EVAL, epoch, step, x, y), device)
        yield Message(Kind.END_EPOCH, epoch, fed)
    yield Message(Kind.STOP, 0, 0)


def _to_device(msg: Message, device: torch.device) -> Message:
    if device.type != "cuda":
        return msg
    msg.x = msg.x.pin_memory().to(device, non_blocking=True)
    msg.y = msg.y.pin_memory().to(device, non_blocking=True)
    return depart(msg)


class Coordinator:
    """Rank 0's bookkeeping: a metrics record per epoch, a manifest per checkpoint, ``model.pt``
    at the end. It takes stage reports in any order and acts once all K of a kind are in."""

    def __init__(self, cfg: Config, run_plan: Plan, train_batches: int) -> None:
        self.cfg, self.plan, self.train_batches = cfg, run_plan, train_batches
        self.save_dir = cfg.save_dir or None
        self.recorder = Recorder(self.save_dir, [s.describe() for s in run_plan.specs],
                                 cfg.backprop)
        self.pending: dict[tuple, list[dict]] = {}
        self.records: list[dict] = []
        self.state: dict | None = None

    def handle(self, report: dict) -> None:
        key = (report["kind"], report.get("epoch"), report.get("step"))
        got = self.pending.setdefault(key, [])
        got.append(report)
        if len(got) < len(self.plan.parts):
            return
        del self.pending[key]
        got.sort(key=lambda r: r["stage"])
        kind, epoch, step = key
        if kind == "end_epoch":
            self.records.append(self.recorder.epoch(epoch, self.cfg.lr_at(epoch), got))
            if step == self.train_batches:  # a whole epoch: go on with the next one
                epoch, step = epoch + 1, 0
        if kind != "final":
            if self.save_dir:  # every stage has saved its file: complete the checkpoint
                checkpoint.write_manifest(
                    self.save_dir, got[0]["steps"], (epoch, step), self.cfg.to_dict(),
                    [{"stage": r["stage"], "units": r["units"], **f} for r in got
                     for f in r["files"]], self.cfg.keep_checkpoints)
        else:
            self.state = {k: v for r in got for k, v in r["state"].items()}
            if self.save_dir:
                checkpoint.save_torch(self.state, os.path.join(self.save_dir, "model.pt"))


def prepare_save_dir(cfg: Config, start: Start) -> None:
    """Write args.json; start metrics.jsonl afresh unless resuming (then it is appended to)."""
    if not cfg.save_dir:
        return
    try:
        os.makedirs(cfg.save_dir, exist_ok=True)
        with open(os.path.join(cfg.save_dir, "args.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=1)
        open(os.path.join(cfg.save_dir, "metrics.jsonl"), "a" if start.folder else "w").close()
    except OSError as exc:
        raise ConfigError(f"cannot write to --save-dir {cfg.save_dir}: {exc.strerror}") from None


def load_batches(cfg: Config, info: DatasetInfo) -> tuple[Batches, Batches]:
    train = Batches(*load_split(cfg, True), info, cfg, train=True)
    test = Batches(*load_split(cfg, False), info, cfg, train=False)
    return train, test


def set_threads(cfg: Config, threads_per_process: int) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif threads_per_process:
        torch.set_num_threads(threads_per_process)


# ------------------------------------------------------------------------ in-process runner
def stage_devices(cfg: Config, first: torch.device) -> list[torch.device]:
    """One GPU per stage when K are visible, else every stage on the first device."""
    if first.type == "cuda" and torch.cuda.device_count() >= cfg.stages:
        return [torch.device("cuda", k) for k in range(cfg.stages)]
    return [first] * cfg.stages


def run_inprocess(cfg: Config, stop: StopRequest, fault: Fault | None = None) -> Coordinator:
    """Train with every stage as a thread of this process; raise StageFailed if one fails."""
    seed_everything(cfg.seed)
    device = default_device(cfg)
    if device.type == "cpu":  # OpenMP gives every stage thread its own team: share the cores
        set_threads(cfg, max(1, (os.cpu_count() or 1) // cfg.stages))
    start = start_point(cfg)
    run_plan = make_plan(cfg, device)
    prepare_save_dir(cfg, start)
    train, test = load_batches(cfg, run_plan.info)
    devices = stage_devices(cfg, device)
    info = run_plan.info
    stages = [build_stage(cfg, info.shape, info.num_classes, part, dev)
              for part, dev in zip(run_plan.parts, devices)]
    for stage in stages:
        start.restore(stage)
    coordinator = Coordinator(cfg, run_plan, len(train))
    run_threads(cfg, stages, devices, feed(cfg, train, test, devices[0], start, stop),
                coordinator.handle, fault, start.steps)
    return coordinator


def run_threads(cfg: Config, stages: list, devices: list[torch.device],
                messages: Iterator[Message], on_report: Callable[[dict], None],
                fault: Fault | None = None, steps: int = 0) -> None:
    """Serve ``messages`` through the stages, one thread each, until STOP has passed every
    stage. ``on_report`` gets every stage report, in this thread; StageFailed is raised here
    when any stage (or ``on_report``) fails."""
    abort = Abort()
    channels = [Channel(cfg.queue_depth, abort, cfg.comm_timeout, f"stage {k}'s input queue")
                for k in range(len(stages))]
    reports: queue.Queue[dict] = queue.Queue()

    def guarded(k: int, body) -> None:
        try:
            if devices[k].type == "cuda":
                with torch.cuda.device(devices[k]), torch.cuda.stream(
                        torch.cuda.Stream(devices[k])):
                    body()
            else:
                body()
        except StageFailed:
            pass  # another stage failed first; it is the one reported
        except Exception as exc:
            abort.fail(StageFailed(k, f"{type(exc).__name__}: {exc}"))

    def feeder() -> None:
        for msg in messages:
            channels[0].put(msg, timeout=None)

    def worker(k: int) -> None:
        outbox = channels[k + 1] if k + 1 < len(stages) else None
        run_stage(stages[k], k, channels[k], outbox, reports.put, devices[k], cfg.save_dir,
                  fault, steps)

    threads = [threading.Thread(target=guarded, args=(0, feeder), name="feed", daemon=True)]
    threads += [threading.Thread(target=guarded, args=(k, lambda k=k: worker(k)),
                                 name=f"stage-{k}", daemon=True) for k in range(len(stages))]
    for t in threads:
        t.start()
    finals = 0
    while finals < len(stages):
        abort.check()
        try:
            report = reports.get(timeout=0.1)
        except queue.Empty:
            continue
        try:
            on_report(report)
        except Exception as exc:  # writing metrics or checkpoints failed: stop every stage
            abort.fail(StageFailed(0, f"{type(exc).__name__}: {exc}"))
            raise
        finals += report["kind"] == "final"
    for t in threads:
        t.join(timeout=cfg.comm_timeout)


# ------------------------------------------------------------------------ multi-process runner
def run_distributed(cfg: Config, stop: StopRequest,
                    fault: Fault | None = None) -> Coordinator | None:
    """Train as rank RANK of WORLD_SIZE == --stages processes started by torchrun.

    Any failure in this process prints which stage failed and ends the process at once; the
    neighbours then lose their links and torchrun stops the rest, so no stage waits forever.
    """
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != cfg.stages:
        raise ConfigError(f"torchrun started {world} processes but --stages is {cfg.stages}; "
                          f"use --nproc-per-node {cfg.stages} (or one process for the "
                          f"in-process runner)")
    seed_everything(cfg.seed)
    use_cuda = default_device(cfg).type == "cuda"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda \
        else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    set_threads(cfg, 0)
    static_plan(cfg)  # a bad --stages or --balance fails here, before any process group
    start = start_point(cfg)
    if rank == 0:
        prepare_save_dir(cfg, start)
        train, test = load_batches(cfg, INFO[cfg.dataset])
    timeout = timedelta(seconds=cfg.comm_timeout)
    # torchrun keeps its store across --max-restarts: without a prefix of its own, a restarted
    # worker can read a dead worker's address from the last attempt and fail to connect.
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout,
                            store=dist.PrefixStore(f"localpipe/attempt-{attempt}", store),
                            rank=rank, world_size=world, device_id=device if use_cuda else None)

    def die(reason: str, verb: str = "failed") -> None:
        print(f"localpipe: stage {rank} {verb}: {reason}", file=sys.stderr, flush=True)
        os._exit(1)

    def lost_link(reason: str) -> None:
        die(reason, "stopped")

    try:
        links = [dist.new_group([k, k + 1]) for k in range(world - 1)]
        shared = [make_plan(cfg, device) if rank == 0 else None]
        dist.broadcast_object_list(shared, src=0)
        run_plan: Plan = shared[0]
        info = run_plan.info
        stage = build_stage(cfg, info.shape, info.num_classes, run_plan.parts[rank], device)
        start.restore(stage)
        coordinator = Coordinator(cfg, run_plan, len(train)) if rank == 0 else None
        messages = feed(cfg, train, test, device, start, stop) if rank == 0 else None
        serve_rank(cfg, stage, device, links, messages,
                   coordinator.handle if coordinator else None, lost_link, fault, start.steps)
        dist.destroy_process_group()
        return coordinator
    except Exception as exc:
        die(f"{type(exc).__name__}: {exc}")


def serve_rank(cfg: Config, stage, device: torch.device, links: list, messages,
               on_report: Callable[[dict], None] | None, on_link_error: Callable[[str], None],
               fault: Fault | None = None, steps: int = 0) -> None:
    """Run this rank's stage under torch.distributed until STOP: rank 0 serves ``messages``,
    the others receive from the rank before; every stage report is gathered to rank 0 and
    handed to ``on_report`` there. ``links[k]`` is the process group of ranks k and k+1."""
    rank, world = dist.get_rank(), dist.get_world_size()
    abort = Abort()
    inbox = Channel(cfg.queue_depth, abort, cfg.comm_timeout, f"stage {rank}'s input queue")
    if rank == 0:
        threading.Thread(target=lambda: [inbox.put(m, timeout=None) for m in messages],
                         name="feed", daemon=True).start()
    else:
        DistReceiver(inbox, links[rank - 1], rank - 1, device, on_link_error).start()
    outbox, sender = None, None
    if rank < world - 1:
        outbox = Channel(cfg.queue_depth, abort, cfg.comm_timeout, f"stage {rank}'s output queue")
        sender = DistSender(outbox, links[rank], rank + 1, device, on_link_error)
        sender.start()

    def report(r: dict) -> None:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(r, gathered, dst=0)
        if rank == 0 and on_report is not None:
            for item in gathered:
                on_report(item)

    run_stage(stage, rank, inbox, outbox, report, device, cfg.save_dir, fault, steps)
    if sender is not None:
        sender.join(timeout=cfg.comm_timeout)
