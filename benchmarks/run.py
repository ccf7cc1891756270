"""Throughput and memory of pipelined local learning against global backprop and GPipe/1F1B.

    python benchmarks/run.py --model vgg8b --feat-mult 0.5 --stages 2 --batch-size 128
    python benchmarks/run.py --quick                  # a smoke run, about 40 s on 2 cores
    python benchmarks/run.py --sweep                  # stages 1, 2, 4 x batch 32-256, mlp and vgg8b
    python benchmarks/run.py --model mlp --num-layers 3 --replicas 2   # + K x R processes, model
    python benchmarks/run.py --model resnet18 --feat-mult 0.25 --stages 4
    python benchmarks/run.py --model vit --num-layers 8 --num-hidden 128 --num-heads 4

Every registered network runs: the MLP, the VGGs, the ResNets and Wide ResNets, the ViTs.

Every mode trains the same network on the same batches at the same batch size in float32, and
all modes share one thread budget (--threads, default: every core): K workers get C // K torch
threads each. Warm-up batches are excluded; rates are medians over --repeats groups of --steps
batches, each group timed alike in every mode: from its first batch entering any process or
stage to its last update finished on any.

Each pipeline gets the cut whose slowest stage is fastest for its own step times. The local
pipelines may cut anywhere, inside a residual block too (its skip tensor travels with the batch
to the next stage). A backprop stage of torch's GPipe and 1F1B is one differentiable forward that
starts with no skip tensors, so there the cut falls only between whole residual blocks
(``harness.block_groups``: every unit boundary of an MLP, a VGG or a ViT), and the backprop step
times are measured per such group.

--replicas R adds the mode local_pipelined_replicas (K·R processes: every stage R times, each
replica on its shard of every batch, C // (K·R) threads each; more processes than cores
oversubscribe them, which the output says) and a model on paper of throughput at K = 4 and
R = 1, 2, 4, 8 from measured unit step times and gloo all-reduce times. It is a model under
stated link figures: no machine with fewer cores than processes can show scaling.
Writes one JSON file (every figure plus the machine), prints a markdown table, and draws PNGs
when matplotlib is installed.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from localpipe.benchmarks import harness
from localpipe.launch.options import Parser
from localpipe.pipeline import device as dev
from localpipe.pipeline.data import INFO
from localpipe.pipeline.plan import check_trains, network_of
from localpipe.stages import partition
from localpipe.stages.config import Config, ConfigError
from localpipe.stages.residual import WRN_MODELS
from localpipe.stages.vit import VIT_MODELS, patch_side

MiB = 2 ** 20
REPLICAS_MODE = "local_pipelined_replicas"
MODEL_STAGES, MODEL_REPLICAS = 4, (1, 2, 4, 8)
ASSUMED_LINK = {"link": "ASSUMED, not measured: 25 GB/s and 5 us per message (about one "
                        "InfiniBand HDR 200 Gb/s port)", "bytes_per_s": 25e9, "latency_s": 5e-6}


def measure(setup: harness.Setup, stages: int, microbatches: list[int], progress,
            replicas: int = 1) -> dict:
    """Every mode at K = ``stages``, plus the ratios that explain them; with ``replicas`` > 1
    the replicated pipeline and the model of replicas at scale too."""
    c, k = setup.threads, stages
    per_worker = max(1, c // k)
    costs, _ = harness.unit_costs(setup, per_worker)
    parts = partition.split(partition.best_balance(costs, k), len(costs))
    groups = harness.block_groups(setup)
    bp_costs = harness.backprop_costs(setup, per_worker, groups)
    bp_balance = partition.best_balance(bp_costs, k)  # groups per stage
    bp_parts = [[u for g in stage for u in groups[g]]
                for stage in partition.split(bp_balance, len(groups))]
    modes: dict[str, dict] = {}

    def run(name: str, fn, *args) -> None:
        progress(name)
        modes[name] = fn(*args)

    gpu = setup.device == "cuda"
    run("backprop", harness.sequential, setup, True, c)
    if not gpu:
        run("local_sequential_1thread", harness.sequential, setup, False, 1)
    run(f"local_sequential_{c}threads" if not gpu else "local_sequential", harness.sequential,
        setup, False, c)
    processes = not gpu or torch.cuda.device_count() >= k  # NCCL: one GPU per process
    if k > 1:
        run("local_pipelined_threads", harness.local_threads, setup, parts)
    if k > 1 and processes:
        run("local_pipelined_processes", harness.local_processes, setup, parts)
        for schedule in ("gpipe", "1f1b"):
            for m in microbatches:  # torch's 1F1B needs at least K micro-batches
                if m <= setup.cfg.batch_size and (schedule == "gpipe" or m >= k):
                    run(f"{schedule}_m{m}", harness.backprop_pipeline, setup, bp_parts,
                        schedule, m)
    if replicas > 1 and processes:
        run(REPLICAS_MODE, harness.local_processes, setup, parts, replicas)
        modes[REPLICAS_MODE].update(replicas=replicas, **oversubscription(c, k * replicas))
    batch = setup.cfg.batch_size
    ideal_local = batch / max(partition.stage_costs(costs, [len(p) for p in parts]))
    ideal_bp = batch / max(partition.stage_costs(bp_costs, bp_balance))
    for name, m in modes.items():
        m["largest_stage_live_bytes"] = max(s["live_bytes"] for s in m["stages"])
        m["total_live_bytes"] = sum(s["live_bytes"] for s in m["stages"])
        ideal = ideal_bp if name.startswith(("gpipe", "1f1b")) else ideal_local
        if ("pipelined" in name and name != REPLICAS_MODE) or name.startswith(("gpipe", "1f1b")):
            m["ideal_samples_per_s"] = ideal
            m["efficiency"] = m["samples_per_s"] / ideal
    out = {"stages": k, "threads_per_worker": per_worker, "partition": parts,
           "backprop_partition": bp_parts, "unit_step_s": costs, "backprop_groups": groups,
           "backprop_group_step_s": bp_costs, "modes": modes,
           "local_head_compute_ratio": sum(costs) / sum(bp_costs)}
    if k > 1:
        out["comparison"] = compare(modes, ideal_local, ideal_bp)
    if replicas > 1:
        out["replica_model"] = replica_model(setup, replicas, progress)
    return out


def oversubscription(threads: int, processes: int) -> dict:
    """How the thread budget covers ``processes`` processes, and whether the cores are
    oversubscribed (then the processes time-share cores and the mode cannot show scaling)."""
    cores = os.cpu_count() or 1
    return {"processes": processes, "threads_per_process": max(1, threads // processes),
            "cores": cores, "oversubscribed": processes > cores}


def replica_problem(batch_size: int, replicas: int) -> str | None:
    """Why ``batch_size`` cannot be shared by ``replicas`` (a run's own check), or None."""
    try:
        Config(batch_size=batch_size, replicas=replicas).validate()
    except ConfigError as exc:
        return str(exc)
    return None


def ring_seconds(nbytes: int, replicas: int, link: dict) -> float:
    """A ring all-reduce of ``nbytes`` over ``replicas``: 2(R-1)/R of the bytes through each
    link, and 2(R-1) steps of latency."""
    if replicas == 1:
        return 0.0
    return (2 * (replicas - 1) / replicas * nbytes / link["bytes_per_s"]
            + 2 * (replicas - 1) * link["latency_s"])


def fit_link(sizes: list[int], seconds: list[float]) -> dict:
    """Latency and bandwidth from all-reduces between 2 processes (a ring of 2: bytes / bandwidth
    + 2 latencies), by least squares."""
    n = len(sizes)
    mx, my = sum(sizes) / n, sum(seconds) / n
    slope = (sum((x - mx) * (y - my) for x, y in zip(sizes, seconds))
             / sum((x - mx) ** 2 for x in sizes))
    return {"link": "measured: gloo all-reduce between 2 processes on this machine (loopback), "
                    "fitted", "bytes_per_s": 1 / slope, "latency_s": max(0.0, my - slope * mx) / 2}


def replica_model(setup: harness.Setup, replicas: int, progress) -> dict:
    """Throughput at K = 4 and R = 1, 2, 4, 8 (and ``replicas``) on paper, not measured: B / the
    slowest stage's (step at batch B / R + its exposed exchange). Measured here: each unit's
    step at B / R (one thread, standing for a device per stage and replica), the bucket each
    unit's replicas sum, and gloo all-reduces between 2 processes, fitted as a link. A unit's
    exchange overlaps the next unit's forward; the stage's last unit's does not. The forward's
    share of a step is not measured, so each rate comes as a bound: every exchange but the last
    hidden (overlapped), and none hidden (not_overlapped)."""
    batch = setup.cfg.batch_size
    threads = max(1, setup.threads // MODEL_STAGES)
    steps, buckets = {}, []
    for r in sorted({*MODEL_REPLICAS, replicas}):
        if replica_problem(batch, r) is None:
            progress(f"model: unit steps at batch {batch // r}")
            steps[r], own = harness.unit_costs(setup, threads, r)
            buckets = own or buckets
    sizes = sorted(set(buckets) | {4 ** i for i in range(6, 13)})  # 4 KiB to 16 MiB besides
    progress("model: gloo all-reduce")
    seconds = harness.allreduce_seconds(setup, sizes, repeats=10)
    links = {"measured": fit_link(sizes, seconds), "assumed": ASSUMED_LINK}
    k = min(MODEL_STAGES, len(buckets))
    points = []
    for r, costs in steps.items():
        parts = partition.split(partition.best_balance(costs, k), len(costs))
        point = {"replicas": r, "replica_batch": batch // r, "partition": parts,
                 "stage_step_s": [sum(costs[u] for u in p) for p in parts],
                 "stage_bucket_bytes": [sum(buckets[u] for u in p) for p in parts]}
        for name, link in links.items():
            last = [ring_seconds(buckets[p[-1]], r, link) for p in parts]
            every = [sum(ring_seconds(buckets[u], r, link) for u in p) for p in parts]
            point[name] = {
                "stage_exchange_s": every, "stage_last_exchange_s": last,
                "samples_per_s": {
                    "overlapped": batch / max(map(sum, zip(point["stage_step_s"], last))),
                    "not_overlapped": batch / max(map(sum, zip(point["stage_step_s"], every)))}}
        points.append(point)
    for point in points:
        for name in links:
            base = points[0][name]["samples_per_s"]["overlapped"]
            point[name]["speedup_vs_r1"] = {how: v / base
                                            for how, v in point[name]["samples_per_s"].items()}
    return {"note": "a model on paper, not a measurement of scaling: measured unit steps and "
                    "gloo all-reduces on this machine, combined under the stated links",
            "stages": k, "global_batch": batch, "threads_per_stage": threads,
            "unit_bucket_bytes": buckets, "links": links,
            "allreduce_2_processes": [{"bytes": b, "seconds": t} for b, t in zip(sizes, seconds)],
            "points": points}


def compare(modes: dict, ideal_local: float, ideal_bp: float) -> dict:
    """The headline ratios, each split so a reader sees why one mode is ahead."""
    seq = modes.get("local_sequential_1thread", modes.get("local_sequential"))["samples_per_s"]
    local = max((n for n in ("local_pipelined_threads", "local_pipelined_processes")
                 if n in modes), key=lambda n: modes[n]["samples_per_s"])
    out = {"best_local_pipelined": local,
           "parallel_efficiency_vs_2x_sequential_1thread":
               modes[local]["samples_per_s"] / (len(modes[local]["stages"]) * seq),
           "efficiency_vs_ideal": modes[local]["efficiency"],
           "largest_stage_vs_backprop_peak": modes[local]["largest_stage_live_bytes"]
           / modes["backprop"]["largest_stage_live_bytes"]}
    for schedule in ("gpipe", "1f1b"):
        runs = {n: m for n, m in modes.items() if n.startswith(schedule)}
        if not runs:
            continue
        best = max(runs, key=lambda n: runs[n]["samples_per_s"])
        out[schedule] = {
            "best": best,
            "throughput_ratio": modes[local]["samples_per_s"] / runs[best]["samples_per_s"],
            # ratio = (ideal local / ideal backprop) x (local efficiency / pipeline efficiency)
            "compute_factor": ideal_local / ideal_bp,
            "efficiency_factor": modes[local]["efficiency"] / runs[best]["efficiency"],
            "largest_stage_memory_ratio": modes[local]["largest_stage_live_bytes"]
            / runs[best]["largest_stage_live_bytes"]}
    return out


def table(result: dict) -> str:
    rows = ["| mode | samples/s (min-max) | efficiency vs ideal | largest stage MiB | "
            "total MiB | time split per stage (busy/recv/send) |", "|---|---|---|---|---|---|"]
    for name, m in result["modes"].items():
        split = " ; ".join(f"{s['busy']:.2f}/{s['recv_wait']:.2f}/{s['send_wait']:.2f}"
                           for s in m["stages"] if "busy" in s) or "-"
        eff = f"{m['efficiency']:.2f}" if "efficiency" in m else "-"
        rows.append(f"| {name} | {m['samples_per_s']:.1f} ({m['min']:.1f}-{m['max']:.1f}) | "
                    f"{eff} | {m['largest_stage_live_bytes'] / MiB:.1f} | "
                    f"{m['total_live_bytes'] / MiB:.1f} | {split} |")
    rows += [f"\n{name}: {m['processes']} processes on {m['cores']} cores, "
             f"{m['threads_per_process']} thread(s) each: oversubscribed, the processes "
             f"time-share the cores (not a measure of scaling)"
             for name, m in result["modes"].items() if m.get("oversubscribed")]
    return "\n".join(rows)


def model_table(model: dict) -> str:
    """The model's rates at each R for both links: a bound with the exchanges overlapped (all
    but each stage's last unit's) and one with none overlapped."""
    rows = [f"Model on paper, not measured: K = {model['stages']}, global batch "
            f"{model['global_batch']}, unit steps measured at {model['threads_per_stage']} "
            f"thread(s) per stage",
            *(f"- {link['link']}: {link['bytes_per_s'] / 1e9:.3g} GB/s, "
              f"{link['latency_s'] * 1e6:.3g} us" for link in model["links"].values()),
            "", "| R | batch per replica | slowest stage step ms | largest stage bucket MiB | "
            + " | ".join(f"{n} samples/s (overlapped / not) | {n} speedup vs R=1"
                         for n in model["links"]) + " |",
            "|---|---|---|---|" + "---|---|" * len(model["links"])]
    for pt in model["points"]:
        cells = [f"{pt['replicas']}", f"{pt['replica_batch']}",
                 f"{max(pt['stage_step_s']) * 1e3:.2f}",
                 f"{max(pt['stage_bucket_bytes']) / MiB:.2f}"]
        for name in model["links"]:
            rate, up = pt[name]["samples_per_s"], pt[name]["speedup_vs_r1"]
            cells += [f"{rate['overlapped']:.0f} / {rate['not_overlapped']:.0f}",
                      f"{up['overlapped']:.2f} / {up['not_overlapped']:.2f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _pyplot():
    """matplotlib's pyplot for files, or None (with a note) when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    return plt


def plot(result: dict, path: Path) -> None:
    """Throughput of every mode (median, min-max over the repeats, the ideal rate of the
    pipelines) beside the live memory of each of its stages."""
    plt = _pyplot()
    if plt is None:
        return
    names = list(result["modes"])
    modes = [result["modes"][n] for n in names]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    rates = [m["samples_per_s"] for m in modes]
    spread = [[r - m["min"] for r, m in zip(rates, modes)],
              [m["max"] - r for r, m in zip(rates, modes)]]
    ax1.barh(names, rates, xerr=spread, capsize=3, color="tab:blue", label="median (min-max)")
    ideal = [(i, m["ideal_samples_per_s"]) for i, m in enumerate(modes)
             if "ideal_samples_per_s" in m]
    if ideal:
        ax1.scatter([v for _, v in ideal], [i for i, _ in ideal], marker="|", s=300, color="k",
                    zorder=3, label="ideal (slowest stage's solo rate)")
    ax1.set_xlabel("training samples/s")
    ax1.invert_yaxis()
    ax1.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    left = [0.0] * len(names)
    for s in range(max(len(m["stages"]) for m in modes)):
        width = [m["stages"][s]["live_bytes"] / MiB if s < len(m["stages"]) else 0
                 for m in modes]
        ax2.barh(names, width, left=left, label=f"stage {s}")
        left = [a + b for a, b in zip(left, width)]
    ax2.set_xlabel("live tensor MiB per stage")
    ax2.set_yticklabels([])
    ax2.invert_yaxis()
    ax2.legend(fontsize=8)
    fig.suptitle(result["title"])
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"plot: {path}")


def sweep(args, progress) -> dict:
    """Local sequential vs local pipelined (threads) and backprop over stages and batch sizes."""
    points = []
    for model in ("mlp", "vgg8b"):
        for batch in args.sweep_batches:
            cfg = model_config(args, model=model, batch_size=batch)
            setup = harness.Setup(cfg, args.threads, args.warmup, args.steps, args.repeats,
                                  args.device)
            costs = None
            for k in (1, 2, 4):
                progress(f"{model} batch {batch} stages {k}")
                if k == 1:
                    m = harness.sequential(setup, False, args.threads)
                    bp = harness.sequential(setup, True, args.threads)
                else:
                    costs = costs or harness.unit_costs(setup, max(1, args.threads // 2))[0]
                    k_eff = min(k, len(costs))
                    parts = partition.split(partition.best_balance(costs, k_eff), len(costs))
                    m = harness.local_threads(setup, parts)
                points.append({"model": model, "network": network(cfg), "batch_size": batch,
                               "stages": k, "samples_per_s": m["samples_per_s"],
                               "min": m["min"], "max": m["max"],
                               "largest_stage_live_bytes": max(s["live_bytes"]
                                                               for s in m["stages"]),
                               "backprop_samples_per_s": bp["samples_per_s"] if k == 1
                               else None})
    return {"points": points}


def plot_sweep(result: dict, path: Path) -> None:
    """Throughput (top) and the largest stage's live memory (bottom) against stages."""
    plt = _pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    for col, model in enumerate(("mlp", "vgg8b")):
        pts = [p for p in result["points"] if p["model"] == model]
        for batch in sorted({p["batch_size"] for p in pts}):
            row = sorted((p["stages"], p["samples_per_s"], p["largest_stage_live_bytes"],
                          p["min"], p["max"]) for p in pts if p["batch_size"] == batch)
            stages = [r[0] for r in row]
            axes[0][col].errorbar(stages, [r[1] for r in row], capsize=3, marker="o",
                                  yerr=[[r[1] - r[3] for r in row], [r[4] - r[1] for r in row]],
                                  label=f"batch {batch}")
            axes[1][col].plot(stages, [r[2] / MiB for r in row], marker="o",
                              label=f"batch {batch}")
        axes[0][col].set_title(pts[0]["network"] if pts else model)
        axes[0][col].set_ylabel("samples/s (median, min-max)")
        axes[1][col].set_ylabel("largest stage, live MiB")
        axes[1][col].set_xlabel("stages (threads, 1 process)")
        axes[1][col].set_xticks([1, 2, 4])
    # one legend below both columns, where it covers no line
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels))
    fig.suptitle(result["title"])
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"plot: {path}")


