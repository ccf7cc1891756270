"""The torchrun runner: one process per stage and replica, wired by the transport and the
control plane.

Setup checks everything it can before any process group exists, so bad input exits with code 2
on every rank. Then: the rendezvous, the default gloo group, the control plane, the link
groups, the plan (rank 0 measures and broadcasts it), the stage. From then on a failure
anywhere is published on the control plane, and every rank exits within seconds naming it.

Ranks share a GPU when two of them hold the same one (by its UUID, which every rank reports
through the store before any group exists); NCCL refuses two ranks on one GPU, so payloads then
travel through pinned host memory over gloo.
"""
from __future__ import annotations

import dataclasses
import json
import os
import queue
import threading
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Callable, Iterator, NoReturn

import torch
import torch.distributed as dist

from localpipe.pipeline import device as dev
from localpipe.pipeline import process, runs, topology
from localpipe.pipeline.channel import Abort, Channel
from localpipe.pipeline.checkpoint import Finished, resume_from
from localpipe.pipeline.control import LONG, ControlPlane, Failure, ReportReceiver, ReportSender
from localpipe.pipeline.console import say
from localpipe.pipeline.coordinator import Coordinator
from localpipe.pipeline.data import DataError, load_batches
from localpipe.pipeline.feed import feed
from localpipe.pipeline.message import Message
from localpipe.pipeline import faults
from localpipe.pipeline.lifecycle import Data, Prepared, build, hooked, prepare
from localpipe.pipeline.plan import Plan, network_of, static_plan
from localpipe.pipeline.signals import StopRequest
from localpipe.pipeline.transport import Receiver, Sender
from localpipe.pipeline.worker import Watchdog, run_stage, watched
from localpipe.stages.config import Config, ConfigError
from localpipe.stages.network import Network
from localpipe.stages.stage import Stage


@dataclass
class Rank:
    """One process of the job, joined to the others: what serving a stage needs."""

    cfg: Config
    topo: topology.Topology
    device: torch.device
    control: ControlPlane
    links: topology.Wiring
    ending: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def name(self) -> str:
        return self.topo.name(self.topo.rank)

    def exit(self, failure: Failure) -> NoReturn:
        """Name what stopped the run and end this process at once (blocked threads and all).
        The first caller does: the main thread and the control plane's monitor may both find
        the same failure, and a second line would repeat it; later callers wait for the end."""
        self.ending.acquire()  # never released: os._exit follows
        own = failure.who == self.name
        try:
            say(str(failure) if own else f"{self.name} stopped: {failure}")
        finally:  # a line that cannot be written must not keep the process alive
            os._exit(1)

    def fail(self, reason: str) -> NoReturn:
        """This rank failed: publish it (unless another failure came first), then exit."""
        self.exit(self.control.publish(Failure(self.name, "failed", reason)))

    def lost_link(self, peer: int | None, exc: BaseException) -> NoReturn:
        self.exit(self.control.blame_link(peer, exc))


