"""The transport and the control plane on their own: the wire format, the host-staged payload
path between two gloo processes (the very code ranks sharing a GPU use, copies aside), the NCCL
payload's code over gloo between three (its lock, one batch per message), and the control
plane's protocol (first failure wins, the dead and the frozen are named, a signal becomes a
stop only when no stage died)."""
import json
import os
import signal
import socket
import subprocess
import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from localpipe.pipeline import checkpoint, control, device
from localpipe.pipeline.channel import Abort, Channel, StageFailed
from localpipe.pipeline.control import ControlPlane, Failure
from localpipe.pipeline.files import WriteError
from localpipe.pipeline.message import Kind, Message, decode, decode_spec, encode
from localpipe.pipeline.signals import StopRequest
from localpipe.pipeline.worker import FEED, Watchdog


def _message(step: int) -> Message:
    gen = torch.Generator().manual_seed(step)
    return Message(Kind.TRAIN, 2, step, tensors={
        "x": torch.randn(3, 4, 5, generator=gen),
        "y": torch.randint(10, (3,), generator=gen),
        "skip": torch.randn(3, 2, 2, generator=gen).to(torch.bfloat16),  # a named extra
        "mask": torch.rand(3, generator=gen) > 0.5})


def test_the_header_and_tensor_list_round_trip():
    msg = _message(7)
    header, spec = encode(msg)
    got, length = decode(header)
    assert (got.kind, got.epoch, got.step, length) == (Kind.TRAIN, 2, 7, spec.numel())
    assert decode_spec(spec) == [(k, t.dtype, list(t.shape)) for k, t in msg.tensors.items()]
    marker, spec = encode(Message(Kind.CHECKPOINT, 3, 5))
    assert spec is None and decode(marker)[0].kind == Kind.CHECKPOINT


def test_a_tensor_list_naming_an_unknown_dtype_is_refused():
    text = json.dumps([["x", "torch.complex64", [2]]]).encode()
    with pytest.raises(ValueError, match="unknown dtype torch.complex64"):
        decode_spec(torch.frombuffer(bytearray(text), dtype=torch.uint8))


# ------------------------------------------------------------------ two processes over gloo
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _payload_rank(rank: int, port: int, count: int) -> None:
    from localpipe.pipeline.distributed import join
    from localpipe.pipeline.topology import Topology
    from localpipe.pipeline.transport import HostPayload, Receiver, Sender
    from localpipe.stages.config import Config

    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timedelta(seconds=60))
    me = join(Config(stages=2), store, Topology(rank, 2), torch.device("cpu"), False, 1)
    channel = Channel(2, Abort(), "test")
    if rank == 0:
        assert isinstance(me.links.outbound.payload, HostPayload)
        sender = Sender(channel, me.links.outbound, torch.device("cpu"), me.lost_link)
        sender.start()
        for step in range(count):
            channel.put(_message(step))
            if step == 1:
                channel.put(Message(Kind.CHECKPOINT, 2, 2))
        channel.put(Message(Kind.STOP, 0, 0))
        sender.join()
    else:
        Receiver(channel, me.links.inbound, torch.device("cpu"), me.lost_link).start()
        got = [channel.get()[0] for _ in range(count + 2)]
        kinds = [m.kind for m in got]
        assert kinds == [Kind.TRAIN] * 2 + [Kind.CHECKPOINT] + [Kind.TRAIN] * (count - 2) \
            + [Kind.STOP], kinds
        batches = [m for m in got if m.kind == Kind.TRAIN]
        for step, msg in enumerate(batches):
            want = _message(step)
            assert msg.step == step and msg.tensors.keys() == want.tensors.keys()
            for name, t in want.tensors.items():
                assert msg.tensors[name].dtype == t.dtype and torch.equal(msg.tensors[name], t)
    dist.barrier()
    me.control.finish()
    dist.destroy_process_group()


def test_host_staged_payloads_carry_every_tensor_and_marker_in_order():
    mp.spawn(_payload_rank, args=(_free_port(), 5), nprocs=2, join=True)


class OwnedLock:
    """NCCL_LOCK, knowing which thread holds it."""

    def __init__(self) -> None:
        self.lock, self.owner = threading.Lock(), None

    def __enter__(self) -> None:
        self.lock.acquire()
        self.owner = threading.get_ident()

    def __exit__(self, *exc) -> None:
        self.owner = None
        self.lock.release()