def network(cfg: Config) -> str:
    """The network in a few words, for titles and file names: what sizes it."""
    if cfg.model == "mlp":
        return f"mlp {cfg.num_layers}x{cfg.num_hidden}"
    if cfg.model in VIT_MODELS:
        patch = f"patch {patch_side(cfg, INFO[cfg.dataset].shape[1])}"
        if cfg.model == "vit":  # the generic one; the others have fixed sizes
            return (f"vit depth {cfg.num_layers} width {cfg.num_hidden} heads {cfg.num_heads} "
                    f"{patch}")
        return f"{cfg.model} {patch}"
    if cfg.model in WRN_MODELS:  # --feat-mult does not scale them
        return cfg.model
    return f"{cfg.model} x{cfg.feat_mult:g}{' pre-act' if cfg.pre_act else ''}"


def model_config(args, **override) -> Config:
    values = dict(model=args.model, dataset=args.dataset, feat_mult=args.feat_mult,
                  num_layers=args.num_layers, num_hidden=args.num_hidden,
                  num_heads=args.num_heads, patch_size=args.patch_size, pre_act=args.pre_act,
                  dim_in_decoder=args.dim_in_decoder, loss_sup=args.loss_sup, optim=args.optim,
                  batch_size=args.batch_size, nonlin="leakyrelu", save_dir="")
    values.update(override)
    if values["model"] == "mlp" and "num_layers" not in override and args.model != "mlp":
        values["num_layers"] = 3
    if values["model"] in VIT_MODELS:  # sized by width, heads and depth; a named one by its name
        sizes = ("num_layers", "num_hidden", "num_heads") if values["model"] != "vit" else ()
        for name in ("feat_mult", "nonlin", *sizes):
            del values[name]
    return Config(**values).validate()