def run_distributed(cfg: Config, stop: StopRequest, network: Network | None = None,
                    data: Data = load_batches,
                    gather: Callable[[dict, list[dict]], None] | None = None
                    ) -> Coordinator | None:
    """Train as rank RANK of WORLD_SIZE == --stages × --replicas processes started by
    torchrun. ``network`` and ``data``: the paper's ``cfg.model`` and ``cfg.dataset`` unless
    given. ``gather``, where given, gets the whole trained network's state (every stage's
    ``state_dict``, on the CPU) and the epoch records in every process before the job's
    process group ends."""
    world = int(os.environ["WORLD_SIZE"])
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} is set but {', '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not: start the run with "
                          f"torchrun, or unset WORLD_SIZE for one process")
    rank = int(os.environ["RANK"])
    needed = cfg.stages * cfg.replicas
    if world != needed and cfg.replicas == 1:
        raise ConfigError(f"torchrun started {world} processes but --stages is {cfg.stages}; "
                          f"use --nproc-per-node {cfg.stages} (or one process for the "
                          f"in-process runner)")
    if world != needed:
        raise ConfigError(f"torchrun started {world} processes but --stages {cfg.stages} × "
                          f"--replicas {cfg.replicas} needs {needed}; use --nproc-per-node "
                          f"{needed} on one node, or {needed} processes over the nodes")
    try:
        kind = dev.choose(cfg.device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    network = network or network_of(cfg)
    static = static_plan(cfg, network)  # bad options fail here, on every rank
    process.configure(cfg)
    device = dev.rank_device(kind, int(os.environ.get("LOCAL_RANK", 0)))
    store = rendezvous_store(cfg)
    number = attempt_number(store, rank)
    topo = topology.Topology(rank, cfg.stages, cfg.replicas)
    notice = sharing(rank_gpus(attempt(store, number), topo, device))
    shared = notice is not None
    # only now: binding makes a CUDA context (cudaSetDevice does since CUDA 12), and a GPU in
    # EXCLUSIVE_PROCESS mode would refuse a second one before ``sharing`` could say why
    dev.bind(device)
    ready = verdict(cfg, store, topo, number, network, static, data, device,
                    own_devices=dev.is_cuda(device) and not shared)  # a GPU for every stage
    cfg, start, run_plan, batches = ready.cfg, ready.start, ready.plan, ready.batches
    fault = faults.injected(topo.replica, number)
    me = join(cfg, store, topo, device, shared, number, stop)
    if rank == 0 and notice:
        say(notice)
    # from here on a signal is a stop request only if the control plane confirms it (torchrun
    # signals the survivors when a worker dies); before, the default action ends the process
    with stop.installed(confirm_at_once=False):
        try:
            with dev.use(device):
                devices = [None] * world
                dist.all_gather_object(devices, str(device))
                if rank == 0:
                    runs.write_provenance(cfg.save_dir, devices, run_plan.parts)
                stage = build(ready, network, topo.stage, device, fault)
                stage.replicate(topo.replica, me.links.replicas)
            coordinator = Coordinator(cfg, run_plan, batches[0]) if rank == 0 else None
            messages = None if topo.stage else hooked(feed(
                cfg, *batches, device, start, stop, (topo.replica, topo.replicas),
                me.links.agreement), ready, fault, stop)
        except Exception as exc:
            me.fail(f"{type(exc).__name__}: {exc}")
        serve(me, stage, messages, coordinator.handle if coordinator else None, start.steps)
        if gather is not None:
            gather(*gathered(me, stage, coordinator.records.history if coordinator else []))
    me.control.finish()
    dist.destroy_process_group()
    if rank == 0:
        runs.release(cfg.save_dir)
    return coordinator


def gathered(me: Rank, stage: Stage, history: list[dict]) -> tuple[dict, list[dict]]:
    """Every stage's final weights (replica 0's: the replicas agree), on the CPU, and rank 0's
    epoch records, in every process: one all-gather at the very end."""
    mine = ({k: v.detach().cpu() for k, v in stage.state_dict().items()}
            if me.topo.replica == 0 else {}, history)
    got: list = [None] * me.topo.world
    try:
        dist.all_gather_object(got, mine)
    except Exception as exc:
        me.lost_link(None, exc)
    return {k: v for state, _ in got for k, v in state.items()}, got[0][1]


def rank_gpus(store: dist.Store, topo: topology.Topology, device: torch.device) -> list[list]:
    """Every rank's GPU as [UUID, ``dev.gpu_mode``] ([None, None] on the CPU), exchanged
    through the store: before any process group, and the same list in every rank."""
    store.set(f"gpu/{topo.rank}", json.dumps([dev.uuid(device), dev.gpu_mode(device)]))
    keys = [f"gpu/{r}" for r in range(topo.world)]
    store.wait(keys, LONG)
    return [json.loads(store.get(key)) for key in keys]


def sharing(gpus: list[list]) -> str | None:
    """How ranks share GPUs, from every rank's [UUID, mode] (``rank_gpus``): None where each rank
    on a GPU has one of its own, else the notice that says how. Raises ConfigError where a
    GPU that admits one process (EXCLUSIVE_PROCESS, no MPS) would be shared."""
    shared = dev.shared_gpus([uuid for uuid, _ in gpus])
    if not shared:
        return None
    ranks = sum(uuid in shared for uuid, _ in gpus)
    modes = {mode for uuid, mode in gpus if uuid in shared}
    if "EXCLUSIVE_PROCESS" in modes:
        raise ConfigError(f"{ranks} ranks would share {len(shared)} GPU(s) in compute mode "
                          f"EXCLUSIVE_PROCESS, which admits one process: give each rank a GPU "
                          f"of its own, or set the mode to DEFAULT (nvidia-smi -c DEFAULT), or "
                          f"start an MPS daemon")
    how = ("run side by side under MPS" if modes == {"MPS"} else
           "take turns on it (time slicing, no MPS)")
    return (f"{ranks} ranks share {len(shared)} GPU(s): the processes of one GPU {how}, and "
            f"since NCCL needs a GPU per rank, payloads travel through pinned host memory "
            f"over gloo")


def verdict(cfg: Config, store: dist.Store, topo: topology.Topology, number: int,
            network: Network, static: Plan, data: Data, device: torch.device,
            own_devices: bool) -> Prepared:
    """Rank 0 prepares the run (pipeline/lifecycle.py: the checks, the data, the cut and the
    run folder); the other ranks learn its verdict through the store, so bad input stops
    every rank at once with the same line and exit code 2, before any process group, and
    every rank trains the same cut. The folder is kept in the store for the whole job: a
    restarted attempt writes where the first one did. The batches are loaded on each
    replica's stage 0, which feeds it (None elsewhere)."""
    ours = attempt(store, number)  # the verdict of this attempt, under "verdict"
    if topo.rank == 0:
        try:
            with dev.use(device):
                ready = prepare(cfg, network, static, data, device, own_devices, store)
        except (ConfigError, DataError) as exc:
            ours.set("verdict", json.dumps({"error": str(exc), "kind": type(exc).__name__}))
            raise
        except Finished as done:
            ours.set("verdict", json.dumps({"finished": str(done), "folder": done.folder}))
            raise
        ours.set("verdict", json.dumps({"resume": ready.start.folder,
                                        "save_dir": ready.cfg.save_dir,
                                        "epoch_steps": ready.epoch_steps,
                                        "plan": dataclasses.asdict(ready.plan)}))
        return ready
    ours.wait(["verdict"], LONG)  # rank 0 may be downloading a dataset, or timing units
    said = json.loads(ours.get("verdict"))
    if "finished" in said:
        raise Finished(said["finished"], said["folder"])
    if "error" in said:
        raise (DataError if said["kind"] == "DataError" else ConfigError)(said["error"])
    cfg = replace(cfg, save_dir=said["save_dir"])
    return Prepared(cfg, resume_from(said["resume"]), Plan(**said["plan"]),
                    None if topo.stage else data(cfg), said["epoch_steps"])


def rendezvous_store(cfg: Config) -> dist.Store:
    """torchrun's store (served by its agent, or by rank 0 outside torchrun)."""
    store, _, _ = next(dist.rendezvous("env://", timeout=timedelta(seconds=cfg.comm_timeout)))
    return store


def attempt_number(store: dist.Store, rank: int) -> int:
    """Which attempt of the job this is (1 for the first): how many times a process of this
    rank has started, counted in torchrun's store, which outlives restarts. Every rank starts
    once per attempt, so all ranks of one attempt count alike, even where their agents count
    restarts differently (an agent that restarts its workers because another node's agent
    did counts no restart, so TORCHELASTIC_RESTART_COUNT differs between nodes)."""
    return store.add(f"localpipe/starts/{rank}", 1)


def attempt(store: dist.Store, number: int) -> dist.PrefixStore:
    """``store`` under a prefix of attempt ``number``'s own: torchrun keeps its store across
    --max-restarts, and a restarted worker must not read a dead worker's entries."""
    return dist.PrefixStore(f"localpipe/attempt-{number}", store)


def join(cfg: Config, store: dist.Store, topo: topology.Topology, device: torch.device,
         shared: bool, number: int, stop: StopRequest | None = None) -> Rank:
    """Join the job: the default gloo group, the control plane (on a store connection of its
    own, so that beats never queue behind a long wait), the links to this rank's neighbours
    and its stage's replicas. A failure here ends the process, named."""
    rank = topo.rank
    me = Rank(cfg, topo, device, None, topology.Wiring())
    try:
        with dev.use(device):
            dist.init_process_group("gloo", store=attempt(store, number), rank=rank,
                                    world_size=topo.world,
                                    timeout=timedelta(seconds=cfg.comm_timeout))
            me.control = ControlPlane(attempt(store.clone(), number), rank, topo.names(),
                                      cfg.heartbeat_timeout, me.exit, stop, store_host(topo))
            me.control.start()
            me.links = topology.connect(topo, device, shared, cfg.comm_timeout, me.lost_link)
    except Exception as exc:
        me.exit(Failure(me.name, "failed", f"{type(exc).__name__}: {exc}"))
    return me


def store_host(topo: topology.Topology) -> str:
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    return "torchrun's agent" if agent else topo.name(0)


def serve(me: Rank, stage: Stage, messages: Iterator[Message] | None,
          on_report: Callable[[dict], None] | None, steps: int = 0) -> None:
    """Run this rank's stage until STOP has passed it: a stage 0 serves ``messages`` (its
    replica's feed), the others receive from the rank before. Rank 0 hands every rank's
    reports to ``on_report``; the others send theirs to it. Ends with a barrier once rank 0 has
    taken every final report."""
    cfg, rank, device = me.cfg, me.topo.rank, me.device
    links = me.links
    abort = Abort()  # a failure ends the process; the channels only need somewhere to look
    inbox = Channel(cfg.queue_depth, abort, f"{me.name}'s input queue")
    outbox = None if links.outbound is None else Channel(cfg.queue_depth, abort,
                                                         f"{me.name}'s output queue")
    reports: queue.Queue[dict] = queue.Queue()
    watchdog = Watchdog(cfg.comm_timeout)
    threads: list[threading.Thread] = []

    def guarded(name: str, body: Callable[[], None]) -> threading.Thread:
        def run() -> None:
            process.pin_thread()
            try:
                with dev.use(device, dev.new_stream(device)):
                    body()
            except Exception as exc:
                me.fail(f"{name}{type(exc).__name__}: {exc}")
        thread = threading.Thread(target=run, name=name or "stage", daemon=True)
        threads.append(thread)
        return thread

    if messages is not None:
        guarded("the data feed: ", lambda: [inbox.put(m) for m in watched(messages, watchdog)])
    else:
        threads.append(Receiver(inbox, links.inbound, device, me.lost_link))
    if rank == 0:
        threads.append(ReportReceiver(me.topo.world, reports.put, me.lost_link))
        send_report = reports.put
    else:
        report_sender = ReportSender(me.lost_link)
        threads.append(report_sender)
        send_report = report_sender.put
    if links.outbound is not None:
        threads.append(Sender(outbox, links.outbound, device, me.lost_link))
    worker = guarded("", lambda: run_stage(stage, me.topo.stage, inbox, outbox, send_report,
                                           device, cfg, steps, watchdog=watchdog))
    for thread in threads:
        thread.start()

    def watch(wait: Callable[[], bool]) -> None:
        """Wait until ``wait()`` says done, naming this stage if it gets stuck meanwhile."""
        while not wait():
            if (failure := watchdog.stuck()) is not None:
                me.fail(failure.reason)

    if rank == 0:
        finals = 0

        def next_report() -> bool:
            nonlocal finals
            try:
                report = reports.get(timeout=0.1)
            except queue.Empty:
                return False
            try:
                on_report(report)
            except Exception as exc:  # writing metrics, a manifest or model.pt failed
                me.fail(f"{type(exc).__name__}: {exc}")
            finals += report["kind"] == "final"
            return finals == me.topo.world
        watch(next_report)
    else:
        watch(lambda: finished(worker))
        report_sender.close()
    for thread in threads:
        if isinstance(thread, Sender):
            thread.join()
    try:
        dist.barrier()  # every final report is in, and model.pt written, before anyone leaves
    except Exception as exc:
        me.lost_link(None, exc)


def finished(thread: threading.Thread) -> bool:
    thread.join(0.1)
    return not thread.is_alive()