def _nccl_logic_rank(rank: int, port: int, count: int) -> None:
    """Three ranks, NcclPayload's code over gloo groups with CPU tensors: the middle rank's
    Receiver and Sender post batches at the same time, on two communicators."""
    from localpipe.pipeline import transport
    from localpipe.pipeline.transport import Link, NcclPayload, Receiver, Sender

    store = dist.TCPStore("127.0.0.1", port, 3, rank == 0, timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=3,
                            timeout=timedelta(seconds=60))
    links = {}
    for a in range(2):  # every rank makes every group, in one order
        headers, payloads = (dist.new_group([a, a + 1], backend="gloo") for _ in range(2))
        for me, peer in ((a, a + 1), (a + 1, a)):
            if rank == me:
                links[peer] = Link(peer, headers, NcclPayload(payloads, peer, torch.device("cpu")))
    lock = transport.NCCL_LOCK = OwnedLock()
    post, calls, errors = dist.batch_isend_irecv, {}, []

    def checked(ops):  # every "NCCL call": under the lock, by the group's one thread
        assert lock.owner == threading.get_ident(), "a batch posted without NCCL_LOCK"
        calls.setdefault(ops[0].group, []).append(threading.get_ident())
        time.sleep(0.01)  # room for another thread to barge in
        return post(ops)

    dist.batch_isend_irecv = checked
    abort = Abort()
    channel = Channel(2, abort, "test")

    def on_error(peer: int, exc: BaseException) -> None:
        errors.append(f"link to {peer}: {exc!r}")
        abort.fail(StageFailed(rank, repr(exc)))

    cpu = torch.device("cpu")
    threads = ([Receiver(channel, links[rank - 1], cpu, on_error)] if rank > 0 else []) + \
        ([Sender(channel, links[rank + 1], cpu, on_error)] if rank < 2 else [])
    for t in threads:
        t.start()
    if rank == 0:
        for step in range(count):
            channel.put(_message(step))
        channel.put(Message(Kind.STOP, 0, 0))
    elif rank == 2:
        got = [channel.get()[0] for _ in range(count + 1)]
        assert [m.kind for m in got] == [Kind.TRAIN] * count + [Kind.STOP]
        for step, msg in enumerate(got[:-1]):
            want = _message(step)
            assert msg.step == step and msg.tensors.keys() == want.tensors.keys()
            for name, t in want.tensors.items():
                assert msg.tensors[name].dtype == t.dtype and torch.equal(msg.tensors[name], t)
    for t in threads:
        t.join()
    assert errors == [], errors
    # one batch per message and link end, each group posted to by one thread alone
    assert sorted(len(c) for c in calls.values()) == [count] * (1 if rank != 1 else 2)
    assert all(len(set(c)) == 1 for c in calls.values())
    assert len({c[0] for c in calls.values()}) == len(calls)  # the middle rank: two threads
    dist.barrier()
    dist.destroy_process_group()


def test_nccl_payloads_post_one_batch_per_message_under_the_lock():
    mp.spawn(_nccl_logic_rank, args=(_free_port(), 4), nprocs=3, join=True)


# ------------------------------------------------------------------ the control plane
@pytest.fixture
def store():
    port = _free_port()
    return dist.TCPStore("127.0.0.1", port, 1, True, timedelta(seconds=30))


class Plane:
    """A ControlPlane of one pretend rank, on a store connection of its own (as in a run),
    recording failures instead of exiting."""

    def __init__(self, store, rank: int, world: int, timeout: float = 1.0, stop=None) -> None:
        self.failures: list[Failure] = []
        self.plane = ControlPlane(store.clone(), rank, [f"stage {r}" for r in range(world)],
                                  timeout, self.failures.append, stop)


def _register_dead(store, rank: int) -> None:
    """A rank whose process has exited: the pid of a finished child of ours."""
    child = subprocess.Popen(["true"])
    child.wait()
    store.set(f"proc/{rank}", json.dumps({"host": control.host_id(), "pid": child.pid}))
    store.set(f"beat/{rank}", "0")


def _wait_for(predicate, seconds: float) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < seconds, "timed out"
        time.sleep(0.02)
    return time.monotonic() - start


def test_the_first_failure_wins_and_every_rank_is_told(store):
    planes = [Plane(store, r, 3) for r in range(3)]
    for p in planes:
        threading_start(p.plane)
    first = Failure("stage 1", "failed", "RuntimeError: boom")
    assert planes[1].plane.publish(first) == first
    assert planes[2].plane.publish(Failure("stage 2", "failed", "later")) == first
    _wait_for(lambda: all(p.failures for p in planes), 5)
    assert all(p.failures == [first] for p in planes)


def threading_start(plane: ControlPlane) -> None:
    """``start`` waits for every rank to register: register them all from threads."""
    import threading

    threading.Thread(target=plane.start, daemon=True).start()


