"""The in-process runner: K stages as threads of one process, joined by bounded channels.

On a GPU each stage computes on a CUDA stream of its own (neighbouring stages share a GPU when
there are fewer GPUs than stages); on the CPU the cores are shared out between the stage
threads. The main thread hands stage reports to the coordinator and stops every thread when
one fails.
"""
from __future__ import annotations

import os
import queue
import threading
from typing import Callable, Iterator

import torch

from localpipe.pipeline import device as dev
from localpipe.pipeline import process
from localpipe.pipeline.channel import Abort, Channel, StageFailed
from localpipe.pipeline import runs
from localpipe.pipeline.coordinator import Coordinator
from localpipe.pipeline.data import load_batches
from localpipe.pipeline.distributed import rendezvous_store
from localpipe.pipeline.feed import feed
from localpipe.pipeline.memory import DeviceMemory
from localpipe.pipeline.message import Message
from localpipe.pipeline import faults
from localpipe.pipeline.lifecycle import Data, build, hooked, prepare
from localpipe.pipeline.plan import network_of, static_plan
from localpipe.pipeline.signals import StopRequest
from localpipe.pipeline.worker import Watchdog, run_stage, watched
from localpipe.stages.config import Config, ConfigError
from localpipe.stages.network import Network


def run_inprocess(cfg: Config, stop: StopRequest, network: Network | None = None,
                  data: Data = load_batches) -> Coordinator:
    """Train with every stage as a thread of this process; raise StageFailed if one fails.
    Every check (options, checkpoint, data, the save folder) passes before the first write.
    ``network`` and ``data``: the paper's ``cfg.model`` and ``cfg.dataset`` unless given."""
    if cfg.replicas > 1:
        raise ConfigError(f"--replicas {cfg.replicas} needs a process per stage and replica: "
                          f"torchrun --nproc-per-node {cfg.stages * cfg.replicas} "
                          f"launch/pipeline.py ... (on several nodes, K·R processes in all)")
    try:
        first = dev.choose(cfg.device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    network = network or network_of(cfg)
    static = static_plan(cfg, network)  # bad options fail before any setup
    store = rendezvous_store(cfg) if "TORCHELASTIC_RUN_ID" in os.environ else None
    process.configure(cfg, 0 if dev.is_cuda(first) else
                      max(1, (os.cpu_count() or 1) // cfg.stages))  # OpenMP team per thread
    devices = dev.stage_devices(cfg.stages, first)
    own = dev.is_cuda(first) and len(set(map(str, devices))) == cfg.stages
    ready = prepare(cfg, network, static, data, first, own, store)
    fault = faults.injected()
    cfg, start, run_plan, (train, test, val) = ready.cfg, ready.start, ready.plan, ready.batches
    try:
        runs.write_provenance(cfg.save_dir, [str(d) for d in devices], run_plan.parts)
        stages = [build(ready, network, k, d, fault) for k, d in enumerate(devices)]
        coordinator = Coordinator(cfg, run_plan, train)
        try:
            messages = feed(cfg, train, test, val, devices[0], start, stop)
            run_threads(cfg, stages, devices, hooked(messages, ready, fault, stop),
                        coordinator.handle, start.steps)
        finally:
            coordinator.records.close()
    finally:
        runs.release(cfg.save_dir)
    return coordinator


def run_threads(cfg: Config, stages: list, devices: list[torch.device],
                messages: Iterator[Message], on_report: Callable[[dict], None],
                steps: int = 0) -> None:
    """Serve ``messages`` through the stages, one thread each, until STOP has passed every
    stage. ``on_report`` gets every stage report, in this thread; StageFailed is raised here
    when any stage (or ``on_report``) fails, or when a stage spends more than --comm-timeout
    seconds on one message (stuck in a device wait, say)."""
    abort = Abort()
    channels = [Channel(cfg.queue_depth, abort, f"stage {k}'s input queue")
                for k in range(len(stages))]
    reports: queue.Queue[dict] = queue.Queue()
    memory = DeviceMemory(devices)
    watchdog = Watchdog(cfg.comm_timeout)

    def guarded(k: int, body: Callable[[], None], label: str = "") -> None:
        process.pin_thread()
        try:
            with dev.use(devices[k], dev.new_stream(devices[k])):
                body()
        except StageFailed:
            pass  # another stage failed first; it is the one reported
        except Exception as exc:
            abort.fail(StageFailed(k, f"{label}{type(exc).__name__}: {exc}"))

    def feeder() -> None:
        for msg in watched(messages, watchdog):
            channels[0].put(msg)

    def worker(k: int) -> None:
        outbox = channels[k + 1] if k + 1 < len(stages) else None
        run_stage(stages[k], k, channels[k], outbox, reports.put, devices[k], cfg,
                  steps, memory, watchdog)

    threads = [threading.Thread(target=guarded, args=(0, feeder, "the data feed: "), name="feed",
                                daemon=True)]
    threads += [threading.Thread(target=guarded, args=(k, lambda k=k: worker(k)),
                                 name=f"stage-{k}", daemon=True) for k in range(len(stages))]
    for t in threads:
        t.start()
    finals = 0
    while finals < len(stages):
        abort.check()
        if (failure := watchdog.stuck()) is not None:
            abort.fail(failure)
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

