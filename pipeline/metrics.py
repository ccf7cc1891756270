"""What a run measures: each stage's time, and the records rank 0 composes from stage reports:
one per epoch (``metrics.jsonl``) and one every --log-every training batches (``steps.jsonl``).
Pure functions of the reports; ``pipeline/records.py`` writes them out."""
from __future__ import annotations

import math
import time

import torch

from localpipe.pipeline.device import Clock


class StageTimer:
    """Where one stage's time goes in an epoch: computing (device time on a GPU), waiting for
    input, waiting for room downstream, and how full its input queue was when it looked."""

    def __init__(self, device: torch.device) -> None:
        self.clock = Clock(device)
        self.recv_wait_s = self.send_wait_s = 0.0
        self.occupancy: list[int] = []
        self.train_start: float | None = None  # wall clock (time.time) of the first train batch
        self.train_end: float | None = None
        self.train_samples = 0  # trained by this process this epoch (after a resume: since it)

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


def merge_replicas(reports: list[dict]) -> list[dict]:
    """One report per stage, in stage order, from the reports of every (stage, replica) of one
    kind and position: replica 0's, with the replicas' meters merged (sample-weighted means,
    summed counts), their logged losses averaged, their trained samples summed and their
    training spans joined, and every device sample kept (``device_samples``)."""
    by_stage: dict[int, list[dict]] = {}
    for r in sorted(reports, key=lambda r: (r["stage"], r["replica"])):
        by_stage.setdefault(r["stage"], []).append(r)
    merged = []
    for group in by_stage.values():
        first = dict(group[0])
        first["device_samples"] = [r["device_memory"] for r in group if r.get("device_memory")]
        if len(group) > 1:
            if "meters" in first:
                first["meters"] = {u: {phase: _merged_meter([r["meters"][u][phase]
                                                              for r in group])
                                       for phase in m} for u, m in first["meters"].items()}
                timings = [r["timing"] for r in group]
                starts = [t["train_start"] for t in timings if t["train_start"]]
                ends = [t["train_end"] for t in timings if t["train_end"]]
                first["timing"] = {**timings[0],
                                   "train_samples": sum(t["train_samples"] for t in timings),
                                   "train_start": min(starts, default=None),
                                   "train_end": max(ends, default=None)}
            if "losses" in first:
                first["losses"] = {u: sum(r["losses"][u] for r in group) / len(group)
                                   for u in first["losses"]}
                first["time"] = max(r["time"] for r in group)
        merged.append(first)
    return merged


def _merged_meter(meters: list[dict]) -> dict:
    """One meter's averages over several replicas' shards, weighted by their samples."""
    n = sum(m["n"] for m in meters)
    out = {"n": n, "nonfinite": sum(m["nonfinite"] for m in meters)}
    for key in meters[0]:
        if key in out:
            continue
        seen = [m for m in meters if m[key] is not None and m["n"]]
        out[key] = sum(m[key] * m["n"] for m in seen) / n if seen and n else None
    return out


def epoch_record(epoch: int, lr: tuple[float, float], reports: list[dict],
                 unit_names: list[str], dropped: int = 0) -> dict:
    """The record of ``epoch`` from its K END_EPOCH reports (in stage order, each merged over
    the replicas); ``lr``: the learning rates of its first and last training batch;
    ``dropped`` training samples were left out (a last batch too small to share)."""
    meters: dict[int, dict] = {}
    for r in reports:
        meters.update({int(k): v for k, v in r["meters"].items()})
    out = meters.pop(max(meters))
    starts = [r["timing"]["train_start"] for r in reports if r["timing"]["train_start"]]
    ends = [r["timing"]["train_end"] for r in reports if r["timing"]["train_end"]]
    timed = reports[0]["timing"]["train_samples"]
    elapsed = max(ends) - min(starts) if starts and ends else 0.0
    phases = ("train", "val", "test") if out["val"]["n"] else ("train", "test")
    blocks = [{"block": i, "name": unit_names[i],
               **{f"{phase}_{k}": v for phase in phases for k, v in m[phase].items()
                  if k != "n"}}
              for i, m in sorted(meters.items())]
    record = {
        "epoch": epoch, "lr": lr[0], "lr_last": lr[1],
        "train_loss_local": sum(m["train"]["loss"] or 0.0 for m in meters.values()),
        "train_loss_global": out["train"]["loss"], "train_error": out["train"]["error"],
        "test_loss": out["test"]["loss"], "test_error": out["test"]["error"],
        "train_samples": out["train"]["n"], "train_dropped_samples": dropped,
        "test_samples": out["test"]["n"],
        "nonfinite_batches": out["train"]["nonfinite"] + sum(
            m["train"]["nonfinite"] for m in meters.values()),
        "blocks": blocks,
        "samples_per_s": timed / elapsed if elapsed > 0 else None,
        **device_records([s for r in reports for s in r["device_samples"]]),
        "stages": [{"stage": r["stage"], "units": r["units"], "memory": r["memory"],
                    **{k: v for k, v in r["timing"].items() if k != "train_samples"}}
                   for r in reports],
        "time": time.time(),
    }
    if "val" in phases:
        record.update(val_loss=out["val"]["loss"], val_error=out["val"]["error"],
                      val_samples=out["val"]["n"])
    return record