def test_a_rank_that_stops_beating_is_named_frozen_after_the_timeout(store):
    watcher = Plane(store, 0, 2, timeout=1.0)
    store.set("proc/1", json.dumps({"host": control.host_id(), "pid": os.getpid()}))
    store.set("beat/1", "0")  # registered, alive, but never beats again
    watcher.plane.start()
    took = _wait_for(lambda: watcher.failures, 10)
    assert str(watcher.failures[0]).startswith("stage 1 froze: no heartbeat for")
    assert 1.0 <= took < 10  # never before the timeout; the bound only catches a hang


def test_a_dead_process_is_named_at_once_not_after_the_timeout(store):
    watcher = Plane(store, 0, 2, timeout=30.0)
    _register_dead(store, 1)
    watcher.plane.start()
    took = _wait_for(lambda: watcher.failures, 10)
    assert str(watcher.failures[0]) == "stage 1 died: its process is gone"
    assert took < 15  # long before the 30 s timeout


def test_a_broken_link_is_blamed_on_the_peer_only_with_evidence(store):
    watcher = Plane(store, 0, 3, timeout=0.5)
    _register_dead(store, 1)
    store.set("proc/2", json.dumps({"host": control.host_id(), "pid": os.getpid()}))
    store.set("beat/2", "0")
    watcher.plane.start()
    assert str(watcher.plane.blame_link(1, OSError("reset"))) == "stage 1 died: its process is gone"


def test_a_broken_link_with_no_evidence_is_named_as_such(store):
    plane = Plane(store, 0, 2, timeout=0.3).plane  # not started: nobody is watched
    plane.procs = {1: {"host": control.host_id(), "pid": os.getpid()}}
    failure = plane.blame_link(1, ConnectionResetError("Connection closed by peer"))
    assert str(failure).startswith("stage 1 is unreachable: the link to it broke "
                                   "(ConnectionResetError: Connection closed by peer)")


def test_a_signal_to_one_rank_stops_every_rank_after_the_grace_period(store):
    stops = [StopRequest() for _ in range(2)]
    planes = [Plane(store, r, 2, timeout=5.0, stop=stops[r]) for r in range(2)]
    for p in planes:
        threading_start(p.plane)
    stops[1].received, stops[1].received_at = signal.SIGTERM, time.monotonic()
    took = _wait_for(lambda: all(s.signum == signal.SIGTERM for s in stops), 10)
    assert took >= control.GRACE_S - 0.5 and not any(p.failures for p in planes)


def test_a_signal_that_comes_with_a_death_is_no_stop_request(store):
    stop = StopRequest()
    watcher = Plane(store, 0, 2, timeout=30.0, stop=stop)
    _register_dead(store, 1)
    watcher.plane.start()
    stop.received, stop.received_at = signal.SIGTERM, time.monotonic()  # torchrun's forward
    _wait_for(lambda: watcher.failures, 5)
    time.sleep(control.GRACE_S + 0.5)
    assert stop.signum is None and str(watcher.failures[0]).startswith("stage 1 died")


def test_the_watchdog_names_the_first_stage_stuck_on_one_message():
    watchdog = Watchdog(0.2)
    watchdog.begin(0)
    watchdog.begin(2)
    time.sleep(0.05)
    watchdog.begin(1)
    watchdog.end(0)
    assert watchdog.stuck() is None
    time.sleep(0.3)
    failure = watchdog.stuck()
    assert failure.stage == 2 and "stuck for 0 s on one message (--comm-timeout 0.2)" in str(
        failure)
    watchdog.begin(FEED)
    watchdog.end(1)
    watchdog.end(2)
    time.sleep(0.3)
    assert str(watchdog.stuck()).startswith("stage 0 failed: the data feed: stuck for")


def test_a_failed_checkpoint_write_never_blocks_the_stage(tmp_path):
    """The first write fails (its folder is a file); the stage's next submissions and its
    close still return at once, and the failure is raised in the stage."""
    (tmp_path / "checkpoints").write_text("not a folder")
    reports = []
    writer = checkpoint.Writer(str(tmp_path), 0, reports.append)
    state = {"w": torch.zeros(3)}
    writer.submit(1, False, state, {"kind": "checkpoint"})
    deadline = time.monotonic() + 10
    while writer.error is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(WriteError, match="cannot write"):
        writer.submit(2, False, state, {"kind": "checkpoint"})
    with pytest.raises(WriteError):
        writer.close()
    assert reports == []


def test_stages_are_grouped_contiguously_on_fewer_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cuda = torch.device("cuda", 0)
    assert [d.index for d in device.stage_devices(5, cuda)] == [0, 0, 0, 1, 1]
    assert [d.index for d in device.stage_devices(2, cuda)] == [0, 1]
    assert device.stage_devices(3, torch.device("cpu")) == [torch.device("cpu")] * 3
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert device.rank_device(cuda, 3) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert device.rank_device(cuda, 3) == torch.device("cuda", 3)
