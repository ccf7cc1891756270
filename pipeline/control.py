"""The control plane of a torchrun job: who is alive, who failed, whether to stop, and the
stage reports that rank 0 turns into metrics, manifests and ``model.pt``.

Liveness, failures and stop requests live in the rendezvous store, which torchrun's agent
serves, so it outlives any worker. Each rank's monitor thread, on a store connection of its own:

- beats every ``period`` seconds and reads everyone else's beats. Beats come from this thread
  alone, so long compute, a checkpoint write or a graph capture never count as frozen;
- names a rank that died on its own host at once (its process is gone or a zombie), and any
  rank whose beats stopped for ``--heartbeat-timeout`` seconds (frozen, or on a lost node);
- publishes the first failure it finds with ``compare_set``, so that every rank names the same
  one: the stage that died, froze or raised, never the stages that waited for it;
- turns a signal this process received into a stop request for the whole job, but only after a
  grace period in which no failure appeared (torchrun's agent signals the survivors when a
  worker dies, and that is no request to stop), and picks up requests other ranks published.

A lost link is blamed on its peer only with evidence: the peer's own failure record, its death,
or its silence; otherwise, once that could have shown, it is named as a lost link.

Stage reports go to rank 0 over the default gloo group: a sender thread on each rank, and on
rank 0 a receiver thread that takes them from any rank in arrival order. No collective spans
the stages, so no report ever holds a stage back.
"""
from __future__ import annotations

import io
import json
import os
import queue
import socket
import threading
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

FAILED, STOP = "failed", "stop"
GRACE_S = 2.0  # a signal waits this long for a failure before it counts as a stop request
LONG = timedelta(days=365)  # waits bounded by the control plane, not by a timeout


@dataclass(frozen=True)
class Failure:
    """What stopped the run: ``who`` (a stage's name) ``what`` ("failed", "died", "froze", ...)."""

    who: str
    what: str
    reason: str

    def __str__(self) -> str:
        return f"{self.who} {self.what}: {self.reason}"

    def encode(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def decode(cls, data: bytes) -> "Failure":
        return cls(**json.loads(data))


def host_id() -> str:
    """This host and PID namespace: process ids are comparable between equal ids only."""
    return f"{socket.gethostname()}/{os.stat('/proc/self/ns/pid').st_ino}"


def boot_id() -> str | None:
    """This machine's boot: processes of an earlier boot have all ended."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot): a pid taken again by a later
    process has another."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def process_alive(pid: int) -> bool:
    """Whether a process on this host still runs (a zombie is dead; a stopped one is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class ControlPlane:
    """This rank's view of the job's health. ``on_failure(failure)`` is called (from the
    monitor thread) when another rank published a failure; it must end the process."""

    def __init__(self, store: dist.Store, rank: int, names: list[str], heartbeat_timeout: float,
                 on_failure: Callable[[Failure], None], stop=None, store_host: str = "") -> None:
        """``names[r]`` names rank r in messages; ``stop`` is this process's StopRequest;
        ``store_host`` names who serves the store, blamed if it cannot be reached."""
        self.store, self.rank, self.names = store, rank, names
        self.timeout, self.on_failure, self.stop = heartbeat_timeout, on_failure, stop
        self.store_host = store_host or "torchrun's agent"
        self.period = min(1.0, heartbeat_timeout / 5)
        self.others = [r for r in range(len(names)) if r != rank]
        self.procs: dict[int, dict] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._monitor, name="control-plane", daemon=True)

    def start(self) -> None:
        """Register this process and start monitoring once every rank has registered."""
        self.store.set(f"proc/{self.rank}", json.dumps({"host": host_id(), "pid": os.getpid()}))
        self.store.set(f"beat/{self.rank}", "0")
        keys = [f"proc/{r}" for r in self.others]
        if keys:
            self.store.wait(keys)
            self.procs = {r: json.loads(v) for r, v in zip(self.others, self.store.multi_get(keys))}
        self._thread.start()

    def finish(self) -> None:
        """This rank is done: others stop watching it, and it stops watching them. The monitor
        is joined, so that no store call is under way while the process shuts down (a call cut
        off by the interpreter's exit aborts the process)."""
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.period + 10)
        self.store.set(f"beat/{self.rank}", "done")

    # ------------------------------------------------------------------ failures
    def publish(self, failure: Failure) -> Failure:
        """Record ``failure`` unless one is already recorded; return the recorded one."""
        return Failure.decode(self.store.compare_set(FAILED, "", failure.encode()))

    def recorded(self) -> Failure | None:
        return Failure.decode(self.store.get(FAILED)) if self.store.check([FAILED]) else None

    def blame_link(self, peer: int | None, exc: BaseException) -> Failure:
        """The failure behind a broken link to rank ``peer`` (None: not known which): its own
        record, its death, its silence once the heartbeat timeout has passed; else the broken
        link itself."""
        deadline = time.monotonic() + self.timeout + 2 * self.period
        while time.monotonic() < deadline:
            found = self.recorded()
            if found is not None:
                return found
            if peer is not None and not self._alive(peer):
                return self.publish(Failure(self.names[peer], "died", "its process is gone"))
            time.sleep(self.period / 2)
        who = self.names[peer] if peer is not None else "a link of " + self.names[self.rank]
        return self.publish(Failure(who, "is unreachable",
                                    f"the link to it broke ({_first_line(exc)})"))

    def _alive(self, rank: int) -> bool:
        proc = self.procs.get(rank)
        return proc is None or proc["host"] != host_id() or process_alive(proc["pid"])

    # ------------------------------------------------------------------ the monitor
    def _monitor(self) -> None:
        try:
            self._watch()
        except Exception as exc:  # the store is gone: so is whoever served it
            if not self._done.is_set():
                self.on_failure(Failure(self.store_host, "is unreachable",
                                        f"the control plane's store: {_first_line(exc)}"))

    def _watch(self) -> None:
        beats = {r: (b"", time.monotonic()) for r in self.others}
        count = 0
        while not self._done.wait(self.period):
            count += 1
            self.store.set(f"beat/{self.rank}", str(count))
            found = self.recorded()
            if found is not None:
                self.on_failure(found)
                return
            now = time.monotonic()
            values = self.store.multi_get([f"beat/{r}" for r in self.others]) if self.others \
                else []
            for r, value in zip(self.others, values):
                if value == b"done":
                    continue
                if value != beats[r][0]:
                    beats[r] = (value, now)
                if not self._alive(r):
                    if self.store.get(f"beat/{r}") == b"done":  # it finished, then exited
                        continue
                    self.publish(Failure(self.names[r], "died", "its process is gone"))
                elif now - beats[r][1] > self.timeout:
                    local = self.procs.get(r, {}).get("host") == host_id()
                    self.publish(Failure(self.names[r], "froze" if local else
                                         "stopped responding",
                                         f"no heartbeat for {now - beats[r][1]:.0f} s"))
            self._check_stop()  # after the deaths: a forwarded signal must not win over one

    def _check_stop(self) -> None:
        """Publish this process's signal as the job's stop request after the grace period, and
        confirm a request published by any rank."""
        if self.stop is None or self.stop.signum is not None or self.recorded() is not None:
            return
        if self.store.check([STOP]):
            self.stop.confirm(int(self.store.get(STOP)))
        elif self.stop.received is not None \
                and time.monotonic() - self.stop.received_at > GRACE_S:
            self.stop.confirm(int(self.store.compare_set(STOP, "", str(self.stop.received))))