def step_record(lr: float, batch_size: int, reports: list[dict],
                previous: dict | None) -> dict:
    """The record of one logged training batch from its K "log" reports (in stage order):
    each unit's local loss (None where it was not finite), and the rate since the previous
    record, timed at the last stage."""
    first, last = reports[0], reports[-1]
    losses = {str(u): (v if math.isfinite(v) else None)
              for r in reports for u, v in r["losses"].items()}
    rate = None
    if previous is not None and last["time"] > previous["time"]:
        rate = (first["steps"] - previous["steps"]) * batch_size / (last["time"]
                                                                     - previous["time"])
    return {"steps": first["steps"], "epoch": first["epoch"], "step": first["step"], "lr": lr,
            "loss": losses, "samples_per_s": rate, "time": last["time"]}


def summary(r: dict, backprop: bool) -> str:
    """The paper's lines for one epoch (§7), and with several stages their time split."""
    def num(v, fmt=".4f"):
        return "n/a" if v is None else format(v, fmt)

    def pct(v):
        return "n/a" if v is None else f"{v:.3f}%"

    last = r.get("lr_last", r["lr"])  # a warm-up or the cosine: the epoch's first → last
    lr = f"{r['lr']:.2e}" + (f"→{last:.2e}" if last != r["lr"] else "")
    lines = [f"Train epoch={r['epoch']}, lr={lr}, "
             f"loss_local={num(r['train_loss_local'])}, "
             f"loss_global={num(r['train_loss_global'])}, error={pct(r['train_error'])}, "
             f"mem={r['peak_memory_bytes'] / 2**20:.0f}MiB, "
             f"{num(r['samples_per_s'], '.1f')} samples/s"]
    if r.get("nonfinite_batches"):  # --on-nan skip: say what the averages leave out
        lines.append(f"  skipped {r['nonfinite_batches']} update(s) of a unit on a NaN or "
                     f"infinite loss (--on-nan skip); the averages leave them out")
    for phase in ("train", "val", "test"):
        if phase == "val" and "val_error" not in r:
            continue
        if phase != "train":
            lines.append(f"{'Valid' if phase == 'val' else 'Test '} "
                         f"loss_global={num(r[f'{phase}_loss'])}, "
                         f"error={pct(r[f'{phase}_error'])}")
        if backprop:
            continue
        for b in r["blocks"]:
            lines.append(f"  block {b['block']} {b['name']}: loss={num(b[f'{phase}_loss'])}, "
                         f"loss_sim={num(b[f'{phase}_loss_sim'])}, "
                         f"loss_pred={num(b[f'{phase}_loss_pred'])}, "
                         f"error={pct(b[f'{phase}_error'])}")
    for s in r["stages"]:
        total = s["busy_s"] + s["recv_wait_s"] + s["send_wait_s"]
        if len(r["stages"]) > 1 and total > 0:
            lines.append(f"  stage {s['stage']} units {s['units'][0]}-{s['units'][-1]}: "
                         f"busy {100 * s['busy_s'] / total:.0f}%, "
                         f"recv wait {100 * s['recv_wait_s'] / total:.0f}%, "
                         f"send wait {100 * s['send_wait_s'] / total:.0f}%, "
                         f"queue {s['queue_occupancy']:.2f}")
    return "\n".join(lines)
