"""What a run measures: per-stage timing, and the per-epoch record of the whole run
(``metrics.jsonl`` and the paper-style lines on stdout), composed on rank 0 from stage reports."""
from __future__ import annotations

import json
import os
import time

import torch

from pipeline.checkpoint import WriteError
from pipeline.device import Clock


class StageTimer:
    """Where one stage's time goes in an epoch: computing (device time on a GPU), waiting for
    input, waiting for room downstream, and how full its input queue was when it looked."""

    def __init__(self, device: torch.device) -> None:
        self.clock = Clock(device)
        self.recv_wait_s = self.send_wait_s = 0.0
        self.occupancy: list[int] = []
        self.train_start: float | None = None  # wall clock (time.time) of the first train batch
        self.train_end: float | None = None
        self.train_samples = 0

    def take(self) -> dict:
        out = {"busy_s": self.clock.take(), "recv_wait_s": self.recv_wait_s,
               "send_wait_s": self.send_wait_s,
               "queue_occupancy": (sum(self.occupancy) / len(self.occupancy)
                                   if self.occupancy else 0.0),
               "train_start": self.train_start, "train_end": self.train_end,
               "train_samples": self.train_samples}
        self.__init__(self.clock.device)
        return out


def device_records(samples: list[dict]) -> dict:
    """Each process's figures on each device it used, and NVML's view once per GPU; the
    run's ``peak_memory_bytes`` is the largest allocator peak (GPU) or resident set (CPU)."""
    processes = [{k: v for k, v in s.items() if k != "nvml_used_bytes"} for s in samples]
    gpus = {s["uuid"]: {"uuid": s["uuid"], "host": s["host"],
                        "nvml_used_bytes": s["nvml_used_bytes"]}
            for s in samples if s.get("uuid")}
    peaks = [s.get("peak_allocated_bytes", s.get("peak_rss_bytes", 0)) for s in samples]
    return {"peak_memory_bytes": max(peaks, default=0), "processes": processes,
            "gpus": list(gpus.values())}


class Recorder:
    """Turns the K stage reports of an epoch into one record; prints it and appends it to
    ``metrics.jsonl``. Lives on rank 0 only."""

    def __init__(self, save_dir: str | None, unit_names: list[str], backprop: bool) -> None:
        self.path = os.path.join(save_dir, "metrics.jsonl") if save_dir else None
        self.unit_names = unit_names
        self.backprop = backprop

    def epoch(self, epoch: int, lr: float, reports: list[dict], dropped: int = 0) -> dict:
        """The record of ``epoch`` from its K END_EPOCH reports; ``dropped`` training samples
        were left out (a last batch of one)."""
        meters: dict[int, dict] = {}
        for r in reports:
            meters.update({int(k): v for k, v in r["meters"].items()})
        out = meters.pop(max(meters))
        starts = [r["timing"]["train_start"] for r in reports if r["timing"]["train_start"]]
        ends = [r["timing"]["train_end"] for r in reports if r["timing"]["train_end"]]
        samples = reports[0]["timing"]["train_samples"]
        elapsed = max(ends) - min(starts) if starts and ends else 0.0
        blocks = [{"block": i, "name": self.unit_names[i],
                   **{f"train_{k}": v for k, v in m["train"].items() if k != "n"},
                   **{f"test_{k}": v for k, v in m["test"].items() if k != "n"}}
                  for i, m in sorted(meters.items())]
        record = {
            "epoch": epoch, "lr": lr,
            "train_loss_local": sum(m["train"]["loss"] or 0.0 for m in meters.values()),
            "train_loss_global": out["train"]["loss"], "train_error": out["train"]["error"],
            "test_loss": out["test"]["loss"], "test_error": out["test"]["error"],
            "train_samples": samples, "train_dropped_samples": dropped,
            "test_samples": out["test"]["n"],
            "nonfinite_batches": out["train"]["nonfinite"] + sum(
                m["train"]["nonfinite"] for m in meters.values()),
            "blocks": blocks,
            "samples_per_s": samples / elapsed if elapsed > 0 else None,
            **device_records([r["device_memory"] for r in reports if r.get("device_memory")]),
            "stages": [{"stage": r["stage"], "units": r["units"], "memory": r["memory"],
                        **{k: v for k, v in r["timing"].items() if k != "train_samples"}}
                       for r in reports],
            "time": time.time(),
        }
        self.print(record)
        if self.path:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as exc:
                raise WriteError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        return record

    def print(self, r: dict) -> None:
        def num(v, fmt=".4f"):
            return "n/a" if v is None else format(v, fmt)

        speed = num(r["samples_per_s"], ".1f")
        print(f"Train epoch={r['epoch']}, lr={r['lr']:.2e}, "
              f"loss_local={num(r['train_loss_local'])}, "
              f"loss_global={num(r['train_loss_global'])}, error={num(r['train_error'], '.3f')}%, "
              f"mem={r['peak_memory_bytes'] / 2**20:.0f}MiB, {speed} samples/s", flush=True)
        for phase in ("train", "test"):
            if phase == "test":
                print(f"Test  loss_global={num(r['test_loss'])}, "
                      f"error={num(r['test_error'], '.3f')}%", flush=True)
            if self.backprop:
                continue
            for b in r["blocks"]:
                print(f"  block {b['block']} {b['name']}: loss={num(b[f'{phase}_loss'])}, "
                      f"loss_sim={num(b[f'{phase}_loss_sim'])}, "
                      f"loss_pred={num(b[f'{phase}_loss_pred'])}, "
                      f"error={num(b[f'{phase}_error'], '.3f')}%", flush=True)
        for s in r["stages"]:
            total = s["busy_s"] + s["recv_wait_s"] + s["send_wait_s"]
            if len(r["stages"]) > 1 and total > 0:
                print(f"  stage {s['stage']} units {s['units'][0]}-{s['units'][-1]}: "
                      f"busy {100 * s['busy_s'] / total:.0f}%, "
                      f"recv wait {100 * s['recv_wait_s'] / total:.0f}%, "
                      f"send wait {100 * s['send_wait_s'] / total:.0f}%, "
                      f"queue {s['queue_occupancy']:.2f}", flush=True)