# ---------------------------------------------------------------------------- reports
REPORT_TAG = 17  # the size goes with this tag, the bytes with the next one


def encode_report(report: dict) -> torch.Tensor:
    buffer = io.BytesIO()
    torch.save(report, buffer)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def decode_report(data: torch.Tensor) -> dict:
    """Reports hold tensors and plain containers only: loading one runs no code."""
    return torch.load(io.BytesIO(data.numpy().tobytes()), weights_only=True)


class ReportSender(threading.Thread):
    """Sends this rank's reports to rank 0, in order, off the stage's thread."""

    def __init__(self, on_error: Callable[[int, BaseException], None]) -> None:
        super().__init__(name="report-sender", daemon=True)
        self.queue: queue.Queue[dict | None] = queue.Queue()
        self.on_error = on_error

    def put(self, report: dict) -> None:
        self.queue.put(report)

    def run(self) -> None:
        try:
            while (report := self.queue.get()) is not None:
                data = encode_report(report)
                dist.send(torch.tensor([data.numel()]), dst=0, tag=REPORT_TAG)
                dist.send(data, dst=0, tag=REPORT_TAG + 1)
        except Exception as exc:
            self.on_error(0, exc)

    def close(self) -> None:
        """Send what is queued, then end."""
        self.queue.put(None)
        self.join()


class ReportReceiver(threading.Thread):
    """Rank 0: takes every other rank's reports, in arrival order, until each has sent its
    final one; ``sink`` gets them one by one."""

    def __init__(self, ranks: int, sink: Callable[[dict], None],
                 on_error: Callable[[int | None, BaseException], None]) -> None:
        super().__init__(name="report-receiver", daemon=True)
        self.ranks, self.sink, self.on_error = ranks, sink, on_error

    def run(self) -> None:
        finals, src = 0, None
        try:
            while finals < self.ranks - 1:
                size = torch.zeros(1, dtype=torch.int64)
                work = dist.irecv(size, tag=REPORT_TAG)  # from any rank
                work.wait(LONG)
                src = None
                src = work._source_rank()
                data = torch.empty(int(size.item()), dtype=torch.uint8)
                dist.recv(data, src=src, tag=REPORT_TAG + 1)
                report = decode_report(data)
                finals += report["kind"] == "final"
                self.sink(report)
        except Exception as exc:
            self.on_error(src, exc)


def _first_line(exc: BaseException) -> str:
    text = (str(exc).splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text[:200]}"