def input_problem(args) -> str | None:
    """What makes this benchmark impossible, said as the trainer says it (its own checks on
    the network, the batch and the device), before anything runs; None when it can run."""
    for name in ("steps", "repeats", "warmup", "stages", "threads", "replicas"):
        if getattr(args, name) < 1:
            return f"--{name} must be at least 1, got {getattr(args, name)}"
    batches = args.sweep_batches if args.sweep else [args.batch_size]
    try:
        dev.choose(args.device)
        for batch in batches:
            cfg = model_config(args, batch_size=batch)
            network = network_of(cfg)
            partition.check_stages(len(network.names()), 4 if args.sweep else args.stages)
            check_trains(cfg, network)
    except (ConfigError, ValueError) as exc:
        return str(exc)
    if not args.sweep:  # the sweep runs no backprop pipeline
        setup = harness.Setup(cfg, args.threads, args.warmup, args.steps, args.repeats)
        if (most := len(harness.block_groups(setup))) < args.stages:
            return (f"--stages {args.stages}: the backprop pipelines cut {args.model} only "
                    f"between whole residual blocks, into at most {most} stages")
    for micro in args.microbatches:
        if not 1 <= micro <= min(batches):
            return (f"--microbatches {micro}: each must lie in 1..{min(batches)} (a "
                    f"micro-batch needs a sample of the batch)")
    return None


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="benchmarks/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vgg8b",
                   help="any network of the trainer's --model: mlp, the VGGs, the ResNets and "
                        "Wide ResNets, vit (sized by the options below), vit-tiny/-small/-base")
    p.add_argument("--dataset", default="MNIST", help="sets the input shape; data is random")
    p.add_argument("--feat-mult", type=float, default=0.5,
                   help="multiplies the VGGs' and ResNets' conv widths")
    p.add_argument("--num-layers", type=int, default=1,
                   help="hidden layers of the mlp, FC layers after a VGG's convs, a vit's depth")
    p.add_argument("--num-hidden", type=int, default=1024,
                   help="width of those layers; a vit's width")
    p.add_argument("--num-heads", type=int, default=4, help="attention heads of a vit")
    p.add_argument("--patch-size", type=int, default=0,
                   help="side of a ViT's patches; 0: the trainer's choice for the input (7 for "
                        "28x28, 4 for 32x32)")
    p.add_argument("--pre-act", action="store_true",
                   help="pre-activation Basic blocks (ResNet)")
    p.add_argument("--optim", default="adam",
                   help="every optimizer, as the trainer's --optim (adamw: as ViTs are trained)")
    p.add_argument("--dim-in-decoder", type=int, default=1024)
    p.add_argument("--loss-sup", default="predsim")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--replicas", type=int, default=1, metavar="R",
                   help="R > 1: also every stage R times (K·R processes) and the model on "
                        "paper of replicas at K = 4, R = 1, 2, 4, 8")
    p.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="the whole thread budget C shared by every mode")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true",
                   help="a small MLP and few batches: a smoke run of every mode")
    p.add_argument("--sweep", action="store_true", help="the scaling sweep instead")
    p.add_argument("--sweep-batches", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: backprop, local sequential and local stages on CUDA streams of "
                        "one GPU; the process modes when K GPUs are visible")
    p.add_argument("--out", default="runs/benchmarks", help="folder for JSON and PNG")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.num_layers, args.num_hidden, args.batch_size = "mlp", 3, 256, 64
        args.warmup, args.steps, args.repeats, args.microbatches = 2, 4, 2, [2, 4]
    if (problem := replica_problem(args.batch_size, args.replicas)) is not None:
        p.error(problem)
    if (problem := input_problem(args)) is not None:
        p.error(problem)
    from tqdm import tqdm

    bar = tqdm(desc="benchmark", bar_format="{desc}: {elapsed} {postfix}",
               disable=not sys.stderr.isatty())  # a log gets no lines joined by CRs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if args.sweep:
        result = sweep(args, lambda s: bar.set_postfix_str(s))
        name = f"sweep-{args.feat_mult}"
        networks = " and ".join(dict.fromkeys(p["network"] for p in result["points"]))
        result["title"] = (f"local learning on threads of one process: {networks}, "
                           f"{args.dataset} shape, C={args.threads} threads, {args.device}")
    else:
        cfg = model_config(args)
        setup = harness.Setup(cfg, args.threads, args.warmup, args.steps, args.repeats,
                              args.device)
        result = measure(setup, args.stages, args.microbatches, lambda s: bar.set_postfix_str(s),
                         args.replicas)
        replicas = f"-r{args.replicas}" if args.replicas > 1 else ""
        loss = "" if cfg.loss_sup == "predsim" else f"-{cfg.loss_sup}"  # the default unsaid
        name = (f"{network(cfg).replace(' ', '-')}{loss}-b{cfg.batch_size}-k{args.stages}"
                f"{replicas}")
        result["title"] = (f"{network(cfg)} {cfg.loss_sup}, {cfg.dataset} shape, batch "
                           f"{cfg.batch_size}, "
                           f"K={args.stages}{f', R={args.replicas}' if replicas else ''}, "
                           f"C={args.threads} threads, {args.device}: "
                           f"{args.repeats} repeats of {args.steps} batches")
        result["config"] = cfg.to_dict()
    bar.close()
    result.update(machine=harness.machine(), seconds=time.time() - started,
                  batches={"warmup": args.warmup, "per_timed_group": args.steps,
                           "timed_groups": args.repeats},
                  command=" ".join(["python", "benchmarks/run.py", *(argv or sys.argv[1:])]),
                  thread_budget=f"{args.threads} threads in total for every mode; "
                                f"K workers get {args.threads} // K each")
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"results: {path}")
    if args.sweep:
        plot_sweep(result, out / f"{name}.png")
    else:
        print(table(result))
        if "replica_model" in result:
            print(model_table(result["replica_model"]))
        if "comparison" in result:
            print(json.dumps(result["comparison"], indent=1))
        plot(result, out / f"{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
